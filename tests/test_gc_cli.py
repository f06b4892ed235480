"""`sidequest gc` as a user runs it: `python -m sidequest.cli` processes against a real daemon.

A module of its own, with its own daemon and data dir (the `cli` fixture of test_cli, imported):
gc deletes across every project, so it must not share a store with other tests' tasks.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_cli import Cli, cli, only_line, wait_until  # noqa: F401 (cli: the fixture, one daemon per module)

from sidequest.commands import TaskDetail
from sidequest.models import GcReport, TaskSubmitted

pytestmark = pytest.mark.slow


def finished_task(cli: Cli, project: Path, prompt: str) -> str:  # noqa: F811
    submitted = TaskSubmitted.model_validate_json(cli(project, "submit", "echo", prompt, "--json").stdout)

    def done() -> bool:
        shown = cli(project, "show", submitted.task_id, "--json").stdout
        return TaskDetail.model_validate_json(shown).task.status.finished

    wait_until(done, f"task {submitted.task_id} to finish")
    return submitted.task_id


def test_gc_dry_run_counts_then_gc_deletes_and_says_what_it_freed(cli: Cli) -> None:  # noqa: F811
    project = cli.project("gc")
    ids = [finished_task(cli, project, f"old soon {i}") for i in range(2)]
    time.sleep(1.2)  # both finished more than a second ago

    dry = GcReport.model_validate_json(cli(project, "gc", "--older-than", "1s", "--dry-run", "--json").stdout)
    assert dry.dry_run and dry.deleted.tasks == 2 and dry.deleted.results == 2 and dry.deleted.workflows == 2
    cli(project, "show", ids[0])  # still there

    human = cli(project, "gc", "--dry-run", "--older-than", "1s").stdout
    assert "would delete 2 finished tasks older than 1s" in human, human
    assert "nothing was deleted (dry run)" in human, human

    done = cli(project, "gc", "--older-than", "1s").stdout
    assert "deleted 2 finished tasks older than 1s" in done, done
    assert "results" in done and "workflows" in done, done
    assert "database " in done and "free for new rows" in done, done
    missing = cli(project, "show", ids[0], code=1)
    assert "unknown" in only_line(missing.stderr), missing.stderr

    again = GcReport.model_validate_json(cli(project, "gc", "--json").stdout)  # the retention setting: 30d
    assert again.older_than_seconds == 30 * 86400 and again.deleted.tasks == 0
    assert again.file_bytes_after > 0


@pytest.mark.parametrize(
    ("age", "message"),
    [
        ("abc", "'abc' is not a duration"),
        ("-1d", "an age must be more than zero"),
        ("0s", "an age must be more than zero"),
        ("4000d", "3650-day maximum"),
    ],
)
def test_gc_refuses_an_age_that_is_no_age_before_asking_the_daemon(
    cli: Cli,  # noqa: F811
    age: str,
    message: str,
) -> None:
    result = cli(cli.project("gc-bad"), "gc", f"--older-than={age}", code=2)
    assert "--older-than" in result.stderr and message in result.stderr, result.stderr
    assert result.stdout == ""
