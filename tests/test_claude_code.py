"""The `claude-code` executor end to end: MCP tools → engine → the real bundled Claude Code CLI → fake API.

Nothing here is mocked but the Anthropic API: the CLI bundled with
claude-agent-sdk runs for real, in a temporary HOME and config dir, and talks
HTTP to `FakeAnthropic`, which scripts the model's side (text, tool calls,
errors) and records what the CLI sent.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_for
from mcp import Client
from tools import call, submit

from sidequest.agents import load_agent_file
from sidequest.config import AnthropicConfig, ClaudeCodeConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.executors.base import PermanentError, TaskContext
from sidequest.executors.claude_code import ClaudeCodeExecutor
from sidequest.executors.sandbox import child_env, end_process_tree, resolve_workdir
from sidequest.server.mcp import build_server
from sidequest.testing.fake_anthropic import Error, FakeAnthropic, Text, ToolUse

pytestmark = pytest.mark.slow

WAIT = 30.0
"""Patience for one CLI run (each takes about a second against the fake)."""

CODER = """\
---
name: coder
description: Edits files in the project.
tools: Write, Bash
model: haiku
maxTurns: 6
sidequest:
  executor: claude-code
---
You are CODER-BODY-MARKER, a careful coder.
"""

SLEEPER = "import time; time.sleep(300)"


# ---- fixtures ------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    agents = root / ".claude" / "agents"
    agents.mkdir(parents=True)
    (agents / "coder.md").write_text(CODER, encoding="utf-8")
    return root


def make_settings(tmp_path: Path, fake: FakeAnthropic, **overrides: Any) -> Settings:
    """The CLI gets its own HOME and config dir, and talks only to the fake."""
    cli_home = tmp_path / "cli-home"
    (cli_home / ".claude").mkdir(parents=True, exist_ok=True)
    quiet = {k: v for k, v in fake.env().items() if not k.startswith("ANTHROPIC_")}
    env = {"HOME": str(cli_home), "CLAUDE_CONFIG_DIR": str(cli_home / ".claude"), **quiet}
    return Settings(
        home=tmp_path / "home",
        user_agent_dir=tmp_path / "user-agents",
        lease_seconds=2.0,
        shutdown_grace=1.0,
        anthropic=AnthropicConfig(base_url=fake.base_url),
        claude_code=ClaudeCodeConfig(env=env),
        **overrides,
    )


@pytest.fixture
def settings(tmp_path: Path, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ANTHROPIC_API_KEY", fake.api_key)
    return make_settings(tmp_path, fake)


@asynccontextmanager
async def serve(settings: Settings, project: Path) -> AsyncIterator[Client]:
    """A real engine and MCP server whose client connected from `project`."""
    engine = Engine(settings)
    async with engine.running(), Client(build_server(engine, str(project))) as client:
        yield client


@pytest.fixture
async def client(settings: Settings, project: Path) -> AsyncIterator[Client]:
    async with serve(settings, project) as c:
        yield c


async def finished(client: Client, task_id: str, expected: str) -> dict[str, Any]:
    """Wait for the task to finish, then check it finished as `expected` (showing its error if not)."""

    async def done() -> dict[str, Any] | None:
        task = await status(client, task_id)
        return task if task["status"] in ("completed", "failed", "cancelled") else None

    task = await wait_for(done, timeout=WAIT, what=f"task {task_id} to finish")
    assert task["status"] == expected, task.get("error") or task
    return task


async def status(client: Client, task_id: str) -> dict[str, Any]:
    return (await call(client, "check_workflow_status", task_id=task_id))["task"]


async def result_text(client: Client, task_id: str) -> str:
    return (await call(client, "get_task_result", task_id=task_id))["content"]


def processes_with(marker: str) -> list[psutil.Process]:
    """Live processes whose command line mentions `marker` (zombies count as gone)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(marker in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cli_of(proc: psutil.Process) -> psutil.Process:
    """The Claude Code CLI that (indirectly) started `proc`."""
    for parent in proc.parents():
        if parent.name() == "claude":
            return parent
    raise AssertionError(f"no claude process above {proc.pid}: {[p.name() for p in proc.parents()]}")


# ---- runs ----------------------------------------------------------------------


async def test_task_completes_with_the_reply_and_reports_session_and_usage(
    client: Client, fake: FakeAnthropic
) -> None:
    fake.on("say hello", Text("Hello from the fake model."))
    task_id = (await submit(client, "coder", "say hello"))["task_id"]
    task = await finished(client, task_id, "completed")
    assert await result_text(client, task_id) == "Hello from the fake model."
    assert task["session_id"]
    report = await status(client, task_id)
    usage = report["usage"]
    assert usage["models"] == ["claude-haiku-5-5"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["cost_usd"] > 0
    request = fake.message_requests[-1]
    assert request.model == "claude-haiku-5-5"  # `model: haiku`, mapped through [models]
    assert "CODER-BODY-MARKER" in request.system_text  # the agent body, appended to Claude Code's prompt
    assert request.headers["x-api-key"] == fake.api_key
    assert sorted(set(request.tool_names) & {"Bash", "Read", "Write", "Edit"}) == ["Bash", "Write"]


async def test_tools_from_the_agent_file_run_in_the_project(
    client: Client, fake: FakeAnthropic, project: Path
) -> None:
    fake.on(
        "write the files",
        [
            ToolUse("Write", {"file_path": str(project / "hello.txt"), "content": "hi there\n"}),
            ToolUse("Bash", {"command": "pwd > where.txt", "description": "note the directory"}),
            Text("Both files written."),
        ],
    )
    task_id = (await submit(client, "coder", "write the files"))["task_id"]
    await finished(client, task_id, "completed")
    assert await result_text(client, task_id) == "Both files written."
    assert (project / "hello.txt").read_text() == "hi there\n"
    assert (project / "where.txt").read_text().strip() == os.path.realpath(project)
    results = [r.tool_results for r in fake.message_requests if r.tool_results]
    assert len(results) == 2 and not any(block.get("is_error") for blocks in results for block in blocks)
    report = await status(client, task_id)
    assert report["progress"]["message"] == "turn 3: Both files written."
    # the session's messages are in the run log, in order: start, each tool call and its result, end
    log = await call(client, "get_task_log", task_id=task_id, limit=200)
    kinds = [(e["kind"], e["message"]) for e in log["events"]]
    session = [k for k, _ in kinds if k in ("session_message", "tool_use", "tool_result", "text")]
    assert session[0] == "session_message" and session[-1] == "session_message"
    tools = [m for k, m in kinds if k == "tool_use"]
    assert [m.split()[0] for m in tools] == ["Write", "Bash"] and "hello.txt" in tools[0]
    assert sum(k == "tool_result" for k, _ in kinds) == 2
    assert ("text", "Both files written.") in kinds
    assert kinds[-1][0] == "attempt_finished"


async def test_resume_task_id_continues_the_first_tasks_conversation(
    client: Client, fake: FakeAnthropic, settings: Settings
) -> None:
    fake.on("remember the word", Text("I will remember PINEAPPLE."))
    fake.on("which word", Text("The word was PINEAPPLE."))
    first = (await submit(client, "coder", "remember the word PINEAPPLE"))["task_id"]
    first_task = await finished(client, first, "completed")

    second = (await submit(client, "coder", "which word did I say?", resume_task_id=first))["task_id"]
    second_task = await finished(client, second, "completed")
    request = fake.message_requests[-1]
    assert request.prompt_text == "which word did I say?"
    assert "remember the word PINEAPPLE" in request.conversation_text
    assert "I will remember PINEAPPLE." in request.conversation_text
    assert second_task["session_id"] and second_task["session_id"] != first_task["session_id"]  # forked
    assert await result_text(client, second) == "The word was PINEAPPLE."
    # The CLI's total for a resumed session includes the first task's spend; only this run's is recorded.
    usage = (await status(client, second))["usage"]
    price = settings.price("claude-haiku-5-5")
    assert price is not None
    tokens = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    assert usage["cost_usd"] == pytest.approx(price.cost(*(usage[key] for key in tokens)))


async def test_a_failed_tasks_session_can_still_be_resumed(client: Client, fake: FakeAnthropic) -> None:
    refuse = Error(400, "refused before any session work")
    fake.on("first", refuse, match=lambda request: "again" not in request.prompt_text)
    first = (await submit(client, "coder", "first", max_retries=0))["task_id"]
    first_task = await finished(client, first, "failed")
    assert first_task["session_id"]  # saved from the CLI's init message, before the API answered
    second = (await submit(client, "coder", "again", resume_task_id=first))["task_id"]
    await finished(client, second, "completed")
    assert "first" in fake.message_requests[-1].conversation_text


async def test_resuming_a_session_that_is_gone_fails_and_says_why(
    client: Client, fake: FakeAnthropic, project: Path
) -> None:
    first = (await submit(client, "coder", "hello"))["task_id"]
    await finished(client, first, "completed")
    shutil.rmtree(project.parent / "cli-home" / ".claude" / "projects")  # the CLI's session files
    second = (await submit(client, "coder", "again", resume_task_id=first))["task_id"]
    task = await finished(client, second, "failed")
    assert "no session" in task["error"] and first in task["error"] and "CLAUDE_CONFIG_DIR" in task["error"]
    assert task["attempts"] == 1


async def test_retry_whose_session_never_reached_disk_starts_afresh(
    settings: Settings, fake: FakeAnthropic, project: Path
) -> None:
    """An attempt can die after the CLI announced its session but before writing it: start a new one."""
    executor = ClaudeCodeExecutor(load_agent_file(project / ".claude" / "agents" / "coder.md"), settings)
    saved: list[str | None] = []
    lost = str(uuid.uuid4())  # what attempt 1 saved before dying
    ctx = TaskContext(
        task_id="t_retry",
        workflow_id="w_retry",
        agent="coder",
        attempt=2,
        scope=str(project),
        metadata={},
        _on_progress=lambda percent, message: None,
        _on_usage=lambda usage: None,
        session_id=lost,
        _on_state=lambda session_id, batch_id: saved.append(session_id),
        _workdir_roots=lambda: [os.path.realpath(project)],
    )
    result = await executor.run("hello again", ctx)
    assert result.content == "fake reply: hello again"
    assert saved and saved[-1] != lost and ctx.session_id == saved[-1]  # the new session replaces it


async def test_spending_cap_stops_the_session(client: Client, fake: FakeAnthropic) -> None:
    fake.on("spend", ToolUse("Bash", {"command": "echo more", "description": "loop"}))
    task_id = (await submit(client, "coder", "spend a lot", max_budget_usd=0.0001))["task_id"]
    task = await finished(client, task_id, "failed")
    assert "spending cap of $0.0001" in task["error"] and "max_budget_usd" in task["error"]
    assert task["attempts"] == 1
    assert (await status(client, task_id))["usage"]["cost_usd"] > 0  # what it spent is still recorded


# ---- stopping ------------------------------------------------------------------


async def start_sleeping_task(client: Client, fake: FakeAnthropic, **options: Any) -> tuple[str, str]:
    """A task whose Bash tool runs a long sleeper, plus a background one; returns (task id, marker)."""
    marker = f"sq-marker-{uuid.uuid4().hex[:12]}"
    command = (
        f"{sys.executable} -c '{SLEEPER}' {marker}-bg & {sys.executable} -c '{SLEEPER}' {marker}-fg; wait"
    )
    fake.on(marker, [ToolUse("Bash", {"command": command, "description": "wait", "timeout": 600000})])
    task_id = (await submit(client, "coder", f"run the sleeper {marker}", **options))["task_id"]

    async def sleeping() -> list[psutil.Process] | None:
        procs = processes_with(marker)
        names = " ".join(" ".join(p.info["cmdline"]) for p in procs)
        return procs if f"{marker}-fg" in names and f"{marker}-bg" in names else None

    await wait_for(sleeping, timeout=WAIT, what="the Bash tool to start both sleepers")
    return task_id, marker


async def assert_tree_ends(marker: str, cli_pid: int, within: float) -> None:
    started = time.monotonic()

    async def gone() -> bool:
        return not processes_with(marker) and not alive(cli_pid)

    await wait_for(gone, timeout=10, what="the CLI and every process it started to end")
    assert time.monotonic() - started < within, "the tree should end at once, not after the SDK's 5 s grace"


async def test_cancel_ends_the_cli_and_every_process_its_tools_started(
    client: Client, fake: FakeAnthropic
) -> None:
    task_id, marker = await start_sleeping_task(client, fake)
    procs = processes_with(marker)
    cli = cli_of(procs[0])
    result = await call(client, "cancel_task", task_id=task_id)
    assert result["cancelled"] == [task_id]
    await assert_tree_ends(marker, cli.pid, within=4.5)
    report = await status(client, task_id)
    assert report["status"] == "cancelled"


async def test_timeout_ends_the_process_tree_and_fails_the_task(client: Client, fake: FakeAnthropic) -> None:
    task_id, marker = await start_sleeping_task(client, fake, timeout=4, max_retries=0)
    cli = cli_of(processes_with(marker)[0])
    task = await finished(client, task_id, "failed")
    assert "timed out after 4s" in task["error"]
    await assert_tree_ends(marker, cli.pid, within=3)


async def test_server_shutdown_ends_the_process_tree(
    settings: Settings, fake: FakeAnthropic, project: Path
) -> None:
    async with serve(settings, project) as client:
        task_id, marker = await start_sleeping_task(client, fake)
        cli = cli_of(processes_with(marker)[0])
    assert not processes_with(marker) and not alive(cli.pid)  # gone by the time the server has stopped
    async with serve(settings, project) as client:  # and the task went back to the queue, to continue
        report = await status(client, task_id)
        assert report["session_id"] and report["attempt_history"][0]["status"] == "interrupted"
        await call(client, "cancel_task", task_id=task_id)
    assert not processes_with(marker)


async def test_end_process_tree_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    """The SIGKILL fallback: a grandchild that ignores SIGTERM still ends after the grace period."""
    ready = tmp_path / "ready"
    code = (
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(300)"
    )
    parent = psutil.Popen(["/bin/sh", "-c", f'{sys.executable} -c "{code}" {ready} & wait'])
    try:

        async def started() -> bool:
            return ready.exists()

        await wait_for(started, timeout=10, what="the stubborn grandchild to ignore SIGTERM")
        stubborn = [p for p in parent.children(recursive=True) if str(ready) in " ".join(p.cmdline())]
        assert len(stubborn) == 1
        killed = await end_process_tree(parent.pid, grace=0.5)
        assert killed == [stubborn[0].pid]  # it needed SIGKILL; the shell went on SIGTERM
        assert not alive(stubborn[0].pid)
    finally:
        parent.kill()
        parent.wait()


# ---- refusals and failures -----------------------------------------------------


async def test_missing_api_key_fails_at_once_naming_the_variable(
    client: Client, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    submitted = await submit(client, "coder", "hello")
    assert any("ANTHROPIC_API_KEY" in w for w in submitted["warnings"])
    task = await finished(client, submitted["task_id"], "failed")
    assert "ANTHROPIC_API_KEY" in task["error"]
    assert task["attempts"] == 1
    assert fake.requests == []


async def test_cwd_outside_the_allowed_roots_is_refused(
    client: Client, fake: FakeAnthropic, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    submitted = await submit(client, "coder", "hello", cwd=str(outside))
    assert any("allowed_roots" in w for w in submitted["warnings"])
    task = await finished(client, submitted["task_id"], "failed")
    assert str(outside) in task["error"] and "allowed_roots" in task["error"]
    assert task["attempts"] == 1
    assert fake.requests == []


async def test_cwd_in_an_allowed_root_is_used(
    tmp_path: Path, fake: FakeAnthropic, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", fake.api_key)
    outside = tmp_path / "elsewhere"
    (outside / "sub").mkdir(parents=True)
    settings = make_settings(tmp_path, fake, allowed_roots=[outside])
    fake.on("where", [ToolUse("Bash", {"command": "pwd > where.txt"}), Text("noted")])
    async with serve(settings, project) as client:
        task_id = (await submit(client, "coder", "where am I", cwd=str(outside / "sub")))["task_id"]
        await finished(client, task_id, "completed")
    assert (outside / "sub" / "where.txt").read_text().strip() == os.path.realpath(outside / "sub")


async def test_api_error_fails_the_task_with_the_apis_message(client: Client, fake: FakeAnthropic) -> None:
    fake.on("break please", Error(400, "the fake refuses this request"))
    task_id = (await submit(client, "coder", "break please"))["task_id"]
    task = await finished(client, task_id, "failed")
    assert "400" in task["error"] and "the fake refuses this request" in task["error"]
    assert task["attempts"] == 1  # a 4xx does not get better by retrying


async def test_overload_is_retried_by_the_engine(client: Client, fake: FakeAnthropic) -> None:
    # The CLI tries twice itself (CLAUDE_CODE_MAX_RETRIES=1), then the engine's retry gets the answer.
    fake.on("busy", [Error(529), Error(529), Text("finally through")])
    task_id = (await submit(client, "coder", "busy day", retry_backoff={"initial": 0.1}))["task_id"]
    task = await finished(client, task_id, "completed")
    assert task["attempts"] == 2
    assert await result_text(client, task_id) == "finally through"
    history = (await call(client, "check_workflow_status", task_id=task_id))["task"]["attempt_history"]
    assert "529" in history[0]["error"]


async def test_max_turns_fails_with_a_clear_message(
    client: Client, fake: FakeAnthropic, project: Path
) -> None:
    text = CODER.replace("name: coder", "name: looper").replace("maxTurns: 6", "maxTurns: 2")
    (project / ".claude" / "agents" / "looper.md").write_text(text, encoding="utf-8")
    fake.on("loop forever", ToolUse("Bash", {"command": "echo again", "description": "loop"}))
    task_id = (await submit(client, "looper", "loop forever"))["task_id"]
    task = await finished(client, task_id, "failed")
    assert "maxTurns" in task["error"] and "2 turns" in task["error"]
    assert task["attempts"] == 1


async def test_the_cli_and_its_tools_see_only_allowed_variables(
    client: Client, fake: FakeAnthropic, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDEQUEST_TEST_SECRET", "hunter2-do-not-leak")
    monkeypatch.setenv("CLAUDE_CODE_ENTRYPOINT", "cli")  # as when Claude Code started the sidequest server
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(project.parent / "the-users-real-config"))
    fake.on("show env", [ToolUse("Bash", {"command": "env > env.txt"}), Text("done")])
    task_id = (await submit(client, "coder", "show env"))["task_id"]
    await finished(client, task_id, "completed")
    env = (project / "env.txt").read_text()
    assert "SIDEQUEST_TEST_SECRET" not in env  # removed, not just emptied
    assert f"HOME={project.parent / 'cli-home'}" in env.splitlines()  # fixed values win over the server's
    assert "PATH=" in env  # on the default allowlist
    assert "CLAUDE_CODE_ENTRYPOINT=sdk-py" in env.splitlines()  # the SDK's own value survives
    assert f"CLAUDE_CONFIG_DIR={project.parent / 'cli-home' / '.claude'}" in env.splitlines()


# ---- the sandbox helpers -------------------------------------------------------


def test_workdir_defaults_to_the_scope_and_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    assert resolve_workdir(None, str(tmp_path), [tmp_path]) == Path(os.path.realpath(tmp_path))
    assert resolve_workdir("sub", str(tmp_path), [tmp_path]) == Path(os.path.realpath(tmp_path / "sub"))


@pytest.mark.parametrize("requested", ["..", "link", "/"])
def test_workdir_escaping_the_scope_is_refused(tmp_path: Path, requested: str) -> None:
    scope = tmp_path / "scope"
    scope.mkdir()
    (scope / "link").symlink_to(tmp_path)
    with pytest.raises(PermanentError, match="allowed_roots"):
        resolve_workdir(requested, str(scope), [scope])


def test_untrusted_scope_is_not_a_root(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="none: the scope is not a project a client runs in"):
        resolve_workdir(None, str(tmp_path), [])


def test_child_env_is_the_allowlist_plus_fixed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQ_ALLOWED", "yes")
    monkeypatch.setenv("SQ_SECRET", "no")
    env = child_env(["SQ_ALLOWED", "SQ_UNSET"], {"SQ_FIXED": "1"})
    assert env == {"SQ_ALLOWED": "yes", "SQ_FIXED": "1"}
