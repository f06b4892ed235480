"""Python agents with `isolation = "process"`: a real child interpreter per attempt, under a real engine."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import all_test_agents, wait_for

from sidequest.agents import AgentRegistry
from sidequest.config import AgentConfig, ConfigError, Settings
from sidequest.engine.engine import Engine
from sidequest.executors.python import PythonExecutor, defined_async
from sidequest.executors.python_child import FrameDecoder, encode_frame
from sidequest.executors.python_process import CHILD_MODULE, ProcessPythonExecutor, child_sys_path
from sidequest.executors.sandbox import STOP_GRACE
from sidequest.models import TaskInfo, TaskOptions, TaskStatus

FAST = {"initial": 0.01, "max": 0.05}


def isolated(name: str, **keys: Any) -> AgentConfig:
    return AgentConfig(callable=f"sidequest.testing.agents:{name}", isolation="process", **keys)


def make_settings(home: Path, extra_agents: dict[str, AgentConfig] | None, **overrides: Any) -> Settings:
    agents = all_test_agents()
    for name in ("hard_exit", "kill_self", "spin", "reports_all", "retry_later"):
        agents[name] = AgentConfig(callable=f"sidequest.testing.agents:{name}")  # sync: process by default
    for name in ("echo", "json_result", "big_result", "fail", "fail_permanently", "sleep", "bad_unicode"):
        agents[f"{name}_isolated"] = isolated(name)
    agents.update(extra_agents or {})
    values: dict[str, Any] = {
        "home": home,
        "agents": agents,
        "lease_seconds": 2.0,
        "shutdown_grace": 0.2,
        "max_concurrency": 8,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_engine(
    home: Path, extra_agents: dict[str, AgentConfig] | None = None, **overrides: Any
) -> AsyncIterator[Engine]:
    engine = Engine(make_settings(home, extra_agents, **overrides))
    async with engine.running():
        yield engine


async def wait_status(engine: Engine, task_id: str, *statuses: TaskStatus, timeout: float = 15.0) -> TaskInfo:
    async def check() -> TaskInfo | None:
        info = await engine.get_task(task_id)
        return info if info.status in statuses else None

    return await wait_for(check, timeout, what=f"{task_id} to be {', '.join(statuses)}")


def opts(**kwargs: Any) -> TaskOptions:
    return TaskOptions.model_validate(kwargs)


def gone(pid: int) -> bool:
    """Exited (a zombie counts: an orphan reparented to a PID 1 that never reaps stays one)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def read_pids(pidfile: Path) -> list[int]:
    async def check() -> list[int] | None:
        text = pidfile.read_text() if pidfile.exists() else ""
        return [int(p) for p in text.split()] if len(text.split()) == 2 else None

    return await wait_for(check, 15.0, what="the agent to write its pids")


async def wait_gone(pids: list[int], timeout: float) -> None:
    async def check() -> bool:
        return all(gone(pid) for pid in pids)

    await wait_for(check, timeout, what=f"processes {pids} to be gone")


# ---- a crash stays in its task -----------------------------------------------


async def test_an_agent_calling_os_exit_fails_its_own_task_while_others_finish(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        neighbours = [
            await engine.submit("sleep", "1"),  # async, inline
            await engine.submit("sleep_sync", "1"),  # sync, its own process
            await engine.submit("echo_sync", "hello"),
        ]
        crash = await engine.submit("hard_exit", "137 0.5", opts(max_retries=0))
        info = await wait_status(engine, crash.task_id, TaskStatus.failed)
        assert info.error is not None
        assert info.error.startswith("the agent's process exited with status 137 before returning a result")
        assert "about to exit with status 137" in info.error  # the end of its output
        for task in neighbours:
            done = await wait_status(engine, task.task_id, TaskStatus.completed)
            assert done.attempts == 1
        after = await engine.submit("echo", "still serving")
        done = await wait_status(engine, after.task_id, TaskStatus.completed)
        assert done.result_preview == "still serving"


async def test_an_exit_at_start_is_an_ordinary_retried_failure(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("hard_exit", "137", opts(max_retries=2, retry_backoff=FAST))
        info = await wait_status(engine, submitted.task_id, TaskStatus.failed)
        assert info.attempts == 3
        assert [a.status for a in info.attempt_history] == ["failed"] * 3
        assert all("exited with status 137" in (a.error or "") for a in info.attempt_history)


async def test_an_agent_killed_by_a_signal_names_the_signal(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("kill_self", "9", opts(max_retries=0))
        info = await wait_status(engine, submitted.task_id, TaskStatus.failed)
        assert info.error == (
            "the agent's process was killed by signal SIGKILL (9) before returning a result "
            "(it wrote no output)"
        )


# ---- what crosses the boundary -----------------------------------------------


async def test_progress_usage_and_saved_state_reach_the_store(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("reports_all", "1", opts(metadata={"ticket": 7}))

        async def progressed() -> TaskInfo | None:
            info = await engine.get_task(submitted.task_id)
            working = info.status == TaskStatus.running and info.progress is not None
            return info if working and info.progress.message == "working" else None

        running = await wait_for(progressed, 15.0, what="progress while running")
        assert running.progress is not None and running.progress.percent == 40
        assert running.session_id == "session-1"  # saved at once, not at the end
        info = await wait_status(engine, submitted.task_id, TaskStatus.completed)
        assert info.usage is not None
        assert info.usage.input_tokens == 120 and info.usage.models == ["test-model"]
        seen = json.loads((await engine.get_result(submitted.task_id)).content)
        assert seen["pid"] != os.getpid()
        assert seen["task_id"] == submitted.task_id and seen["attempt"] == 1
        assert seen["metadata"] == {"ticket": 7} and seen["session_id"] == "session-1"
    # the record the agent built named another task; it was filed under this one
    async with running_engine(tmp_path) as engine:
        assert (await engine.store.count_rows())["token_usage"] == 1


async def test_results_round_trip_as_text_and_json(tmp_path: Path) -> None:
    text = 'héllo ✓ 🎉 "quoted" \\ back\nslash'
    async with running_engine(tmp_path) as engine:
        echoed = await engine.submit("echo_isolated", text)
        as_json = await engine.submit("json_result_isolated", "abc")
        big = await engine.submit("big_result_isolated", "5000000")
        assert (await wait_status(engine, echoed.task_id, TaskStatus.completed)).result_preview == text
        await wait_status(engine, as_json.task_id, TaskStatus.completed)
        page = await engine.get_result(as_json.task_id)
        assert page.content_type == "json"
        assert json.loads(page.content) == {"prompt": "abc", "length": 3, "attempt": 1}
        await wait_status(engine, big.task_id, TaskStatus.completed)
        page = await engine.get_result(big.task_id, max_chars=10)
        assert page.total_chars == 5_000_000 and page.content == "abcdefghij" and page.content_type == "text"


async def test_text_that_is_not_utf8_is_repaired_as_it_is_inline(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        inline = await engine.submit("bad_unicode", "x")
        isolated_ = await engine.submit("bad_unicode_isolated", "x")
        results = []
        for task in (inline, isolated_):
            await wait_status(engine, task.task_id, TaskStatus.completed)
            results.append((await engine.get_result(task.task_id)).content)
        assert results[0] == results[1] and results[0].startswith("before ")


async def test_permanent_errors_are_not_retried_across_the_boundary(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("fail_permanently_isolated", "nope", opts(max_retries=3))
        info = await wait_status(engine, submitted.task_id, TaskStatus.failed)
        assert info.attempts == 1
        assert info.error == "cannot do this: nope"


async def test_a_retryable_errors_delay_is_kept(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("retry_later", "0.6", opts(max_retries=1, retry_backoff=FAST))
        info = await wait_status(engine, submitted.task_id, TaskStatus.completed)
        first, second = info.attempt_history
        assert first.error == "busy, come back later"
        assert first.finished_at is not None and second.started_at is not None
        assert (second.started_at - first.finished_at).total_seconds() >= 0.55


async def test_other_exceptions_and_sys_exit_read_as_they_do_inline(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        failed = await engine.submit("fail_isolated", "x", opts(max_retries=0))
        exited = await engine.submit("exits", "x", opts(max_retries=0))  # sync: a process by default
        assert (await wait_status(engine, failed.task_id, TaskStatus.failed)).error == (
            "RuntimeError: failing on purpose: x"
        )
        assert (await wait_status(engine, exited.task_id, TaskStatus.failed)).error == (
            "the agent called sys.exit(3)"
        )


# ---- stopping ----------------------------------------------------------------


async def test_cancel_kills_a_hung_child_and_its_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("spin", str(pidfile))
        pids = await read_pids(pidfile)
        started = time.monotonic()
        await engine.cancel(task_id=submitted.task_id)
        await wait_gone(pids, timeout=STOP_GRACE + 3)
        assert time.monotonic() - started < STOP_GRACE  # SIGTERM was enough: SIGKILL was not needed
        assert (await engine.get_task(submitted.task_id)).status == TaskStatus.cancelled

        async def attempt_recorded() -> list[str] | None:
            info = await engine.get_task(submitted.task_id)
            return [a.status for a in info.attempt_history] or None

        assert await wait_for(attempt_recorded, 5.0, what="the attempt row") == ["cancelled"]


async def test_cancel_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("spin", f"{pidfile} stubborn")
        pids = await read_pids(pidfile)
        await engine.cancel(task_id=submitted.task_id)
        await wait_gone(pids, timeout=STOP_GRACE + 3)


def agent_processes() -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process().children(recursive=True)
        if not gone(child.pid) and "sidequest.executors.python_child" in " ".join(child.cmdline())
    ]


async def test_cancel_stops_an_async_callable_in_a_process(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("sleep_isolated", "30")

        async def progressed() -> TaskInfo | None:
            info = await engine.get_task(submitted.task_id)
            return info if info.progress is not None and info.progress.message else None

        await wait_for(progressed, 15.0, what="the async agent to report progress")
        assert len(agent_processes()) == 1
        await engine.cancel(task_id=submitted.task_id)

        async def none_left() -> bool:
            return not agent_processes()

        await wait_for(none_left, 1.0, what="the agent's process to end")


async def test_timeout_kills_a_hung_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("spin", str(pidfile), opts(timeout="1s", max_retries=0))
        pids = await read_pids(pidfile)
        info = await wait_status(engine, submitted.task_id, TaskStatus.failed)
        assert info.error == "timed out after 1s"
        await wait_gone(pids, timeout=STOP_GRACE)


def test_a_child_whose_daemon_dies_stops_by_itself(tmp_path: Path) -> None:
    """The daemon's end of stdin closing (it was killed) makes the child stop: nothing is orphaned."""
    pidfile = tmp_path / "pids"
    env = {"PYTHONPATH": os.pathsep.join(child_sys_path()), "PATH": os.environ.get("PATH", "")}
    child = subprocess.Popen(
        [sys.executable, "-P", "-m", CHILD_MODULE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    assert child.stdin is not None and child.stdout is not None
    context = {"task_id": "t_1", "workflow_id": "w_1", "agent": "spin", "attempt": 1, "scope": "/"}
    start = {"callable": "sidequest.testing.agents:spin", "prompt": str(pidfile), "context": context}
    child.stdin.write(encode_frame({"type": "start", **start}))
    child.stdin.flush()
    try:
        deadline = time.monotonic() + 15
        while not (pidfile.exists() and len(pidfile.read_text().split()) == 2):
            assert time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.02)
        child.stdin.close()
        assert child.wait(timeout=STOP_GRACE + 2) != 0
        assert list(FrameDecoder().feed(child.stdout.read())) == []  # stopped: no answer
    finally:
        child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pidfile.read_text().split()[1]), 9)


# ---- where it runs and what it sees ------------------------------------------


async def test_the_child_runs_in_a_trusted_scope_with_only_allowed_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.setenv("SIDEQUEST_TEST_SECRET", "hunter2")
    monkeypatch.setenv("SIDEQUEST_TEST_SHARED", "yes")
    shared_config = AgentConfig(
        callable="sidequest.testing.agents:reports_all",
        env_allow=["PATH", "SIDEQUEST_TEST_SHARED"],
        env={"FIXED": "1"},
    )
    async with running_engine(tmp_path, {"reports_shared": shared_config}, allowed_roots=[project]) as engine:
        trusted = await engine.submit("reports_all", "0", opts(scope=str(project)))
        untrusted = await engine.submit("reports_all", "0", opts(scope="/"))
        shared = await engine.submit("reports_shared", "0", opts(scope=str(project)))
        results = {}
        for task in (trusted, untrusted, shared):
            await wait_status(engine, task.task_id, TaskStatus.completed)
            results[task.task_id] = json.loads((await engine.get_result(task.task_id)).content)
    assert results[trusted.task_id]["cwd"] == os.path.realpath(project)
    # A scope that is only a label: a private empty folder, never the daemon's own (the data dir).
    elsewhere = Path(results[untrusted.task_id]["cwd"])
    assert elsewhere.name.startswith("sidequest-attempt-") and str(elsewhere) != os.getcwd()
    assert not elsewhere.exists(), "removed after the attempt"
    names = set(results[trusted.task_id]["env"])
    assert {"PYTHONPATH", "SIDEQUEST_TASK_ID", "SIDEQUEST_ATTEMPT", "SIDEQUEST_SCOPE", "PATH"} <= names
    assert "SIDEQUEST_TEST_SECRET" not in names and "SIDEQUEST_TEST_SHARED" not in names
    shared_names = set(results[shared.task_id]["env"])
    assert {"SIDEQUEST_TEST_SHARED", "FIXED"} <= shared_names and "SIDEQUEST_TEST_SECRET" not in shared_names


async def test_a_module_only_on_the_daemons_sys_path_imports_in_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules = tmp_path / "agents_here"
    modules.mkdir()
    (modules / "iso_local_agent.py").write_text(
        "import os\n\ndef run(prompt, ctx):\n    return f'{prompt} from {os.getpid()}'\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(modules))
    agents = {"local": AgentConfig(callable="iso_local_agent:run")}
    async with running_engine(tmp_path, agents) as engine:
        submitted = await engine.submit("local", "hi")
        info = await wait_status(engine, submitted.task_id, TaskStatus.completed)
        assert info.result_preview is not None and info.result_preview.startswith("hi from ")
        assert info.result_preview != f"hi from {os.getpid()}"
    assert "iso_local_agent" not in sys.modules  # the daemon never imported it


# ---- configuration -------------------------------------------------------------


def test_default_isolation_is_process_for_sync_callables_and_inline_for_async(tmp_path: Path) -> None:
    agents = {
        "async_default": AgentConfig(callable="sidequest.testing.agents:echo"),
        "sync_default": AgentConfig(callable="sidequest.testing.agents:echo_sync"),
        "sync_inline": AgentConfig(callable="sidequest.testing.agents:echo_sync", isolation="inline"),
        "async_process": AgentConfig(callable="sidequest.testing.agents:echo", isolation="process"),
    }
    registry = AgentRegistry.from_settings(Settings(home=tmp_path, agents=agents))
    built = {name: registry.get(name).executor for name in agents}  # type: ignore[union-attr]
    assert {name: type(executor) for name, executor in built.items()} == {
        "async_default": PythonExecutor,
        "sync_default": ProcessPythonExecutor,
        "sync_inline": PythonExecutor,
        "async_process": ProcessPythonExecutor,
    }
    assert all(executor.name == "python" for executor in built.values())


def test_the_default_is_decided_without_importing_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "iso_unimported"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported!')\n", encoding="utf-8")
    (package / "agents.py").write_text(
        "import functools\n\n"
        "async def later(prompt, ctx): ...\n\n"
        "def now(prompt, ctx): ...\n\n"
        "class Holder:\n    async def method(prompt, ctx): ...\n\n"
        "made = functools.partial(now)\n\n"
        "def redefined(prompt, ctx): ...\n\n"
        "async def redefined(prompt, ctx): ...\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert defined_async("iso_unimported.agents:later") is True
    assert defined_async("iso_unimported.agents:now") is False
    assert defined_async("iso_unimported.agents:Holder.method") is True
    assert defined_async("iso_unimported.agents:redefined") is True  # the last definition wins
    assert defined_async("iso_unimported.agents:made") is None  # cannot tell: process, the safe side
    assert defined_async("iso_unimported.agents:missing") is None
    assert defined_async("iso_not_there.agents:x") is None
    assert "iso_unimported" not in sys.modules


def test_isolation_is_only_for_python_agents() -> None:
    with pytest.raises(ValueError, match="isolation is for executor 'python', not 'command'"):
        AgentConfig(executor="command", argv=["true"], isolation="process")


def test_process_only_keys_on_an_inline_agent_are_errors(tmp_path: Path) -> None:
    for config in (
        AgentConfig(callable="sidequest.testing.agents:echo", env={"A": "1"}),
        AgentConfig(callable="sidequest.testing.agents:echo_sync", isolation="inline", env_allow=["PATH"]),
    ):
        with pytest.raises(ConfigError, match="only apply to isolation = 'process'"):
            AgentRegistry.from_settings(Settings(home=tmp_path, agents={"a": config}))


async def test_an_agent_that_cannot_be_imported_fails_permanently(tmp_path: Path) -> None:
    agents = {"broken": AgentConfig(callable="iso_no_such_module:run", isolation="process")}
    async with running_engine(tmp_path, agents) as engine:
        submitted = await engine.submit("broken", "x", opts(max_retries=3))
        info = await wait_status(engine, submitted.task_id, TaskStatus.failed)
        assert info.attempts == 1
        assert info.error is not None and "cannot import module 'iso_no_such_module'" in info.error


async def test_many_isolated_attempts_at_once(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        tasks = [await engine.submit("echo_sync", f"n{i}") for i in range(16)]
        for i, task in enumerate(tasks):
            info = await wait_status(engine, task.task_id, TaskStatus.completed, timeout=30.0)
            assert info.result_preview == f"n{i}"
