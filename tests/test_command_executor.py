"""The `command` executor with real subprocesses: argv, cwd, env, output, exits, progress, kills.

Phase 1 drives CommandExecutor directly with a TaskContext built the way the
engine builds one; the end-to-end tests at the bottom go through the engine
and the MCP tools.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import wait_for
from mcp import Client

from sidequest.config import AgentConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.executors.base import ExecutionResult, PermanentError, TaskContext
from sidequest.executors.command import CommandExecutor, parse_progress
from sidequest.server.mcp import build_server

pytestmark = pytest.mark.slow

PY = sys.executable
SH = "/bin/sh"
ENV = shutil.which("env") or "/usr/bin/env"
PRINT_ARGS = "import json, sys; print(json.dumps(sys.argv[1:]))"
PRINT_CWD = "import os; print(os.getcwd())"


# ---- helpers -------------------------------------------------------------------


def workdir_roots(scope: str, allowed: list[Path], project_scope: bool) -> list[str]:
    """What the engine computes: the scope counts only when a client connected from it."""
    roots = [os.path.realpath(root) for root in allowed]
    if project_scope and os.path.isabs(scope) and os.path.isdir(scope):
        roots.insert(0, os.path.realpath(scope))
    return roots


class Run:
    """One executor plus the context it runs with, collecting the progress it reports."""

    def __init__(
        self,
        tmp_path: Path,
        argv: list[str],
        scope: Path | str | None = None,
        options: dict[str, Any] | None = None,
        allowed_roots: list[Path] | None = None,
        project_scope: bool = True,
        **config: Any,
    ) -> None:
        self.scope = str(scope if scope is not None else project(tmp_path))
        self.progress: list[tuple[float | None, str | None]] = []
        settings = Settings(home=tmp_path / "home", allowed_roots=allowed_roots or [])
        self.executor = CommandExecutor("cmd", AgentConfig(executor="command", argv=argv, **config), settings)
        self.ctx = TaskContext(
            task_id="t_test1",
            workflow_id="w_test1",
            agent="cmd",
            attempt=2,
            scope=self.scope,
            metadata={},
            _on_progress=lambda p, m: self.progress.append((p, m)),
            _on_usage=lambda u: None,
            options=dict(options or {}),
            _workdir_roots=lambda: workdir_roots(self.scope, allowed_roots or [], project_scope),
        )

    async def __call__(self, prompt: str = "the prompt", limit: float = 30.0) -> str:
        with anyio.fail_after(limit):
            result = await self.executor.run(prompt, self.ctx)
        assert isinstance(result, ExecutionResult)
        assert result.content_type == "text"
        return result.content


def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir(exist_ok=True)
    return path


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def is_gone(pid: int) -> bool:
    """Dead or a zombie: an orphan's zombie may wait for a PID 1 that never reaps (containers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0]
    except OSError:
        return True
    return state == b"Z"


async def wait_gone(pids: list[int], timeout: float = 5.0) -> None:
    async def check() -> bool:
        return all(is_gone(pid) for pid in pids)

    await wait_for(check, timeout=timeout, what=f"processes {pids} to be gone")


async def read_pids(path: Path, count: int, timeout: float = 10.0) -> list[int]:
    async def check() -> list[int] | None:
        if not path.exists():
            return None
        pids = [int(p) for p in path.read_text().split()]
        return pids if len(pids) >= count else None

    return await wait_for(check, timeout=timeout, what=f"{count} pids in {path}")


def kill_leftovers(pids: list[int]) -> None:
    """A failing test must not leave sleepers behind."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def spawner(pid_file: Path, extra: str = "") -> list[str]:
    """A shell that starts two grandchildren, writes all three pids, and waits."""
    script = (
        f"{extra}"
        f'echo $$ > "{pid_file}.tmp"; '
        "sleep 100 & echo $! >> " + f'"{pid_file}.tmp"; '
        "sleep 100 & echo $! >> " + f'"{pid_file}.tmp"; '
        f'mv "{pid_file}.tmp" "{pid_file}"; '
        "wait"
    )
    return [SH, "-c", script]


# ---- argv and the prompt -------------------------------------------------------

HOSTILE = [
    "$(rm -rf /)",
    "; echo hi",
    "{other}",
    "`id` && echo $HOME",
    "a'b\"c\\d",
    "{prompt}",
    "-rf",
    "日本語 \t\n x",
]


@pytest.mark.parametrize("prompt", HOSTILE)
async def test_prompt_is_one_literal_argument(tmp_path: Path, prompt: str) -> None:
    run = Run(tmp_path, [PY, "-c", PRINT_ARGS, "{prompt}", "pre-{prompt}-post", "{other}", "{ prompt }"])
    args = json.loads(await run(prompt))
    assert args == [prompt, f"pre-{prompt}-post", "{other}", "{ prompt }"]


async def test_prompt_with_nul_is_refused(tmp_path: Path) -> None:
    run = Run(tmp_path, [PY, "-c", PRINT_ARGS, "{prompt}"])
    with pytest.raises(PermanentError, match="NUL"):
        await run("a\0b")


async def test_nul_in_prompt_is_fine_on_stdin(tmp_path: Path) -> None:
    code = "import sys; print(repr(sys.stdin.read()))"
    assert await Run(tmp_path, py(code), stdin_prompt=True)("a\0b") == "'a\\x00b'\n"


async def test_lone_surrogate_is_replaced_not_fatal(tmp_path: Path) -> None:
    run = Run(tmp_path, [PY, "-c", PRINT_ARGS, "{prompt}"])
    assert json.loads(await run("x\ud800y")) == ["x?y"]


async def test_stdin_is_devnull_unless_stdin_prompt(tmp_path: Path) -> None:
    code = "import sys; data = sys.stdin.read(); print(repr(data))"
    assert await Run(tmp_path, py(code))("hello") == "''\n"
    assert await Run(tmp_path, py(code), stdin_prompt=True)("hello {x} $(y)") == "'hello {x} $(y)'\n"


async def test_big_stdin_prompt_the_program_never_reads(tmp_path: Path) -> None:
    run = Run(tmp_path, [SH, "-c", "echo done"], stdin_prompt=True)
    assert await run("p" * 2_000_000) == "done\n"


async def test_too_long_argument_is_permanent_and_says_why(tmp_path: Path) -> None:
    run = Run(tmp_path, [PY, "-c", PRINT_ARGS, "{prompt}"])
    with pytest.raises(PermanentError, match="stdin_prompt"):
        await run("p" * 1_000_000)


# ---- working directory ---------------------------------------------------------


async def test_cwd_defaults_to_scope(tmp_path: Path) -> None:
    run = Run(tmp_path, py(PRINT_CWD))
    assert await run() == os.path.realpath(project(tmp_path)) + "\n"


async def test_config_cwd_relative_to_scope(tmp_path: Path) -> None:
    (project(tmp_path) / "sub" / "dir").mkdir(parents=True)
    run = Run(tmp_path, py(PRINT_CWD), cwd=Path("sub/dir"))
    assert await run() == os.path.realpath(project(tmp_path) / "sub" / "dir") + "\n"


async def test_option_cwd_relative_and_absolute(tmp_path: Path) -> None:
    sub = project(tmp_path) / "sub"
    sub.mkdir()
    assert await Run(tmp_path, py(PRINT_CWD), options={"cwd": "sub"})() == os.path.realpath(sub) + "\n"
    assert await Run(tmp_path, py(PRINT_CWD), options={"cwd": str(sub)})() == os.path.realpath(sub) + "\n"


async def test_config_cwd_wins_over_option(tmp_path: Path) -> None:
    (project(tmp_path) / "a").mkdir()
    (project(tmp_path) / "b").mkdir()
    run = Run(tmp_path, py(PRINT_CWD), cwd=Path("a"), options={"cwd": "b"})
    assert (await run()).strip().endswith(os.sep + "a")


@pytest.mark.parametrize("how", ["config", "option"])
async def test_cwd_outside_roots_is_refused(tmp_path: Path, how: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    kwargs: dict[str, Any] = {"cwd": outside} if how == "config" else {"options": {"cwd": str(outside)}}
    run = Run(tmp_path, py(PRINT_CWD), **kwargs)
    with pytest.raises(PermanentError) as caught:
        await run()
    message = str(caught.value)
    assert str(outside) in message
    assert os.path.realpath(project(tmp_path)) in message
    assert "allowed_roots" in message


async def test_dotdot_escape_is_refused(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    run = Run(tmp_path, py(PRINT_CWD), options={"cwd": "../outside"})
    with pytest.raises(PermanentError, match="outside the allowed roots"):
        await run()


async def test_symlink_escaping_scope_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (project(tmp_path) / "link").symlink_to(outside)
    run = Run(tmp_path, py(PRINT_CWD), cwd=Path("link"))
    with pytest.raises(PermanentError) as caught:
        await run()
    assert "link" in str(caught.value)
    assert f"really {os.path.realpath(outside)}" in str(caught.value)


async def test_symlinked_scope_is_fine(tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(project(tmp_path))
    run = Run(tmp_path, py(PRINT_CWD), scope=tmp_path / "alias")
    assert await run() == os.path.realpath(project(tmp_path)) + "\n"


async def test_allowed_roots_add_directories(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "deep"
    shared.mkdir(parents=True)
    run = Run(tmp_path, py(PRINT_CWD), cwd=shared, allowed_roots=[tmp_path / "shared"])
    assert await run() == os.path.realpath(shared) + "\n"


async def test_sibling_with_common_prefix_is_not_inside(tmp_path: Path) -> None:
    (tmp_path / "project-evil").mkdir()
    run = Run(tmp_path, py(PRINT_CWD), options={"cwd": str(tmp_path / "project-evil")})
    with pytest.raises(PermanentError, match="outside the allowed roots"):
        await run()


async def test_scope_that_is_not_a_directory_allows_nothing(tmp_path: Path) -> None:
    run = Run(tmp_path, py(PRINT_CWD), scope="/projects/does-not-exist")
    with pytest.raises(PermanentError, match=r"scope .* is not a directory, so give options.cwd"):
        await run()


async def test_a_scope_no_client_connected_from_is_not_a_root(tmp_path: Path) -> None:
    """A model can type any scope; only the project a client runs in lets processes run there."""
    run = Run(tmp_path, py(PRINT_CWD), project_scope=False)
    with pytest.raises(PermanentError, match="outside the allowed roots"):
        await run()


async def test_missing_or_file_cwd_is_permanent(tmp_path: Path) -> None:
    (project(tmp_path) / "file.txt").write_text("x")
    for cwd in ("missing", "file.txt"):
        with pytest.raises(PermanentError, match="does not exist or is not a directory"):
            await Run(tmp_path, py(PRINT_CWD), options={"cwd": cwd})()


def test_preflight_warns_about_a_refused_cwd(tmp_path: Path) -> None:
    run = Run(tmp_path, py(PRINT_CWD))
    ok = type("Options", (), {"cwd": None})()
    bad = type("Options", (), {"cwd": "/"})()
    assert run.executor.preflight(ok, run.scope, run.ctx.workdir_roots) == []
    [warning] = run.executor.preflight(bad, run.scope, run.ctx.workdir_roots)
    assert "will fail" in warning and "allowed_roots" in warning


# ---- environment ----------------------------------------------------------------


async def test_environment_is_only_the_allowlist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-secret")
    monkeypatch.setenv("SQ_TEST_ALLOWED", "yes")
    monkeypatch.setenv("SQ_TEST_NOT_LISTED", "no")
    monkeypatch.delenv("SQ_TEST_UNSET", raising=False)
    run = Run(
        tmp_path,
        [ENV],
        env_allow=["PATH", "SQ_TEST_ALLOWED", "SQ_TEST_UNSET"],
        env={"FIXED": "1", "SIDEQUEST_TASK_ID": "spoofed"},
    )
    output = await run()
    seen = dict(line.split("=", 1) for line in output.splitlines())
    assert set(seen) == {
        "PATH",
        "SQ_TEST_ALLOWED",
        "FIXED",
        "SIDEQUEST_TASK_ID",
        "SIDEQUEST_WORKFLOW_ID",
        "SIDEQUEST_ATTEMPT",
        "SIDEQUEST_SCOPE",
    }
    assert "sk-ant-fake-secret" not in output
    assert seen["SQ_TEST_ALLOWED"] == "yes"
    assert seen["PATH"] == os.environ["PATH"]
    assert seen["SIDEQUEST_TASK_ID"] == "t_test1"
    assert seen["SIDEQUEST_WORKFLOW_ID"] == "w_test1"
    assert seen["SIDEQUEST_ATTEMPT"] == "2"
    assert seen["SIDEQUEST_SCOPE"] == run.scope


async def test_default_allowlist_hides_api_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake-2")
    output = await Run(tmp_path, [ENV])()
    assert "sk-ant-fake-secret" not in output and "sk-fake-2" not in output
    assert "SIDEQUEST_TASK_ID=t_test1" in output.splitlines()


# ---- output -----------------------------------------------------------------------


async def test_output_cap_and_marker(tmp_path: Path) -> None:
    run = Run(
        tmp_path, py("import sys; sys.stdout.buffer.write(b'x' * (5 * 1024 * 1024))"), output_limit=1000
    )
    started = time.monotonic()
    out = await run()
    assert out == "x" * 1000 + "\n[output truncated: kept 1000 of 5242880 bytes]"
    assert time.monotonic() - started < 20


async def test_five_megabytes_uncapped_does_not_hang(tmp_path: Path) -> None:
    code = (
        "import sys\nfor _ in range(80): sys.stdout.write('y' * 65535 + '\\n'); sys.stderr.write('e' * 4096)"
    )
    run = Run(tmp_path, py(code), output_limit=10_000_000)
    out = await run()
    assert len(out) == 80 * 65536


async def test_cut_inside_a_multibyte_character(tmp_path: Path) -> None:
    run = Run(tmp_path, py("print('é' * 10)"), output_limit=5)
    assert await run() == "éé\n[output truncated: kept 5 of 21 bytes]"


async def test_output_exactly_at_limit_is_not_marked(tmp_path: Path) -> None:
    assert await Run(tmp_path, py("print('abcd')"), output_limit=5)() == "abcd\n"


async def test_bad_utf8_is_replaced_and_json_stays_text(tmp_path: Path) -> None:
    assert await Run(tmp_path, py("import sys; sys.stdout.buffer.write(b'\\xff ok')"))() == "\ufffd ok"
    assert await Run(tmp_path, [SH, "-c", "echo '{\"a\": 1}'"])() == '{"a": 1}\n'


# ---- exits and failures ------------------------------------------------------------


async def test_nonzero_exit_carries_stderr_tail(tmp_path: Path) -> None:
    code = "import sys; sys.stderr.write('A' * 100_000 + 'the real error'); sys.exit(3)"
    with pytest.raises(Exception) as caught:
        await Run(tmp_path, py(code))()
    assert not isinstance(caught.value, PermanentError)
    message = str(caught.value)
    assert message.startswith("command exited with status 3")
    assert message.endswith("the real error")
    assert len(message) < 2200


async def test_nonzero_exit_without_stderr(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"^command exited with status 7 \(no stderr output\)$"):
        await Run(tmp_path, [SH, "-c", "exit 7"])()


async def test_signal_death_names_the_signal(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="killed by signal SIGKILL") as caught:
        await Run(tmp_path, [SH, "-c", "echo dying >&2; kill -KILL $$"])()
    assert "dying" in str(caught.value)
    assert not isinstance(caught.value, PermanentError)


@pytest.mark.parametrize("program", ["/nonexistent/prog", "sidequest-no-such-program-xyz"])
async def test_missing_program_is_permanent(tmp_path: Path, program: str) -> None:
    with pytest.raises(PermanentError, match=program):
        await Run(tmp_path, [program, "{prompt}"])()


async def test_not_executable_is_permanent(tmp_path: Path) -> None:
    script = project(tmp_path) / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(PermanentError, match=r"script\.sh.*not executable"):
        await Run(tmp_path, [str(script)])()
    with pytest.raises(PermanentError, match="not executable"):
        await Run(tmp_path, [str(project(tmp_path))])()


async def test_relative_program_runs_from_cwd(tmp_path: Path) -> None:
    script = project(tmp_path) / "tool.sh"
    script.write_text("#!/bin/sh\necho tool ran\n")
    script.chmod(0o755)
    assert await Run(tmp_path, ["./tool.sh"])() == "tool ran\n"


# ---- progress ----------------------------------------------------------------------


def test_parse_progress() -> None:
    assert parse_progress("sidequest-progress: 40 copying files") == (40.0, "copying files")
    assert parse_progress("sidequest-progress: 75.5% almost") == (75.5, "almost")
    assert parse_progress("sidequest-progress: 90") == (90.0, None)
    assert parse_progress("sidequest-progress: waiting for the build\r") == (None, "waiting for the build")
    assert parse_progress("sidequest-progress: 3rd pass") == (None, "3rd pass")
    assert parse_progress("sidequest-progress:") is None
    assert parse_progress("warning: sidequest-progress: 40 x") is None
    assert parse_progress("just a line") is None


async def test_progress_lines_are_reported(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "def say(line):\n"
        "    sys.stderr.write(line + '\\n'); sys.stderr.flush(); time.sleep(0.25)\n"
        "say('sidequest-progress: 10 starting')\n"
        "say('noise that is not progress')\n"
        "say('sidequest-progress: 55.5% halfway')\n"
        "sys.stderr.write('sidequest-progress: finishing up')\n"
        "print('ok')\n"
    )
    run = Run(tmp_path, py(code))
    assert await run() == "ok\n"
    assert run.progress == [(10.0, "starting"), (55.5, "halfway"), (None, "finishing up")]


async def test_progress_flood_is_coalesced(tmp_path: Path) -> None:
    code = (
        "import sys\nfor i in range(20000): sys.stderr.write(f'sidequest-progress: {i % 100} step {i}\\n')\n"
    )
    run = Run(tmp_path, py(code))
    await run()
    assert len(run.progress) < 200
    assert run.progress[-1] == (99.0, "step 19999")


async def test_huge_stderr_line_is_bounded(tmp_path: Path) -> None:
    code = "import sys; sys.stderr.write('z' * 3_000_000 + '\\nsidequest-progress: 5 after\\n'); sys.exit(1)"
    run = Run(tmp_path, py(code))
    with pytest.raises(Exception, match="status 1") as caught:
        await run()
    assert run.progress == [(5.0, "after")]
    assert len(str(caught.value)) < 2200


# ---- killing: timeout, cancel, leftovers ------------------------------------------


async def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    run = Run(tmp_path, spawner(pid_file))
    pids: list[int] = []
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            with anyio.fail_after(1.5):
                await run.executor.run("x", run.ctx)
        elapsed = time.monotonic() - started
        pids = await read_pids(pid_file, 3, timeout=0.1)
        await wait_gone(pids, timeout=3.0)  # the kill already happened before run() returned
        assert elapsed < 5
    finally:
        kill_leftovers(pids)


async def test_cancel_kills_the_whole_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    run = Run(tmp_path, spawner(pid_file))
    pids: list[int] = []
    finished = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:

            async def attempt() -> None:
                try:
                    await run.executor.run("x", run.ctx)
                finally:
                    finished.set()

            tg.start_soon(attempt)
            pids = await read_pids(pid_file, 3)
            assert not any(is_gone(pid) for pid in pids)
            tg.cancel_scope.cancel()
        assert finished.is_set()
        await wait_gone(pids, timeout=3.0)
    finally:
        kill_leftovers(pids)


async def test_term_ignoring_grandchild_gets_sigkill(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    run = Run(tmp_path, spawner(pid_file, extra="trap '' TERM; "))
    pids: list[int] = []
    try:
        started = time.monotonic()
        with anyio.move_on_after(1.0):
            await run.executor.run("x", run.ctx)
        elapsed = time.monotonic() - started
        pids = await read_pids(pid_file, 3, timeout=0.1)
        await wait_gone(pids, timeout=3.0)
        assert 2.5 < elapsed < 6, elapsed  # 1 s, then SIGTERM ignored for the 2 s grace, then SIGKILL
    finally:
        kill_leftovers(pids)


async def test_leftover_background_process_is_killed_after_exit(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    script = (
        f'sleep 100 >/dev/null 2>&1 & echo $! > "{pid_file}"; sleep 100 & echo $! >> "{pid_file}"; echo done'
    )
    run = Run(tmp_path, [SH, "-c", script])
    pids: list[int] = []
    try:
        started = time.monotonic()
        assert await run() == "done\n"  # the second sleep holds stdout open; that must not hang
        assert time.monotonic() - started < 5
        pids = await read_pids(pid_file, 2, timeout=0.1)
        await wait_gone(pids, timeout=3.0)
    finally:
        kill_leftovers(pids)


# ---- end to end through the engine and the MCP tools -------------------------------


@pytest.fixture
def command_settings(tmp_path: Path) -> Settings:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    return Settings(
        home=tmp_path / "home",
        lease_seconds=2.0,
        shutdown_grace=1.0,
        agents={
            "shout": AgentConfig(
                executor="command",
                description="prints its argument in capitals",
                argv=[PY, "-c", "import sys; print(sys.argv[1].upper())", "{prompt}"],
            ),
            "spawner": AgentConfig(
                executor="command",
                argv=[SH, "-c", f"{spawner(pid_dir / '$1')[2]}", "sh", "{prompt}"],
                timeout=1.0,
            ),
            "flood": AgentConfig(
                executor="command",
                argv=[PY, "-c", "import sys; sys.stdout.write('f' * 3_000_000)"],
                output_limit=2000,
            ),
            "where": AgentConfig(executor="command", argv=[PY, "-c", PRINT_CWD]),
        },
    )


@pytest.fixture
async def command_client(command_settings: Settings, tmp_path: Path) -> AsyncIterator[Client]:
    engine = Engine(command_settings)
    server = build_server(engine, default_scope=str(project(tmp_path)))
    async with engine.running(), Client(server) as client:
        yield client


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text  # type: ignore[union-attr]
    assert result.structured_content is not None
    return result.structured_content


async def finished_task(client: Client, task_id: str, timeout: float = 15.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        task = (await call(client, "check_workflow_status", task_id=task_id))["task"]
        return task if task["status"] in ("completed", "failed", "timed_out", "cancelled") else None

    return await wait_for(check, timeout=timeout, what=f"task {task_id} to finish")


async def test_e2e_command_result(command_client: Client) -> None:
    agents = await call(command_client, "list_agents")
    shout = next(a for a in agents["agents"] if a["name"] == "shout")
    assert shout["executor"] == "command"

    submitted = await call(
        command_client, "task_async", agent_definition="shout", prompt="hello; $(echo no) {x}"
    )
    task = await finished_task(command_client, submitted["task_id"])
    assert task["status"] == "completed", task
    page = await call(command_client, "get_task_result", task_id=submitted["task_id"])
    assert page["content"] == "HELLO; $(ECHO NO) {X}\n"


async def test_e2e_timeout_kills_grandchildren(command_client: Client, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids" / "run1"
    pids: list[int] = []
    try:
        submitted = await call(
            command_client,
            "task_async",
            agent_definition="spawner",
            prompt="run1",
            options={"max_retries": 0},
        )
        pids = await read_pids(pid_file, 3)
        task = await finished_task(command_client, submitted["task_id"])
        assert task["status"] in ("timed_out", "failed"), task
        assert "timed out" in (task.get("error") or ""), task
        await wait_gone(pids, timeout=5.0)
    finally:
        kill_leftovers(pids)


async def test_e2e_cancel_kills_grandchildren(command_client: Client, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids" / "run2"
    pids: list[int] = []
    try:
        submitted = await call(
            command_client,
            "task_async",
            agent_definition="spawner",
            prompt="run2",
            options={"timeout": 60, "max_retries": 0},
        )
        pids = await read_pids(pid_file, 3)
        await call(command_client, "cancel_task", task_id=submitted["task_id"])
        task = await finished_task(command_client, submitted["task_id"])
        assert task["status"] == "cancelled", task
        await wait_gone(pids, timeout=5.0)
    finally:
        kill_leftovers(pids)


async def test_e2e_output_cap(command_client: Client) -> None:
    submitted = await call(command_client, "task_async", agent_definition="flood", prompt="go")
    task = await finished_task(command_client, submitted["task_id"])
    assert task["status"] == "completed", task
    page = await call(command_client, "get_task_result", task_id=submitted["task_id"])
    assert page["content"] == "f" * 2000 + "\n[output truncated: kept 2000 of 3000000 bytes]"


async def test_e2e_cwd_option_outside_scope_fails_permanently(command_client: Client, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    submitted = await call(
        command_client, "task_async", agent_definition="where", prompt="x", options={"cwd": str(outside)}
    )
    assert any("allowed_roots" in w for w in submitted.get("warnings", [])), submitted
    task = await finished_task(command_client, submitted["task_id"])
    assert task["status"] == "failed", task
    assert task["attempts"] == 1
    assert "outside the allowed roots" in (task.get("error") or ""), task


async def test_e2e_scope_typed_by_the_model_cannot_widen(command_client: Client, tmp_path: Path) -> None:
    """`options.scope` is the model's to choose; it may narrow inside the project, never widen."""
    elsewhere = tmp_path / "someone-elses-project"
    elsewhere.mkdir()
    for scope in (str(elsewhere), "/", os.path.expanduser("~"), "relative/path"):
        result = await command_client.call_tool(
            "task_async", {"agent_definition": "where", "prompt": "x", "options": {"scope": scope}}
        )
        assert result.is_error, scope
        text = result.content[0].text  # type: ignore[union-attr]
        assert "options.scope" in text, text
    page = await call(command_client, "list_active_workflows", all_scopes=True)
    assert page["total"] == 0, "a refused submit writes nothing"
    (project(tmp_path) / "sub").mkdir()
    inner = f"{project(tmp_path)}/sub/../sub"
    submitted = await call(
        command_client, "task_async", agent_definition="where", prompt="x", options={"scope": inner}
    )
    task = await finished_task(command_client, submitted["task_id"])
    assert task["scope"] == str(project(tmp_path) / "sub"), "scopes are normalised"
    assert task["status"] == "completed", task
