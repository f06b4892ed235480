"""Each task's run log, through the real surfaces: the MCP tool against an engine running the real
`anthropic` client and the fake Messages API, command agents' stderr, retries, the cap, REST paging
and the live event stream over a real HTTP server, `sidequest logs --follow` as a subprocess
against a real daemon, and retention deleting a purged task's entries."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx2
import pytest
from conftest import all_test_agents, wait_for
from mcp import Client
from test_rest import Live, live, read_events  # noqa: F401  (live: the fixture, a real uvicorn server)
from tools import call, call_error, submit, wait_status

import sidequest
from sidequest.config import AgentConfig, AnthropicConfig, Settings, TaskLogConfig
from sidequest.engine.engine import Engine
from sidequest.models import TaskLogPage, TaskOptions, TaskStatus
from sidequest.server.mcp import build_server
from sidequest.storage.duckdb import DuckDBStore
from sidequest.testing.fake_anthropic import FakeAnthropic, ToolUse, Usage, WebSearch

PY = sys.executable
GRUMBLE = (
    "import sys; print('first complaint', file=sys.stderr); print('second complaint', file=sys.stderr); "
    "print('ok')"
)
KITTEN_RESULTS = [
    ("Kitten sleep | Vet guide", "https://vets.example/kittens"),
    ("Why cats nap", "https://cats.example/naps"),
]
PLAIN = "---\nname: plain\ndescription: no tools\nmaxTurns: 2\n---\nBe brief.\n"
RESEARCHER = (
    "---\nname: researcher\ndescription: searches\ntools: WebSearch\nmodel: haiku\nmaxTurns: 3\n---\nCite.\n"
)


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    agents = root / ".claude" / "agents"
    agents.mkdir(parents=True)
    (agents / "researcher.md").write_text(RESEARCHER)
    (agents / "plain.md").write_text(PLAIN)
    return root


@pytest.fixture
def settings(tmp_path: Path, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ANTHROPIC_API_KEY", fake.api_key)
    agents = all_test_agents()
    agents["chatty"] = AgentConfig(callable="sidequest.testing.agents:chatty")
    agents["wait_for_file"] = AgentConfig(callable="sidequest.testing.agents:wait_for_file")
    agents["grumble"] = AgentConfig(executor="command", argv=[PY, "-c", GRUMBLE])
    agents["grumble_fails"] = AgentConfig(
        executor="command", argv=[PY, "-c", GRUMBLE.replace("print('ok')", "sys.exit(3)")]
    )
    return Settings(
        home=tmp_path / "home",
        agents=agents,
        user_agent_dir=tmp_path / "no-user-agents",
        anthropic=AnthropicConfig(base_url=fake.base_url, max_retry_after=1.0),
        lease_seconds=2.0,
        shutdown_grace=1.0,
    )


@pytest.fixture
async def client(engine: Engine, project: Path) -> AsyncIterator[Client]:
    async with Client(build_server(engine, str(project))) as c:
        yield c


async def log_of(client: Client, task_id: str, **paging: Any) -> dict[str, Any]:
    return await call(client, "get_task_log", task_id=task_id, **paging)


def kinds(page: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in page["events"]]


# ---- what gets logged --------------------------------------------------------------------------


async def test_anthropic_turn_is_logged_with_search_urls_text_and_usage(
    client: Client, fake: FakeAnthropic
) -> None:
    fake.on(
        "kittens",
        WebSearch("kitten sleep", results=KITTEN_RESULTS, text="They sleep a lot.", usage=Usage(1000, 200)),
    )
    task_id = (await submit(client, "researcher", "How long do kittens sleep?"))["task_id"]
    await wait_status(client, task_id, "completed")

    page = await log_of(client, task_id)
    assert page["status"] == "completed" and page["total"] == len(page["events"])
    assert [e["seq"] for e in page["events"]] == list(range(page["total"]))
    assert kinds(page)[0] == "attempt_started" and kinds(page)[-1] == "attempt_finished"
    by_kind = {e["kind"]: e for e in page["events"]}
    search = by_kind["tool_use"]
    assert search["data"]["tool"] == "web_search" and search["data"]["input"] == {"query": "kitten sleep"}
    found = by_kind["web_search"]
    assert [r["url"] for r in found["data"]["results"]] == [url for _, url in KITTEN_RESULTS]
    assert "https://vets.example/kittens" in found["message"]
    assert by_kind["text"]["message"] == "They sleep a lot."
    usage = by_kind["usage"]["data"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["model"]) == (1000, 200, "claude-haiku-5-5")
    assert by_kind["attempt_finished"]["data"]["status"] == "completed"
    assert all(e["attempt"] == 1 for e in page["events"])


async def test_a_local_tool_call_is_logged_with_its_input_before_the_task_fails(
    client: Client, fake: FakeAnthropic
) -> None:
    fake.on("read it", ToolUse("read_file", {"path": "notes.txt"}, text="Let me look."))
    task_id = (await submit(client, "plain", "read it"))["task_id"]
    await wait_status(client, task_id, "failed")

    events = (await log_of(client, task_id))["events"]
    [tool] = [e for e in events if e["kind"] == "tool_use"]
    assert tool["data"]["tool"] == "read_file" and tool["data"]["input"] == {"path": "notes.txt"}
    assert tool["message"] == 'read_file {"path": "notes.txt"}'
    finished = events[-1]
    assert finished["kind"] == "attempt_finished" and finished["data"]["status"] == "failed"
    assert "read_file" in finished["data"]["error"]


async def test_command_agent_stderr_lines_are_logged(client: Client) -> None:
    ok = (await submit(client, "grumble", "x"))["task_id"]
    failing = (await submit(client, "grumble_fails", "x", max_retries=0))["task_id"]
    await wait_status(client, ok, "completed")
    await wait_status(client, failing, "failed")

    for task_id in (ok, failing):
        events = (await log_of(client, task_id))["events"]
        assert [e["message"] for e in events if e["kind"] == "stderr"] == [
            "first complaint",
            "second complaint",
        ]
    last = (await log_of(client, failing))["events"][-1]
    assert last["kind"] == "attempt_finished" and "exited with status 3" in last["message"]


async def test_a_retry_is_logged_with_its_reason(client: Client) -> None:
    task_id = (await submit(client, "flaky", "succeed on 2", retry_backoff={"initial": 0.01}))["task_id"]
    await wait_status(client, task_id, "completed")

    events = (await log_of(client, task_id))["events"]
    assert [(e["kind"], e["attempt"]) for e in events] == [
        ("attempt_started", 1),
        ("attempt_finished", 1),
        ("retry_scheduled", 1),
        ("attempt_started", 2),
        ("attempt_finished", 2),
    ]
    retry = events[2]
    assert retry["data"]["reason"] == "RuntimeError: attempt 1 fails on purpose"
    assert "attempt 1 fails on purpose" in retry["message"] and retry["data"]["failures"] == 1


async def test_progress_and_entries_from_an_isolated_python_agent(client: Client) -> None:
    """`chatty` is a sync callable: it runs in a child process and its entries cross the pipe."""
    task_id = (await submit(client, "chatty", "3"))["task_id"]
    await wait_status(client, task_id, "completed")
    events = (await log_of(client, task_id))["events"]
    logged = [(e["message"], e["data"]) for e in events if e["kind"] == "log"]
    assert logged == [(f"entry {i + 1} of 3", {"i": i}) for i in range(3)]

    sleeper = (await submit(client, "sleep", "0.1"))["task_id"]
    await wait_status(client, sleeper, "completed")
    progress = [e["message"] for e in (await log_of(client, sleeper))["events"] if e["kind"] == "progress"]
    assert progress[0] == "0% step 1 of 10" and progress[-1] == "90% step 10 of 10"


async def test_the_log_is_cut_at_the_cap_with_one_marker(settings: Settings, project: Path) -> None:
    capped = settings.model_copy(update={"task_log": TaskLogConfig(max_events=10, max_event_chars=100)})
    engine = Engine(capped)
    async with engine.running():
        options = TaskOptions(scope=str(project))
        task_id = (await engine.submit("chatty", "50", options, project=str(project))).task_id
        await engine.wait_for_tasks([task_id], timeout=30)
        page = await engine.get_task_log(task_id, limit=1000)

    assert [e.kind for e in page.events] == ["attempt_started", *["log"] * 8, "log_cut", "attempt_finished"]
    cut = page.events[9]
    assert cut.seq == 9 and "log cut here" in cut.message and cut.data == {"max_events": 10}
    assert page.events[-1].data is not None and page.events[-1].data["status"] == "completed"
    assert page.events[-1].data["dropped_entries"] == 50 - 8  # the marker took the place of one
    assert page.total == 11 and page.next_offset is None


async def test_long_or_unstorable_entries_are_cut_not_fatal(settings: Settings, project: Path) -> None:
    """An entry is agent input: too long is cut, lone surrogates and NaN never reach the store
    (where they would fail the group commit, and with it the store)."""
    settings.agents["logs_badly"] = AgentConfig(callable="sidequest.testing.agents:logs_badly")
    small = settings.model_copy(update={"task_log": TaskLogConfig(max_event_chars=100)})
    engine = Engine(small)
    async with engine.running():
        options = TaskOptions(scope=str(project))
        task_id = (await engine.submit("logs_badly", "go", options, project=str(project))).task_id
        await engine.wait_for_tasks([task_id], timeout=10)
        later = (await engine.submit("echo", "still writing", options, project=str(project))).task_id
        await engine.wait_for_tasks([later], timeout=10)
        assert engine.failure is None
        assert (await engine.get_task(later)).status == TaskStatus.completed
        page = await engine.get_task_log(task_id)

    long, big = [e for e in page.events if e.kind == "text"]
    assert len(long.message) == 100 and long.message.endswith("…")
    assert long.data is not None and set(long.data) == {"unreadable"}
    assert big.data is not None and big.data["cut"] is True and len(big.data["json"]) == 100


async def test_a_task_run_again_after_a_restart_continues_its_log(
    settings: Settings, project: Path, tmp_path: Path
) -> None:
    """The next seq is read back from the store for a task this process did not start: no entry is
    overwritten or repeated, and the interrupted attempt stays in the log."""
    gate = tmp_path / "gate"
    options = TaskOptions(scope=str(project))
    engine = Engine(settings)
    async with engine.running():
        task_id = (await engine.submit("wait_for_file", str(gate), options, project=str(project))).task_id

        async def waiting() -> bool:
            return any(e.kind == "progress" for e in (await engine.get_task_log(task_id)).events)

        await wait_for(waiting, what="the task to wait at its gate")
    # shutdown_grace passed: the attempt was interrupted and the task put back in the queue
    gate.touch()
    engine = Engine(settings)
    async with engine.running():
        await engine.wait_for_tasks([task_id], timeout=20)
        page = await engine.get_task_log(task_id)

    assert [e.seq for e in page.events] == list(range(page.total))
    assert [(e.kind, e.data and e.data.get("status")) for e in page.events] == [
        ("attempt_started", None),
        ("progress", None),
        ("attempt_finished", "interrupted"),
        ("attempt_started", None),
        ("progress", None),
        ("progress", None),
        ("attempt_finished", "completed"),
    ]


async def test_deeply_nested_data_is_kept_as_text_and_the_log_stays_readable(client: Client) -> None:
    task_id = (await submit(client, "logs_deeply", "go"))["task_id"]
    await wait_status(client, task_id, "completed")
    page = await call(client, "get_task_log", task_id=task_id)  # what the MCP tool and REST serialise
    deep = next(e for e in page["events"] if e["message"] == "deep input")
    assert deep["data"]["cut"] is True and deep["data"]["json"].startswith('{"input": [[[[')
    assert any(e["message"] == "after the deep one" for e in page["events"])
    TaskLogPage.model_validate_json(json.dumps(page))  # and what a client (CLI, stdio front) reads


async def test_cancels_are_logged_whether_the_task_ran_or_not(
    settings: Settings, project: Path, tmp_path: Path
) -> None:
    options = TaskOptions(scope=str(project))
    engine = Engine(settings)
    async with engine.running():
        queued = (
            await engine.submit(
                "sleep", "30", TaskOptions(scope=str(project), delay=60), project=str(project)
            )
        ).task_id
        running = (await engine.submit("sleep", "30", options, project=str(project))).task_id
        await wait_for(lambda: _kinds(engine, running, "attempt_started"), what="the sleeper to start")
        await engine.cancel(task_id=running)
        await engine.cancel(task_id=queued)
        await engine.wait_for_tasks([running, queued], mode="all", timeout=10)

        async def ended() -> bool:
            return bool(await _kinds(engine, running, "attempt_finished"))

        await wait_for(ended, what="the cancelled attempt to end")
        ran = [(e.kind, e.data and e.data.get("status")) for e in (await engine.get_task_log(running)).events]
        assert ran[0] == ("attempt_started", None)
        assert ran[-2:] == [("cancelled", None), ("attempt_finished", "cancelled")]
        assert [e.kind for e in (await engine.get_task_log(queued)).events] == ["cancelled"]
    # a task loaded at start that never ran here: its cancel continues its log, it does not restart it
    engine = Engine(settings)
    async with engine.running():
        again = (
            await engine.submit(
                "sleep", "30", TaskOptions(scope=str(project), delay=60), project=str(project)
            )
        ).task_id
    engine = Engine(settings)
    async with engine.running():
        await engine.cancel(task_id=again)
        assert [e.kind for e in (await engine.get_task_log(again)).events] == ["cancelled"]


async def _kinds(engine: Engine, task_id: str, kind: str) -> list[str]:
    return [e.kind for e in (await engine.get_task_log(task_id)).events if e.kind == kind]


async def test_unknown_task_and_bad_paging_are_refused(client: Client) -> None:
    assert "unknown task_id 't_nope'" in await call_error(client, "get_task_log", task_id="t_nope")
    task_id = (await submit(client, "echo", "x"))["task_id"]
    assert "limit" in await call_error(client, "get_task_log", task_id=task_id, limit=0)
    assert "offset" in await call_error(client, "get_task_log", task_id=task_id, offset=-1)


async def test_the_daemon_log_has_one_line_per_attempt_start_and_finish(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidequest.engine.attempts")
    task_id = (await submit(client, "echo", "hello"))["task_id"]
    await wait_status(client, task_id, "completed")
    lines = [r.getMessage() for r in caplog.records if task_id in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0] == f"task {task_id} started: agent echo, attempt 1"
    assert lines[1].startswith(f"task {task_id} finished: completed after ")
    assert lines[1].endswith("s (agent echo, attempt 1)")


# ---- REST and the event stream -----------------------------------------------------------------


def test_rest_pages_the_log_by_offset(live: Live) -> None:  # noqa: F811
    with httpx2.Client(base_url=live.base, timeout=10) as http:
        created = http.post("/tasks", json={"agent_definition": "chatty", "prompt": "7"})
        assert created.status_code == 201, created.text
        task_id = created.json()["task_id"]
        waited = http.post("/wait", json={"task_ids": [task_id], "timeout": 20})
        assert waited.json()["tasks"][0]["status"] == "completed", waited.text

        first = TaskLogPage.model_validate(http.get(f"/tasks/{task_id}/events", params={"limit": 4}).json())
        assert first.total == 9 and [e.seq for e in first.events] == [0, 1, 2, 3] and first.next_offset == 4
        rest = http.get(f"/tasks/{task_id}/events", params={"offset": 4, "limit": 100}).json()
        second = TaskLogPage.model_validate(rest)
        assert [e.seq for e in second.events] == [4, 5, 6, 7, 8] and second.next_offset is None
        assert second.status == TaskStatus.completed

        bad = http.get(f"/tasks/{task_id}/events", params={"limit": 1001})
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"
        missing = http.get("/tasks/t_missing/events")
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"


async def test_the_event_stream_carries_a_tasks_new_entries_live(live: Live, tmp_path: Path) -> None:  # noqa: F811
    gate = tmp_path / "gate"
    async with httpx2.AsyncClient(base_url=live.base, timeout=10) as http:
        created = await http.post("/tasks", json={"agent_definition": "wait_for_file", "prompt": str(gate)})
        task_id = created.json()["task_id"]
        async with http.stream("GET", "/events", params={"task_id": task_id}) as response:
            events = read_events(response)
            assert (await anext(events))[0] == "hello"
            seen: list[dict[str, Any]] = []
            while not any(e["message"] == "0% waiting for gate" for e in seen):
                event, data = await anext(events)
                if event == "task_log":
                    seen.append(data)
            gate.touch()
            while seen[-1]["kind"] != "attempt_finished":
                event, data = await anext(events)
                if event == "task_log":
                    assert data["task_id"] == task_id
                    seen.append(data)
        stored = (await http.get(f"/tasks/{task_id}/events")).json()["events"]
    # Every entry arrived live, once, in order, as stored (a stream opened after the first entries
    # would start later: read /tasks/{id}/events first, then follow).
    assert [{k: v for k, v in e.items() if k != "task_id"} for e in seen] == stored[-len(seen) :]
    assert seen[-1]["data"]["status"] == "completed"


# ---- retention -----------------------------------------------------------------------------------


async def test_gc_deletes_a_purged_tasks_entries(settings: Settings, project: Path) -> None:
    engine = Engine(settings)
    async with engine.running():
        options = TaskOptions(scope=str(project))
        old = (await engine.submit("chatty", "5", options, project=str(project))).task_id
        kept = (await engine.submit("chatty", "2", options, project=str(project))).task_id
        await engine.wait_for_tasks([old, kept], mode="all", timeout=30)
        old_entries = (await engine.get_task_log(old)).total
        kept_entries = (await engine.get_task_log(kept)).total

    store = DuckDBStore(settings.database_path)
    store.open()
    try:
        task = await store.get_task(old)
        assert task is not None and task.finished_at is not None
        store.update_task(replace(task, finished_at=task.finished_at - timedelta(days=40)))
        await store.flush()
    finally:
        store.close()

    engine = Engine(settings.model_copy(update={"retention": None}))
    async with engine.running():
        dry = await engine.gc(older_than=30 * 86400, dry_run=True)
        report = await engine.gc(older_than=30 * 86400)
        assert (await engine.get_task_log(kept)).total == kept_entries
    assert dry.deleted.events == report.deleted.events == old_entries == 7
    with duckdb.connect(str(settings.database_path), read_only=True) as con:
        rows = dict(con.execute("SELECT task_id, count(*) FROM task_events GROUP BY task_id").fetchall())
    assert rows == {kept: kept_entries}


# ---- the CLI against a real daemon ---------------------------------------------------------------


@pytest.fixture
def daemon_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A data dir and config for `python -m sidequest.cli` processes; the daemon they start is
    stopped (and killed if it will not stop) at the end."""
    home = tmp_path / "cli-home"
    home.mkdir()
    config = tmp_path / "cli.toml"
    config.write_text(
        'shutdown_grace = 1\n\n[agents.wait_for_file]\nexecutor = "python"\n'
        'callable = "sidequest.testing.agents:wait_for_file"\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDEQUEST_", "ANTHROPIC_", "CLAUDE_"))}
    env.update(
        SIDEQUEST_HOME=str(home),
        SIDEQUEST_CONFIG=str(config),
        SIDEQUEST_USER_AGENT_DIR=str(tmp_path / "no-user-agents"),
        PYTHONPATH=str(Path(sidequest.__file__).resolve().parent.parent),
        NO_COLOR="1",
        CLAUDE_PROJECT_DIR=str(tmp_path),
    )
    try:
        yield env
    finally:
        pid = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = int(json.loads((home / "daemon.json").read_text())["pid"])
        subprocess.run(
            [PY, "-m", "sidequest.cli", "stop"], env=env, capture_output=True, timeout=60, check=False
        )
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def sidequest_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [PY, "-m", "sidequest.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class Lines:
    """A process's stdout line by line as it comes, failing at a deadline (never hanging the suite).
    Reads the raw pipe: a buffered reader could hold a line the selector no longer reports."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self.fd = process.stdout.fileno()
        self.buffer = b""
        self.closed = False

    def next(self, deadline: float) -> str | None:
        """The next whole line, or None once the stream ended."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.fd, selectors.EVENT_READ)
            while b"\n" not in self.buffer and not self.closed:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no line from `sidequest logs --follow` (so far {self.buffer!r})")
                if selector.select(timeout=0.5):
                    chunk = os.read(self.fd, 65536)
                    self.closed = not chunk
                    self.buffer += chunk
        if b"\n" not in self.buffer:
            return None
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


@pytest.mark.slow
def test_cli_logs_follow_prints_a_running_task_to_its_end(daemon_env: dict[str, str], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    submitted = json.loads(sidequest_cli(daemon_env, "submit", "wait_for_file", str(gate), "--json"))
    task_id = submitted["task_id"]
    follow = subprocess.Popen(
        [PY, "-m", "sidequest.cli", "logs", task_id, "--follow"],
        env=daemon_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        reader, lines = Lines(follow), []
        while not lines or "waiting for gate" not in lines[-1]:
            line = reader.next(deadline)
            assert line is not None, f"it stopped while the task was still running: {lines}"
            lines.append(line)
        assert follow.poll() is None, "it stopped while the task was still running"
        gate.touch()
        while (line := reader.next(deadline)) is not None:
            lines.append(line)
        assert follow.wait(timeout=60) == 0
    finally:
        if follow.poll() is None:
            follow.kill()
    kinds_seen = [line.split()[1] for line in lines]
    assert kinds_seen == ["attempt_started", "progress", "progress", "attempt_finished"], lines
    assert lines[0].split()[0].endswith("Z") and "attempt 1 started (wait_for_file)" in lines[0]
    assert "attempt 1 completed after" in lines[-1]

    as_json = TaskLogPage.model_validate_json(sidequest_cli(daemon_env, "logs", task_id, "--json"))
    assert [e.kind for e in as_json.events] == kinds_seen and as_json.status == TaskStatus.completed
    plain = sidequest_cli(daemon_env, "logs", task_id)
    assert plain.splitlines() == lines
