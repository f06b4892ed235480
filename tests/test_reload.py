"""Reloading the configuration of a running daemon: `sidequest reload`, the file watch, a broken
new version, settings that need a restart, and the key notice of a client.

Through the real surfaces: the CLI as a subprocess and the detached daemon it starts, with its
own data dir and config file; the daemon's pid shows that nothing was restarted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import agents_toml
from test_cli import COMMAND_TIMEOUT, Cli, _daemon_pid, wait_until
from test_env import SECRET, private_cli

from sidequest.commands import TaskDetail
from sidequest.models import ReloadResult

pytestmark = pytest.mark.slow

GREETER = '[agents.greeter]\nexecutor = "python"\ncallable = "sidequest.testing.agents:echo"\n\n'

WRITER = """\
---
name: writer
description: Writes things.
---
You write.
"""


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    with private_cli(tmp_path) as runner:
        _write_config(runner)
        yield runner


def _write_config(cli: Cli, top: str = "", tables: str = "", watch: bool = False) -> None:
    """The whole file, top-level keys first (TOML puts a key after a table header into the table)."""
    text = f"watch_config = {'true' if watch else 'false'}\nshutdown_grace = 1\n{top}\n"
    Path(cli.env["SIDEQUEST_CONFIG"]).write_text(text + agents_toml() + tables, encoding="utf-8")


def _agent_names(cli: Cli) -> set[str]:
    listed = json.loads(cli(cli.project("p"), "agents", "--json").stdout)
    return {agent["name"] for agent in listed["agents"]}


def _status(cli: Cli) -> dict[str, object]:
    return dict(json.loads(cli(cli.project("p"), "status", "--json").stdout))


def _run(cli: Cli, agent: str, prompt: str) -> TaskDetail:
    done = cli(cli.project("p"), "submit", agent, prompt, "--wait", "--json")
    return TaskDetail.model_validate_json(done.stdout)


def test_a_new_config_agent_is_usable_after_sidequest_reload_without_a_restart(cli: Cli) -> None:
    assert "greeter" not in _agent_names(cli)  # this started the daemon
    pid = _daemon_pid(cli.home)
    _write_config(cli, tables=GREETER)
    refused = cli(cli.project("p"), "submit", "greeter", "hi", code=1)
    assert "no agent named 'greeter'" in refused.stderr  # watch_config = false: not read yet

    done = cli(cli.project("p"), "reload")
    assert "changed: agents.greeter" in done.stdout
    assert _run(cli, "greeter", "hello").result.content == "hello"  # type: ignore[union-attr]
    assert _daemon_pid(cli.home) == pid


def test_the_daemon_notices_a_changed_config_file_by_itself(cli: Cli) -> None:
    _write_config(cli, watch=True)
    assert "greeter" not in _agent_names(cli)
    pid = _daemon_pid(cli.home)
    _write_config(cli, tables=GREETER, watch=True)
    wait_until(lambda: "greeter" in _agent_names(cli), "the daemon to read the changed config")
    assert _run(cli, "greeter", "noticed").result.content == "noticed"  # type: ignore[union-attr]
    assert _daemon_pid(cli.home) == pid


def test_a_new_agent_folder_and_its_file_are_usable_after_reload(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "team-agents"
    folder.mkdir()
    (folder / "writer.md").write_text(WRITER)
    assert "writer" not in _agent_names(cli)
    _write_config(cli, top=f'agent_dirs = ["{folder}"]')
    assert "changed: agent_dirs" in cli(cli.project("p"), "reload").stdout
    assert "writer" in _agent_names(cli)


def test_a_broken_config_is_not_applied_the_old_keeps_serving_and_status_shows_why(cli: Cli) -> None:
    cli(cli.project("p"), "agents")
    _write_config(cli, top='max_concurrency = "many"', tables=GREETER)

    refused = cli(cli.project("p"), "reload", "--json", code=1)
    result = ReloadResult.model_validate_json(refused.stdout)
    assert not result.applied and result.problem is not None and "'max_concurrency'" in result.problem

    status = _status(cli)
    config = status["config"]
    assert isinstance(config, dict)
    assert "'max_concurrency'" in config["problem"] and config["differs_on_disk"] is True
    assert config["file"] == cli.env["SIDEQUEST_CONFIG"]
    assert "CONFIG PROBLEM" in cli(cli.project("p"), "status").stdout
    # Task commands are clients: they warn about the file and go on, served by the old config.
    assert _run(cli, "echo", "still serving").result.content == "still serving"  # type: ignore[union-attr]
    assert "greeter" not in _agent_names(cli)  # nothing of the refused version was applied
    warned = cli(cli.project("p"), "agents")
    assert "warning: configuration error" in warned.stderr and "last good configuration" in warned.stderr

    _write_config(cli, tables=GREETER)
    assert "changed: agents.greeter" in cli(cli.project("p"), "reload").stdout
    config = _status(cli)["config"]
    assert isinstance(config, dict) and config["problem"] is None and config["differs_on_disk"] is False


def test_a_config_file_that_is_not_toml_is_refused_by_reload(cli: Cli) -> None:
    cli(cli.project("p"), "agents")
    Path(cli.env["SIDEQUEST_CONFIG"]).write_text("max_concurrency = [\n")
    refused = cli(cli.project("p"), "reload", code=1)
    assert "not reloaded" in refused.stdout and "cannot read configuration" in refused.stdout
    assert "keeps serving" in refused.stdout


def test_a_changed_port_is_reported_as_needing_a_restart_and_the_daemon_keeps_its_port(cli: Cli) -> None:
    cli(cli.project("p"), "agents")
    before = _status(cli)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _write_config(cli, top=f"max_concurrency = 2\n[http]\nport = {port}\n")
    done = cli(cli.project("p"), "reload")
    assert "changed: max_concurrency" in done.stdout
    assert "needs restart: http.port" in done.stdout
    after = _status(cli)
    assert after["port"] == before["port"] and after["pid"] == before["pid"]
    assert after["config"]["needs_restart"] == ["http.port"]  # type: ignore[index]


def test_reload_without_a_daemon_says_so_and_starts_none(cli: Cli) -> None:
    done = cli(cli.project("p"), "reload", code=3)
    assert "no sidequest daemon is running" in done.stderr
    assert _daemon_pid(cli.home) is None


def test_env_set_and_unset_reach_the_running_daemon_after_reload(cli: Cli) -> None:
    assert "MY_TOKEN" not in _environment(cli)
    pid = _daemon_pid(cli.home)
    cli(cli.project("p"), "env", "set", "MY_TOKEN", stdin=SECRET)
    done = cli(cli.project("p"), "reload")
    assert "environment MY_TOKEN" in done.stdout and SECRET not in done.stdout + done.stderr
    assert _environment(cli)["MY_TOKEN"] == SECRET
    cli(cli.project("p"), "env", "unset", "MY_TOKEN")
    cli(cli.project("p"), "reload")
    assert "MY_TOKEN" not in _environment(cli)
    assert _daemon_pid(cli.home) == pid


def _environment(cli: Cli) -> dict[str, str]:
    detail = _run(cli, "environment", "x")
    assert detail.result is not None
    return dict(json.loads(detail.result.content))


# ---- the key notice -------------------------------------------------------------------------


def _with_key(cli: Cli) -> Cli:
    return Cli(home=cli.home, env={**cli.env, "ANTHROPIC_API_KEY": SECRET}, projects=cli.projects)


def test_a_client_with_a_key_the_daemon_lacks_says_so_once_with_the_fix(cli: Cli) -> None:
    cli(cli.project("p"), "agents")  # the daemon starts from a shell without the key
    keyed = _with_key(cli)
    first = keyed(cli.project("p"), "agents")
    [line] = [line for line in first.stderr.splitlines() if "ANTHROPIC_API_KEY" in line]
    assert "the sidequest daemon does not" in line
    assert "`sidequest env set ANTHROPIC_API_KEY`" in line and "`sidequest reload`" in line
    assert SECRET not in first.stdout + first.stderr
    second = keyed(cli.project("p"), "tasks")
    assert "ANTHROPIC_API_KEY" not in second.stderr  # once per daemon start


def test_under_json_the_key_notice_waits_for_the_next_plain_command(cli: Cli) -> None:
    """--json keeps stderr for one JSON error object: the notice is not said there, and not
    remembered as said either."""
    cli(cli.project("p"), "agents")  # the daemon starts from a shell without the key
    keyed = _with_key(cli)
    quiet = keyed(cli.project("p"), "agents", "--json")
    assert quiet.stderr == ""
    json.loads(quiet.stdout)
    failed = keyed(cli.project("p"), "show", "t_nope", "--json", code=1)
    assert len(failed.stderr.splitlines()) == 1 and "ANTHROPIC_API_KEY" not in failed.stderr
    plain = keyed(cli.project("p"), "agents")
    assert "`sidequest env set ANTHROPIC_API_KEY`" in plain.stderr


def test_a_client_whose_key_the_daemon_has_says_nothing(cli: Cli) -> None:
    cli(cli.project("p"), "env", "set", "ANTHROPIC_API_KEY", stdin=SECRET)
    done = _with_key(cli)(cli.project("p"), "agents")
    assert "ANTHROPIC_API_KEY" not in done.stderr


def test_the_stdio_front_gives_the_key_notice_on_stderr_and_keeps_stdout_for_the_protocol(cli: Cli) -> None:
    cli(cli.project("p"), "agents")
    project = cli.project("p")
    done = subprocess.run(
        [sys.executable, "-m", "sidequest.cli", "stdio"],
        env={**cli.env, "ANTHROPIC_API_KEY": SECRET, "CLAUDE_PROJECT_DIR": str(project)},
        cwd=project,
        input="",
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "`sidequest env set ANTHROPIC_API_KEY`" in done.stderr
    assert SECRET not in done.stderr
    assert os.path.exists(cli.home / "key-notice.json")


# ---- in one process: what a reload changes in a running engine ------------------------------


async def test_a_raised_max_concurrency_starts_queued_tasks_at_once(tmp_path: Path) -> None:
    """The engine and the reloader in this process, on a real DuckDB file and a real config file."""
    import anyio

    from sidequest.config import load_settings
    from sidequest.engine.engine import Engine
    from sidequest.reload import Reloader

    config = tmp_path / "sidequest.toml"
    agents = '[agents.sleep]\nexecutor = "python"\ncallable = "sidequest.testing.agents:sleep"\n'
    config.write_text(f"watch_config = false\nmax_concurrency = 1\n{agents}")
    settings = load_settings(config, {"SIDEQUEST_HOME": str(tmp_path / "home")})
    (tmp_path / "home").mkdir()
    reloader = Reloader(settings, config)
    engine = Engine(settings)
    reloader.attach(engine)
    async with engine.running():
        first = await engine.submit("sleep", "30", project=str(tmp_path))
        second = await engine.submit("sleep", "30", project=str(tmp_path))
        with anyio.fail_after(30):
            while engine.running_count < 1:
                await anyio.sleep(0.05)
        assert (await engine.get_task(second.task_id)).status == "queued"  # one slot

        config.write_text(f"watch_config = false\nmax_concurrency = 2\n{agents}")
        result = await reloader.reload()
        assert result.applied and result.changed == ["max_concurrency"]
        with anyio.fail_after(30):  # a deadline for a hang, not a timing claim
            while engine.running_count < 2:
                await anyio.sleep(0.05)
        for task in (first, second):
            await engine.cancel(task.task_id)


async def test_reload_applies_task_log_keeps_the_lease_and_skips_a_touch(tmp_path: Path) -> None:
    """[task_log] takes effect for new entries; lease_seconds waits for a restart (the renewal period
    is fixed at start); a save that changes nothing applies nothing (no new agent registry kept)."""
    from sidequest.config import load_settings
    from sidequest.engine.engine import Engine
    from sidequest.reload import Reloader

    config = tmp_path / "sidequest.toml"
    agents = '[agents.noisy]\nexecutor = "python"\ncallable = "sidequest.testing.agents:logs_badly"\n'
    config.write_text(f"watch_config = false\nlease_seconds = 30\n{agents}")
    (tmp_path / "home").mkdir()
    settings = load_settings(config, {"SIDEQUEST_HOME": str(tmp_path / "home")})
    reloader = Reloader(settings, config)
    engine = Engine(settings)
    reloader.attach(engine)
    async with engine.running():
        registry = engine.agents
        config.write_text(f"watch_config = false\nlease_seconds = 30\n{agents}")  # saved, unchanged
        touched = await reloader.reload()
        assert touched.applied and touched.changed == [] and engine.agents is registry

        changed = f"watch_config = false\nlease_seconds = 3\n[task_log]\nmax_event_chars = 100\n{agents}"
        config.write_text(changed)
        result = await reloader.reload()
        assert result.applied and result.changed == ["task_log"]
        assert result.needs_restart == ["lease_seconds"] and engine.settings.lease_seconds == 30
        task = await engine.submit("noisy", "go", project=str(tmp_path))
        await engine.wait_for_tasks([task.task_id], timeout=10)
        texts = [e.message for e in (await engine.get_task_log(task.task_id)).events if e.kind == "text"]
        assert [len(t) for t in texts] == [100, len("big data")]  # 4000 before the reload
