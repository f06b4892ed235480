"""`sidequest doctor` against a real daemon started by the CLI, from a shell without the API key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import Cli
from test_env import SECRET, private_cli

from sidequest.doctor import DoctorReport

pytestmark = pytest.mark.slow

RESEARCHER = """\
---
name: researcher
description: Finds and summarises sources on a topic.
---
You are a careful researcher.
"""


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    with private_cli(tmp_path) as runner:
        yield runner


def _project_with_anthropic_agent(cli: Cli) -> Path:
    project = cli.project("research")
    (project / ".claude" / "agents").mkdir(parents=True)
    (project / ".claude" / "agents" / "researcher.md").write_text(RESEARCHER)
    return project


def _check(report: DoctorReport, name: str) -> tuple[str, str, str | None]:
    [check] = [c for c in report.checks if c.name == name]
    return check.status, check.detail, check.fix


def test_doctor_fails_on_a_missing_key_and_passes_after_env_set_and_a_restart(cli: Cli) -> None:
    project = _project_with_anthropic_agent(cli)
    failed = cli(project, "doctor", code=1)
    [line] = [line for line in failed.stdout.splitlines() if "ANTHROPIC_API_KEY:" in line]
    assert line.startswith("fail") and "missing" in line and "researcher" in line
    assert "sidequest env set ANTHROPIC_API_KEY" in line

    cli(project, "env", "set", "ANTHROPIC_API_KEY", stdin=SECRET)
    cli(project, "stop")
    done = cli(project, "doctor", "--json")
    report = DoctorReport.model_validate_json(done.stdout)
    assert report.ok
    status, detail, _ = _check(report, "ANTHROPIC_API_KEY")
    assert status == "ok" and f"env file {cli.home / 'env'}" in detail
    assert SECRET not in done.stdout + done.stderr


def test_doctor_reports_the_daemon_store_agents_and_disk(cli: Cli) -> None:
    report = DoctorReport.model_validate_json(cli(cli.project("p"), "doctor", "--json").stdout)
    assert report.ok
    assert _check(report, "daemon")[0] == "ok"
    status, detail, _ = _check(report, "store")
    assert status == "ok" and str(cli.home / "sidequest.duckdb") in detail and "schema version" in detail
    assert _check(report, "ANTHROPIC_API_KEY")[0] == "info"  # no anthropic agent needs it here
    assert "echo" in _check(report, "agents")[1]
    assert _check(report, "disk")[0] == "ok"


def test_doctor_fails_on_a_broken_agent_file_and_names_it(cli: Cli) -> None:
    project = cli.project("broken")
    (project / ".claude" / "agents").mkdir(parents=True)
    broken = project / ".claude" / "agents" / "bad.md"
    broken.write_text("---\nname: bad\n---\nno description\n")
    report = DoctorReport.model_validate_json(cli(project, "doctor", "--json", code=1).stdout)
    status, detail, fix = _check(report, "agent file")
    assert status == "fail" and "description" in detail and fix == f"fix or remove {broken}"


def test_doctor_passes_after_env_set_and_reload_without_a_restart(cli: Cli) -> None:
    project = _project_with_anthropic_agent(cli)
    config = Path(cli.env["SIDEQUEST_CONFIG"])
    config.write_text("watch_config = false\n" + config.read_text())  # only the reload applies it
    failed = DoctorReport.model_validate_json(cli(project, "doctor", "--json", code=1).stdout)
    status, _, fix = _check(failed, "ANTHROPIC_API_KEY")
    assert status == "fail" and fix == "`sidequest env set ANTHROPIC_API_KEY`, then `sidequest reload`"
    pid = (cli.home / "daemon.json").read_text()

    cli(project, "env", "set", "ANTHROPIC_API_KEY", stdin=SECRET)
    stale = DoctorReport.model_validate_json(cli(project, "doctor", "--json", code=1).stdout)
    status, detail, fix = _check(stale, "config")
    assert status == "fail" and "changed since" in detail and fix == "`sidequest reload`"

    cli(project, "reload")
    done = cli(project, "doctor", "--json")
    report = DoctorReport.model_validate_json(done.stdout)
    assert report.ok, report
    assert _check(report, "ANTHROPIC_API_KEY")[0] == "ok"
    assert _check(report, "config")[0] == "ok"
    assert (cli.home / "daemon.json").read_text() == pid  # the same daemon
    assert SECRET not in done.stdout + done.stderr


def test_doctor_shows_a_config_the_daemon_refused_and_still_runs_with_a_broken_file(cli: Cli) -> None:
    project = cli.project("p")
    cli(project, "agents")
    config = Path(cli.env["SIDEQUEST_CONFIG"])
    config.write_text("max_concurrency = 0\n" + config.read_text())
    cli(project, "reload", code=1)
    report = DoctorReport.model_validate_json(cli(project, "doctor", "--json", code=1).stdout)
    status, detail, fix = _check(report, "config")
    assert status == "fail" and "not applied" in detail and "max_concurrency" in detail
    assert fix == "fix the file, then `sidequest reload`"
    assert _check(report, "config file")[0] == "fail"  # this command could not read it either
    status, detail, _ = _check(report, "store")
    assert status == "ok" and "readable" in detail
