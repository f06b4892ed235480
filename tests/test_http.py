"""`sidequest serve` as a real process: token-protected streamable HTTP, /health, graceful SIGTERM."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from conftest import agents_toml, wait_for
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

import sidequest

pytestmark = pytest.mark.slow

REPO = Path(sidequest.__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    home: Path
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.home / "token").read_text().strip()

    def stop(self, timeout: float = 20) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_daemon(home: Path) -> Daemon:
    config = home / "test.toml"
    config.write_text("shutdown_grace = 1\n\n" + agents_toml(), encoding="utf-8")
    port = free_port()
    log = home / f"serve-{port}.log"
    env = {"SIDEQUEST_HOME": str(home), "SIDEQUEST_CONFIG": str(config), "PYTHONPATH": str(REPO), "PATH": ""}
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "sidequest.cli", "serve", "--port", str(port)],
            env=env,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    return Daemon(process, home, port, log)


async def wait_healthy(daemon: Daemon) -> dict[str, Any]:
    async def healthy() -> dict[str, Any] | None:
        assert daemon.process.poll() is None, daemon.log.read_text()
        try:
            async with httpx2.AsyncClient() as http:
                response = await http.get(f"{daemon.base}/health")
        except httpx2.TransportError:
            return None
        return response.json() if response.status_code == 200 else None

    return await wait_for(healthy, timeout=20, what="/health")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    running = start_daemon(tmp_path)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


async def test_health_and_mcp_over_http(daemon: Daemon) -> None:
    health = await wait_healthy(daemon)
    assert health == {"status": "ok", "version": sidequest.__version__, "pid": daemon.process.pid}

    token_file = daemon.home / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(daemon.token) >= 40

    async with create_mcp_http_client(headers={"Authorization": f"Bearer {daemon.token}"}) as http:
        for mode in ("auto", "legacy"):
            async with Client(
                streamable_http_client(f"{daemon.base}/mcp", http_client=http), mode=mode
            ) as client:
                result = await client.call_tool(
                    "task_async", {"agent_definition": "echo", "prompt": f"via {mode}"}
                )
                assert not result.is_error, result.content
                task_id = result.structured_content["task_id"]  # type: ignore[index]

                async def completed(client: Client = client, task_id: str = task_id) -> bool:
                    report = await client.call_tool("check_workflow_status", {"task_id": task_id})
                    return report.structured_content["task"]["status"] == "completed"  # type: ignore[index]

                await wait_for(completed, what=f"the {mode} task")
                page = await client.call_tool("get_task_result", {"task_id": task_id})
                assert page.structured_content["content"] == f"via {mode}"  # type: ignore[index]


async def test_mcp_needs_token_and_local_host(daemon: Daemon) -> None:
    await wait_healthy(daemon)
    url = f"{daemon.base}/mcp"
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with httpx2.AsyncClient() as http:
        assert (await http.post(url, json=body)).status_code == 401
        wrong = await http.post(url, json=body, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401
        assert (await http.get(f"{daemon.base}/anything-else")).status_code == 401

        rebinding = await http.post(
            url, json=body, headers={"Authorization": f"Bearer {daemon.token}", "Host": "evil.example:80"}
        )
        assert rebinding.status_code in (400, 403, 421), rebinding.text
        foreign_page = await http.post(
            url,
            json=body,
            headers={"Authorization": f"Bearer {daemon.token}", "Origin": "http://evil.example"},
        )
        assert foreign_page.status_code == 403, foreign_page.text


async def test_sigterm_stops_cleanly_and_token_is_reused(daemon: Daemon) -> None:
    await wait_healthy(daemon)
    token = daemon.token
    assert await anyio.to_thread.run_sync(daemon.stop) == 0, daemon.log.read_text()

    again = start_daemon(daemon.home)
    try:
        await wait_healthy(again)
        assert again.token == token
        assert again.stop() == 0, again.log.read_text()
    finally:
        if again.process.poll() is None:
            again.process.kill()
            again.process.wait()
