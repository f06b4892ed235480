"""Idempotency keys on a real daemon: the same key returns the earlier task, finished or not,
after a daemon restart too, and for `idempotency_window` after the task finished; and the daemon
client's own key turns its resend of a submit whose reply was lost into one task, not two.

Everything is real: `sidequest serve` daemons started by the daemon client (`DaemonLocator`), REST,
the DuckDB file, an agent with a side effect (a line appended to a file).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx2
import pytest
from conftest import wait_for
from test_crash_recovery import client_of, data_dir, wait_daemon_dead

from sidequest.config import load_settings
from sidequest.models import TaskInfo, TaskOptions
from sidequest.server.client import IDEMPOTENCY_PREFIX, DaemonClient, Endpoint
from sidequest.server.daemon import DaemonLocator, read_state

pytestmark = pytest.mark.slow

AGENTS = {
    "echo": "sidequest.testing.agents:echo",
    "record": "sidequest.testing.agents:record_and_sleep",  # prompt: "FILE SECONDS"
    "sleep_then_ok": "sidequest.testing.crash_agents:sleep_then_ok",
}


def write_config(home: Path, extra: str = "") -> None:
    agents = "".join(
        f'[agents.{name}]\nexecutor = "python"\ncallable = "{target}"\n\n' for name, target in AGENTS.items()
    )
    (home / "sidequest.toml").write_text(f"shutdown_grace = 1\n{extra}\n\n{agents}", encoding="utf-8")


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    with data_dir(tmp_path, write_config) as home:
        yield home


async def wait_done(client: DaemonClient, task_id: str, timeout: float = 20) -> TaskInfo:
    async def check() -> TaskInfo | None:
        task = await client.get_task(task_id)
        return task if task.status in ("completed", "failed", "cancelled") else None

    task = await wait_for(check, timeout=timeout, what=f"task {task_id} to finish")
    assert task.status == "completed", task.error
    return task


def side_effects(path: Path) -> list[str]:
    """Lines the record agent appended: one per attempt that ran."""
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


async def rest_submit(home: Path, project: Path, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST /api/v1/tasks to the daemon now serving, as any REST client (or the front) sends it."""
    state = read_state(home)
    assert state is not None, "no daemon serves"
    headers = {"Authorization": f"Bearer {state.token}", "X-Sidequest-Project": str(project)}
    async with httpx2.AsyncClient(timeout=10, trust_env=False) as http:
        response = await http.post(state.url + "/api/v1/tasks", json=body, headers=headers)
    assert response.status_code in (200, 201), response.text
    return response.status_code, response.json()


async def test_a_key_returns_its_finished_task_also_after_the_daemon_was_killed(
    home: Path, tmp_path: Path
) -> None:
    keyed = TaskOptions(idempotency_key="nightly-report-2026-12-05")
    async with client_of(home, tmp_path) as client:
        first = await client.submit("echo", "the report", keyed)
        assert first.deduplicated is False
        await wait_done(client, first.task_id)

        again = await client.submit("echo", "the report, sent twice", keyed)
        assert (again.task_id, again.deduplicated, again.status) == (first.task_id, True, "completed")
        other = await client.submit("echo", "another", TaskOptions(idempotency_key="another-key"))
        assert other.task_id != first.task_id and other.deduplicated is False
        await wait_done(client, other.task_id)

        state = read_state(home)
        assert state is not None
        os.kill(state.pid, signal.SIGKILL)
        await wait_daemon_dead(home)

        after = await client.submit("echo", "the report, after a crash", keyed)  # starts a new daemon
        assert read_state(home).pid != state.pid  # type: ignore[union-attr]
        assert (after.task_id, after.deduplicated, after.status) == (first.task_id, True, "completed")
        assert (await client.get_result(first.task_id)).content == "the report"  # the first prompt ran
        history = await client.workflow_history(all_scopes=True)
        assert history.total == 2


async def test_a_key_holds_while_its_task_runs_and_for_the_window_after_it_finished(
    home: Path, tmp_path: Path
) -> None:
    window = 2.0
    write_config(home, f'idempotency_window = "{window:g}s"')
    keyed = TaskOptions(idempotency_key="k")
    async with client_of(home, tmp_path) as client:
        first = await client.submit("sleep_then_ok", "2.5", keyed)
        await anyio.sleep(window + 0.2)  # it has run longer than the window: the key still holds
        running = await client.submit("sleep_then_ok", "2.5", keyed)
        assert (running.task_id, running.deduplicated) == (first.task_id, True)

        done = await wait_done(client, first.task_id)
        assert done.finished_at is not None
        inside = await client.submit("sleep_then_ok", "0", keyed)
        assert (inside.task_id, inside.deduplicated, inside.status) == (first.task_id, True, "completed")

        await anyio.sleep(max(0.0, done.finished_at.timestamp() + window + 0.3 - time.time()))
        fresh = await client.submit("sleep_then_ok", "0", keyed)
        assert fresh.task_id != first.task_id and fresh.deduplicated is False
        repeat = await client.submit("sleep_then_ok", "0", keyed)
        assert (repeat.task_id, repeat.deduplicated) == (fresh.task_id, True)


async def test_the_fronts_key_sent_twice_after_the_task_finished_makes_one_task_and_one_side_effect(
    home: Path, tmp_path: Path
) -> None:
    """What the front's resend looks like to the daemon: the same request, with the key the front
    made up, arriving again after the first one's task already ran."""
    effects = tmp_path / "effects.txt"
    body = {
        "agent_definition": "record",
        "prompt": f"{effects} 0",
        "options": {"idempotency_key": IDEMPOTENCY_PREFIX + "one-call", "max_retries": 0},
    }
    async with client_of(home, tmp_path) as client:
        await client.connect()  # starts the daemon
        code, first = await rest_submit(home, tmp_path, body)
        assert code == 201 and first["deduplicated"] is False
        await wait_done(client, first["task_id"])

        code, resent = await rest_submit(home, tmp_path, body)
        assert code == 200
        assert (resent["task_id"], resent["deduplicated"], resent["status"]) == (
            first["task_id"],
            True,
            "completed",
        )
        # The daemon client says "not deduplicated" for its own keys: the caller made one call.
        via_client = await client.submit(
            "record", f"{effects} 0", TaskOptions.model_validate(body["options"])
        )
        assert (via_client.task_id, via_client.deduplicated) == (first["task_id"], False)

        assert (await client.workflow_history(all_scopes=True)).total == 1
    assert side_effects(effects) == [f"{first['task_id']} 1"]


class ReplyDroppingRelay:
    """A TCP relay in front of the daemon. The first connection's request reaches the daemon, which
    commits the task and answers; the relay waits until that task has finished, then closes the
    connection without passing the answer on: a reply lost after the write (the daemon died, the
    network failed). Later connections are relayed both ways."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.connections = 0
        self.dropped: dict[str, Any] | None = None
        self.port = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._relay)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        drop = self.connections == 1
        state = read_state(self.home)
        assert state is not None
        async with (
            client,
            await anyio.connect_tcp("127.0.0.1", state.port) as upstream,
            anyio.create_task_group() as tg,
        ):

            async def pump(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
                with suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    async for chunk in source:
                        await sink.send(chunk)
                tg.cancel_scope.cancel()

            tg.start_soon(pump, client, upstream)
            if not drop:
                tg.start_soon(pump, upstream, client)
                return
            with anyio.fail_after(20):
                self.dropped = await self._read_reply(upstream)
                await self._until_finished(state.url, state.token, self.dropped["task_id"])
            tg.cancel_scope.cancel()  # and the client gets nothing back

    @staticmethod
    async def _read_reply(upstream: anyio.abc.SocketStream) -> dict[str, Any]:
        data = b""
        while True:
            data += await upstream.receive()
            head, _, body = data.partition(b"\r\n\r\n")
            try:
                reply = json.loads(body)
            except ValueError:
                continue  # not all of it yet
            assert head.startswith(b"HTTP/1.1 201"), head
            return reply

    @staticmethod
    async def _until_finished(url: str, token: str, task_id: str) -> None:
        async with httpx2.AsyncClient(timeout=5, trust_env=False) as http:
            while True:
                response = await http.get(
                    f"{url}/api/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {token}"}
                )
                if response.json()["status"] == "completed":
                    return
                await anyio.sleep(0.05)


async def test_a_submit_whose_reply_was_lost_is_sent_again_and_makes_one_task(
    home: Path, tmp_path: Path
) -> None:
    """The daemon client resends a call whose connection dropped; with the key it adds to every
    submit, the caller's one call makes one task and runs the agent once."""
    effects = tmp_path / "effects.txt"
    relay = ReplyDroppingRelay(home)
    config = home / "sidequest.toml"
    locator = DaemonLocator(load_settings(config, env={"SIDEQUEST_HOME": str(home)}), config)

    async def through_relay(start: bool) -> Endpoint:
        """The real locator (finds or starts the daemon), pointed at the relay."""
        return replace(await locator(start), url=f"http://127.0.0.1:{relay.port}")

    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve)
        async with DaemonClient(through_relay, str(tmp_path)) as client:
            submitted = await client.submit("record", f"{effects} 0", TaskOptions(max_retries=0))
            assert relay.connections == 2, "the first reply was not dropped, or not resent"
            assert relay.dropped is not None and relay.dropped["task_id"] == submitted.task_id
            assert submitted.deduplicated is False  # to its caller, the one task it asked for
            assert (await client.get_task(submitted.task_id)).status == "completed"
            assert (await client.workflow_history(all_scopes=True)).total == 1
        tg.cancel_scope.cancel()
    assert side_effects(effects) == [f"{submitted.task_id} 1"]
