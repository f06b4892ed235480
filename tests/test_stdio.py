"""`sidequest stdio --embedded` as an MCP client launches it: a real subprocess on a real data dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import agents_toml, wait_for
from mcp import Client, StdioServerParameters

import sidequest

pytestmark = pytest.mark.slow

REPO = Path(sidequest.__file__).resolve().parent.parent
PROJECT = "/projects/stdio-test"


def server_params(home: Path) -> StdioServerParameters:
    config = home / "test.toml"
    if not config.exists():
        config.write_text("shutdown_grace = 1\nlease_seconds = 5\n\n" + agents_toml(), encoding="utf-8")
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "sidequest.cli", "stdio", "--embedded"],
        env={
            "SIDEQUEST_HOME": str(home),
            "SIDEQUEST_CONFIG": str(config),
            "CLAUDE_PROJECT_DIR": PROJECT,
            "PYTHONPATH": str(REPO),
        },
        cwd=str(home),
    )


@asynccontextmanager
async def stdio_client(home: Path) -> AsyncIterator[Client]:
    async with Client(server_params(home)) as client:
        yield client


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text  # type: ignore[union-attr]
    return result.structured_content  # type: ignore[return-value]


async def wait_completed(client: Client, task_id: str, timeout: float = 15.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        task = (await call(client, "check_workflow_status", task_id=task_id))["task"]
        assert task["status"] not in ("failed", "cancelled"), task
        return task if task["status"] == "completed" else None

    return await wait_for(check, timeout=timeout, what=f"task {task_id} to complete")


def server_pids() -> list[int]:
    """Our own child processes running `sidequest.cli stdio` (the stdio client hides the pid)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"sidequest.cli" in cmdline and b"stdio" in cmdline:
            found.append(int(entry.name))
    return found


async def test_submit_complete_result_and_restart_keeps_tasks(tmp_path: Path) -> None:
    async with stdio_client(tmp_path) as client:
        assert client.server_info.name == "sidequest"
        submitted = await call(client, "task_async", agent_definition="echo", prompt="over stdio")
        task = await wait_completed(client, submitted["task_id"])
        assert task["scope"] == PROJECT
        page = await call(client, "get_task_result", task_id=submitted["task_id"])
        assert page["content"] == "over stdio"

    # A new process on the same data dir (the DuckDB lock is released, so the old one has exited).
    async with stdio_client(tmp_path) as client:
        task = (await call(client, "check_workflow_status", task_id=submitted["task_id"]))["task"]
        assert task["status"] == "completed"
        page = await call(client, "get_task_result", task_id=submitted["task_id"])
        assert page["content"] == "over stdio"
        history = await call(client, "get_workflow_history")
        assert [w["workflow_id"] for w in history["workflows"]] == [submitted["workflow_id"]]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the server pid through /proc")
async def test_kill_9_mid_task_is_retried_after_restart(tmp_path: Path) -> None:
    marks = tmp_path / "attempts.log"
    async with stdio_client(tmp_path) as client:
        submitted = await call(client, "task_async", agent_definition="record_and_sleep", prompt=f"{marks} 2")
        task_id = submitted["task_id"]

        async def first_attempt_started() -> bool:
            return marks.exists() and f"{task_id} 1" in marks.read_text()

        await wait_for(first_attempt_started, what="attempt 1 to start")
        (pid,) = server_pids()
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: _dead(pid), what=f"server {pid} to die")

    async with stdio_client(tmp_path) as client:
        task = await wait_completed(client, task_id)
        assert task["attempts"] == 2
        statuses = [a["status"] for a in task["attempt_history"]]
        assert statuses == ["lost", "completed"], task["attempt_history"]
        assert "lease lapsed" in task["attempt_history"][0]["error"]
    assert marks.read_text().split("\n")[:2] == [f"{task_id} 1", f"{task_id} 2"]


async def _dead(pid: int) -> bool:
    """Gone or a zombie: either way its DuckDB lock is released."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def test_sigterm_stops_even_while_the_client_keeps_stdin_open(tmp_path: Path) -> None:
    params = server_params(tmp_path)
    log = tmp_path / "stdio.log"
    with log.open("wb") as err:
        process = subprocess.Popen(
            [params.command, *params.args],
            env={**params.env, "PATH": os.environ.get("PATH", "")},  # type: ignore[dict-item]
            cwd=params.cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:

        async def serving() -> bool:
            assert process.poll() is None, log.read_text()
            return "serving MCP over stdio" in log.read_text()

        await wait_for(serving, timeout=20, what="the stdio server to start")
        process.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: process.wait(timeout=15)) == 0, log.read_text()
        assert process.stdout is not None and process.stdout.read() == b""  # nothing but protocol on stdout
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
