"""Retention: finished tasks past their age go, with every row that hangs off them; nothing else does.

Real engines on a real DuckDB file in tmp_path. Tasks are made old the way time would: by moving
their `finished_at` back through the store while no engine runs, or by measuring from a later `now`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pytest
from conftest import wait_for

from sidequest.config import ConfigError, Settings, load_settings
from sidequest.engine.engine import Engine
from sidequest.engine.errors import InvalidRequest, NotFound
from sidequest.engine.retention import Retention, pass_interval
from sidequest.models import GcReport, ScheduleSpec, TaskInfo, TaskOptions, TaskStatus, utcnow
from sidequest.storage.duckdb import DuckDBStore
from sidequest.testing.clock import ManualClock

SCOPE = "/projects/retention"
DAY = timedelta(days=1)

TASK_TABLES = {
    "task_executions": "id",
    "task_attempts": "task_id",
    "task_results": "task_id",
    "token_usage": "task_id",
    "notifications": "task_id",
    "schedule_fires": "task_id",
    "webhook_callbacks": "task_id",
}


def options(**fields: Any) -> TaskOptions:
    return TaskOptions(scope=SCOPE, **fields)


async def finished(engine: Engine, agent: str, prompt: str, **fields: Any) -> TaskInfo:
    """Submit and wait until the task has finished."""
    task_id = (await engine.submit(agent, prompt, options(**fields))).task_id
    return await wait_until_finished(engine, task_id)


async def wait_until_finished(engine: Engine, task_id: str) -> TaskInfo:
    async def done() -> TaskInfo | None:
        info = await engine.get_task(task_id)
        return info if info.status.finished else None

    return await wait_for(done, what=f"task {task_id} to finish")


async def age(path: Path, task_ids: Iterable[str], by: timedelta) -> None:
    """Move tasks' finish back in time through the store, as if they had finished `by` ago."""
    store = DuckDBStore(path)
    store.open()
    try:
        for task_id in task_ids:
            task = await store.get_task(task_id)
            assert task is not None and task.finished_at is not None, task
            store.update_task(
                replace(task, finished_at=task.finished_at - by, updated_at=task.updated_at - by)
            )
        await store.flush()
    finally:
        store.close()


def rows_of(path: Path, task_ids: Iterable[str]) -> dict[str, int]:
    """Rows in every per-task table that still name one of `task_ids` (read from the file itself)."""
    ids = list(task_ids)
    with duckdb.connect(str(path), read_only=True) as con:
        return {
            table: con.execute(f"SELECT count(*) FROM {table} WHERE {column} = ANY($1)", [ids]).fetchone()[0]  # type: ignore[index]
            for table, column in TASK_TABLES.items()
        }


def counts(report: GcReport) -> dict[str, int]:
    return report.deleted.model_dump()


async def test_old_finished_tasks_go_with_every_row_of_theirs(settings: Settings) -> None:
    """Completed, failed and cancelled tasks past the age go with their attempts, results, usage,
    notifications and schedule fire keys, and their workflows when no task of them remains. Recent
    tasks, unfinished ones, a workflow that still has a task, and schedules stay."""
    clock = ManualClock(datetime(2026, 3, 6, 12, 0, tzinfo=UTC))
    engine = Engine(settings, clock=clock)
    async with engine.running():
        kept = await finished(engine, "echo", "old, in a workflow that gets a new task", workflow_name="kept")
        old = [
            kept,
            await finished(engine, "fail_permanently", "old failure"),
            await finished(engine, "reports_usage", "old usage"),
            await finished(engine, "flaky", "succeed on 2", retry_backoff={"initial": 0.01}),
        ]
        cancelled = await engine.submit("echo", "never ran", options(delay=3600))
        await engine.cancel(task_id=cancelled.task_id)
        old.append(await engine.get_task(cancelled.task_id))
        first = await finished(engine, "echo", "old pair, first", workflow_name="pair")
        old += [first, await finished(engine, "echo", "old pair, second", workflow_id=first.workflow_id)]
        schedule = await engine.schedule_task(
            ScheduleSpec(agent_definition="echo", prompt="scheduled run", cron="0 * * * *"), scope=SCOPE
        )
        clock.set(schedule.next_runs[0])
        assert await engine.scheduler.run_due() == 1
        runs = await engine.schedule_runs(schedule.schedule_id)
        old.append(await wait_until_finished(engine, runs.tasks[0].task_id))
        recent = await finished(engine, "echo", "recent")
        old_ids = [t.task_id for t in old]
        assert {t.status for t in old} == {TaskStatus.completed, TaskStatus.failed, TaskStatus.cancelled}
        assert (await engine.get_task(old[3].task_id)).attempts == 2

    await age(settings.database_path, old_ids, by=40 * DAY)
    before_rows = rows_of(settings.database_path, old_ids)
    assert before_rows["task_attempts"] == 8 and before_rows["token_usage"] == 1
    assert before_rows["schedule_fires"] == 1 and before_rows["task_results"] == 6

    # No pass at start here (that is another test): this one wants the report of gc itself.
    engine = Engine(settings.model_copy(update={"retention": None}), clock=clock)
    async with engine.running():
        joined = await finished(engine, "echo", "recent, same workflow", workflow_id=kept.workflow_id)
        queued = await engine.submit("echo", "waits an hour", options(delay=3600))
        running = await engine.submit("sleep", "30", options())
        await wait_for(lambda: _status_is(engine, running.task_id, TaskStatus.running), what="a running task")
        totals_before = await engine.store.count_rows()

        report = await engine.gc(older_than=30 * 86400)

        totals_after = await engine.store.count_rows()
        assert report.deleted.tasks == len(old_ids) == 8
        assert not report.dry_run and report.batches == 1 and report.checkpointed
        assert report.older_than_seconds == 30 * 86400
        table_of = {
            "tasks": "task_executions",
            "attempts": "task_attempts",
            "results": "task_results",
            "usage": "token_usage",
            "notifications": "notifications",
            "schedule_fires": "schedule_fires",
            "workflows": "workflow_executions",
        }
        for counter, table in table_of.items():  # the report says what actually left the file
            assert counts(report)[counter] == totals_before[table] - totals_after[table], counter
        assert report.deleted.workflows == 6  # every old workflow but "kept"

        for task in old:
            with pytest.raises(NotFound):
                await engine.get_task(task.task_id)
        for workflow_id in {t.workflow_id for t in old} - {kept.workflow_id}:
            with pytest.raises(NotFound):
                await engine.get_workflow(workflow_id)
        kept_now = await engine.get_workflow(kept.workflow_id)
        assert [t.task_id for t in kept_now.tasks or []] == [joined.task_id]
        assert (await engine.get_result(recent.task_id)).content == "recent"
        assert (await engine.get_task(queued.task_id)).status == TaskStatus.queued
        assert (await engine.get_task(running.task_id)).status == TaskStatus.running
        assert (await engine.get_schedule(schedule.schedule_id)).runs == 1  # schedules are configuration
        await engine.cancel(task_id=running.task_id)

    assert rows_of(settings.database_path, old_ids) == dict.fromkeys(TASK_TABLES, 0)


async def test_the_daemon_deletes_aged_tasks_when_it_starts(settings: Settings) -> None:
    engine = Engine(settings)
    async with engine.running():
        old = await finished(engine, "echo", "old")
        recent = await finished(engine, "echo", "recent")
    await age(settings.database_path, [old.task_id], by=31 * DAY)

    engine = Engine(settings)  # retention: 30 days, the default
    async with engine.running():

        async def gone() -> bool:
            return await engine.store.get_task(old.task_id) is None

        await wait_for(gone, what="the pass at start to delete the aged task")
        assert (await engine.get_task(recent.task_id)).status == TaskStatus.completed


async def _status_is(engine: Engine, task_id: str, status: TaskStatus) -> bool:
    return (await engine.get_task(task_id)).status == status


async def test_dry_run_deletes_nothing_and_counts_what_gc_then_deletes(engine: Engine) -> None:
    first = await finished(engine, "echo", "one", workflow_name="two tasks")
    await finished(engine, "echo", "two", workflow_id=first.workflow_id)
    await finished(engine, "reports_usage", "three")
    await finished(engine, "fail", "four", max_retries=1, retry_backoff={"initial": 0.01})
    later = utcnow() + 2 * DAY
    rows = await engine.store.count_rows()

    dry = await engine.retention.collect(older_than=86400, dry_run=True, now=later)

    assert await engine.store.count_rows() == rows
    assert dry.dry_run and dry.batches == 0 and not dry.checkpointed
    assert (dry.file_bytes_after, dry.wal_bytes_after) == (dry.file_bytes_before, dry.wal_bytes_before)
    real = await engine.retention.collect(older_than=86400, now=later)
    assert counts(dry) == counts(real)
    assert real.deleted.tasks == 4 and real.deleted.workflows == 3 and real.deleted.attempts == 5
    assert real.deleted.notifications == rows["notifications"] - 1  # the newest stays (see below)


async def test_tasks_newer_than_the_age_stay(engine: Engine) -> None:
    task = await finished(engine, "echo", "just now")

    report = await engine.gc(older_than=3600)

    assert report.deleted.tasks == 0 and report.batches == 0
    assert (await engine.get_task(task.task_id)).status == TaskStatus.completed


async def test_a_task_the_engine_holds_stays_whatever_its_row_says(
    settings: Settings, engine: Engine
) -> None:
    held = await finished(engine, "echo", "held")
    free = await finished(engine, "echo", "free")
    retention = Retention(
        engine.store, settings, held=lambda: {held.task_id}, now=lambda: utcnow() + 60 * DAY
    )

    report = await retention.collect()

    assert report.deleted.tasks == 1
    assert (await engine.get_task(held.task_id)).status == TaskStatus.completed
    with pytest.raises(NotFound):
        await engine.get_task(free.task_id)


async def test_a_task_with_writes_still_queued_waits_for_the_next_pass(settings: Settings) -> None:
    """A write must never land on a row retention just deleted (DuckDB can lose such an update)."""
    engine = Engine(settings)
    async with engine.running():
        task_id = (await finished(engine, "echo", "late write")).task_id
    store = DuckDBStore(settings.database_path)
    store.open()
    try:
        record = await store.get_task(task_id)
        assert record is not None
        store.update_task(
            replace(record, progress_message="queued, not yet written")
        )  # no writer: stays queued
        later = utcnow() + DAY

        kept, _ = await store.purge_finished(later, frozenset, 100)
        assert kept.tasks == 0 and await store.get_task(task_id) is not None

        await store.flush()
        gone, _ = await store.purge_finished(later, frozenset, 100)
        assert gone.tasks == 1 and await store.get_task(task_id) is None
    finally:
        store.close()


async def test_big_purges_go_in_bounded_batches_and_a_workflow_goes_with_its_last_task(
    settings: Settings, engine: Engine
) -> None:
    first = await finished(engine, "echo", "w1", workflow_name="spans batches")
    for i in range(4):
        await finished(engine, "echo", f"w{i + 2}", workflow_id=first.workflow_id)
    retention = Retention(engine.store, settings, batch_size=2, now=lambda: utcnow() + DAY)

    report = await retention.collect(older_than=60)

    assert report.batches == 3 and report.deleted.tasks == 5
    assert report.deleted.workflows == 1
    with pytest.raises(NotFound):
        await engine.get_workflow(first.workflow_id)


async def test_the_newest_notification_stays_so_cursors_never_go_back(settings: Settings) -> None:
    engine = Engine(settings)
    async with engine.running():
        for i in range(3):
            await finished(engine, "echo", f"task {i}")
        page = await engine.notifications(all_scopes=True, include_delivered=True, mark_delivered=False)
        newest = page.notifications[-1].cursor
        report = await engine.retention.collect(older_than=60, now=utcnow() + DAY)
        assert report.deleted.tasks == 3
        left = await engine.notifications(all_scopes=True, include_delivered=True, mark_delivered=False)
        assert [n.cursor for n in left.notifications] == [newest]

    engine = Engine(settings)  # the next start reads the cursor back from the store
    async with engine.running():
        await finished(engine, "echo", "after the restart")
        page = await engine.notifications(all_scopes=True, since=newest, include_delivered=True)
        assert [n.cursor for n in page.notifications] == [newest + 1]


async def test_old_schedule_notices_without_a_task_go_too(settings: Settings) -> None:
    """A schedule that skips a due time notifies without a task; those would pile up forever."""
    clock = ManualClock(datetime(2026, 3, 6, 12, 0, tzinfo=UTC))
    engine = Engine(settings, clock=clock)
    async with engine.running():
        created = await engine.schedule_task(
            ScheduleSpec(agent_definition="sleep", prompt="30", cron="* * * * *", overlap="skip"), scope=SCOPE
        )
        clock.set(created.next_runs[0])
        await engine.scheduler.run_due()
        clock.set(created.next_runs[1])
        await engine.scheduler.run_due()  # the first run still sleeps: this one is skipped
        page = await engine.notifications(all_scopes=True, include_delivered=True, mark_delivered=False)
        assert "schedule_skipped" in [n.kind for n in page.notifications]
        await engine.cancel(task_id=(await engine.get_schedule(created.schedule_id)).last_task_id)
        await finished(engine, "echo", "the newest notification")

        report = await engine.retention.collect(older_than=60, now=utcnow() + DAY)

        left = await engine.notifications(all_scopes=True, include_delivered=True, mark_delivered=False)
        assert [n.kind for n in left.notifications] == ["task_completed"]
        assert report.deleted.tasks == 2 and report.deleted.schedule_fires == 1
        assert (await engine.get_schedule(created.schedule_id)).runs == 1


async def test_the_daemon_loop_deletes_tasks_as_they_age(settings: Settings, engine: Engine) -> None:
    now = [utcnow()]
    retention = Retention(engine.store, settings, now=lambda: now[0])
    task = await finished(engine, "echo", "ages while the loop runs")
    async with anyio.create_task_group() as tg:
        tg.start_soon(retention.run, 0.05)
        await anyio.sleep(0.2)
        assert (await engine.get_task(task.task_id)).status == TaskStatus.completed
        now[0] += 31 * DAY

        async def gone() -> bool:
            try:
                await engine.get_task(task.task_id)
            except NotFound:
                return True
            return False

        await wait_for(gone, what="the periodic pass to delete the aged task")
        tg.cancel_scope.cancel()


def test_a_pass_runs_every_tenth_of_the_age_between_a_minute_and_six_hours() -> None:
    assert pass_interval(30 * 86400) == 6 * 3600
    assert pass_interval(3600) == 360
    assert pass_interval(5) == 60


async def test_retention_off_keeps_everything_and_gc_then_needs_an_age(tmp_path: Path) -> None:
    from conftest import all_test_agents

    settings = Settings(home=tmp_path, agents=all_test_agents(), retention="off")  # type: ignore[arg-type]
    engine = Engine(settings)
    async with engine.running():
        task = await finished(engine, "echo", "kept forever")
        with pytest.raises(InvalidRequest, match="retention is off"):
            await engine.gc()
        assert (await engine.gc(older_than=3600, dry_run=True)).deleted.tasks == 0
        assert (await engine.get_task(task.task_id)).status == TaskStatus.completed


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), 3651 * 86400.0])
async def test_gc_refuses_an_age_that_is_no_age(engine: Engine, bad: float) -> None:
    with pytest.raises(InvalidRequest, match="older_than must be more than 0"):
        await engine.gc(older_than=bad)


async def test_after_a_purge_the_space_is_reused(settings: Settings, engine: Engine, capsys: Any) -> None:
    """What compaction really does in DuckDB: CHECKPOINT frees the deleted rows' blocks inside the file
    and new rows reuse them; the file does not shrink (unless the free blocks are at its end)."""

    async def fill(tag: str) -> None:
        ids = [
            (await engine.submit("big_result", "200000", options(workflow_name=f"{tag} {i}"))).task_id
            for i in range(40)
        ]
        for task_id in ids:
            await wait_until_finished(engine, task_id)
        assert await engine.store.checkpoint()  # into the file, as DuckDB's own checkpoints do

    await fill("first")
    report = await engine.retention.collect(older_than=60, now=utcnow() + DAY)
    assert report.deleted.results == 40 and report.checkpointed
    assert report.free_bytes_after > 0 and report.wal_bytes_after == 0
    await fill("second")
    refilled = (await engine.store.disk_usage()).file_bytes
    with capsys.disabled():
        print(
            f"\nretention on 40 tasks x 200,000-character results: file {report.file_bytes_before:,} "
            f"(+ {report.wal_bytes_before:,} WAL) -> {report.file_bytes_after:,} bytes after purge + "
            f"CHECKPOINT ({report.free_bytes_after:,} free inside); after writing the same again: "
            f"{refilled:,} bytes"
        )
    assert refilled < report.file_bytes_after * 1.25, "new rows should reuse the freed blocks"


async def test_checkpoints_are_not_blocked_by_earlier_reads(engine: Engine) -> None:
    """A read left open (fetchone) used to keep its transaction open, and an open transaction older than
    an update blocks every checkpoint, DuckDB's automatic ones too: the WAL grew without bound."""
    first = await finished(engine, "echo", "read me")
    for _ in range(20):  # spread over the worker threads' cursors
        await engine.get_task(first.task_id)
        await engine.get_result(first.task_id)
    await finished(engine, "echo", "updated after the reads")

    assert await engine.store.checkpoint()


def test_retention_setting(tmp_path: Path) -> None:
    def load(text: str, **env: str) -> Settings:
        (tmp_path / "sidequest.toml").write_text(text, encoding="utf-8")
        return load_settings(env={"SIDEQUEST_HOME": str(tmp_path), **env})

    assert load("").retention == 30 * 86400
    assert load('retention = "90d"\n').retention == 90 * 86400
    assert load('retention = "off"\n').retention is None
    assert load("retention = false\n").retention is None
    assert load('retention = "90d"\n', SIDEQUEST_RETENTION="12h").retention == 12 * 3600
    for text, message in [
        ('retention = "0s"\n', "an age must be more than zero"),
        ('retention = "-1d"\n', "an age must be more than zero"),
        ('retention = "abc"\n', "'abc' is not a duration"),
        ('retention = "4000d"\n', "3650-day maximum"),
    ]:
        with pytest.raises(ConfigError, match="'retention'") as info:
            load(text)
        assert message in str(info.value) and 'retention = "off"' in str(info.value)
