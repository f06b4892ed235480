"""The shared daemon as users meet it: `sidequest stdio` fronts started by MCP clients, the daemon
they start and share, and what happens when clients leave, race, or the daemon dies.

Everything is a real process on a real data dir: fronts, the detached daemon, DuckDB.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import httpx2
import psutil
import pytest
from conftest import agents_toml, wait_for
from mcp import Client, StdioServerParameters
from mcp_types import ResourceUpdatedNotification

import sidequest
from sidequest.server.daemon import LOCK_FILE, STATE_FILE, DaemonState, daemon_alive, read_state

pytestmark = pytest.mark.slow

REPO = Path(sidequest.__file__).resolve().parent.parent


def make_env(home: Path, project: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    config = home / "test.toml"
    if not config.exists():
        home.mkdir(parents=True, exist_ok=True)
        pwd = '[agents.pwd]\nexecutor = "command"\nargv = ["pwd"]\n\n'
        config.write_text("shutdown_grace = 1\nlease_seconds = 5\n\n" + pwd + agents_toml(), encoding="utf-8")
    env = {
        "SIDEQUEST_HOME": str(home),
        "SIDEQUEST_CONFIG": str(config),
        "PYTHONPATH": str(REPO),
        "PATH": os.environ.get("PATH", ""),
    }
    if project:
        env["CLAUDE_PROJECT_DIR"] = project
    return {**env, **(extra or {})}


def sidequest_cli(
    home: Path,
    *args: str,
    project: str | None = None,
    timeout: float = 60,
    extra_env: dict[str, str] | None = None,
    umask: int = -1,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidequest.cli", *args],
        env=make_env(home, project, extra_env),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        umask=umask,
    )


def daemon_pids(home: Path) -> list[int]:
    """Every `sidequest serve` process of this data dir, however it was started."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if (
                "sidequest.cli" in cmdline
                and "serve" in cmdline
                and proc.environ().get("SIDEQUEST_HOME") == str(home)
            ):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_daemons(home: Path) -> None:
    for pid in daemon_pids(home):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    try:
        yield home
    finally:
        kill_daemons(home)


@asynccontextmanager
async def front(home: Path, project: str, **client_args: Any) -> AsyncIterator[Client]:
    """`sidequest stdio` as Claude Code launches it: no --embedded, so it uses the daemon."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "sidequest.cli", "stdio"],
        env=make_env(home, project),
        cwd=str(home),
    )
    async with Client(params, **client_args) as client:
        yield client


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text  # type: ignore[union-attr]
    return result.structured_content  # type: ignore[return-value]


async def wait_task(
    client: Client, task_id: str, status: str = "completed", timeout: float = 30
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        task = (await call(client, "check_workflow_status", task_id=task_id))["task"]
        return task if task["status"] == status else None

    return await wait_for(check, timeout=timeout, what=f"task {task_id} to be {status}")


def state_of(home: Path) -> DaemonState:
    state = read_state(home)
    assert state is not None, f"no live daemon for {home}"
    return state


# ---- sharing ----------------------------------------------------------------------


async def test_two_fronts_share_one_daemon_and_see_each_other_only_with_all_scopes(
    home: Path, tmp_path: Path
) -> None:
    project_a, project_b = tmp_path / "a", tmp_path / "b"
    project_a.mkdir()
    project_b.mkdir()
    async with front(home, str(project_a)) as a, front(home, str(project_b)) as b:
        task_a = (await call(a, "task_async", agent_definition="echo", prompt="from a"))["task_id"]
        task_b = (await call(b, "task_async", agent_definition="echo", prompt="from b"))["task_id"]
        await wait_task(a, task_a)
        await wait_task(b, task_b)  # b reads through the same daemon

        def ids(page: dict[str, Any]) -> set[str]:
            return {t["task_id"] for w in page["workflows"] for t in w.get("tasks") or []} | {
                w["workflow_id"] for w in page["workflows"]
            }

        mine = await call(a, "get_workflow_history")
        everyone = await call(a, "get_workflow_history", all_scopes=True)
        wf_a = (await call(a, "check_workflow_status", task_id=task_a))["task"]["workflow_id"]
        wf_b = (await call(b, "check_workflow_status", task_id=task_b))["task"]["workflow_id"]
        assert wf_a in ids(mine) and wf_b not in ids(mine)
        assert {wf_a, wf_b} <= ids(everyone)
        assert (await call(b, "check_workflow_status", task_id=task_a))["task"]["scope"] == str(project_a)

    assert len(daemon_pids(home)) == 1
    state = state_of(home)
    assert list(home.glob("*.duckdb")) == [Path(state.database)]


async def test_task_outlives_its_client_and_a_new_client_reads_result_and_notification(
    home: Path, tmp_path: Path
) -> None:
    project = str(tmp_path)
    async with front(home, project) as first:
        task_id = (await call(first, "task_async", agent_definition="sleep", prompt="1.5"))["task_id"]
    # The first client (and its stdio process) is gone; the daemon keeps working.
    assert daemon_alive(home)
    async with front(home, project) as second:
        task = await wait_task(second, task_id)
        assert task["status"] == "completed"
        page = await call(second, "get_task_result", task_id=task_id)
        assert page["content"] == "slept 1.5"
        notes = (await call(second, "get_workflow_notifications"))["notifications"]
        assert any(n["task_id"] == task_id and n["kind"] == "task_completed" for n in notes), notes


async def test_wait_and_retry_through_a_front(home: Path, tmp_path: Path) -> None:
    async with front(home, str(tmp_path)) as client:
        args = {"agent_definition": "flaky", "prompt": "succeed on 2", "options": {"max_retries": 0}}
        task_id = (await call(client, "task_async", **args))["task_id"]
        waited = await call(client, "wait_for_tasks", task_ids=[task_id], timeout=20)
        assert waited["timed_out"] is False and waited["tasks"][0]["status"] == "failed"
        await call(client, "retry_task", task_id=task_id)
        waited = await call(client, "wait_for_tasks", task_ids=[task_id], timeout=20)
        assert waited["tasks"][0]["status"] == "completed"


async def test_a_typo_in_the_config_does_not_break_new_sessions(home: Path, tmp_path: Path) -> None:
    """The daemon keeps its last good config; a front started after the file broke still serves."""
    async with front(home, str(tmp_path)) as client:
        await call(client, "list_agents")
    config = home / "test.toml"
    config.write_text(config.read_text() + "\nmax_concurrency = [\n", encoding="utf-8")
    async with front(home, str(tmp_path)) as client:
        task_id = (await call(client, "task_async", agent_definition="echo", prompt="still here"))["task_id"]
        await wait_task(client, task_id)
        page = await call(client, "get_task_result", task_id=task_id)
        assert page["content"] == "still here"


async def test_resource_updated_reaches_a_front_from_the_daemon(home: Path, tmp_path: Path) -> None:
    send, receive = anyio.create_memory_object_stream[str](100)

    async def on_message(message: object) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            send.send_nowait(str(message.params.uri))

    async with front(home, str(tmp_path), message_handler=on_message) as client:
        task_id = (await call(client, "task_async", agent_definition="sleep", prompt="1"))["task_id"]
        uri = f"sidequest://tasks/{task_id}"
        async with client.listen(resource_subscriptions=[uri]) as events:

            async def forward() -> None:
                async for event in events:
                    send.send_nowait(event.uri)  # type: ignore[union-attr]

            async with anyio.create_task_group() as tg:
                tg.start_soon(forward)
                with anyio.fail_after(20):
                    while True:
                        assert await receive.receive() == uri
                        task = (await call(client, "check_workflow_status", task_id=task_id))["task"]
                        if task["status"] == "completed":
                            break
                tg.cancel_scope.cancel()


async def test_a_model_typed_scope_does_not_widen_where_agents_run(home: Path, tmp_path: Path) -> None:
    """The front names its own project to the daemon; a scope in the arguments stays untrusted.
    The project path is not ASCII, as paths need not be."""
    project = tmp_path / "projé ünïcode"
    project.mkdir()
    async with front(home, str(project)) as client:
        mine = await call(client, "task_async", agent_definition="pwd", prompt="here")
        task = await wait_task(client, mine["task_id"])
        assert task["scope"] == str(project)
        assert (await call(client, "get_task_result", task_id=mine["task_id"]))["content"].strip() == str(
            project
        )

        for scope in ("/", "/etc", str(tmp_path)):  # the root, elsewhere, and the project's parent
            elsewhere = await client.call_tool(
                "task_async",
                {"agent_definition": "pwd", "prompt": "x", "options": {"scope": scope, "cwd": "/etc"}},
            )
            assert elsewhere.is_error, scope
            assert "options.scope" in elsewhere.content[0].text  # type: ignore[union-attr]
        listed = await call(client, "list_active_workflows", all_scopes=True)
        assert listed["total"] == 0, "nothing was recorded, nothing ran"


async def test_trust_is_per_request_and_never_remembered(home: Path, tmp_path: Path) -> None:
    """Reproduced before: after one `cd / && sidequest tasks`, or once project B connected, any
    session's model could pass `scope: "/etc"` or B's folder, and agent files under a folder a
    model named were launched. Each attack is refused at submit, and nothing runs."""
    project_a, project_b, lure = tmp_path / "project-a", tmp_path / "project-b", tmp_path / "lure"
    for folder in (project_a, project_b):
        folder.mkdir()
    hostile = lure / ".claude" / "agents" / "helper.md"
    hostile.parent.mkdir(parents=True)
    hostile.write_text(
        "---\nname: helper\ndescription: runs anything\ntools: Bash\n---\nRun what you are told.\n",
        encoding="utf-8",
    )
    assert sidequest_cli(home, "tasks", project="/").returncode == 0  # a CLI call from `/`
    async with front(home, str(project_b)) as other:  # project B connected once
        await call(other, "list_agents")
    async with front(home, str(project_a)) as client:
        for scope in ("/etc", "/", str(project_b), str(lure), str(tmp_path), "../project-b"):
            refused = await client.call_tool(
                "task_async", {"agent_definition": "pwd", "prompt": "x", "options": {"scope": scope}}
            )
            assert refused.is_error, scope
            assert "options.scope" in refused.content[0].text, refused  # type: ignore[union-attr]
        by_path = await client.call_tool("task_async", {"agent_definition": str(hostile), "prompt": "x"})
        assert by_path.is_error
        assert "outside the agent folders" in by_path.content[0].text  # type: ignore[union-attr]
        agents = await call(client, "list_agents")
        assert "helper" not in [a["name"] for a in agents["agents"]]
        listed = await call(client, "list_active_workflows", all_scopes=True)
        history = await call(client, "get_workflow_history", all_scopes=True)
        assert listed["total"] == 0 and history["total"] == 0, "nothing was recorded, nothing ran"
        inside = project_a / "sub"
        inside.mkdir()
        narrowed = await call(
            client, "task_async", agent_definition="pwd", prompt="x", options={"scope": str(inside)}
        )
        await wait_task(client, narrowed["task_id"])
        result = await call(client, "get_task_result", task_id=narrowed["task_id"])
        assert result["content"].strip() == str(inside), "a scope inside the project narrows the work"


# ---- starting ----------------------------------------------------------------------


async def test_concurrent_first_starts_make_exactly_one_daemon(home: Path) -> None:
    starters = [
        subprocess.Popen(
            [sys.executable, "-m", "sidequest.cli", "serve", "--detach"],
            env=make_env(home),
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    outputs = [p.communicate(timeout=60) for p in starters]
    assert all(p.returncode == 0 for p in starters), outputs
    state = state_of(home)
    assert daemon_pids(home) == [state.pid]
    assert all(f"pid {state.pid}" in err for _, err in outputs), outputs
    assert stat.S_IMODE((home / STATE_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "token").stat().st_mode) == 0o600


async def test_second_serve_refuses_and_stale_state_is_cleaned(home: Path) -> None:
    assert sidequest_cli(home, "serve", "--detach").returncode == 0
    state = state_of(home)
    again = sidequest_cli(home, "serve", timeout=30)
    assert again.returncode == 1
    assert "already running" in again.stderr and str(state.pid) in again.stderr

    stopped = sidequest_cli(home, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"pid {state.pid}" in stopped.stderr
    assert not daemon_alive(home) and not (home / STATE_FILE).exists()
    assert sidequest_cli(home, "status").returncode == 3

    # A state file left by a daemon that died without cleaning up (kill -9, power loss).
    (home / STATE_FILE).write_text(state.model_copy(update={"pid": 999_999}).model_dump_json())
    status = sidequest_cli(home, "status", "--json")
    assert status.returncode == 3
    assert json.loads(status.stdout)["alive"] is False
    assert not (home / STATE_FILE).exists()


async def test_status_reports_the_daemon(home: Path, tmp_path: Path) -> None:
    async with front(home, str(tmp_path)) as client:
        task_id = (await call(client, "task_async", agent_definition="echo", prompt="x"))["task_id"]
        await wait_task(client, task_id)
    status = sidequest_cli(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    state = state_of(home)
    assert report["alive"] is True and report["running"] == 0
    assert report["pid"] == state.pid and report["port"] == state.port
    assert report["version"] == sidequest.__version__
    assert report["tasks"]["completed"] >= 1
    assert report["database"] == state.database and report["uptime_seconds"] > 0
    table = sidequest_cli(home, "status")
    assert table.returncode == 0 and str(state.pid) in table.stdout and "completed" in table.stdout


def test_binding_a_public_address_needs_a_flag(home: Path) -> None:
    refused = sidequest_cli(home, "serve", "--host", "192.0.2.1", timeout=30)
    assert refused.returncode == 2
    assert "--allow-remote" in refused.stderr
    wildcard = sidequest_cli(home, "serve", "--host", "0.0.0.0", "--allow-remote", timeout=30)
    assert wildcard.returncode == 2
    assert "every interface" in wildcard.stderr
    assert not daemon_alive(home)


# ---- what the daemon starts with ---------------------------------------------------


def test_daemon_started_under_umask_000_keeps_its_data_dir_and_every_file_private(home: Path) -> None:
    """The store holds every prompt and result and the token runs agents: nobody else may read them,
    whatever umask the first client's shell had, and whatever an older version left behind."""
    home.chmod(0o777)
    old_log = home / "daemon.log"
    old_log.write_text("written by an older version\n", encoding="utf-8")
    old_log.chmod(0o666)

    done = sidequest_cli(home, "submit", "echo", "private", "--wait", "--json", umask=0)
    assert done.returncode == 0, done.stderr
    state = state_of(home)
    assert (home / "sidequest.duckdb.wal").exists()  # the task's rows are in the log, not checkpointed yet

    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in home.iterdir()}
    expected = {"daemon.json", "daemon.lock", "daemon.log", "start.lock", "token", "sidequest.duckdb"}
    assert expected <= set(modes)
    assert modes == dict.fromkeys(modes, 0o600), modes
    status = Path(f"/proc/{state.pid}/status").read_text(encoding="utf-8")
    assert "Umask:\t0077" in status


def test_a_new_data_dir_is_created_private(tmp_path: Path) -> None:
    home = tmp_path / "not" / "yet" / "there"
    env = {"SIDEQUEST_HOME": str(home), "PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")}
    try:
        started = subprocess.run(
            [sys.executable, "-m", "sidequest.cli", "serve", "--detach"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            umask=0,
        )
        assert started.returncode == 0, started.stderr
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in home.iterdir())
    finally:
        kill_daemons(home)


async def test_daemon_and_its_agents_see_only_allowlisted_variables_of_the_client_that_started_it(
    home: Path, tmp_path: Path
) -> None:
    """The daemon serves every project but is started from one project's shell: that shell's
    tokens must not live on in it, nor reach python agents (which read the daemon's os.environ)."""
    leaks = {"SIDEQUEST_CANARY_XYZ": "canary-secret", "OTHER_PROJECT_TOKEN": "other-project-secret"}
    kept = {"LC_ALL": "C.UTF-8", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9", "SIDEQUEST_MAX_CONCURRENCY": "3"}
    done = sidequest_cli(
        home,
        "submit",
        "environment",
        "show me",
        "--wait",
        "--json",
        project=str(tmp_path),
        extra_env={**leaks, **kept},
    )
    assert done.returncode == 0, done.stderr

    environ = Path(f"/proc/{state_of(home).pid}/environ").read_bytes().split(b"\0")
    daemon_env = dict(item.decode().split("=", 1) for item in environ if item)
    for name, value in leaks.items():
        assert name not in daemon_env
        assert value not in " ".join(daemon_env.values())
    assert "CLAUDE_PROJECT_DIR" not in daemon_env  # the first client's project is not everyone's
    assert {name: daemon_env.get(name) for name in kept} == kept
    assert daemon_env["SIDEQUEST_HOME"] == str(home)

    agent_env = json.loads(json.loads(done.stdout)["result"]["content"])
    assert not set(leaks) & set(agent_env) and "CLAUDE_PROJECT_DIR" not in agent_env
    assert agent_env["LC_ALL"] == "C.UTF-8"


# ---- recovery -------------------------------------------------------------------------


async def test_daemon_killed_mid_task_is_restarted_by_the_next_call_and_the_task_completes(
    home: Path, tmp_path: Path
) -> None:
    async with front(home, str(tmp_path)) as client:
        task_id = (await call(client, "task_async", agent_definition="sleep", prompt="2"))["task_id"]
        await wait_task(client, task_id, status="running")
        old = state_of(home)
        os.kill(old.pid, signal.SIGKILL)
        await wait_for(lambda: _async(not daemon_alive(home)), timeout=10, what="the daemon to die")

        task = (await call(client, "check_workflow_status", task_id=task_id))["task"]  # restarts it
        new = state_of(home)
        assert new.pid != old.pid
        assert task["status"] in ("queued", "running", "retrying", "completed")
        done = await wait_task(client, task_id, timeout=30)
        assert done["attempts"] >= 2  # the lost attempt is counted, then it ran again
        history = (await call(client, "check_workflow_status", task_id=task_id))["task"]["attempt_history"]
        assert history[0]["status"] == "lost", history


async def test_submit_retried_after_daemon_death_creates_one_task(home: Path, tmp_path: Path) -> None:
    """A call that reaches a dead daemon is sent again to a new one; the idempotency key the front
    adds means the task exists once, whichever side of the crash it was recorded on."""
    async with front(home, str(tmp_path)) as client:
        await call(client, "list_agents")  # daemon up
        os.kill(state_of(home).pid, signal.SIGKILL)
        await wait_for(lambda: _async(not daemon_alive(home)), timeout=10, what="the daemon to die")
        submitted = await call(client, "task_async", agent_definition="echo", prompt="after the crash")
        assert submitted["deduplicated"] is False
        await wait_task(client, submitted["task_id"])
        page = await call(client, "get_workflow_history", all_scopes=True)
        assert page["total"] == 1


async def _async(value: bool) -> bool:
    return value


# ---- versions -----------------------------------------------------------------------


def start_old_daemon(home: Path, version: str = "0.0.1-old") -> subprocess.Popen[bytes]:
    """A daemon from an earlier install: same code, another version string."""
    code = (
        "import sys, sidequest; sidequest.__version__ = sys.argv[1]; "
        "from sidequest.cli import main; main(['serve'])"
    )
    log = (home / "old-daemon.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-c", code, version],
        env=make_env(home),
        cwd=home,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


async def wait_state(home: Path) -> DaemonState:
    async def ready() -> DaemonState | None:
        return read_state(home)

    return await wait_for(ready, timeout=30, what="the daemon's state file")


async def test_idle_daemon_of_another_version_is_replaced(home: Path, tmp_path: Path) -> None:
    old = start_old_daemon(home)
    try:
        assert (await wait_state(home)).version == "0.0.1-old"
        async with front(home, str(tmp_path)) as client:
            await call(client, "list_agents")
            state = state_of(home)
            assert state.version == sidequest.__version__
            assert state.pid != old.pid
        assert old.wait(timeout=30) == 0  # it was stopped gracefully
    finally:
        if old.poll() is None:
            old.kill()


async def test_busy_daemon_of_another_version_is_kept_with_a_warning(home: Path, tmp_path: Path) -> None:
    old = start_old_daemon(home)
    try:
        state = await wait_state(home)
        async with httpx2.AsyncClient() as http:
            response = await http.post(
                state.url + "/api/v1/tasks",
                json={"agent_definition": "sleep", "prompt": "5"},
                headers={"Authorization": f"Bearer {state.token}"},
            )
            assert response.status_code == 201, response.text

            async def running() -> bool:
                daemon = await http.get(
                    state.url + "/api/v1/daemon", headers={"Authorization": f"Bearer {state.token}"}
                )
                return daemon.json()["running"] == 1

            await wait_for(running, timeout=10, what="the task to start")
        agents = sidequest_cli(home, "agents", project=str(tmp_path))
        assert agents.returncode == 0, agents.stderr
        assert "runs version 0.0.1-old" in agents.stderr and "sidequest stop" in agents.stderr
        assert state_of(home).pid == old.pid
    finally:
        if old.poll() is None:
            old.kill()


# ---- the HTTP door ---------------------------------------------------------------------


async def test_everything_but_health_needs_the_token_and_a_local_host(home: Path) -> None:
    assert sidequest_cli(home, "serve", "--detach").returncode == 0
    state = state_of(home)
    auth = {"Authorization": f"Bearer {state.token}"}
    async with httpx2.AsyncClient() as http:
        health = await http.get(state.url + "/health")
        assert health.status_code == 200 and health.json()["pid"] == state.pid
        for path in ("/api/v1/daemon", "/api/v1/tasks/t_x", "/api/v1/openapi.json", "/mcp", "/api/v1/events"):
            response = await http.get(state.url + path)
            assert response.status_code == 401, path
            assert response.json()["code"] == "unauthorized"
        wrong = await http.get(state.url + "/api/v1/daemon", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (await http.get(state.url + "/api/v1/daemon", headers=auth)).status_code == 200

        rebinding = await http.get(state.url + "/api/v1/daemon", headers={**auth, "Host": "evil.example"})
        assert rebinding.status_code == 421 and rebinding.json()["code"] == "forbidden"
        page = await http.get(
            state.url + "/api/v1/daemon", headers={**auth, "Origin": "http://evil.example:8080"}
        )
        assert page.status_code == 403
        local_page = await http.get(
            state.url + "/api/v1/daemon", headers={**auth, "Origin": f"http://localhost:{state.port}"}
        )
        assert local_page.status_code == 200
    assert stat.S_IMODE((home / LOCK_FILE).stat().st_mode) == 0o600
