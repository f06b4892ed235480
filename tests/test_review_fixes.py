"""Hostile or unlucky inputs found in review: each must cost one record or one request, never the
daemon, and never widen trust."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import all_test_agents
from test_engine import running_engine, wait_status

from sidequest.config import AgentConfig
from sidequest.engine.errors import InvalidRequest, NotFound
from sidequest.executors.base import ReportedUsage, TaskContext
from sidequest.models import ScheduleSpec, ScheduleUpdate, TaskOptions, TaskStatus, utcnow


async def absurd_usage(prompt: str, ctx: TaskContext) -> str:
    """Usage no store column can hold: numbers past 64 bits, a lone surrogate, a NaN cost."""
    ctx.record_usage(ReportedUsage("model-\ud800", 2**70, -5, 0, 1, float("nan")))
    return "done"


async def test_usage_the_store_cannot_hold_costs_the_record_not_the_daemon(tmp_path: Path) -> None:
    agents = {**all_test_agents(), "absurd": AgentConfig(callable="test_review_fixes:absurd_usage")}
    async with running_engine(tmp_path, agents=agents) as engine:
        submitted = await engine.submit("absurd", "go")
        info = await wait_status(engine, submitted.task_id, TaskStatus.completed)
        assert engine.failure is None, engine.failure
        assert info.usage is not None
        assert info.usage.input_tokens == 2**63 - 1 and info.usage.output_tokens == 0
        assert (await engine.submit("echo", "still serving")).task_id


async def test_gc_with_writes_queued_runs(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        done = await engine.submit("echo", "x")
        await wait_status(engine, done.task_id, TaskStatus.completed)
        engine.store.mark_delivered("rest:x", [1], utcnow())  # a background write waiting for the writer
        report = await engine.gc(older_than=0.001, dry_run=False)
        assert report.deleted.tasks == 1, report
        assert engine.failure is None
        with pytest.raises(NotFound):
            await engine.get_task(done.task_id)


async def test_a_scope_whose_symlink_now_points_outside_is_not_a_root(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "later").mkdir()
    async with running_engine(tmp_path / "home") as engine:
        scope, trusted = engine.admit_scope(str(project / "later"), str(project))
        assert engine.workdir_roots(scope, trusted) == [os.path.realpath(project / "later")]
        (project / "later").rmdir()
        (project / "later").symlink_to("/")
        assert engine.workdir_roots(scope, trusted) == [], "re-checked at run time, not only at admission"


async def test_joining_a_workflow_from_an_unnormalised_project_path(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    async with running_engine(tmp_path / "home") as engine:
        first = await engine.submit("echo", "a", project=f"{project}/")
        again = await engine.submit(
            "echo",
            "b",
            TaskOptions(workflow_id=first.workflow_id, scope=f"{project}//"),
            project=f"{project}/",
        )
        assert again.workflow_id == first.workflow_id


async def test_only_the_owning_project_may_change_what_a_schedule_runs(tmp_path: Path) -> None:
    owner, other = tmp_path / "owner", tmp_path / "other"
    owner.mkdir()
    other.mkdir()
    async with running_engine(tmp_path / "home") as engine:
        spec = ScheduleSpec(agent_definition="echo", prompt="daily report", cron="0 9 * * *")
        created = await engine.schedule_task(spec, project=str(owner))
        for change in (ScheduleUpdate(prompt="rm -rf"), ScheduleUpdate(options=TaskOptions(timeout=5))):
            with pytest.raises(InvalidRequest, match="belongs to project"):
                await engine.update_schedule(created.schedule_id, change, project=str(other))
            with pytest.raises(InvalidRequest, match="belongs to project"):
                await engine.update_schedule(created.schedule_id, change)  # no project at all
        paused = await engine.update_schedule(
            created.schedule_id, ScheduleUpdate(paused=True), project=str(other)
        )
        assert paused.state == "paused", "pausing is open to anyone holding the id"
        mine = await engine.update_schedule(
            created.schedule_id, ScheduleUpdate(prompt="weekly"), project=str(owner)
        )
        assert mine.prompt == "weekly"


async def test_the_attempt_journal_is_emptied_under_steady_load(tmp_path: Path) -> None:
    """Emptied once every start in it is committed, even while other writes keep arriving."""
    from sidequest.storage import duckdb as store_module

    async with running_engine(tmp_path) as engine:
        journal = engine.store._journal  # type: ignore[attr-defined]
        limit = store_module.JOURNAL_MAX_BYTES
        store_module.JOURNAL_MAX_BYTES = 2000  # a few dozen starts
        try:
            ids = [(await engine.submit("echo", f"{i}")).task_id for i in range(200)]
            for task_id in ids:
                await wait_status(engine, task_id, TaskStatus.completed)
            await engine.store.flush()
            assert journal.size <= 2000 + 200, journal.size
            assert journal.path.stat().st_size == journal.size
        finally:
            store_module.JOURNAL_MAX_BYTES = limit
