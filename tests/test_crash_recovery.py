"""A python agent that kills the daemon it runs in (in-process, the default for python agents).

What users rely on: such an agent cannot take the daemon down forever (it is failed as
"poisonous" after `max_lost_attempts` deaths, however fast it kills the process), and tasks that
merely ran beside it are re-run to completion without their retries being spent.

Everything is real: `sidequest serve` daemons on a tmp data dir, restarted the way users and
clients restart them (`sidequest serve --detach`, or the daemon client's `DaemonLocator` as the
stdio front and the CLI use it), REST in between, the DuckDB file read after the daemon stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import duckdb
import httpx2
import psutil
import pytest
from conftest import wait_for

import sidequest
from sidequest.config import load_settings
from sidequest.engine.errors import Unavailable
from sidequest.models import TaskInfo, TaskOptions
from sidequest.server.client import DaemonClient
from sidequest.server.daemon import DaemonLocator, daemon_alive, read_state

pytestmark = pytest.mark.slow

REPO = Path(sidequest.__file__).resolve().parent.parent
MAX_LOST = 3
"""max_lost_attempts, left at its default."""

CRASH = "sidequest.testing.crash_agents"
AGENTS = {
    "exit_at_once": f"{CRASH}:exit_at_once",
    "exit_after_half_a_second": f"{CRASH}:exit_after_half_a_second",
    "exit_on_first_attempt": f"{CRASH}:exit_on_first_attempt",
    "sleep_then_ok": f"{CRASH}:sleep_then_ok",
    "echo": "sidequest.testing.agents:echo",
}


def write_config(home: Path) -> Path:
    """The data dir's own sidequest.toml, as a user would write it. `isolation = "inline"`: these
    agents run in the daemon's own process, so a crash takes the daemon down (the case under test)."""
    config = home / "sidequest.toml"
    agents = "".join(
        f'[agents.{name}]\nexecutor = "python"\ncallable = "{target}"\nisolation = "inline"\n\n'
        for name, target in AGENTS.items()
    )
    config.write_text("max_concurrency = 4\nshutdown_grace = 1\n\n" + agents, encoding="utf-8")
    return config


def daemon_pids(home: Path) -> list[int]:
    """Every `sidequest serve` process of this data dir."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            cmdline = proc.info["cmdline"] or []
            if "serve" in cmdline and proc.environ().get("SIDEQUEST_HOME") == str(home):
                found.append(proc.pid)
    return found


@contextmanager
def data_dir(tmp_path: Path, configure: Callable[[Path], object]) -> Iterator[Path]:
    """A configured data dir; every daemon started on it is killed at the end."""
    home = tmp_path / "home"
    home.mkdir()
    configure(home)
    try:
        yield home
    finally:
        for pid in daemon_pids(home):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    with data_dir(tmp_path, write_config) as home:
        yield home


@asynccontextmanager
async def client_of(home: Path, project: Path) -> AsyncIterator[DaemonClient]:
    """The client the stdio front and CLI use: it finds the data dir's daemon, starts one when none
    answers, and sends a call once more when the daemon went away under it."""
    config = home / "sidequest.toml"
    settings = load_settings(config, env={"SIDEQUEST_HOME": str(home)})
    async with DaemonClient(DaemonLocator(settings, config), str(project)) as client:
        yield client


async def wait_task(client: DaemonClient, task_id: str, *statuses: str, timeout: float = 30) -> TaskInfo:
    """Poll until the task reaches one of `statuses`. A call that meets a dying daemon fails with
    Unavailable (the crash agent killed the one the client just started); the next call starts
    another, as the next call of a real client would."""

    async def check() -> TaskInfo | None:
        try:
            task = await client.get_task(task_id)
        except Unavailable:
            return None
        return task if task.status in statuses else None

    return await wait_for(check, timeout=timeout, interval=0.1, what=f"task {task_id} to be {statuses}")


async def wait_daemon_dead(home: Path) -> None:
    async def dead() -> bool:
        return not daemon_alive(home)

    await wait_for(dead, timeout=15, what="the daemon to die")


def stored_counts(home: Path, task_id: str) -> tuple[str, int, int, int]:
    """(status, attempts, failures, lost_attempts) as the DuckDB file holds them; no daemon may run."""
    assert not daemon_alive(home)
    con = duckdb.connect(str(home / "sidequest.duckdb"), read_only=True)
    try:
        row = con.execute(
            "SELECT status, attempts, failures, lost_attempts FROM task_executions WHERE id = ?", [task_id]
        ).fetchone()
    finally:
        con.close()
    assert row is not None, task_id
    return row[0], row[1], row[2], row[3]


def sidequest_env(home: Path) -> dict[str, str]:
    """What a user's shell passes: the data dir, and nothing that names another config."""
    return {"SIDEQUEST_HOME": str(home), "PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")}


async def sidequest_cli(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(60):
        return await anyio.run_process(
            [sys.executable, "-m", "sidequest.cli", *args],
            env=sidequest_env(home),
            cwd=home,
            check=False,
            stdin=subprocess.DEVNULL,
        )


async def api(home: Path, project: Path, method: str, path: str, **kwargs: Any) -> Any:
    """One REST call to the daemon now serving, never starting one: each death stays visible."""
    state = read_state(home)
    assert state is not None, "no daemon serves"
    headers = {"Authorization": f"Bearer {state.token}", "X-Sidequest-Project": str(project)}
    async with httpx2.AsyncClient(timeout=10, trust_env=False) as http:
        response = await http.request(method, state.url + "/api/v1" + path, headers=headers, **kwargs)
    assert response.status_code < 300, response.text
    return response.json()


async def test_an_agent_that_kills_the_daemon_at_once_is_failed_as_poisonous_after_three_deaths(
    home: Path, tmp_path: Path
) -> None:
    started = await sidequest_cli(home, "serve", "--detach")
    assert started.returncode == 0, started.stderr
    # The delay lets the submit's reply out before the agent kills the process.
    body = {"agent_definition": "exit_at_once", "prompt": "boom", "options": {"delay": 0.3, "max_retries": 5}}
    task_id = (await api(home, tmp_path, "POST", "/tasks", json=body))["task_id"]
    await wait_daemon_dead(home)
    # The process died before the attempt's `running` mark reached the database: the case that
    # used to go uncounted, so that every restart ran the task again and died again.
    status, attempts, _, lost = stored_counts(home, task_id)
    assert (status, attempts, lost) == ("queued", 0, 0), "the crash was not as fast as this test needs"

    deaths = 1
    while True:
        assert deaths <= MAX_LOST, f"the daemon died {deaths} times: the poisonous task was not stopped"
        restart = await sidequest_cli(home, "serve", "--detach")  # as a user or a client would
        if restart.returncode != 0:  # the new daemon died while starting
            assert b"status 137" in restart.stderr, restart.stderr
            deaths += 1
            continue

        async def verdict() -> dict[str, Any] | str | None:
            if not daemon_alive(home):
                return "died"
            try:
                task = await api(home, tmp_path, "GET", f"/tasks/{task_id}")
            except httpx2.TransportError:
                return None  # dying right now: the next look says so
            return task if task["status"] in ("failed", "completed") else None

        found = await wait_for(verdict, timeout=15, what="the task to finish or the daemon to die")
        if found == "died":
            deaths += 1
            continue
        break

    assert deaths == MAX_LOST
    assert isinstance(found, dict)
    assert found["status"] == "failed"
    assert "poisonous" in found["error"] and f"{MAX_LOST} times" in found["error"], found["error"]
    assert found["attempts"] == MAX_LOST
    assert [a["status"] for a in found["attempt_history"]] == ["lost"] * MAX_LOST
    notes = (await api(home, tmp_path, "GET", "/notifications"))["notifications"]
    assert any(
        n["task_id"] == task_id and n["kind"] == "task_failed" and "poisonous" in n["message"] for n in notes
    )

    # The daemon that failed it keeps serving.
    pid = read_state(home).pid  # type: ignore[union-attr]
    echo = await api(home, tmp_path, "POST", "/tasks", json={"agent_definition": "echo", "prompt": "hi"})

    async def echoed() -> bool:
        return (await api(home, tmp_path, "GET", f"/tasks/{echo['task_id']}"))["status"] == "completed"

    await wait_for(echoed, timeout=10, what="a normal task to complete")
    assert read_state(home).pid == pid  # type: ignore[union-attr]


async def test_bystanders_of_a_crash_are_rerun_to_completion_without_spending_retries(
    home: Path, tmp_path: Path
) -> None:
    no_retries = TaskOptions(max_retries=0)
    async with client_of(home, tmp_path) as client:
        bystanders = [(await client.submit("sleep_then_ok", "1.5", no_retries)).task_id for _ in range(3)]
        crasher = (await client.submit("exit_after_half_a_second", "boom", no_retries)).task_id
        await wait_daemon_dead(home)

        # Each call below that finds no daemon starts one, as a client does.
        for task_id in bystanders:
            done = await wait_task(client, task_id, "completed", "failed", timeout=40)
            assert done.status == "completed", done.error
            history = [a.status for a in done.attempt_history or []]
            assert history == ["lost", "completed"], history  # running when the daemon died, once
            assert (await client.get_result(task_id)).content == "ok"

        poisonous = await wait_task(client, crasher, "failed", "completed", timeout=40)
        assert poisonous.status == "failed"
        assert poisonous.error is not None
        assert "poisonous" in poisonous.error and f"{MAX_LOST} times" in poisonous.error, poisonous.error
        assert [a.status for a in poisonous.attempt_history or []] == ["lost"] * MAX_LOST

    stopped = await sidequest_cli(home, "stop")
    assert stopped.returncode == 0, stopped.stderr
    for task_id in bystanders:
        # (status, attempts, failures, lost_attempts): the death is counted, but not as a failure
        assert stored_counts(home, task_id) == ("completed", 2, 0, 1)


async def test_a_lost_attempt_does_not_use_up_max_retries(home: Path, tmp_path: Path) -> None:
    async with client_of(home, tmp_path) as client:
        options = TaskOptions(delay=0.3, max_retries=0)
        task_id = (await client.submit("exit_on_first_attempt", "x", options)).task_id
        await wait_daemon_dead(home)
        done = await wait_task(client, task_id, "completed", "failed", timeout=30)
        assert done.status == "completed", done.error
        assert [a.status for a in done.attempt_history or []] == ["lost", "completed"]
        assert (await client.get_result(task_id)).content == "ok on attempt 2"
        # the run log says so too, where the first attempt's entries end
        log = await client.get_task_log(task_id)
        finished = [
            (e.attempt, e.data and e.data.get("status")) for e in log.events if e.kind == "attempt_finished"
        ]
        assert finished == [(1, "lost"), (2, "completed")]
        assert [e.seq for e in log.events] == list(range(log.total))
