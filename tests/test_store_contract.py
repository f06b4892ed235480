"""One contract for both stores, and the shared store's transitions against a real PostgreSQL.

The contract half runs every test on DuckDB (a file in tmp_path) and on PostgreSQL (a fresh
schema): the Store calls both offer must answer alike, so the engine can be moved from one to
the other. The PostgreSQL half checks what only a shared store does: claims under concurrency,
guards that keep late writes from undoing a cancel, exactly-once workflow ends and schedule
fires, gap-safe notification cursors, migrations under concurrent starts, surviving killed
connections, and LISTEN/NOTIFY between processes (two store instances stand in for two).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from conftest import fresh_pg_schema

from sidequest.storage.base import (
    AttemptRecord,
    ClaimRequest,
    Committed,
    Effects,
    FireRecord,
    NotificationRecord,
    Outcome,
    ResultRecord,
    ScheduleRecord,
    StoreError,
    StoreUnavailable,
    TaskEventRecord,
    TaskRecord,
    UsageRecord,
    WorkerRecord,
    WorkflowQuery,
    WorkflowRecord,
)
from sidequest.storage.duckdb import DuckDBStore
from sidequest.storage.postgres import PostgresStore, _Pending, migrate

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def task(
    task_id: str,
    workflow_id: str,
    *,
    seq: int = 0,
    agent: str = "echo",
    priority: str = "normal",
    scope: str = "/p",
    key: str | None = None,
    at: datetime = T0,
    schedule_id: str | None = None,
) -> TaskRecord:
    return TaskRecord(
        id=task_id,
        seq=seq,
        workflow_id=workflow_id,
        agent=agent,
        prompt=f"prompt of {task_id}",
        status="queued",
        priority=priority,
        scope=scope,
        options={"n": task_id},
        max_retries=2,
        created_at=at,
        updated_at=at,
        idempotency_key=key,
        schedule_id=schedule_id,
    )


def workflow(workflow_id: str, name: str, scope: str = "/p", at: datetime = T0) -> WorkflowRecord:
    return WorkflowRecord(workflow_id, name, scope, "running", at, at)


@pytest.fixture(params=["duckdb", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "duckdb":
        duck = DuckDBStore(tmp_path / "contract.duckdb")
        duck.open()
        yield duck
        duck.close()
        return
    with fresh_pg_schema() as (dsn, schema):
        pg = PostgresStore(dsn, schema=schema)
        pg.open()
        try:
            yield pg
        finally:
            await pg.aclose()


_claimed: dict[int, dict[str, TaskRecord]] = {}
"""Tasks `finish` claimed on a PostgreSQL store and has not finished yet (a claim takes every ready one)."""


async def finish(store: Any, records: list[TaskRecord], statuses: list[str], at: datetime) -> None:
    """Finish tasks the way each store is finished: DuckDB by the engine's write-behind update,
    PostgreSQL by a claim and a guarded finish_attempt."""
    if isinstance(store, PostgresStore):
        claimed = _claimed.setdefault(id(store), {})
        claimed.update({t.id: t for t in await store.claim(ClaimRequest("w-test", 100, 60))})
        for record, status in zip(records, statuses, strict=True):
            current = claimed.pop(record.id)
            current.status, current.finished_at, current.updated_at = status, at, at
            current.worker_id = current.lease_expires_at = None
            attempt = AttemptRecord(
                record.id, current.attempts, status, current.started_at, at, None, "w-test"
            )
            effects = await store.finish_attempt(Outcome(current, "w-test", attempt))
            assert effects.applied
            record.status = status
        return
    for record, status in zip(records, statuses, strict=True):
        record.status, record.finished_at, record.updated_at, record.attempts = status, at, at, 1
        store.update_task(record)
    await store.flush()


# ---- the contract: both stores ---------------------------------------------------------------------


async def test_insert_and_read_back(store: Any) -> None:
    tasks = [task("t_a", "w_1", seq=1), task("t_b", "w_1", seq=2, priority="high")]
    await store.insert([workflow("w_1", "flow")], tasks)
    got = await store.get_task("t_b")
    assert got is not None
    assert (got.id, got.workflow_id, got.agent, got.prompt, got.status, got.priority) == (
        "t_b",
        "w_1",
        "echo",
        "prompt of t_b",
        "queued",
        "high",
    )
    assert got.options == {"n": "t_b"} and got.created_at == T0 and got.queue == "default"
    assert [t.id for t in await store.get_tasks("w_1")] == ["t_a", "t_b"]
    assert tasks[0].seq < tasks[1].seq
    assert await store.get_payload("t_a") == ("prompt of t_a", {"n": "t_a"})
    assert await store.get_task("t_missing") is None
    assert await store.task_statuses(["t_a", "t_missing"]) == {"t_a": "queued"}
    assert await store.task_counts() == {"queued": 2}


async def test_workflow_status_is_derived_from_its_tasks(store: Any) -> None:
    records = [task("t_1", "w_1", seq=1), task("t_2", "w_1", seq=2), task("t_3", "w_2", seq=3)]
    await store.insert([workflow("w_1", "one"), workflow("w_2", "two")], records)
    running = await store.get_workflow("w_1")
    assert running is not None and running.status == "running" and running.finished_at is None
    done = T0 + timedelta(minutes=5)
    await finish(store, records, ["completed", "failed", "cancelled"], done)
    one, two = await store.get_workflow("w_1"), await store.get_workflow("w_2")
    assert one is not None and (one.status, one.finished_at) == ("failed", done)
    assert two is not None and two.status == "cancelled"
    listed, total = await store.list_workflows(WorkflowQuery(scope="/p", finished=True))
    assert total == 2 and {w.id for w in listed} == {"w_1", "w_2"}
    listed, total = await store.list_workflows(WorkflowQuery(scope="/p", finished=True, statuses=["failed"]))
    assert [w.id for w in listed] == ["w_1"] and total == 1
    assert (await store.list_workflows(WorkflowQuery(scope=None, finished=False)))[1] == 0
    assert (await store.list_workflows(WorkflowQuery(scope="/p", finished=True, agent="nobody")))[1] == 0
    counts = await store.workflow_counts(["w_1", "w_2"])
    assert counts == {"w_1": {"completed": 1, "failed": 1}, "w_2": {"cancelled": 1}}


async def test_notifications_per_reader(store: Any) -> None:
    await store.insert([workflow("w_1", "flow")], [task("t_1", "w_1", seq=1)])
    notes = [
        NotificationRecord(
            i + 1, "task_completed", "t_1", "w_1", "/p", f"message {i}", T0 + timedelta(seconds=i)
        )
        for i in range(3)
    ]
    notes.append(NotificationRecord(4, "task_completed", None, "w_9", "/other", "elsewhere", T0))
    for note in notes:
        store.add_notification(note)
    await store.flush()
    assert [n.cursor for n in notes] == [1, 2, 3, 4]  # PostgreSQL issues them; fresh schema starts at 1

    first = await store.list_notifications("/p", 0, None, False, 10, "mcp:/p")
    assert [n.message for n in first] == ["message 0", "message 1", "message 2"]
    assert all(n.delivered_at is None for n in first)
    store.mark_delivered("mcp:/p", [1, 2], T0 + timedelta(hours=1))
    await store.flush()
    assert [n.cursor for n in await store.list_notifications("/p", 0, None, False, 10, "mcp:/p")] == [3]
    # another reader still gets everything; since and include_delivered re-read what was lost
    assert len(await store.list_notifications("/p", 0, None, False, 10, "cli:/p")) == 3
    again = await store.list_notifications("/p", 1, None, True, 10, "mcp:/p")
    assert [(n.cursor, n.delivered_at) for n in again] == [(2, T0 + timedelta(hours=1)), (3, None)]
    assert [n.cursor for n in await store.list_notifications(None, 0, "w_9", True, 10, "x")] == [4]
    assert len(await store.list_notifications(None, 0, None, True, 2, "x")) == 2


async def test_task_events_paging(store: Any) -> None:
    await store.insert([workflow("w_1", "flow")], [task("t_1", "w_1", seq=1)])
    for seq in range(5):
        data = {"step": seq} if seq % 2 == 0 else None
        store.add_task_event(
            TaskEventRecord(
                "t_1",
                seq,
                T0 + timedelta(seconds=seq),
                1,
                "progress",
                f"m{seq}",
                data,
                data and json.dumps(data),
            )
        )
    await store.flush()
    page, total = await store.get_task_events("t_1", 2, 2)
    assert total == 5
    assert [(e.seq, e.message, e.data) for e in page] == [(2, "m2", {"step": 2}), (3, "m3", None)]
    assert page[0].logged_at == T0 + timedelta(seconds=2)
    empty, total = await store.get_task_events("t_1", 9, 10)
    assert (empty, total) == ([], 5)
    assert await store.get_task_events("t_none", 0, 10) == ([], 0)


async def test_result_pages_and_usage(store: Any) -> None:
    await store.insert([workflow("w_1", "flow")], [task("t_1", "w_1", seq=1), task("t_2", "w_1", seq=2)])
    sources = [{"n": 1, "title": "A page", "url": "https://example.org/a"}]
    store.add_result(ResultRecord("t_1", "text", "abcdefghij", T0, sources))
    for attempt, model, cost in [(1, "m-small", 0.25), (2, "m-big", 0.5), (2, None, None)]:
        store.add_usage(UsageRecord("t_1", attempt, model, 10, 20, 3, 4, cost, T0))
    await store.flush()
    assert await store.get_result_page("t_1", 3, 4) == ("text", "defg", 10, sources)
    assert await store.get_result_page("t_2", 0, 4) is None
    assert await store.get_result_size(["t_1", "t_2"]) == {"t_1": 10}
    usage = await store.get_usage(["t_1", "t_2"])
    assert list(usage) == ["t_1"]
    totals = usage["t_1"]
    assert totals.models == ["m-big", "m-small"]
    assert (totals.input_tokens, totals.output_tokens) == (30, 60)
    assert (totals.cache_creation_input_tokens, totals.cache_read_input_tokens) == (9, 12)
    assert totals.cost_usd == pytest.approx(0.75)


def schedule(schedule_id: str, next_run: datetime, updated: datetime = T0) -> ScheduleRecord:
    return ScheduleRecord(
        id=schedule_id,
        name=f"every hour {schedule_id}",
        agent="echo",
        prompt="tick",
        cron="0 * * * *",
        timezone="UTC",
        options={"priority": "low"},
        scope="/p",
        enabled=True,
        overlap="skip",
        misfire="run_once",
        created_at=T0,
        updated_at=updated,
        next_run_at=next_run,
    )


async def test_schedules_and_fire_exactly_once(store: Any) -> None:
    due = T0 + timedelta(hours=1)
    await store.save_schedule(schedule("s_1", due))
    await store.save_schedule(schedule("s_2", due + timedelta(hours=5)))
    got = await store.get_schedule("s_1")
    assert got is not None and got.options == {"priority": "low"} and got.next_run_at == due
    _, total = await store.list_schedules("/p", 10, 0)
    assert total == 2 and await store.count_schedules() == 2
    assert await store.next_due() == due
    assert [s.id for s in await store.due_schedules(due, 10)] == ["s_1"]

    fired_at = due + timedelta(seconds=1)
    after = schedule("s_1", due + timedelta(hours=1), updated=fired_at)
    after.runs, after.last_task_id = 1, "t_fired"
    run = task("t_fired", "w_fired", seq=1, schedule_id="s_1", at=fired_at)
    fire = FireRecord("s_1", due, "t_fired", fired_at)
    results = [
        await store.record_fire(fire, after, workflow("w_fired", "every hour", at=fired_at), run, T0),
        # a second scheduler with the same due time (and the old row) fires nothing
        await store.record_fire(
            fire, after, workflow("w_other", "every hour"), task("t_other", "w_other"), T0
        ),
    ]
    assert results == [True, False]
    # a changed row refuses the fire too (and writes no fire key)
    stale = FireRecord("s_2", due + timedelta(hours=5), None, fired_at)
    assert not await store.record_fire(stale, schedule("s_2", due), None, None, T0 - timedelta(days=1))
    assert await store.get_task("t_other") is None
    tasks, total = await store.schedule_tasks("s_1", 10, 0)
    assert [t.id for t in tasks] == ["t_fired"] and total == 1
    now_row = await store.get_schedule("s_1")
    assert now_row is not None and now_row.runs == 1 and now_row.updated_at == fired_at
    assert not await store.update_schedule_if(schedule("s_1", due), T0)  # stale expectation
    assert await store.delete_schedule("s_2") and not await store.delete_schedule("s_2")
    rows = await store.count_rows()
    assert (rows["scheduled_tasks"], rows["schedule_fires"], rows["task_executions"]) == (1, 1, 1)


async def test_purge_finished_and_count_rows(store: Any) -> None:
    old, new = T0, T0 + timedelta(days=40)
    records = [task("t_old", "w_old", seq=1), task("t_kept", "w_old", seq=2), task("t_new", "w_new", seq=3)]
    await store.insert([workflow("w_old", "old"), workflow("w_new", "new")], records)
    await finish(store, records[:2], ["completed", "completed"], old)
    await finish(store, records[2:], ["failed"], new)
    store.add_attempt(AttemptRecord("t_old", 1, "completed", old, old, None, "w"))
    store.add_result(ResultRecord("t_old", "text", "x", old))
    store.add_task_event(TaskEventRecord("t_old", 0, old, 1, "progress", "m", None))
    for cursor, task_id in [(1, "t_old"), (2, "t_new")]:
        store.add_notification(NotificationRecord(cursor, "task_completed", task_id, "w_x", "/p", "m", old))
    await store.flush()
    before = await store.count_rows()
    cutoff = T0 + timedelta(days=1)
    dry = await store.count_finished(cutoff, {"t_kept"})
    assert (dry.tasks, dry.results, dry.notifications, dry.events, dry.workflows) == (1, 1, 1, 1, 0)
    counts, batches = await store.purge_finished(cutoff, lambda: {"t_kept"}, 500)
    assert (counts.tasks, counts.results, counts.notifications, counts.events) == (1, 1, 1, 1)
    assert batches == 1
    after = await store.count_rows()
    assert after["task_executions"] == before["task_executions"] - 1
    assert after["notifications"] == before["notifications"] - 1
    assert await store.get_task("t_old") is None and await store.get_task("t_kept") is not None
    counts, _ = await store.purge_finished(cutoff, lambda: set(), 500)
    assert counts.tasks == 1 and counts.workflows == 1  # t_kept, and w_old with it
    assert await store.get_workflow("w_old") is None
    assert await store.checkpoint()
    usage = await store.disk_usage()
    assert usage.file_bytes > 0


# ---- PostgreSQL only: the shared store's transitions ---------------------------------------------


@pytest.fixture
async def pg(pg_schema: tuple[str, str]) -> AsyncIterator[PostgresStore]:
    dsn, schema = pg_schema
    store = PostgresStore(dsn, schema=schema)
    store.open()
    yield store
    await store.aclose()


@pytest.fixture
async def pg2(pg_schema: tuple[str, str], pg: PostgresStore) -> AsyncIterator[PostgresStore]:
    """A second process on the same database (its own pool, its own origin)."""
    dsn, schema = pg_schema
    store = PostgresStore(dsn, schema=schema)
    yield store
    await store.aclose()


def outcome(claimed: TaskRecord, worker: str, status: str, at: datetime | None = None) -> Outcome:
    at = at or datetime.now(UTC)
    claimed.status, claimed.updated_at = status, at
    if status in ("completed", "failed", "cancelled"):
        claimed.finished_at = at
    claimed.worker_id = claimed.lease_expires_at = None
    attempt = AttemptRecord(claimed.id, claimed.attempts, status, claimed.started_at, at, None, worker)
    note = (f"task_{status}", f"Task {claimed.id} ({claimed.agent}) {status}")
    return Outcome(claimed, worker, attempt, ResultRecord(claimed.id, "text", "ok", at), note)


async def test_claim_order_and_concurrent_claimers_never_share(pg: PostgresStore, pg2: PostgresStore) -> None:
    tasks = [task(f"t_{i:03d}", "w_1", priority=("low", "normal", "high")[i % 3]) for i in range(60)]
    await pg.enqueue([workflow("w_1", "flow")], tasks)
    first = await pg.claim(ClaimRequest("w_a", 3, 60))
    assert [t.id for t in first] == ["t_002", "t_005", "t_008"]  # high first, then by submission
    assert all(t.status == "running" and t.attempts == 1 and t.worker_id == "w_a" for t in first)
    assert all(t.lease_expires_at is not None and t.started_at is not None for t in first)

    got: dict[str, list[str]] = {"w_a": [], "w_b": []}

    async def drain(store: PostgresStore, worker: str) -> None:
        while claimed := await store.claim(ClaimRequest(worker, 2, 60)):
            got[worker] += [t.id for t in claimed]

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain, pg, "w_a")
        tg.start_soon(drain, pg2, "w_b")
    together = got["w_a"] + got["w_b"]
    assert len(together) == len(set(together)) == 57
    assert got["w_a"] and got["w_b"]
    assert await pg.task_counts() == {"running": 60}


async def test_claim_respects_queues_agents_and_delays(pg: PostgresStore) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    delayed, other_queue, other_agent = (
        task("t_delayed", "w_1"),
        task("t_q", "w_1"),
        task("t_ag", "w_1", agent="x"),
    )
    delayed.not_before = later
    other_queue.queue = "gpu"
    await pg.enqueue([workflow("w_1", "flow")], [delayed, other_queue, other_agent])
    assert await pg.claim(ClaimRequest("w", 5, 60, agents={"echo"})) == []
    assert [t.id for t in await pg.claim(ClaimRequest("w", 5, 60, queues=["gpu"]))] == ["t_q"]
    assert [t.id for t in await pg.claim(ClaimRequest("w", 5, 60))] == ["t_ag"]


async def test_an_agent_files_limit_holds_on_workers_that_never_read_it(
    pg: PostgresStore, pg2: PostgresStore
) -> None:
    """The limit travels in the task rows (agent_limit): workers asking with no limits at all
    still never run more than it over all of them."""
    tasks = [dataclasses.replace(task(f"t_{i:02d}", "w_1", agent="file"), agent_limit=2) for i in range(8)]
    await pg.enqueue([workflow("w_1", "flow")], tasks)
    claimed: list[TaskRecord] = []
    async with anyio.create_task_group() as tg:

        async def take(store: PostgresStore, worker: str) -> None:
            for _ in range(4):
                claimed.extend(await store.claim(ClaimRequest(worker, 3, 60)))

        tg.start_soon(take, pg, "w_a")
        tg.start_soon(take, pg2, "w_b")
    assert len(claimed) == 2, [t.id for t in claimed]
    await pg.finish_attempt(outcome(claimed[0], claimed[0].worker_id or "", "completed"))
    assert len(await pg2.claim(ClaimRequest("w_b", 5, 60))) == 1


async def test_agent_limit_holds_across_workers(pg: PostgresStore, pg2: PostgresStore) -> None:
    tasks = [task(f"t_{i:02d}", "w_1", agent="slow") for i in range(10)] + [
        task("t_fast", "w_1", agent="fast")
    ]
    await pg.enqueue([workflow("w_1", "flow")], tasks)
    limits = {"slow": 3}
    claimed: list[TaskRecord] = []
    async with anyio.create_task_group() as tg:

        async def take(store: PostgresStore, worker: str) -> None:
            for _ in range(3):
                claimed.extend(await store.claim(ClaimRequest(worker, 2, 60, agent_limits=limits)))

        tg.start_soon(take, pg, "w_a")
        tg.start_soon(take, pg2, "w_b")
    slow = [t for t in claimed if t.agent == "slow"]
    assert len(slow) == 3 and {t.id for t in claimed} >= {"t_fast"}
    # finishing one frees one slot, for whichever worker asks
    await pg.finish_attempt(outcome(slow[0], slow[0].worker_id or "", "completed"))
    more = await pg2.claim(ClaimRequest("w_b", 5, 60, agent_limits=limits))
    assert [t.agent for t in more] == ["slow"]


async def test_renew_reports_cancelled_and_late_writes_do_not_undo_a_cancel(pg: PostgresStore) -> None:
    await pg.enqueue([workflow("w_1", "flow")], [task("t_1", "w_1"), task("t_2", "w_1")])
    claimed = {t.id: t for t in await pg.claim(ClaimRequest("w_a", 2, 60))}
    assert await pg.renew_leases("w_a", {"t_1": 1, "t_2": 1}, 60) == []
    effects, already = await pg.cancel(["t_1", "t_unknown"], None, datetime.now(UTC))
    assert already == [] and effects.stop == [("t_1", "w_a")]
    assert [n.message for n in effects.notifications] == ["Task t_1 (echo) was cancelled"]
    assert await pg.renew_leases("w_a", {"t_1": 1, "t_2": 1}, 60) == ["t_1"]
    assert await pg.renew_leases("w_b", {"t_2": 1}, 60) == ["t_2"]  # not this worker's attempt

    late = claimed["t_1"]
    late.progress_percent, late.progress_message = 50.0, "half way"
    pg.update_task(late)  # a progress write already queued when the cancel landed
    await pg.flush()
    result = await pg.finish_attempt(outcome(late, "w_a", "completed"))
    assert (result.applied, result.status) == (False, "cancelled")
    row = await pg.get_task("t_1")
    assert row is not None and row.status == "cancelled" and row.progress_percent is None
    assert [a.status for a in await pg.get_attempts("t_1")] == ["completed"]  # the history row is kept
    assert await pg.get_result_page("t_1", 0, 10) is None
    # a second cancel of it, and of the workflow, reports it as already finished
    effects, already = await pg.cancel(None, "w_1", datetime.now(UTC))
    assert already == ["t_1"] and [t.id for t in effects.tasks] == ["t_2"]
    assert [f.status for f in effects.workflows_finished] == ["cancelled"]
    kinds = [n.kind for n in effects.notifications]
    assert kinds == ["task_cancelled", "workflow_completed"]
    assert effects.notifications[-1].message == "Workflow 'flow' (w_1) finished cancelled: 2 cancelled"


async def test_workflow_completed_once_when_the_last_two_finish_together(
    pg: PostgresStore, pg2: PostgresStore
) -> None:
    for round_ in range(5):
        wid = f"w_{round_}"
        await pg.enqueue(
            [workflow(wid, f"flow {round_}")], [task(f"t_{round_}_a", wid), task(f"t_{round_}_b", wid)]
        )
        first = await pg.claim(ClaimRequest("w_a", 1, 60))
        second = await pg2.claim(ClaimRequest("w_b", 1, 60))
        results: list[Effects] = []

        async def end(
            store: PostgresStore, claimed: TaskRecord, worker: str, results: list[Effects] = results
        ) -> None:
            results.append(await store.finish_attempt(outcome(claimed, worker, "completed")))

        async with anyio.create_task_group() as tg:
            tg.start_soon(end, pg, first[0], "w_a")
            tg.start_soon(end, pg2, second[0], "w_b")
        ends = [f for r in results for f in r.workflows_finished]
        assert [f.status for f in ends] == ["completed"]
        notes = await pg.list_notifications(None, 0, wid, True, 50, "r")
        done = [n for n in notes if n.kind == "workflow_completed"]
        assert len(done) == 1
        assert done[0].message == f"Workflow 'flow {round_}' ({wid}) finished completed: 2 completed"


async def test_unnamed_single_task_workflow_has_no_workflow_notification(pg: PostgresStore) -> None:
    await pg.enqueue([workflow("w_1", "echo")], [task("t_1", "w_1")])
    [claimed] = await pg.claim(ClaimRequest("w", 1, 60))
    effects = await pg.finish_attempt(outcome(claimed, "w", "failed"))
    assert [f.status for f in effects.workflows_finished] == ["failed"]
    assert [n.kind for n in effects.notifications] == ["task_failed"]


async def test_retry_outcome_wakes_and_requeue(pg: PostgresStore) -> None:
    await pg.enqueue([workflow("w_1", "flow")], [task("t_1", "w_1")])
    [claimed] = await pg.claim(ClaimRequest("w", 1, 60))
    retry = outcome(claimed, "w", "retrying")
    retry.task.next_attempt_at = datetime.now(UTC) - timedelta(seconds=1)
    retry.task.failures = 1
    retry.result = retry.notification = None
    effects = await pg.finish_attempt(retry)
    assert effects.status == "retrying" and not effects.workflows_finished
    [again] = await pg.claim(ClaimRequest("w", 1, 60))
    assert again.attempts == 2 and again.next_attempt_at is None
    await pg.finish_attempt(outcome(again, "w", "failed"))
    assert await pg.requeue("t_missing", datetime.now(UTC)) is None
    requeued = await pg.requeue("t_1", datetime.now(UTC))
    assert requeued is not None and (requeued.status, requeued.failures, requeued.finished_at) == (
        "queued",
        0,
        None,
    )
    assert await pg.requeue("t_1", datetime.now(UTC)) is None  # queued now, not failed
    assert (await pg.get_workflow("w_1")).status == "running"  # type: ignore[union-attr]
    assert await pg.unfinished_count() == 1


async def test_reap_lapsed_requeues_then_fails_as_poisonous(pg: PostgresStore) -> None:
    await pg.enqueue([workflow("w_1", "flow")], [task("t_1", "w_1")])
    for death in (1, 2):
        [claimed] = await pg.claim(ClaimRequest("w_dead", 1, 0.01))
        assert claimed.attempts == death
        await anyio.sleep(0.05)
        effects = await pg.reap_lapsed(datetime.now(UTC), max_lost_attempts=2, limit=10)
        [reaped] = effects.tasks
        assert reaped.lost_attempts == death and reaped.worker_id is None
        if death == 1:
            assert reaped.status == "queued" and not effects.notifications
    assert reaped.status == "failed" and reaped.failures == 1
    assert reaped.error is not None and reaped.error.startswith("poisonous: the process died 2 times")
    kinds = [n.kind for n in effects.notifications]
    assert kinds == ["task_failed", "workflow_completed"]
    assert effects.notifications[0].message.startswith("Task t_1 (echo) failed after 2 attempts: poisonous")
    attempts = await pg.get_attempts("t_1")
    assert [(a.attempt, a.status) for a in attempts] == [(1, "lost"), (2, "lost")]
    assert attempts[0].error == "attempt 1 was lost: the process running it stopped and its lease lapsed"
    assert (await pg.reap_lapsed(datetime.now(UTC), 2, 10)).tasks == []


async def test_idempotency_key_outlives_its_task(pg_schema: tuple[str, str]) -> None:
    dsn, schema = pg_schema
    store = PostgresStore(dsn, schema=schema, idempotency_window=3600)
    store.open()
    try:
        first = task("t_1", "w_1", key="k")
        assert await store.enqueue([workflow("w_1", "flow")], [first]) == {}
        assert first.seq >= 1
        [claimed] = await store.claim(ClaimRequest("w", 1, 60))
        await store.finish_attempt(outcome(claimed, "w", "completed"))
        dup = await store.enqueue(
            [workflow("w_2", "flow")], [task("t_2", "w_2", key="k"), task("t_3", "w_2")]
        )
        assert dup == {"t_2": "t_1"}
        assert await store.get_task("t_2") is None and await store.get_task("t_3") is not None
        # the same key in another scope is another key; twice in one call is a duplicate of the first
        dup = await store.enqueue(
            [workflow("w_4", "x", scope="/q")],
            [task("t_4", "w_4", key="k", scope="/q"), task("t_5", "w_4", key="k", scope="/q")],
        )
        assert dup == {"t_5": "t_4"}
        assert await store.get_workflow("w_2") is not None
        # past the window the key is free again
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(
                f"UPDATE {schema}.task_executions SET finished_at = now() - interval '2 hours' "
                "WHERE id = 't_1'"
            )
        assert await store.enqueue([workflow("w_6", "flow")], [task("t_6", "w_6", key="k")]) == {}
    finally:
        await store.aclose()


async def test_notification_cursors_are_gap_safe(pg: PostgresStore, pg2: PostgresStore) -> None:
    """A reader polling while several writers commit never skips a row: every row it ever finds
    has a cursor above everything it had seen."""
    await pg.enqueue([workflow("w_1", "flow")], [task("t_1", "w_1")])
    writers = [pg, pg2, PostgresStore(pg.dsn, schema=pg.schema)]
    seen: list[int] = []
    done = anyio.Event()

    async def write(store: PostgresStore, n: int) -> None:
        for i in range(40):
            store.add_notification(
                NotificationRecord(0, "task_completed", "t_1", "w_1", "/p", f"{n}-{i}", T0)
            )
            if i % 4 == 3:
                await store.flush()
        await store.flush()

    async def read() -> None:
        while True:
            last = seen[-1] if seen else 0
            found = [n.cursor for n in await pg.list_notifications(None, last, None, True, 1000, "r")]
            seen.extend(found)
            if done.is_set() and not found:
                return
            await anyio.sleep(0)

    async with anyio.create_task_group() as outer:
        outer.start_soon(read)
        async with anyio.create_task_group() as tg:
            for n, store in enumerate(writers):
                tg.start_soon(write, store, n)
        done.set()
    await writers[2].aclose()
    everything = [n.cursor for n in await pg.list_notifications(None, 0, None, True, 1000, "r")]
    assert len(everything) == 120
    assert seen == everything == sorted(everything)


def test_concurrent_migrate_applies_once(pg_schema: tuple[str, str]) -> None:
    dsn, schema = pg_schema
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(dsn, schema))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(results) == [(0, 8), (8, 8), (8, 8), (8, 8)]
    with psycopg.connect(dsn) as conn:
        versions = [row[0] for row in conn.execute(f"SELECT version FROM {schema}.schema_version ORDER BY 1")]
    assert versions == list(range(1, 9))


def test_newer_schema_is_refused(pg_schema: tuple[str, str]) -> None:
    dsn, schema = pg_schema
    migrate(dsn, schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {schema}.schema_version VALUES (99, now())")
    with pytest.raises(StoreError) as caught:
        PostgresStore(dsn, schema=schema).open()
    message = str(caught.value)
    assert "schema version 99" in message and "up to 8" in message and "upgrade sidequest" in message


@pytest.mark.parametrize(
    ("dsn", "names"),
    [
        ("postgresql://postgres:s3cret-pw@127.0.0.1:1/test", "127.0.0.1:1/test"),
        ("postgresql://postgres:s3cret-pw@127.0.0.1:5432/no_such_db_here", "no_such_db_here"),
        ("host=127.0.0.1 port=1 dbname=test user=postgres password=s3cret-pw", "127.0.0.1:1/test"),
    ],
)
def test_bad_dsn_is_one_line_without_the_password(dsn: str, names: str) -> None:
    with pytest.raises(StoreError) as caught:
        PostgresStore(dsn, connect_timeout=2).open()
    message = str(caught.value)
    assert "\n" not in message and "s3cret" not in message and names in message, message


async def test_terminated_connections_are_survived(pg_schema: tuple[str, str]) -> None:
    dsn, schema = pg_schema
    name = f"sq_{schema}"  # only this store's connections are killed, not those of tests beside it
    pg = PostgresStore(psycopg.conninfo.make_conninfo(dsn, application_name=name), schema=schema)
    pg.open()
    try:
        await _survive_termination(pg, name)
    finally:
        await pg.aclose()


async def _survive_termination(pg: PostgresStore, name: str) -> None:
    await pg.enqueue([workflow("w_1", "flow")], [task("t_1", "w_1")])
    [claimed] = await pg.claim(ClaimRequest("w", 1, 60))
    store_pids = await pg._fetchall(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %(name)s", {"name": name}
    )
    assert store_pids
    claimed.progress_percent = 40.0
    pg.update_task(claimed)
    pg.add_task_event(TaskEventRecord("t_1", 0, T0, 1, "progress", "before the kill", None))
    with psycopg.connect(pg.dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [[p[0] for p in store_pids]]
        )
    await pg.flush()  # the queued writes ride a new connection
    row = await pg.get_task("t_1")
    assert row is not None and row.progress_percent == 40.0
    assert (await pg.get_task_events("t_1", 0, 10))[1] == 1
    effects = await pg.finish_attempt(outcome(claimed, "w", "completed"))
    assert effects.applied and effects.status == "completed"


async def test_listen_delivers_another_stores_commits(pg_schema: tuple[str, str], pg2: PostgresStore) -> None:
    dsn, schema = pg_schema
    pg = PostgresStore(psycopg.conninfo.make_conninfo(dsn, application_name=f"sq_{schema}"), schema=schema)
    try:
        await _listen_and_hear(pg, pg2)
    finally:
        await pg.aclose()


async def _listen_and_hear(pg: PostgresStore, pg2: PostgresStore) -> None:
    remote: list[Committed] = []
    local: list[Committed] = []
    woken: list[bool] = []
    pg.on_remote_commit(remote.append)
    pg.on_work(lambda: woken.append(True))
    async with anyio.create_task_group() as tg:
        tg.start_soon(pg.run_writer, local.append)
        with anyio.fail_after(5):
            await pg.listening.wait()
        await pg2.enqueue([workflow("w_1", "flow")], [task("t_1", "w_1")])
        [claimed] = await pg2.claim(ClaimRequest("w_b", 1, 60))
        pg2.add_task_event(TaskEventRecord("t_1", 0, T0, 1, "progress", "working", {"k": 1}, '{"k": 1}'))
        await pg2.flush()
        effects = await pg2.finish_attempt(outcome(claimed, "w_b", "completed"))
        cursor = effects.notifications[0].cursor

        async def heard_finish() -> None:
            while not any(n.cursor == cursor for c in remote for n in c.notifications):
                await anyio.sleep(0.01)

        with anyio.fail_after(5):
            await heard_finish()
        # the listener comes back after its connection is killed, and hears the next commit
        with psycopg.connect(pg.dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                [pg.application_name + "-listener"],
            )
        with anyio.fail_after(5):
            while pg.subscriptions < 2:
                await anyio.sleep(0.01)
        await pg2.enqueue([workflow("w_2", "flow")], [task("t_2", "w_2")])
        with anyio.fail_after(5):
            while not any("t_2" in c.task_ids for c in remote):
                await anyio.sleep(0.01)
        # a local write of the listening store reaches on_commit, not on_remote_commit
        pg.add_notification(NotificationRecord(0, "task_completed", "t_1", "w_1", "/p", "local", T0))
        await pg.flush()
        tg.cancel_scope.cancel()
    assert woken  # the enqueue woke this store's workers
    [finished] = [c for c in remote if any(n.cursor == cursor for n in c.notifications)]
    assert "t_1" in finished.task_ids and "w_1" in finished.workflow_ids
    assert finished.notifications[0].message == "Task t_1 (echo) completed"
    events = [e for c in remote for e in c.task_events]
    assert [(e.task_id, e.seq, e.data) for e in events] == [("t_1", 0, {"k": 1})]
    assert all("local" not in n.message for c in remote for n in c.notifications)
    assert [n.message for c in local for n in c.notifications] == ["local"]


async def test_workers(pg: PostgresStore) -> None:
    now = datetime.now(UTC)
    await pg.heartbeat(WorkerRecord("wk_1", "host-a", 42, ["default"], None, 4, 1, now, now))
    await pg.heartbeat(
        WorkerRecord("wk_2", "host-b", 43, ["gpu"], ["echo"], 2, 0, now, now - timedelta(hours=1))
    )
    assert [w.id for w in await pg.list_workers(60)] == ["wk_1"]
    [worker] = await pg.list_workers(60)
    assert (worker.queues, worker.agents, worker.kind) == (["default"], None, "worker")
    await pg.remove_worker("wk_1")
    assert await pg.list_workers(60) == []


async def test_unreachable_database_fails_stop_after_the_grace_period() -> None:
    store = PostgresStore(
        "postgresql://postgres:pw-x@127.0.0.1:1/test", unavailable_after=1.0, connect_timeout=1
    )
    failures: list[StoreUnavailable] = []
    store.on_failure(failures.append)
    try:
        with anyio.fail_after(15):
            with pytest.raises(StoreUnavailable) as caught:
                await store.get_task("t_1")
        message = str(caught.value)
        assert failures == [caught.value] and "127.0.0.1:1/test" in message and "pw-x" not in message
        assert store.failure is caught.value
        with pytest.raises(StoreUnavailable):
            await store.unfinished_count()  # fail-stop: nothing is tried again
        store.add_usage(UsageRecord("t_1", 1, None, 1, 1, 0, 0, None, T0))  # dropped, not raised
    finally:
        await store.aclose()


async def test_repeated_finish_and_batch_apply_once(pg: PostgresStore) -> None:
    """What a retry after a lost commit answer does: the second try finds the first's work."""
    await pg.enqueue([workflow("w_1", "flow")], [task("t_1", "w_1"), task("t_2", "w_1")])
    claimed = await pg.claim(ClaimRequest("w", 2, 60))
    done = outcome(claimed[0], "w", "completed")
    first, second = await pg.finish_attempt(done), await pg.finish_attempt(done)
    assert first.applied and (second.applied, second.status) == (False, "completed")
    assert len(await pg.get_attempts(claimed[0].id)) == 1

    batch = _Pending()
    batch.notifications.append(NotificationRecord(0, "task_retried", "t_2", "w_1", "/p", "again", T0))
    batch.usage.append(UsageRecord("t_2", 1, "m", 1, 2, 0, 0, None, T0))
    batch.events.append(TaskEventRecord("t_2", 0, T0, 1, "progress", "m", None))
    for _ in range(2):
        await pg._run("test", lambda conn: pg._write_batch(conn, batch))
    rows = await pg.count_rows()
    assert (rows["notifications"], rows["token_usage"], rows["task_events"]) == (2, 1, 1)
    assert batch.notifications[0].cursor == 2  # the retry reports the cursor the first try got


async def test_statement_timeout_is_retried(pg_schema: tuple[str, str]) -> None:
    dsn, schema = pg_schema
    store = PostgresStore(dsn, schema=schema, statement_timeout=0.2)
    store.open()
    try:
        await store.enqueue([workflow("w_1", "flow")], [task("t_1", "w_1")])
        holding, release = threading.Event(), threading.Event()

        def hold_row() -> None:
            with psycopg.connect(dsn) as admin:
                admin.execute(f"SELECT 1 FROM {schema}.task_executions WHERE id = 't_1' FOR UPDATE")
                holding.set()
                release.wait(5)

        thread = threading.Thread(target=hold_row)
        thread.start()
        holding.wait(5)
        with anyio.CancelScope() as scope:
            scope.deadline = anyio.current_time() + 10

            async def let_go() -> None:
                await anyio.sleep(0.7)  # several statement timeouts while the row is held
                release.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(let_go)
                effects, _ = await store.cancel(["t_1"], None, datetime.now(UTC))
        thread.join()
        assert [t.status for t in effects.tasks] == ["cancelled"]
        assert release.is_set()
    finally:
        await store.aclose()


async def test_claim_and_requeue_retried_after_a_lost_answer(
    pg: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit goes through, the answer does not: the retry returns what the commit did."""
    await pg.enqueue([workflow("w_1", "flow")], [task(f"t_{i}", "w_1") for i in range(4)])
    pool = await pg._get_pool()
    real = pool.connection
    lose = [1]

    @contextlib.asynccontextmanager
    async def connection(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with real(*args, **kwargs) as conn:
            yield conn
        if lose[0]:
            lose[0] -= 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(pool, "connection", connection)
    claimed = await pg.claim(ClaimRequest("w", 2, 60))
    assert [t.id for t in claimed] == ["t_0", "t_1"] and lose == [0]
    assert await pg.task_counts() == {"running": 2, "queued": 2}

    lose[0] = 1
    effects = await pg.finish_attempt(outcome(claimed[0], "w", "failed"))
    assert (effects.applied, effects.status, lose) == (True, "failed", [0])
    assert [n.kind for n in effects.notifications] == ["task_failed"]
    assert len(await pg.get_attempts("t_0")) == 1
    assert len(await pg.list_notifications(None, 0, None, True, 10, "r")) == 1
    lose[0] = 1
    requeued = await pg.requeue("t_0", T0 + timedelta(days=1))
    assert requeued is not None and requeued.status == "queued" and lose == [0]


async def test_cancel_retried_after_a_lost_answer(pg: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> None:
    await pg.enqueue([workflow("w_1", "flow")], [task("t_0", "w_1"), task("t_1", "w_1")])
    await pg.claim(ClaimRequest("w", 1, 60))
    pool = await pg._get_pool()
    real = pool.connection
    lose = [1]

    @contextlib.asynccontextmanager
    async def connection(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with real(*args, **kwargs) as conn:
            yield conn
        if lose[0]:
            lose[0] -= 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(pool, "connection", connection)
    effects, already = await pg.cancel(None, "w_1", datetime.now(UTC))
    assert lose == [0] and already == []
    assert sorted(t.id for t in effects.tasks) == ["t_0", "t_1"] and effects.stop == [("t_0", "w")]
    assert [n.kind for n in effects.notifications] == [
        "task_cancelled",
        "task_cancelled",
        "workflow_completed",
    ]
    assert [(f.workflow_id, f.status) for f in effects.workflows_finished] == [("w_1", "cancelled")]
    assert len(await pg.list_notifications(None, 0, None, True, 10, "r")) == 3


async def test_writer_cancelled_while_retrying_loses_nothing(
    pg: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await pg.enqueue([workflow("w_1", "flow")], [task("t_1", "w_1")])
    real = pg._write_batch
    fails = [1]

    async def flaky(conn: Any, batch: _Pending) -> Committed:
        if fails[0]:
            fails[0] -= 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await real(conn, batch)

    monkeypatch.setattr(pg, "_write_batch", flaky)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pg.run_writer, lambda committed: None)
        pg.add_usage(UsageRecord("t_1", 1, "m", 1, 2, 0, 0, None, T0))
        await anyio.sleep(0.02)  # the batch failed once and waits to retry
        tg.cancel_scope.cancel()
    assert fails == [0]
    assert (await pg.count_rows())["token_usage"] == 1
