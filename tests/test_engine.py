"""The engine's promises, checked against a real DuckDB file."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import all_test_agents, store_database, wait_for

from sidequest.config import AgentConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.engine.errors import InvalidRequest, NotFound
from sidequest.engine.retry import backoff_delay
from sidequest.models import NotificationKind, RetryBackoff, TaskOptions, TaskStatus, utcnow
from sidequest.storage.base import StoreError
from sidequest.storage.duckdb import DuckDBStore

pytestmark = pytest.mark.both_stores

FAST = {"initial": 0.01, "max": 0.05}


def make_settings(home: Path, **overrides: Any) -> Settings:
    agents = all_test_agents()
    agents["solo"] = AgentConfig(callable="sidequest.testing.agents:sleep", max_concurrency=1)
    values: dict[str, Any] = {
        "home": home,
        "agents": agents,
        "lease_seconds": 2.0,
        "shutdown_grace": 0.2,
        "max_concurrency": 4,
        **store_database(),
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_engine(home: Path, **overrides: Any) -> AsyncIterator[Engine]:
    engine = Engine(make_settings(home, **overrides))
    async with engine.running():
        yield engine


async def wait_status(engine: Engine, task_id: str, *statuses: TaskStatus, timeout: float = 10.0):
    async def check():
        info = await engine.get_task(task_id)
        return info if info.status in statuses else None

    return await wait_for(check, timeout)


def opts(**kwargs: Any) -> TaskOptions:
    return TaskOptions.model_validate(kwargs)


async def test_submitted_task_completes_with_result_and_notifications(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("echo", "hello world", opts(scope="proj"))
        assert submitted.task_id.startswith("t_") and len(submitted.task_id) > 20
        info = await wait_status(engine, submitted.task_id, TaskStatus.completed)
        assert info.result_preview == "hello world"
        assert info.attempts == 1
        result = await engine.get_result(submitted.task_id)
        assert result.content == "hello world" and result.next_offset is None
        page = await engine.notifications(scope="proj")
        kinds = [n.kind for n in page.notifications]
        # an unnamed one-task workflow: the task's notification says it all
        assert kinds == [NotificationKind.task_completed]
        again = await engine.notifications(scope="proj")
        assert again.notifications == []
        everything = await engine.notifications(scope="proj", include_delivered=True)
        assert len(everything.notifications) == 1 and all(n.delivered for n in everything.notifications)
        named = await engine.submit("echo", "again", opts(scope="proj", workflow_name="named"))
        await wait_status(engine, named.task_id, TaskStatus.completed)
        page = await engine.notifications(scope="proj")
        assert [n.kind for n in page.notifications] == [
            NotificationKind.task_completed,
            NotificationKind.workflow_completed,
        ]
        assert page.notifications[0].cursor < page.notifications[1].cursor
        assert page.next_cursor == page.notifications[1].cursor


async def test_task_row_is_durable_when_submit_returns(tmp_path: Path) -> None:
    async with running_engine(tmp_path, max_concurrency=1) as engine:
        await engine.submit("sleep", "30")  # occupies the only slot
        queued = await engine.submit("echo", "survive me", opts(priority="low"))
    # the engine has stopped: a new one on the same file must find the task and run it
    async with running_engine(tmp_path) as engine:
        info = await wait_status(engine, queued.task_id, TaskStatus.completed)
        assert info.result_preview == "survive me"


async def test_json_results_are_stored_as_json(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("json_result", "abc")
        await wait_status(engine, submitted.task_id, TaskStatus.completed)
        page = await engine.get_result(submitted.task_id)
        assert page.content_type == "json"
        assert '"length": 3' in page.content


async def test_results_are_paged(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("big_result", "2500")
        await wait_status(engine, submitted.task_id, TaskStatus.completed)
        chunks, offset = [], 0
        while offset is not None:
            page = await engine.get_result(submitted.task_id, offset=offset, max_chars=1000)
            assert page.total_chars == 2500
            chunks.append(page.content)
            offset = page.next_offset
        assert [len(c) for c in chunks] == [1000, 1000, 500]
        assert "".join(chunks).startswith("abcdef")
        with pytest.raises(InvalidRequest, match="past the end"):
            await engine.get_result(submitted.task_id, offset=9999)


async def test_high_priority_runs_before_normal_before_low_then_fifo(tmp_path: Path) -> None:
    log = tmp_path / "order.txt"
    async with running_engine(tmp_path, max_concurrency=1) as engine:
        blocker = await engine.submit("sleep", "0.3")
        await wait_status(engine, blocker.task_id, TaskStatus.running)
        ids = {}
        for name, priority in [
            ("low1", "low"),
            ("normal1", "normal"),
            ("high1", "high"),
            ("normal2", "normal"),
        ]:
            submitted = await engine.submit("record_and_sleep", f"{log} 0", opts(priority=priority))
            ids[submitted.task_id] = name
        for task_id in ids:
            await wait_status(engine, task_id, TaskStatus.completed)
    order = [ids[line.split()[0]] for line in log.read_text().splitlines()]
    assert order == ["high1", "normal1", "normal2", "low1"]


async def test_idempotency_key_returns_the_same_task_until_its_window_ends(tmp_path: Path) -> None:
    async with running_engine(tmp_path, idempotency_window=1.5) as engine:
        first = await engine.submit("sleep", "0.3", opts(idempotency_key="k1"))
        second = await engine.submit("sleep", "0.3", opts(idempotency_key="k1"))
        assert second.task_id == first.task_id and second.deduplicated
        concurrent: list[str] = []

        async def submit() -> None:
            concurrent.append((await engine.submit("echo", "x", opts(idempotency_key="k2"))).task_id)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(submit)
        assert len(set(concurrent)) == 1
        await wait_status(engine, first.task_id, TaskStatus.completed)
        again = await engine.submit("sleep", "0.01", opts(idempotency_key="k1"))
        assert again.task_id == first.task_id and again.deduplicated
        assert again.status == TaskStatus.completed
    # The key is in the store: a restart still deduplicates it.
    async with running_engine(tmp_path, idempotency_window=1.5) as engine:
        again = await engine.submit("sleep", "0.01", opts(idempotency_key="k1"))
        assert again.task_id == first.task_id and again.deduplicated
        await anyio.sleep(1.6)  # past the window after the task finished: the key is free again
        third = await engine.submit("sleep", "0.01", opts(idempotency_key="k1"))
        assert third.task_id != first.task_id and not third.deduplicated
        await wait_status(engine, third.task_id, TaskStatus.completed)
        fourth = await engine.submit("sleep", "0.01", opts(idempotency_key="k1"))
        assert fourth.task_id == third.task_id and fourth.deduplicated


async def test_failed_attempts_are_retried_with_history(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("flaky", "succeed on 3", opts(retry_backoff=FAST))
        info = await wait_status(engine, submitted.task_id, TaskStatus.completed)
        assert info.attempts == 3
        assert [a.status for a in info.attempt_history] == ["failed", "failed", "completed"]
        assert "attempt 1 fails on purpose" in info.attempt_history[0].error


async def test_final_failure_stores_error_and_notifies(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("fail", "boom", opts(max_retries=2, retry_backoff=FAST, scope="s"))
        info = await wait_status(engine, submitted.task_id, TaskStatus.failed)
        assert info.attempts == 3
        assert "failing on purpose: boom" in info.error
        kinds = [n.kind for n in (await engine.notifications(scope="s")).notifications]
        assert NotificationKind.task_failed in kinds
        workflow = await engine.get_workflow(submitted.workflow_id)
        assert workflow.status == "failed"


async def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("fail_permanently", "nope", opts(retry_backoff=FAST))
        info = await wait_status(engine, submitted.task_id, TaskStatus.failed)
        assert info.attempts == 1
        assert "cannot do this" in info.error


def test_backoff_grows_exponentially_is_capped_and_jittered() -> None:
    policy = RetryBackoff(initial=1, factor=2, max=10, jitter=0)
    assert [backoff_delay(policy, n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    jittered = RetryBackoff(initial=4, factor=2, max=100, jitter=0.5)
    rng = random.Random(7)
    delays = [backoff_delay(jittered, 1, rng) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert max(delays) - min(delays) > 1.0  # spread, not a constant


async def test_timeout_cancels_the_attempt(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit(
            "sleep", "30", opts(timeout="200ms", max_retries=1, retry_backoff=FAST)
        )
        info = await wait_status(engine, submitted.task_id, TaskStatus.failed)
        assert info.attempts == 2
        assert info.error == "timed out after 0.2s"
        assert [a.status for a in info.attempt_history] == ["timed_out", "timed_out"]


async def test_an_agents_own_timeout_error_is_an_ordinary_failure(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("raises_timeout", "db", opts(max_retries=0))
        info = await wait_status(engine, submitted.task_id, TaskStatus.failed)
        assert info.error == "TimeoutError: socket timed out: db"
        assert [a.status for a in info.attempt_history] == ["failed"]


async def test_cancel_queued_task_never_runs(tmp_path: Path) -> None:
    log = tmp_path / "ran.txt"
    async with running_engine(tmp_path, max_concurrency=1) as engine:
        blocker = await engine.submit("sleep", "0.3")
        queued = await engine.submit("record_and_sleep", f"{log} 0")
        result = await engine.cancel(task_id=queued.task_id)
        assert result.cancelled == [queued.task_id]
        assert (await engine.get_task(queued.task_id)).status == TaskStatus.cancelled
        await wait_status(engine, blocker.task_id, TaskStatus.completed)
        await anyio.sleep(0.1)
    assert not log.exists()


async def test_cancel_running_task_stops_the_executor(tmp_path: Path) -> None:
    async with running_engine(tmp_path, max_concurrency=1) as engine:
        running = await engine.submit("sleep", "30")
        await wait_status(engine, running.task_id, TaskStatus.running)
        result = await engine.cancel(task_id=running.task_id)
        assert result.cancelled == [running.task_id]
        info = await wait_status(engine, running.task_id, TaskStatus.cancelled, timeout=1.0)
        # the slot is free again: a new task runs on the single-slot pool
        after = await engine.submit("echo", "next")
        await wait_status(engine, after.task_id, TaskStatus.completed, timeout=2.0)
        info = await engine.get_task(running.task_id)
        assert [a.status for a in info.attempt_history] == ["cancelled"]
        again = await engine.cancel(task_id=running.task_id)
        assert again.cancelled == [] and again.already_finished == [running.task_id]


async def test_cancel_running_sync_task_is_seen_by_the_callable(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("sleep_sync", "30")
        await wait_status(engine, submitted.task_id, TaskStatus.running)
        attempt = engine.dispatcher.running[submitted.task_id]
        await engine.cancel(task_id=submitted.task_id)
        assert attempt.ctx.is_cancelled
        await wait_status(engine, submitted.task_id, TaskStatus.cancelled, timeout=1.0)


async def test_cancel_unknown_ids_is_an_error(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        with pytest.raises(NotFound, match="unknown task_id"):
            await engine.cancel(task_id="t_nope")
        with pytest.raises(NotFound, match="unknown workflow_id"):
            await engine.cancel(workflow_id="wf_nope")
        with pytest.raises(InvalidRequest, match="exactly one"):
            await engine.cancel()


async def test_cancel_workflow_cancels_its_unfinished_tasks(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        first = await engine.submit("sleep", "30", opts(workflow_name="research"))
        second = await engine.submit("sleep", "30", opts(workflow_id=first.workflow_id))
        result = await engine.cancel(workflow_id=first.workflow_id)
        assert set(result.cancelled) == {first.task_id, second.task_id}
        workflow = await engine.get_workflow(first.workflow_id)
        assert workflow.status == "cancelled" and workflow.counts == {"cancelled": 2}


async def test_workflow_completes_once_all_its_tasks_finish(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        # long enough to be running still when listed, however loaded the machine
        first = await engine.submit("sleep", "2", opts(workflow_name="wf", scope="s"))
        second = await engine.submit("echo", "b", opts(workflow_id=first.workflow_id))
        assert second.workflow_id == first.workflow_id
        active = await engine.list_active_workflows(scope="s")
        assert [w.workflow_id for w in active.workflows] == [first.workflow_id]
        await wait_status(engine, first.task_id, TaskStatus.completed)
        workflow = await engine.get_workflow(first.workflow_id)
        assert workflow.status == "completed" and workflow.counts == {"completed": 2}
        assert workflow.name == "wf"
        done = [
            n for n in (await engine.notifications(scope="s")).notifications if n.kind == "workflow_completed"
        ]
        assert len(done) == 1 and done[0].workflow_id == first.workflow_id
        history = await engine.workflow_history(scope="s")
        assert [w.workflow_id for w in history.workflows] == [first.workflow_id]
        assert (await engine.list_active_workflows(scope="s")).workflows == []
        with pytest.raises(NotFound, match="unknown workflow_id"):
            await engine.submit("echo", "x", opts(workflow_id="wf_missing"))


async def test_listing_defaults_to_the_callers_scope(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        mine = await engine.submit("sleep", "30", opts(scope="/projects/a"))
        theirs = await engine.submit("sleep", "30", opts(scope="/projects/b"))
        own = await engine.list_active_workflows(scope="/projects/a")
        assert [w.workflow_id for w in own.workflows] == [mine.workflow_id]
        every = await engine.list_active_workflows(scope="/projects/a", all_scopes=True)
        assert {w.workflow_id for w in every.workflows} == {mine.workflow_id, theirs.workflow_id}


async def test_agent_concurrency_limit_holds(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        # long enough that the first is still running when the second is looked at, under load
        first = await engine.submit("solo", "1.5")
        second = await engine.submit("solo", "0.3")
        await wait_status(engine, first.task_id, TaskStatus.running)
        await anyio.sleep(0.1)
        assert (await engine.get_task(second.task_id)).status == TaskStatus.queued
        await wait_status(engine, second.task_id, TaskStatus.completed)


async def test_delay_holds_the_task_until_due(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("echo", "later", opts(delay="300ms"))
        info = await engine.get_task(submitted.task_id)
        assert info.status == TaskStatus.queued and info.not_before is not None
        done = await wait_status(engine, submitted.task_id, TaskStatus.completed)
        assert done.started_at >= info.not_before


async def test_progress_is_stored_and_shown(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("sleep", "1")

        async def has_progress():
            info = await engine.get_task(submitted.task_id)
            return info if info.progress and info.progress.message else None

        info = await wait_for(has_progress)
        assert info.progress.message.startswith("step ")
        assert 0 <= info.progress.percent < 100


async def test_shutdown_puts_running_tasks_back_in_the_queue(tmp_path: Path) -> None:
    async with running_engine(tmp_path, shutdown_grace=0.1) as engine:
        submitted = await engine.submit("sleep", "0.5")
        await wait_status(engine, submitted.task_id, TaskStatus.running)
    async with running_engine(tmp_path) as engine:
        info = await wait_status(engine, submitted.task_id, TaskStatus.completed)
        assert [a.status for a in info.attempt_history] == ["interrupted", "completed"]
        assert info.attempts == 1  # the interrupted attempt is not one of its tries


async def test_rejected_submissions_write_nothing(tmp_path: Path) -> None:
    async with running_engine(tmp_path, max_prompt_bytes=100, max_timeout=3600) as engine:
        before = await engine.store.count_rows()
        with pytest.raises(
            InvalidRequest,
            match="no agent named 'xyzzy'; known agents: bad_unicode, big_result, cites_badly, echo, ",
        ):
            await engine.submit("xyzzy", "x")
        with pytest.raises(InvalidRequest, match="over the 100-byte limit"):
            await engine.submit("echo", "x" * 101)
        with pytest.raises(InvalidRequest, match="over the 3600s maximum"):
            await engine.submit("echo", "x", opts(timeout="2h"))
        with pytest.raises(InvalidRequest, match="prompt is empty"):
            await engine.submit("echo", "   ")
        assert await engine.store.count_rows() == before


@pytest.mark.duckdb_only("opens DuckDBStore and writes its schema_version by hand")
async def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    async with running_engine(tmp_path):
        pass
    store = DuckDBStore(tmp_path / "sidequest.duckdb")
    store.open()
    store._require().execute("INSERT INTO schema_version VALUES (999, now()::TIMESTAMP)")
    store.close()
    with pytest.raises(StoreError, match="schema version 999, newer than this sidequest understands"):
        DuckDBStore(tmp_path / "sidequest.duckdb").open()


async def test_text_that_is_not_utf8_is_rejected_or_repaired(tmp_path: Path, store_kind: str) -> None:
    async with running_engine(tmp_path) as engine:
        before = await engine.store.count_rows()
        with pytest.raises(InvalidRequest, match="prompt is not valid UTF-8"):
            await engine.submit("echo", "bad \ud800")
        with pytest.raises(InvalidRequest, match=r"options\.metadata is not valid UTF-8"):
            await engine.submit("echo", "ok", opts(metadata={"k": "\udcff"}))
        assert await engine.store.count_rows() == before
        submitted = await engine.submit("bad_unicode", "go")
        info = await wait_status(engine, submitted.task_id, TaskStatus.completed)
        assert info.result_preview == "before ? after"
        if store_kind == "postgres":  # PostgreSQL text cannot hold NUL: refused, not mangled
            before = await engine.store.count_rows()
            with pytest.raises(InvalidRequest, match="prompt holds a NUL character"):
                await engine.submit("echo", "a\x00b")
            with pytest.raises(InvalidRequest, match=r"options\.metadata holds a NUL character"):
                await engine.submit("echo", "ok", opts(metadata={"k": ["\x00"]}))
            assert await engine.store.count_rows() == before
            return
        nul = await engine.submit("echo", "a\x00b")
        assert (await wait_status(engine, nul.task_id, TaskStatus.completed)).result_preview == "a\x00b"


@pytest.mark.duckdb_only("a group commit (_Pending) with the task but not its workflow row")
async def test_tasks_whose_workflow_row_was_lost_get_it_back(tmp_path: Path) -> None:
    """The workflow row rides the commit after its task's; a crash in between must not orphan the task."""
    from sidequest.storage.base import TaskRecord
    from sidequest.storage.duckdb import _Pending

    store = DuckDBStore(tmp_path / "sidequest.duckdb")
    store.open()
    now = utcnow()
    batch = _Pending()
    batch.tasks_new.append(
        TaskRecord(
            id="t_orphan",
            seq=1,
            workflow_id="wf_lost",
            agent="echo",
            prompt="still here",
            status="queued",
            priority="normal",
            scope="s",
            options={"workflow_name": "named"},
            max_retries=3,
            created_at=now,
            updated_at=now,
        )
    )
    store._commit(batch)
    store.close()
    async with running_engine(tmp_path) as engine:
        await wait_status(engine, "t_orphan", TaskStatus.completed)
        workflow = await engine.get_workflow("wf_lost")
        assert workflow.name == "named" and workflow.status == "completed"


async def test_paging_and_time_filters_reject_or_accept_extremes_cleanly(tmp_path: Path) -> None:
    from datetime import datetime

    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("echo", "x", opts(scope="s"))
        await wait_status(engine, submitted.task_id, TaskStatus.completed)
        with pytest.raises(InvalidRequest, match="offset must be between 0 and"):
            await engine.get_result(submitted.task_id, offset=2**62)
        with pytest.raises(InvalidRequest, match="offset must be between 0 and"):
            await engine.list_active_workflows(offset=2**63)
        with pytest.raises(InvalidRequest, match="limit must be between 1 and 200"):
            await engine.workflow_history(limit=0)
        with pytest.raises(InvalidRequest, match="since must be a cursor"):
            await engine.notifications(since=-1)
        # naive times are UTC, and the far past is just the far past
        history = await engine.workflow_history(scope="s", since=datetime(1, 1, 1))
        assert [w.workflow_id for w in history.workflows] == [submitted.workflow_id]
        assert (await engine.workflow_history(scope="s", until=datetime(2000, 1, 1))).workflows == []


async def test_an_agent_calling_sys_exit_fails_its_task_not_the_server(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        submitted = await engine.submit("exits", "bye", opts(max_retries=0))
        info = await wait_status(engine, submitted.task_id, TaskStatus.failed)
        assert info.error == "the agent called sys.exit(3)"
        after = await engine.submit("echo", "still here")
        assert (await wait_status(engine, after.task_id, TaskStatus.completed)).result_preview == "still here"


async def test_reopening_a_finished_workflow_and_recording_usage(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        first = await engine.submit("reports_usage", "go", opts(workflow_name="wf", scope="s"))
        await wait_status(engine, first.task_id, TaskStatus.completed)
        assert (await engine.get_workflow(first.workflow_id)).status == "completed"
        second = await engine.submit("fail", "x", opts(workflow_id=first.workflow_id, max_retries=0))
        assert (await engine.get_workflow(first.workflow_id)).status == "running"
        await wait_status(engine, second.task_id, TaskStatus.failed)
        workflow = await engine.get_workflow(first.workflow_id)
        assert workflow.status == "failed" and workflow.counts == {"completed": 1, "failed": 1}
        done = [
            n.message
            for n in (await engine.notifications(scope="s")).notifications
            if n.kind == NotificationKind.workflow_completed
        ]
        assert len(done) == 2 and "1 completed, 1 failed" in done[1]
        assert (await engine.store.count_rows())["token_usage"] == 1


async def test_retry_inside_an_open_workflow_keeps_its_counts_right(tmp_path: Path) -> None:
    """The retried task's failure no longer counts: the workflow ends completed, not failed."""
    async with running_engine(tmp_path) as engine:
        first = await engine.submit("flaky", "succeed on 2", opts(max_retries=0, workflow_name="mixed"))
        other = await engine.submit("sleep", "1", opts(workflow_id=first.workflow_id))
        await wait_status(engine, first.task_id, TaskStatus.failed)
        await engine.retry(first.task_id)
        waited = await engine.wait_for_tasks([first.task_id, other.task_id], mode="all", timeout=20)
        assert not waited.timed_out
        assert {t.status for t in waited.tasks} == {TaskStatus.completed}
        workflow = await engine.get_workflow(first.workflow_id)
        assert workflow.status == "completed" and workflow.counts == {"completed": 2}


async def test_retry_after_a_restart_reopens_the_finished_workflow(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        task = await engine.submit("sleep", "30")
        await engine.cancel(task_id=task.task_id)
        assert (await engine.get_workflow(task.workflow_id)).status == "cancelled"
    async with running_engine(tmp_path) as engine:
        retried = await engine.retry(task.task_id)
        assert retried.status == TaskStatus.queued and retried.error is None
        active = await engine.list_active_workflows(all_scopes=True)
        assert [w.workflow_id for w in active.workflows] == [task.workflow_id]
        waited = await engine.wait_for_tasks(workflow_id=task.workflow_id, timeout=0.2)
        assert waited.timed_out and waited.tasks[0].status in (TaskStatus.queued, TaskStatus.running)
        with pytest.raises(InvalidRequest, match="only a failed or cancelled task"):
            await engine.retry(task.task_id)
        await engine.cancel(task_id=task.task_id)
        assert (await engine.get_workflow(task.workflow_id)).status == "cancelled"


async def test_bad_sources_from_agent_code_are_dropped_not_fatal(tmp_path: Path) -> None:
    """Sources ride the group commit with other tasks' writes: a value JSON cannot hold must not
    stop the store, and a page without a url must not make the result unreadable."""
    async with running_engine(tmp_path) as engine:
        cited = await engine.submit("cites_badly", "go")
        other = await engine.submit("echo", "beside it")
        waited = await engine.wait_for_tasks([cited.task_id, other.task_id], mode="all", timeout=10)
        assert {t.status for t in waited.tasks} == {TaskStatus.completed}
        assert engine.failure is None
        page = await engine.get_result(cited.task_id)
        assert [s.model_dump() for s in page.sources] == [
            {"n": 1, "title": None, "url": "https://a.example/"},
            {"n": 3, "title": "T?", "url": "https://b.example/"},
        ]
        assert (await engine.get_result(other.task_id)).content == "beside it"
