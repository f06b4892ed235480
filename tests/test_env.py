"""The daemon's environment: `<data dir>/env`, `[env]` and `env_file` in the config, `sidequest env`.

Through the real surfaces: the CLI as a subprocess, a daemon it starts (detached) or `serve` in
the foreground, and the `environment` test agent, which returns what a python agent can read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import agents_toml
from test_cli import _DROPPED_ENV, COMMAND_TIMEOUT, REPO, Cli, _alive, _daemon_pid, wait_until

from sidequest.commands import TaskDetail
from sidequest.config import ConfigError, load_settings
from sidequest.env_cli import EnvListing
from sidequest.envfile import defined_environment, read_env_file

pytestmark = pytest.mark.slow

SECRET = "sk-test-not-a-real-key-1234"


@contextlib.contextmanager
def private_cli(tmp_path: Path) -> Iterator[Cli]:
    """A data dir of its own, started from a shell without ANTHROPIC_*; its daemon stopped at the end."""
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "test.toml"
    config.write_text("shutdown_grace = 1\n\n" + agents_toml(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV)}
    env.update(
        SIDEQUEST_HOME=str(home),
        SIDEQUEST_CONFIG=str(config),
        SIDEQUEST_USER_AGENT_DIR=str(tmp_path / "user-agents"),
        PYTHONPATH=str(REPO),
        NO_COLOR="1",
    )
    runner = Cli(home=home, env=env, projects=tmp_path / "projects")
    try:
        yield runner
    finally:
        pid = _daemon_pid(home)
        runner(runner.project("p"), "stop")
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    with private_cli(tmp_path) as runner:
        yield runner


def _agent_environment(cli: Cli) -> dict[str, str]:
    done = cli(cli.project("p"), "submit", "environment", "x", "--wait", "--json")
    detail = TaskDetail.model_validate_json(done.stdout)
    assert detail.result is not None
    return dict(json.loads(detail.result.content))


def _listing(cli: Cli) -> EnvListing:
    return EnvListing.model_validate_json(cli(cli.project("p"), "env", "list", "--json").stdout)


def test_env_set_reads_the_value_from_stdin_into_a_private_file_and_never_prints_it(cli: Cli) -> None:
    done = cli(cli.project("p"), "env", "set", "MY_TOKEN", stdin=SECRET + "\n")
    path = cli.home / "env"
    assert path.read_text() == f"MY_TOKEN={SECRET}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    listed = cli(cli.project("p"), "env", "list", "--json")
    assert SECRET not in done.stdout + done.stderr + listed.stdout + listed.stderr
    sources = {v.name: v.source for v in EnvListing.model_validate_json(listed.stdout).variables}
    assert sources["MY_TOKEN"] == "env file"


def test_env_unset_removes_the_name_and_keeps_the_others(cli: Cli) -> None:
    cli(cli.project("p"), "env", "set", "ONE", stdin="1")
    cli(cli.project("p"), "env", "set", "TWO", stdin="2")
    cli(cli.project("p"), "env", "unset", "ONE")
    assert read_env_file(cli.home / "env") == {"TWO": "2"}


@pytest.mark.parametrize("name", ["1ABC", "MY-TOKEN", "SIDEQUEST_HOME"])
def test_env_set_refuses_a_name_that_cannot_be_a_daemon_variable(cli: Cli, name: str) -> None:
    done = cli(cli.project("p"), "env", "set", name, stdin="x", code=2)
    assert done.stderr.startswith("sidequest: ") and done.stderr.count("\n") == 1
    assert not (cli.home / "env").exists()


def test_env_set_refuses_an_empty_value(cli: Cli) -> None:
    done = cli(cli.project("p"), "env", "set", "MY_TOKEN", stdin="", code=2)
    assert "no value for MY_TOKEN" in done.stderr


def test_a_daemon_started_without_a_variable_has_it_after_env_set_and_stop(cli: Cli) -> None:
    config = Path(cli.env["SIDEQUEST_CONFIG"])
    config.write_text("watch_config = false\n" + config.read_text())  # else it may read the file first
    assert "MY_TOKEN" not in _agent_environment(cli)  # this started the daemon, from a shell without it
    done = cli(cli.project("p"), "env", "set", "MY_TOKEN", stdin=SECRET)
    assert "sidequest reload" in done.stderr
    assert _listing(cli).pending == ["MY_TOKEN"]
    cli(cli.project("p"), "stop")
    assert _agent_environment(cli)["MY_TOKEN"] == SECRET  # the next command started a new daemon
    listing = _listing(cli)
    assert listing.running and listing.pending == []
    assert {v.name: v.source for v in listing.variables}["MY_TOKEN"] == "env file"


def test_a_foreground_serve_reads_the_env_file(cli: Cli) -> None:
    (cli.home / "env").write_text("# a comment\n\nMY_VAR=a=b c\n")
    serve = subprocess.Popen(
        [sys.executable, "-m", "sidequest.cli", "serve"],
        env=cli.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: _daemon_pid(cli.home) == serve.pid, "the foreground daemon to serve")
        assert _agent_environment(cli)["MY_VAR"] == "a=b c"
        status = json.loads(cli(cli.project("p"), "status", "--json").stdout)
        mine = {"name": "MY_VAR", "source": "env file", "file": str(cli.home / "env")}
        assert mine in status["environment"]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=COMMAND_TIMEOUT)


def test_a_bad_env_file_line_stops_serve_with_the_file_and_line(cli: Cli) -> None:
    (cli.home / "env").write_text("GOOD=1\nexport BAD\n")
    serve = subprocess.run(
        [sys.executable, "-m", "sidequest.cli", "serve"],
        env=cli.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert serve.returncode == 1
    assert f"{cli.home / 'env'}, line 2: expected NAME=value" in serve.stderr.splitlines()[-1]


def test_the_env_file_overrides_env_file_and_config_which_override_the_starter(tmp_path: Path) -> None:
    extra = tmp_path / "extra.env"
    extra.write_text("LANG=from-env-file-setting\nFROM_EXTRA=1\n")
    config = tmp_path / "sidequest.toml"
    config.write_text(f'env_file = "{extra}"\n[env]\nLANG = "from-config"\nTZ = "from-config"\n')
    (tmp_path / "env").write_text("LANG=from-data-dir\n")
    starter = {"SIDEQUEST_HOME": str(tmp_path), "LANG": "shell", "TZ": "shell", "PATH": "/bin", "OTHER": "x"}
    settings = load_settings(env=starter)
    env, sources = defined_environment(starter, settings, str(config), allowlist=True)
    assert env["LANG"] == "from-data-dir" and env["TZ"] == "from-config" and env["FROM_EXTRA"] == "1"
    assert env["PATH"] == "/bin" and "OTHER" not in env  # the allowlist still applies to the starter
    by_name = {v.name: (v.source, v.file) for v in sources}
    assert by_name["LANG"] == ("env file", str(tmp_path / "env"))
    assert by_name["TZ"] == ("config", str(config))
    assert by_name["FROM_EXTRA"] == ("env file", str(extra))
    assert by_name["PATH"] == ("starter", None)


def test_a_sidequest_setting_in_config_env_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "sidequest.toml").write_text('[env]\nSIDEQUEST_HOME = "/elsewhere"\n')
    starter = {"SIDEQUEST_HOME": str(tmp_path)}
    with pytest.raises(ConfigError, match="SIDEQUEST_HOME is a sidequest setting"):
        defined_environment(starter, load_settings(env=starter), None, allowlist=True)


def test_env_unset_says_when_the_config_still_sets_the_name(cli: Cli) -> None:
    config = Path(cli.env["SIDEQUEST_CONFIG"])
    config.write_text(config.read_text() + '\n[env]\nMY_TOKEN = "from-config"\n')
    cli(cli.project("p"), "env", "set", "MY_TOKEN", stdin=SECRET)
    done = cli(cli.project("p"), "env", "unset", "MY_TOKEN")
    assert f"still gets MY_TOKEN, from config {config}" in " ".join(done.stderr.split())
