"""Attempts: starting, running and finishing one try of a task.

An attempt takes a lease and runs its agent's executor under the task's timeout; what the
executor reports while it runs (progress, usage, session state, log entries) is written as it
comes; its end decides the task's next state (completed, retrying with backoff, failed). It
also recovers the attempts a dead process left behind (a lapsed lease) and renews the leases
of those running. A task that finishes is handed back to the engine (`task_finished`), which
owns what happens to the live set and the task's workflow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

import anyio

from sidequest.agents import AgentLookupError, AgentRegistry
from sidequest.config import Settings
from sidequest.engine.dispatcher import Dispatcher, RunningAttempt
from sidequest.engine.notifier import Notifier
from sidequest.engine.retry import backoff_delay
from sidequest.engine.tasklog import TaskLog
from sidequest.engine.text import clean, short, took
from sidequest.executors.base import (
    ExecutionResult,
    PermanentError,
    ReportedUsage,
    RetryableError,
    TaskContext,
)
from sidequest.models import NotificationKind, RetryBackoff, Source, TaskStatus, utcnow
from sidequest.storage.base import (
    AttemptRecord,
    Outcome,
    ResultRecord,
    SharedStore,
    Store,
    StoreError,
    StoreUnavailable,
    TaskRecord,
    UsageRecord,
)

log = logging.getLogger(__name__)

_NOTIFY_PREVIEW = 200
_INT64_MAX = 2**63 - 1
MAX_SOURCES = 200
"""Cited pages kept with a result; a research answer cites tens."""


def _plain_sources(sources: object) -> list[dict[str, Any]] | None:
    """The cited pages an executor returned, as rows the store can always write: agent code may hand
    back anything (a datetime, NaN, a missing url), and one bad value must not fail the commit that
    carries other tasks' results. Entries that are not a page are dropped."""
    if not isinstance(sources, list):
        return None
    kept = []
    for raw in sources[:MAX_SOURCES]:
        if not isinstance(raw, dict):
            continue
        try:
            source = Source.model_validate({k: raw.get(k) for k in ("n", "title", "url")}, strict=False)
        except ValueError:
            continue
        title = clean(source.title)[:500] if source.title else None
        kept.append({"n": source.n, "title": title, "url": clean(source.url)[:4000]})
    return kept or None


SHARED_RENEW_SECONDS = 1.0
"""On a shared store leases are renewed at least this often: the renewal carries cancels."""
REAP_SECONDS = 0.5
"""On a shared store every process looks for lapsed leases this often."""


class _Sink(Protocol):
    """Where an attempt's end goes: written behind memory (owned store) or collected into one
    guarded transition (shared store). The decision code is the same for both."""

    def attempt_row(self, attempt: AttemptRecord) -> None: ...

    def save(self, task: TaskRecord) -> None: ...

    def result(self, result: ResultRecord) -> None: ...

    def notify(self, task: TaskRecord, kind: NotificationKind, message: str) -> None: ...

    def requeue(self, task: TaskRecord) -> None: ...

    def finished(self, task: TaskRecord, now: datetime) -> None: ...


class _Apply:
    """The owned store: each effect is applied at once; the group commit makes them durable."""

    def __init__(self, attempts: Attempts) -> None:
        self._a = attempts

    def attempt_row(self, attempt: AttemptRecord) -> None:
        self._a.store.add_attempt(attempt)

    def save(self, task: TaskRecord) -> None:
        self._a.store.update_task(task)

    def result(self, result: ResultRecord) -> None:
        self._a.store.add_result(result)

    def notify(self, task: TaskRecord, kind: NotificationKind, message: str) -> None:
        self._a.notifier.emit(kind, task.workflow_id, task.scope, message, task_id=task.id)

    def requeue(self, task: TaskRecord) -> None:
        self._a.dispatcher.enqueue(task)

    def finished(self, task: TaskRecord, now: datetime) -> None:
        self._a._task_finished(task, now)


class _Collect:
    """The shared store: effects are gathered for `finish_attempt`, which applies them together
    only if the attempt is still the task's current one."""

    def __init__(self) -> None:
        self.attempt: AttemptRecord | None = None
        self.task: TaskRecord | None = None
        self.result_record: ResultRecord | None = None
        self.notification: tuple[str, str] | None = None
        self.requeued = False

    def attempt_row(self, attempt: AttemptRecord) -> None:
        self.attempt = attempt

    def save(self, task: TaskRecord) -> None:
        self.task = task

    def result(self, result: ResultRecord) -> None:
        self.result_record = result

    def notify(self, task: TaskRecord, kind: NotificationKind, message: str) -> None:
        self.notification = (kind.value, message)

    def requeue(self, task: TaskRecord) -> None:
        self.requeued = True

    def finished(self, task: TaskRecord, now: datetime) -> None:
        pass  # the engine holds nothing for a task on a shared store once its attempt ends


class Attempts:
    """Runs attempts for the engine's dispatcher (`start` and `run` are its callbacks).

    `settings` and `agents` are replaced by the engine on a reload; `failure` is set by the
    engine when the store failed, `loop_thread` when the engine starts, and `dispatcher` once it
    exists (it is built with this object's callbacks)."""

    dispatcher: Dispatcher

    def __init__(
        self,
        settings: Settings,
        agents: AgentRegistry,
        store: Store,
        notifier: Notifier,
        tasklog: TaskLog,
        worker_id: str,
        live: dict[str, TaskRecord],
        task_finished: Callable[[TaskRecord, datetime], None],
        workdir_roots: Callable[[str, str | None], list[str]],
    ) -> None:
        self.settings = settings
        self.agents = agents
        self.store = store
        self.notifier = notifier
        self.tasklog = tasklog
        self.worker_id = worker_id
        self._live = live
        self._task_finished = task_finished
        self._workdir_roots = workdir_roots
        self.failure: StoreUnavailable | None = None
        self.loop_thread: int | None = None
        self.wake_source: Callable[[], None] | None = None
        """Shared store: wakes the claiming queue when an attempt's end put work back."""

    def start(self, task: TaskRecord) -> RunningAttempt:
        if not self.store.shared:  # a shared store's claim already made it running, counted, leased
            now = utcnow()
            task.status = TaskStatus.running.value
            task.attempts += 1
            task.started_at = now
            task.updated_at = now
            task.next_attempt_at = None
            task.worker_id = self.worker_id
            task.lease_expires_at = now + timedelta(seconds=self.settings.lease_seconds)
            self.store.attempt_started(task)  # a crash from here on is counted against this task
        ctx = TaskContext(
            task_id=task.id,
            workflow_id=task.workflow_id,
            agent=task.agent,
            attempt=task.attempts,
            scope=task.scope,
            metadata=dict((task.options or {}).get("metadata", {})),
            _on_progress=lambda p, m: self._call_in_loop(self._progress, task, p, m),
            _on_usage=lambda u: self._call_in_loop(self._record_usage, task, u),
            options=task.options or {},
            session_id=task.session_id,
            batch_id=task.batch_id,
            _on_state=lambda sid, bid: self._call_in_loop(self._save_state, task, sid, bid),
            _on_log=lambda kind, message, data: self._call_in_loop(
                self.tasklog.add_reported, task, kind, message, data
            ),
            _workdir_roots=lambda: self._workdir_roots(task.scope, task.project),
        )
        return RunningAttempt(task=task, ctx=ctx)

    @property
    def _shared(self) -> SharedStore:
        return cast(SharedStore, self.store)

    def _call_in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Executors may report from a worker thread; engine state is only touched on the loop."""
        if threading.get_ident() == self.loop_thread:
            fn(*args)
        else:
            anyio.from_thread.run_sync(fn, *args)

    def _record_usage(self, task: TaskRecord, usage: ReportedUsage) -> None:
        """Usage comes from agent code (an isolated child may send anything): a value the store
        cannot hold must cost that one record, never the group commit it rides, which would stop
        the daemon (fail-stop). Filed under this task's current attempt, whatever ids it names."""

        def count(value: object) -> int:
            try:
                number = int(value)  # type: ignore[call-overload]
            except (TypeError, ValueError, OverflowError):
                return 0
            return min(max(number, 0), _INT64_MAX)

        cost = usage.cost_usd
        if cost is not None:
            try:
                cost = float(cost)
            except (TypeError, ValueError, OverflowError):
                cost = None
            if cost is not None and not math.isfinite(cost):
                cost = None
        model = clean(str(usage.model))[:200] if usage.model else None
        record = UsageRecord(
            task.id,
            task.attempts,
            model,
            count(usage.input_tokens),
            count(usage.output_tokens),
            count(usage.cache_creation_input_tokens),
            count(usage.cache_read_input_tokens),
            cost,
            utcnow(),
        )
        self.store.add_usage(record)
        tokens = f"{record.input_tokens} in, {record.output_tokens} out"
        self.tasklog.add(
            task,
            "usage",
            f"{model or 'usage'}: {tokens}" + (f", ${cost:.4f}" if cost is not None else ""),
            {
                k: v
                for k, v in dataclasses.asdict(record).items()
                if k not in ("task_id", "attempt", "recorded_at")
            },
        )

    def _save_state(self, task: TaskRecord, session_id: str | None, batch_id: str | None) -> None:
        if session_id is not None:
            task.session_id = clean(session_id)
        if batch_id is not None:
            task.batch_id = clean(batch_id)
        task.updated_at = utcnow()
        self.store.update_task(task)

    def _progress(self, task: TaskRecord, percent: float | None, message: str | None) -> None:
        if task.status != TaskStatus.running:
            return
        if percent is not None:
            task.progress_percent = percent
        if message is not None:
            task.progress_message = clean(short(str(message), 1000))
        task.updated_at = utcnow()
        self.store.update_task(task)
        self.tasklog.add_progress(task, percent, message)

    async def run(self, attempt: RunningAttempt) -> None:
        task, ctx = attempt.task, attempt.ctx
        outcome: str
        detail: str | ExecutionResult
        retry_after: float | None = None
        options = task.options
        if self.failure is not None:  # the store failed while this attempt was being started
            await self._finish(task, "store_failed", "store_failed")
            return
        with attempt.scope:
            try:
                await self.tasklog.resume(task)
                log.info("task %s started: agent %s, attempt %d", task.id, task.agent, task.attempts)
                self.tasklog.add(task, "attempt_started", f"attempt {task.attempts} started ({task.agent})")
                prompt = task.prompt
                if prompt is None or options is None:  # a large payload stays on disk until now
                    payload = await self.store.get_payload(task.id)
                    if payload is None:
                        raise PermanentError(f"task {task.id} has no stored prompt")
                    prompt, options = payload
                    ctx.options, ctx.metadata = options, dict(options.get("metadata", {}))
                try:
                    if task.agent_snapshot is not None and self.store.shared:
                        # Another machine made this task: run the agent file as it was submitted.
                        agent = self.agents.from_snapshot(task.agent_snapshot)
                    else:
                        agent = self.agents.resolve(task.agent, task.project)
                except AgentLookupError as exc:
                    raise PermanentError(f"agent {task.agent!r} can no longer be used: {exc}") from exc
                resume = options.get("resume_task_id")
                if resume:
                    earlier = await self._record(resume)
                    ctx.resume_session_id = earlier.session_id if earlier else None
                    if not ctx.resume_session_id:
                        raise PermanentError(f"task {resume} has no session to resume (it saved none)")
                deadline = anyio.current_time() + task.timeout_s if task.timeout_s else math.inf
                with anyio.CancelScope(deadline=deadline) as limit:
                    detail = await agent.executor.run(prompt, ctx)
                if limit.cancelled_caught:  # our deadline, not a TimeoutError the agent raised itself
                    outcome, detail = "timed_out", f"timed out after {task.timeout_s:g}s"
                else:
                    outcome = "completed"
            except PermanentError as exc:
                outcome, detail = "failed_permanently", str(exc) or type(exc).__name__
            except RetryableError as exc:
                outcome, detail, retry_after = "failed", str(exc) or type(exc).__name__, exc.retry_after
            except Exception as exc:
                outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
            except SystemExit as exc:  # an agent calling sys.exit() must not stop the server
                outcome, detail = "failed", f"the agent called sys.exit({exc.code!r})"
        if attempt.stop_reason is not None:
            outcome, detail = attempt.stop_reason, attempt.stop_reason
        await self._finish(task, outcome, detail, retry_after, options)

    async def give_back(self, task: TaskRecord) -> None:
        """A task claimed (shared store) as this worker stopped, never started: back in the
        queue as at a shutdown (an interrupted attempt, not one of its tries)."""
        await self._finish(task, "shutdown", "claimed as the worker stopped; not started")

    async def _finish(
        self,
        task: TaskRecord,
        outcome: str,
        detail: str | ExecutionResult,
        retry_after: float | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        """Decide what the attempt's end means for the task and make it so: on the owned store by
        writing behind memory, on a shared store by one guarded transition (`finish_attempt`),
        so a cancel or another worker's claim that came first wins."""
        if not self.store.shared:
            self._finish_attempt(task, outcome, detail, retry_after, options, _Apply(self))
            return
        sink = _Collect()
        expected = task.attempts
        self._finish_attempt(task, outcome, detail, retry_after, options, sink)
        self._live.pop(task.id, None)
        self.tasklog.forget(task.id)
        if sink.attempt is None:
            return  # the store failed: nothing more can be written
        if sink.task is None:  # the attempt was stopped by a cancel: only its history row is new
            sink.task = task
        try:
            effects = await self._shared.finish_attempt(
                Outcome(  # guarded by the attempt row's number: a shutdown gives the attempt back
                    task=sink.task,
                    worker_id=self.worker_id,
                    attempt=sink.attempt,
                    result=sink.result_record,
                    notification=sink.notification,
                )
            )
        except StoreError as exc:
            # The store gave up (it retries inside) or refused this outcome: the attempt's lease
            # lapses and another worker runs it again (at-least-once); a store that failed for
            # good stops this process through its failure handler (fail-stop), not through here.
            log.error("task %s: the end of attempt %d could not be recorded: %s", task.id, expected, exc)
            return
        except Exception:
            log.exception("task %s: the end of attempt %d could not be recorded", task.id, expected)
            return
        if not effects.applied:
            log.info(
                "task %s: attempt %d ended after the task was %s elsewhere", task.id, expected, effects.status
            )
        if sink.requeued and self.wake_source is not None:
            self.wake_source()

    def _finish_attempt(
        self,
        task: TaskRecord,
        outcome: str,
        detail: str | ExecutionResult,
        retry_after: float | None,
        options: dict[str, Any] | None,
        sink: _Sink,
    ) -> None:
        now = utcnow()
        started = task.started_at
        error = None if isinstance(detail, ExecutionResult) else clean(detail)
        history_status = {"failed_permanently": "failed", "shutdown": "interrupted"}.get(outcome, outcome)
        self._log_attempt_end(task, history_status, error, now)
        if task.status == TaskStatus.cancelled:
            self.tasklog.forget(task.id)  # cancelled while it ran: that finish was its last entry
        if outcome == "store_failed":
            return  # nothing more can be written; the restart runs it again
        sink.attempt_row(
            AttemptRecord(task.id, task.attempts, history_status, started, now, error, self.worker_id)
        )
        task.worker_id = None
        task.lease_expires_at = None
        task.updated_at = now
        if outcome == "cancelled" or task.status == TaskStatus.cancelled:
            return  # cancel() already recorded the final state
        if outcome == "shutdown":
            task.status = TaskStatus.queued.value
            task.attempts -= 1  # an interrupted attempt is not one of the task's tries
            sink.save(task)
            sink.requeue(task)
            return
        if outcome == "completed":
            assert isinstance(detail, ExecutionResult)
            self._complete(task, detail, now, sink)
            return
        permanent = outcome == "failed_permanently"
        self._after_failure(
            task, clean(str(detail)), permanent, now, sink, min_delay=retry_after, options=options
        )

    def _log_attempt_end(self, task: TaskRecord, status: str, error: str | None, now: datetime) -> None:
        """One line in the daemon's log and one entry in the task's run log per finished attempt."""
        seconds = (now - task.started_at).total_seconds() if task.started_at else 0.0
        # The error stays out of the daemon's log: it is agent text (a program's stderr may hold a
        # token, or lines made to look like ours); the run log and the task's status have it.
        log.info(
            "task %s finished: %s after %s (agent %s, attempt %d)",
            task.id,
            status,
            took(seconds),
            task.agent,
            task.attempts,
        )
        message = f"attempt {task.attempts} {status} after {took(seconds)}"
        if error:
            message += f": {error}"
        data: dict[str, Any] = {"status": status, "seconds": round(seconds, 3), "error": error}
        dropped = self.tasklog.dropped(task.id)
        if dropped:
            data["dropped_entries"] = dropped  # past the cap, so far (counted in this process)
        self.tasklog.add(task, "attempt_finished", message, data, now)

    def _complete(self, task: TaskRecord, result: ExecutionResult, now: datetime, sink: _Sink) -> None:
        result.content = clean(result.content)
        task.status = TaskStatus.completed.value
        task.finished_at = now
        task.error = None
        task.progress_percent = 100.0
        task.result_preview = result.content[: self.settings.result_preview_chars]
        sink.result(
            ResultRecord(task.id, result.content_type, result.content, now, _plain_sources(result.sources))
        )
        sink.save(task)
        sink.notify(
            task,
            NotificationKind.task_completed,
            f"Task {task.id} ({task.agent}) completed: {short(result.content, _NOTIFY_PREVIEW)}",
        )
        sink.finished(task, now)

    def _after_failure(
        self,
        task: TaskRecord,
        error: str,
        permanent: bool,
        now: datetime,
        sink: _Sink,
        min_delay: float | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        task.failures += 1
        task.error = short(error, 4000) if len(error) > 4000 else error
        task.worker_id = None
        task.lease_expires_at = None
        task.updated_at = now
        if permanent or task.failures > task.max_retries:
            self._fail_task(task, error, now, sink)
            return
        options = options if options is not None else task.options or {}
        policy = RetryBackoff.model_validate(options.get("retry_backoff", {}))
        task.status = TaskStatus.retrying.value
        delay = max(backoff_delay(policy, task.failures), min_delay or 0.0)
        task.next_attempt_at = now + timedelta(seconds=delay)
        sink.save(task)
        self.tasklog.add(
            task,
            "retry_scheduled",
            f"retry {task.failures} of {task.max_retries} in {took(delay)}: {short(error, 500)}",
            {"reason": error, "delay_seconds": round(delay, 3), "failures": task.failures},
            now,
        )
        sink.requeue(task)

    def _fail_task(self, task: TaskRecord, error: str, now: datetime, sink: _Sink) -> None:
        task.status = TaskStatus.failed.value
        task.finished_at = now
        task.next_attempt_at = None
        sink.save(task)
        tries = f"after {task.attempts} attempt{'s' if task.attempts != 1 else ''}"
        sink.notify(
            task,
            NotificationKind.task_failed,
            f"Task {task.id} ({task.agent}) failed {tries}: {short(error, _NOTIFY_PREVIEW)}",
        )
        sink.finished(task, now)

    def recover_lapsed(self, task: TaskRecord, now: datetime) -> None:
        """The process running this attempt died. That is not the task's failure (it may have been
        a bystander of another task's crash), so it does not use up `max_retries`; but a task
        present at `max_lost_attempts` deaths is failed as poisonous, or it would crash every
        restart forever. Until then it runs again, alone (see Dispatcher), so a crash it causes
        is counted against it and not against tasks beside it."""
        error = f"attempt {task.attempts} was lost: the process running it stopped and its lease lapsed"
        sink = _Apply(self)
        sink.attempt_row(
            AttemptRecord(task.id, task.attempts, "lost", task.started_at, now, error, task.worker_id)
        )
        log.warning("task %s: %s", task.id, error)
        self.tasklog.lost(task.id, task.attempts, now)
        task.lost_attempts += 1
        task.worker_id = None
        task.lease_expires_at = None
        task.updated_at = now
        if task.lost_attempts >= self.settings.max_lost_attempts:
            deaths = task.lost_attempts
            task.failures += 1
            task.error = (
                f"poisonous: the process died {deaths} time{'s' if deaths != 1 else ''} while it ran "
                f"(max_lost_attempts is {self.settings.max_lost_attempts}); run it with an isolated "
                'agent (isolation = "process") or fix what kills the process'
            )
            self._fail_task(task, task.error, now, sink)
            return
        task.status = TaskStatus.queued.value
        task.next_attempt_at = None
        sink.save(task)
        sink.requeue(task)

    async def renew_leases(self) -> None:
        """Keep the leases of running attempts ahead of the clock. On a shared store this is also
        how a cancel made by another process arrives: the renewal answers with the attempts that
        are no longer this worker's, and they are stopped. It runs at least every second there,
        so such a cancel stops its attempt within a second of being made."""
        interval = max(0.05, self.settings.lease_seconds / 3)
        if self.store.shared:
            interval = min(interval, SHARED_RENEW_SECONDS)
        while True:
            await anyio.sleep(interval)
            if self.store.shared:
                await self._renew_shared()
                continue
            expires = utcnow() + timedelta(seconds=self.settings.lease_seconds)
            for attempt in self.dispatcher.running.values():
                attempt.task.lease_expires_at = expires
                self.store.update_task(attempt.task)

    async def _renew_shared(self) -> None:
        held = {a.task.id: a.task.attempts for a in self.dispatcher.running.values() if a.stop_reason is None}
        if not held:
            return
        try:
            lost = await self._shared.renew_leases(self.worker_id, held, self.settings.lease_seconds)
        except StoreError as exc:  # the store retries inside; this is the one that gave up
            log.warning("could not renew leases: %s", exc)
            return
        for task_id in lost:
            if self.dispatcher.cancel_running(task_id):
                log.info("task %s was cancelled or taken elsewhere: its attempt here is stopped", task_id)

    async def reap_lapsed(self) -> None:
        """Shared store: find attempts whose process died (lease lapsed) and queue them again,
        counted as lost, while everything else keeps running. Every process does this; the
        store's row locks make each lapse reaped once."""
        # Half a second: a dead worker's tasks run again within lease + 0.5 s (the lease lapses at
        # most a lease after the death, renewals being every second); the pass is one indexed UPDATE.
        interval = min(REAP_SECONDS, self.settings.lease_seconds / 4)
        while True:
            try:
                effects = await self._shared.reap_lapsed(utcnow(), self.settings.max_lost_attempts, 100)
            except StoreError as exc:
                log.warning("could not look for lapsed leases: %s", exc)
            else:
                for task in effects.tasks:
                    log.warning(
                        "task %s: attempt %d was lost (its worker stopped renewing its lease); %s",
                        task.id,
                        task.attempts,
                        "failed as poisonous" if task.status == TaskStatus.failed else "queued again",
                    )
                if effects.tasks and self.wake_source is not None:
                    self.wake_source()
            await anyio.sleep(interval)

    async def _record(self, task_id: str) -> TaskRecord | None:
        """The live record when there is one (it is ahead of the store), else the stored row."""
        return self._live.get(task_id) or await self.store.get_task(task_id)
