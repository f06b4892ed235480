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
from typing import Any

import anyio

from sidequest.agents import AgentLookupError, AgentRegistry
from sidequest.config import Settings
from sidequest.engine.dispatcher import Dispatcher, RunningAttempt
from sidequest.engine.notifier import Notifier
from sidequest.engine.retry import backoff_delay
from sidequest.engine.tasklog import TaskLog
from sidequest.engine.text import clean, short, took
from sidequest.executors.base import ExecutionResult, PermanentError, RetryableError, TaskContext
from sidequest.models import NotificationKind, RetryBackoff, Source, TaskStatus, utcnow
from sidequest.storage.base import (
    AttemptRecord,
    ResultRecord,
    Store,
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

    def start(self, task: TaskRecord) -> RunningAttempt:
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

    def _call_in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Executors may report from a worker thread; engine state is only touched on the loop."""
        if threading.get_ident() == self.loop_thread:
            fn(*args)
        else:
            anyio.from_thread.run_sync(fn, *args)

    def _record_usage(self, task: TaskRecord, usage: UsageRecord) -> None:
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
            self._finish_attempt(task, "store_failed", "store_failed")
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
        self._finish_attempt(task, outcome, detail, retry_after, options)

    def _finish_attempt(
        self,
        task: TaskRecord,
        outcome: str,
        detail: str | ExecutionResult,
        retry_after: float | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        now = utcnow()
        started = task.started_at
        error = None if isinstance(detail, ExecutionResult) else clean(detail)
        history_status = {"failed_permanently": "failed", "shutdown": "interrupted"}.get(outcome, outcome)
        self._log_attempt_end(task, history_status, error, now)
        if task.status == TaskStatus.cancelled:
            self.tasklog.forget(task.id)  # cancelled while it ran: that finish was its last entry
        self.store.add_attempt(
            AttemptRecord(task.id, task.attempts, history_status, started, now, error, self.worker_id)
        )
        task.worker_id = None
        task.lease_expires_at = None
        task.updated_at = now
        if outcome == "store_failed":
            return  # nothing more can be written; the restart runs it again
        if outcome == "cancelled" or task.status == TaskStatus.cancelled:
            return  # cancel() already recorded the final state
        if outcome == "shutdown":
            task.status = TaskStatus.queued.value
            task.attempts -= 1  # an interrupted attempt is not one of the task's tries
            self.store.update_task(task)
            return
        if outcome == "completed":
            assert isinstance(detail, ExecutionResult)
            self._complete(task, detail, now)
            return
        permanent = outcome == "failed_permanently"
        self._after_failure(
            task, clean(str(detail)), permanent=permanent, now=now, min_delay=retry_after, options=options
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

    def _complete(self, task: TaskRecord, result: ExecutionResult, now: datetime) -> None:
        result.content = clean(result.content)
        task.status = TaskStatus.completed.value
        task.finished_at = now
        task.error = None
        task.progress_percent = 100.0
        task.result_preview = result.content[: self.settings.result_preview_chars]
        self.store.add_result(
            ResultRecord(task.id, result.content_type, result.content, now, _plain_sources(result.sources))
        )
        self.store.update_task(task)
        self.notifier.emit(
            NotificationKind.task_completed,
            task.workflow_id,
            task.scope,
            f"Task {task.id} ({task.agent}) completed: {short(result.content, _NOTIFY_PREVIEW)}",
            task_id=task.id,
        )
        self._task_finished(task, now)

    def _after_failure(
        self,
        task: TaskRecord,
        error: str,
        permanent: bool,
        now: datetime,
        min_delay: float | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        task.failures += 1
        task.error = short(error, 4000) if len(error) > 4000 else error
        task.worker_id = None
        task.lease_expires_at = None
        task.updated_at = now
        if permanent or task.failures > task.max_retries:
            self._fail_task(task, error, now)
            return
        options = options if options is not None else task.options or {}
        policy = RetryBackoff.model_validate(options.get("retry_backoff", {}))
        task.status = TaskStatus.retrying.value
        delay = max(backoff_delay(policy, task.failures), min_delay or 0.0)
        task.next_attempt_at = now + timedelta(seconds=delay)
        self.store.update_task(task)
        self.tasklog.add(
            task,
            "retry_scheduled",
            f"retry {task.failures} of {task.max_retries} in {took(delay)}: {short(error, 500)}",
            {"reason": error, "delay_seconds": round(delay, 3), "failures": task.failures},
            now,
        )
        self.dispatcher.enqueue(task)

    def _fail_task(self, task: TaskRecord, error: str, now: datetime) -> None:
        task.status = TaskStatus.failed.value
        task.finished_at = now
        task.next_attempt_at = None
        self.store.update_task(task)
        tries = f"after {task.attempts} attempt{'s' if task.attempts != 1 else ''}"
        self.notifier.emit(
            NotificationKind.task_failed,
            task.workflow_id,
            task.scope,
            f"Task {task.id} ({task.agent}) failed {tries}: {short(error, _NOTIFY_PREVIEW)}",
            task_id=task.id,
        )
        self._task_finished(task, now)

    def recover_lapsed(self, task: TaskRecord, now: datetime) -> None:
        """The process running this attempt died. That is not the task's failure (it may have been
        a bystander of another task's crash), so it does not use up `max_retries`; but a task
        present at `max_lost_attempts` deaths is failed as poisonous, or it would crash every
        restart forever. Until then it runs again, alone (see Dispatcher), so a crash it causes
        is counted against it and not against tasks beside it."""
        error = f"attempt {task.attempts} was lost: the process running it stopped and its lease lapsed"
        self.store.add_attempt(
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
            self._fail_task(task, task.error, now)
            return
        task.status = TaskStatus.queued.value
        task.next_attempt_at = None
        self.store.update_task(task)
        self.dispatcher.enqueue(task)

    async def renew_leases(self) -> None:
        interval = max(0.05, self.settings.lease_seconds / 3)
        while True:
            await anyio.sleep(interval)
            expires = utcnow() + timedelta(seconds=self.settings.lease_seconds)
            for attempt in self.dispatcher.running.values():
                attempt.task.lease_expires_at = expires
                self.store.update_task(attempt.task)

    async def _record(self, task_id: str) -> TaskRecord | None:
        """The live record when there is one (it is ahead of the store), else the stored row."""
        return self._live.get(task_id) or await self.store.get_task(task_id)
