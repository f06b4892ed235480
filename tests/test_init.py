"""`sidequest init` on a fresh machine: the README's first commands then work as written."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import _DROPPED_ENV, REPO, Cli, _alive, _daemon_pid

from sidequest.commands import TaskDetail
from sidequest.config import load_settings
from sidequest.models import AgentList

pytestmark = pytest.mark.slow


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Cli]:
    """No config file anywhere, an empty data dir that does not exist yet, no user agents."""
    home = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV)}
    env.update(
        SIDEQUEST_HOME=str(home),
        SIDEQUEST_USER_AGENT_DIR=str(tmp_path / "user-agents"),
        PYTHONPATH=str(REPO),
        NO_COLOR="1",
    )
    runner = Cli(home=home, env=env, projects=tmp_path / "projects")
    try:
        yield runner
    finally:
        pid = _daemon_pid(home)
        subprocess.run(
            [sys.executable, "-m", "sidequest.cli", "stop"], env=env, capture_output=True, timeout=60
        )
        if pid is not None and _alive(pid):
            os.kill(pid, 9)


def test_init_makes_the_readme_echo_submit_work_and_shows_the_example_agent(fresh: Cli) -> None:
    project = fresh.project("p")
    fresh(project, "init")
    config = fresh.home / "sidequest.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    load_settings(env={"SIDEQUEST_HOME": str(fresh.home)})  # the starter config is valid
    done = fresh(project, "submit", "echo", "-n hello", "--wait", "--json")
    detail = TaskDetail.model_validate_json(done.stdout)
    assert detail.task.status == "completed"
    assert detail.result is not None and detail.result.content == "-n hello\n"
    agents = AgentList.model_validate_json(fresh(project, "agents", "--json").stdout)
    executors = {agent.name: agent.executor for agent in agents.agents}
    assert executors == {"echo": "command", "research": "anthropic"} and agents.problems == []


def test_init_refuses_to_overwrite_without_force(fresh: Cli) -> None:
    project = fresh.project("p")
    fresh(project, "init")
    config = fresh.home / "sidequest.toml"
    config.write_text("max_concurrency = 2\n")
    again = fresh(project, "init", code=1)
    assert again.stderr.strip().splitlines()[-1].startswith("sidequest: ")
    assert "--force" in again.stderr and config.read_text() == "max_concurrency = 2\n"
    fresh(project, "init", "--force")
    assert "[agents.echo]" in config.read_text()
