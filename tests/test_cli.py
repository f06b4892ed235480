"""The daemon's client commands (submit, tasks, show, cancel, notifications, agents, schedules) as a user runs
them: `python -m sidequest.cli …` processes against one real daemon they start themselves.

One daemon serves the whole module (starting one per test would dominate the run time); each test
works in a project of its own, so listings and notifications do not see other tests' tasks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TEST_AGENTS, agents_toml

import sidequest
from sidequest.commands import ScheduleDetail, TaskDetail, TaskListing, UsageError, parse_options
from sidequest.models import (
    AgentList,
    CancelResult,
    NotificationPage,
    ScheduleCreated,
    ScheduleDeleted,
    ScheduleInfo,
    SchedulePage,
    TaskStatus,
    TaskSubmitted,
    WorkflowInfo,
)

pytestmark = pytest.mark.slow

REPO = Path(sidequest.__file__).resolve().parent.parent
COMMAND_TIMEOUT = 60.0
_DROPPED_ENV = ("SIDEQUEST_", "ANTHROPIC_", "CLAUDE_", "FORCE_COLOR", "FORCE_TERMINAL", "COLUMNS", "TERM")
"""What a developer's shell may set that would change what the commands print or which daemon they use."""


@dataclass
class Cli:
    """Runs `sidequest` in a project against the module's data dir."""

    home: Path
    env: dict[str, str]
    projects: Path

    def project(self, name: str) -> Path:
        path = self.projects / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __call__(
        self, project: Path, *args: str, stdin: str | None = None, code: int = 0
    ) -> subprocess.CompletedProcess[str]:
        return self.many(project, list(args), stdin=stdin, code=code)[0]

    def many(
        self, project: Path, *commands: list[str], stdin: str | None = None, code: int = 0
    ) -> list[subprocess.CompletedProcess[str]]:
        """Independent commands at once: each process spends most of its time importing."""
        started = [
            (
                args,
                subprocess.Popen(
                    [sys.executable, "-m", "sidequest.cli", *args],
                    env={**self.env, "CLAUDE_PROJECT_DIR": str(project)},
                    cwd=project,
                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
            for args in commands
        ]
        results = []
        for args, process in started:
            try:
                stdout, stderr = process.communicate(stdin, timeout=COMMAND_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
            assert process.returncode == code, (
                f"sidequest {' '.join(args)} exited {process.returncode}, expected {code}\n"
                f"stdout:\n{stdout}\nstderr:\n{stderr}"
            )
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
        return results


def _daemon_pid(home: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads((home / "daemon.json").read_text())["pid"])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@contextlib.contextmanager
def cli_session(base: Path, config_text: str, extra_env: dict[str, str] | None = None) -> Iterator[Cli]:
    """A data dir, a config and an environment of our own for `sidequest …` subprocesses; the daemon
    they start outlives every command by design, and must not outlive the tests."""
    home = base / "home"
    home.mkdir()
    config = base / "test.toml"
    config.write_text(config_text, encoding="utf-8")
    user_agents = base / "user-agents"  # not the real ~/.claude/agents
    user_agents.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV)}
    env.update(
        SIDEQUEST_HOME=str(home),
        SIDEQUEST_CONFIG=str(config),
        SIDEQUEST_USER_AGENT_DIR=str(user_agents),
        PYTHONPATH=str(REPO),
        NO_COLOR="1",
        **(extra_env or {}),
    )
    runner = Cli(home=home, env=env, projects=base / "projects")
    try:
        yield runner
    finally:
        pid = _daemon_pid(home)
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [sys.executable, "-m", "sidequest.cli", "stop"],
                env=env,
                cwd=base,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
            )
        for found in {pid, _daemon_pid(home)} - {None}:
            assert found is not None
            if _alive(found):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(found, signal.SIGKILL)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    settings = "shutdown_grace = 1\nlease_seconds = 5\n\n"
    every_second = "[schedules]\nallow_seconds = true\nmin_interval = 1\n\n"  # a schedule fires within a test
    with cli_session(tmp_path_factory.mktemp("cli"), settings + every_second + agents_toml()) as runner:
        yield runner


def wait_until(check: Callable[[], object], what: str, timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(0.2)


def only_line(stderr: str) -> str:
    """The error line, past any log lines (e.g. the daemon being started)."""
    lines = [line for line in stderr.splitlines() if line.startswith("sidequest: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_submit_with_options_then_show(cli: Cli) -> None:
    project = cli.project("submit")
    options = ['tags=["a","b"]', "priority=high", "timeout=30m", "retry_backoff.initial=2"]
    options += ["metadata.ticket=ABC-1", "workflow_name=2024"]
    submit = ["submit", "echo", "hello from the cli", "--json"]
    for option in options:
        submit += ["--option", option]
    submitted = TaskSubmitted.model_validate_json(cli(project, *submit).stdout)
    assert not submitted.deduplicated

    def finished() -> TaskDetail | None:
        detail = TaskDetail.model_validate_json(cli(project, "show", submitted.task_id, "--json").stdout)
        return detail if detail.task.status.finished else None

    detail = wait_until(finished, "the echo task to finish")
    assert isinstance(detail, TaskDetail)
    assert detail.task.status == TaskStatus.completed
    assert detail.result is not None and detail.result.content == "hello from the cli"
    assert detail.result.next_offset is None
    task = detail.task
    assert (task.tags, task.priority, task.timeout) == (["a", "b"], "high", 1800.0)
    assert task.metadata == {"ticket": "ABC-1"}
    assert task.scope == str(project)
    assert task.prompt == "hello from the cli"

    shown, workflow_json = cli.many(
        project, ["show", submitted.task_id], ["show", submitted.workflow_id, "--json"]
    )
    assert "completed" in shown.stdout and submitted.workflow_id in shown.stdout
    assert re.search(r"^prompt +hello from the cli$", shown.stdout, re.MULTILINE), shown.stdout
    assert shown.stdout.endswith("hello from the cli\n")
    workflow = WorkflowInfo.model_validate_json(workflow_json.stdout)
    assert workflow.name == "2024"
    assert [t.task_id for t in workflow.tasks or []] == [submitted.task_id]


def test_submit_wait_stdin_paged_result_and_failure(cli: Cli) -> None:
    project = cli.project("wait")
    waited, big = cli.many(
        project,
        ["submit", "echo", "-", "--wait"],
        ["submit", "big_result", "120000", "--wait", "--json"],
        stdin="from stdin\n",
    )
    assert waited.stdout == "from stdin\n"
    result = TaskDetail.model_validate_json(big.stdout).result
    assert result is not None and result.total_chars == 120_000  # more than one page
    assert len(result.content) == 120_000 and result.content.startswith("abcdefghij")
    failed = cli(project, "submit", "fail", "boom", "-o", "max_retries=0", "--wait", "--json", code=1)
    detail = TaskDetail.model_validate_json(failed.stdout)
    assert detail.task.status == TaskStatus.failed and "boom" in (detail.task.error or "")


def test_tasks_lists_active_then_all_and_cancel(cli: Cli) -> None:
    project = cli.project("tasks")
    sleeping, quick = cli.many(
        project, ["submit", "sleep", "60", "--json"], ["submit", "echo", "quick", "--wait", "--json"]
    )
    sleeper = TaskSubmitted.model_validate_json(sleeping.stdout)
    done = TaskDetail.model_validate_json(quick.stdout)
    assert done.task.status == TaskStatus.completed and done.result is not None
    assert done.result.content == "quick"

    active_json, table, all_json = cli.many(
        project, ["tasks", "--json"], ["tasks"], ["tasks", "--all", "--json"]
    )
    active = TaskListing.model_validate_json(active_json.stdout)
    assert [t.task_id for t in active.tasks] == [sleeper.task_id]
    assert not active.tasks[0].status.finished
    assert sleeper.task_id in table.stdout and "sleep" in table.stdout
    assert done.task.task_id not in table.stdout
    everything = TaskListing.model_validate_json(all_json.stdout)
    assert {t.task_id for t in everything.tasks} == {sleeper.task_id, done.task.task_id}

    cancelled = CancelResult.model_validate_json(cli(project, "cancel", sleeper.workflow_id, "--json").stdout)
    assert cancelled.cancelled == [sleeper.task_id]
    again, shown, listing = cli.many(
        project, ["cancel", sleeper.task_id], ["show", sleeper.task_id, "--json"], ["tasks"]
    )
    assert "already finished" in again.stdout and sleeper.task_id in again.stdout
    assert TaskDetail.model_validate_json(shown.stdout).task.status == TaskStatus.cancelled
    assert "no active tasks" in listing.stdout


def test_retry_queues_a_failed_task_again(cli: Cli) -> None:
    project = cli.project("retry")
    failed = cli(
        project, "submit", "flaky", "succeed on 2", "-o", "max_retries=0", "--wait", "--json", code=1
    )
    task_id = TaskDetail.model_validate_json(failed.stdout).task.task_id
    retried = cli(project, "retry", task_id)
    assert f"queued again: {task_id}" in retried.stdout and "attempt 2 next" in retried.stdout

    def finished() -> TaskDetail | None:
        detail = TaskDetail.model_validate_json(cli(project, "show", task_id, "--json").stdout)
        return detail if detail.task.status.finished else None

    detail = wait_until(finished, "the retried task to finish")
    assert isinstance(detail, TaskDetail) and detail.task.status == TaskStatus.completed
    refused = cli(project, "retry", task_id, code=1)
    assert "only a failed or cancelled task can be retried" in only_line(refused.stderr)


def test_notifications_are_read_once(cli: Cli) -> None:
    project = cli.project("notifications")
    done = TaskDetail.model_validate_json(cli(project, "submit", "echo", "ping", "--wait", "--json").stdout)
    task_id = done.task.task_id

    def events(page: NotificationPage) -> list[str]:
        return [n.kind.value for n in page.notifications if n.task_id == task_id]

    peeked = cli(project, "notifications", "--peek").stdout
    assert task_id in peeked and "task_completed" in peeked
    read = NotificationPage.model_validate_json(cli(project, "notifications", "--json").stdout)
    assert events(read) == ["task_completed"]
    after = NotificationPage.model_validate_json(cli(project, "notifications", "--json").stdout)
    assert after.notifications == []


def test_agents_lists_configured_and_broken_files(cli: Cli) -> None:
    project = cli.project("agents")
    agent_dir = project / ".claude" / "agents"
    agent_dir.mkdir(parents=True)
    (agent_dir / "broken.md").write_text("---\nname: [unclosed\n---\nbody\n", encoding="utf-8")

    as_json, table = cli.many(project, ["agents", "--json"], ["agents"])
    listing = AgentList.model_validate_json(as_json.stdout)
    assert set(TEST_AGENTS) <= {a.name for a in listing.agents}
    assert [Path(p.file).name for p in listing.problems] == ["broken.md"]
    assert "echo" in table.stdout and "python" in table.stdout and "broken.md" in table.stdout


def test_bad_option_is_a_usage_error_and_submits_nothing(cli: Cli) -> None:
    project = cli.project("bad-option")
    bad, unknown = cli.many(
        project,
        ["submit", "echo", "hi", "-o", "max_retries=99"],
        ["submit", "echo", "hi", "-o", "colour=blue", "--json"],
        code=2,
    )
    assert bad.stdout == "" and unknown.stdout == ""
    assert "max_retries" in only_line(bad.stderr)
    assert "unknown option 'colour'" in json.loads(unknown.stderr)["error"]["message"]  # --json: JSON error

    listing = TaskListing.model_validate_json(cli(project, "tasks", "--all", "--json").stdout)
    assert listing.tasks == []


def test_unknown_ids_fail_with_one_line(cli: Cli) -> None:
    project = cli.project("unknown")
    missing, missing_workflow = cli.many(
        project, ["show", "t_nosuchtask", "--json"], ["cancel", "wf_nosuchworkflow"], code=1
    )
    assert missing.stdout == "" and missing_workflow.stdout == ""
    assert "t_nosuchtask" in json.loads(missing.stderr)["error"]["message"]  # --json: one JSON object
    assert "wf_nosuchworkflow" in only_line(missing_workflow.stderr)


def test_schedule_fires_then_pause_resume_unschedule(cli: Cli) -> None:
    project = cli.project("schedules")
    ticking, daily = cli.many(
        project,
        [
            "schedule",
            "echo",
            "tick",
            "--cron",
            "*/1 * * * * *",
            "--name",
            "ticker",
            "--max-runs",
            "2",
            "--json",
        ],
        [
            "schedule",
            "echo",
            "standup",
            "--cron",
            "0 9 * * 1-5",
            "--tz",
            "Europe/Berlin",
            "-o",
            "priority=high",
        ],
    )
    ticker = ScheduleCreated.model_validate_json(ticking.stdout).schedule_id
    assert ticker.startswith("sch_")
    assert "scheduled sch_" in daily.stdout
    next_runs = [line for line in daily.stdout.splitlines() if " 09:00:00 CE" in line]  # CET or CEST
    assert len(next_runs) == 5, daily.stdout
    standup = daily.stdout.split("scheduled ", 1)[1].split()[0]

    def fired() -> ScheduleDetail | None:
        detail = ScheduleDetail.model_validate_json(cli(project, "schedule-show", ticker, "--json").stdout)
        return detail if detail.runs.tasks and detail.runs.tasks[-1].status.finished else None

    detail = wait_until(fired, "the every-second schedule to run once", timeout=20)
    assert isinstance(detail, ScheduleDetail)
    first = detail.runs.tasks[-1]
    assert first.schedule_id == ticker and first.status == TaskStatus.completed and first.agent == "echo"

    listing, table, shown, tasks = cli.many(
        project, ["schedules", "--json"], ["schedules"], ["schedule-show", standup], ["tasks", "--all"]
    )
    page = SchedulePage.model_validate_json(listing.stdout)
    by_id = {s.schedule_id: s for s in page.schedules}
    assert set(by_id) == {ticker, standup} and page.total == 2
    assert by_id[standup].options == {"priority": "high"} and by_id[standup].timezone == "Europe/Berlin"
    assert by_id[ticker].name == "ticker" and by_id[ticker].runs >= 1
    assert "ticker" in table.stdout and "0 9 * * 1-5" in table.stdout and "Europe/Berlin" in table.stdout
    assert "standup" in shown.stdout and "no runs yet" in shown.stdout and "active" in shown.stdout
    assert "SCHEDULE" in tasks.stdout and ticker in tasks.stdout

    paused = ScheduleInfo.model_validate_json(cli(project, "pause", standup, "--json").stdout)
    assert paused.state == "paused" and paused.next_run_at is None
    assert "paused" in cli(project, "schedules").stdout
    resumed = cli(project, "resume", standup).stdout
    assert f"resumed {standup}" in resumed and "next run" in resumed

    deleted, gone = cli.many(project, ["unschedule", standup, "--json"], ["unschedule", ticker])
    assert ScheduleDeleted.model_validate_json(deleted.stdout).deleted
    assert f"deleted schedule {ticker}" in gone.stdout
    after, empty = cli.many(project, ["schedules", "--json"], ["schedules"])
    assert SchedulePage.model_validate_json(after.stdout).schedules == []
    assert "no schedules" in empty.stdout
    missing = cli(project, "schedule-show", standup, code=1)
    assert missing.stdout == "" and standup in only_line(missing.stderr)


def test_schedule_mistakes_are_one_line_errors(cli: Cli) -> None:
    project = cli.project("schedule-errors")
    bad_cron, bad_zone, bad_option = cli.many(
        project,
        ["schedule", "echo", "x", "--cron", "61 * * * *"],
        ["schedule", "echo", "x", "--cron", "0 9 * * *", "--tz", "Mars/Base"],
        ["schedule", "echo", "x", "--cron", "0 9 * * *", "-o", "delay=5"],
        code=1,
    )
    assert "minute 61 is out of range 0-59" in only_line(bad_cron.stderr)
    assert "unknown time zone 'Mars/Base'" in only_line(bad_zone.stderr)
    assert "delay" in only_line(bad_option.stderr)
    no_cron, bad_time = cli.many(
        project,
        ["schedule", "echo", "x"],
        ["schedule", "echo", "x", "--cron", "0 9 * * *", "--start-at", "tomorrow"],
        code=2,
    )
    assert "--cron" in no_cron.stderr and "ISO 8601" in bad_time.stderr
    assert SchedulePage.model_validate_json(cli(project, "schedules", "--json").stdout).total == 0


def test_option_parsing() -> None:
    """Values read as JSON when they parse, else as text; dotted keys nest."""
    options = parse_options(
        [
            'tags=["a","b"]',
            "max_retries=2",
            "batch=true",
            "timeout=30m",
            "priority=high",
            "retry_backoff.initial=5",
            "metadata.count=3",
            "workflow_name=2024",
        ]
    )
    assert options.tags == ["a", "b"]
    assert (options.max_retries, options.batch, options.timeout) == (2, True, 1800.0)
    assert options.retry_backoff.initial == 5.0
    assert options.metadata == {"count": 3}
    assert options.workflow_name == "2024"
    assert parse_options(["tags=x, y"]).tags == ["x", "y"]

    for pairs, message in [
        (["max_retries"], "expected KEY=VALUE"),
        (["nope=1"], "unknown option 'nope'"),
        (["retry_backoff.bogus=1"], "unknown option 'retry_backoff.bogus'"),
        (["timeout=forever"], "--option timeout=forever"),
        (["priority=low", "priority=high"], "given twice"),
        (["retry_backoff=1", "retry_backoff.initial=2"], "conflicts"),
        (["delay=1", "not_before=2030-01-01T00:00:00Z"], "give delay or not_before"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_options(pairs)
