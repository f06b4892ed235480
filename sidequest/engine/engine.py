"""Engine: submit, cancel, get, list, notifications — the API every surface calls.

The engine owns its store (DuckDB allows one writing process), so the
state of unfinished work lives in memory with the database as its durable
copy. Reads first wait for writes already enqueued (read-your-writes), then
go to the database.

This module is the facade: it holds the live tasks and runs the pieces, each in its own module
(sidequest.engine.admission: what a request must pass; .attempts: running one try of a task;
.reads: what the surfaces read; .ledger: open workflows and when they finish). What stays here
ties them together: submit, cancel, wait, retry, scheduled runs and the engine's lifecycle.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Literal, cast

import anyio

from sidequest.agents import Agent, AgentLookupError, AgentRegistry, agent_snapshot
from sidequest.config import Settings
from sidequest.engine.admission import (
    HELD_PAYLOAD_BUDGET,
    IdempotencyKeys,
    PayloadBudget,
    admit_scope,
    check_queue,
    default_scope,
    new_id,
    payload_size,
    validate_submit,
    workdir_roots,
)
from sidequest.engine.attempts import Attempts
from sidequest.engine.dispatcher import Dispatcher
from sidequest.engine.errors import InvalidRequest, NotFound
from sidequest.engine.ledger import WorkflowLedger, finished_counts
from sidequest.engine.notifier import DEFAULT_READER, Listener, Notifier
from sidequest.engine.reads import MAX_OFFSET, PROMPT_PREVIEW_CHARS, Reads, check_paging
from sidequest.engine.retention import Retention
from sidequest.engine.scheduler import Clock, Scheduler
from sidequest.engine.tasklog import TaskLog
from sidequest.engine.worksource import ClaimingQueue, MemoryQueue, WorkSource
from sidequest.executors.base import Preflight
from sidequest.models import (
    MAX_WAIT_SECONDS,
    MAX_WAIT_TASKS,
    AgentInfo,
    AgentList,
    AgentProblem,
    CancelResult,
    GcReport,
    NotificationKind,
    NotificationPage,
    ResultPage,
    ScheduleCreated,
    ScheduleDeleted,
    ScheduleInfo,
    SchedulePage,
    ScheduleRuns,
    ScheduleSpec,
    ScheduleUpdate,
    StatusReport,
    TaskInfo,
    TaskLogPage,
    TaskOptions,
    TaskStatus,
    TaskSubmitted,
    WaitedTask,
    WaitMode,
    WaitResult,
    WorkflowInfo,
    WorkflowPage,
    WorkflowStatus,
    utcnow,
)
from sidequest.storage.base import (
    ClaimRequest,
    Committed,
    FireRecord,
    LoadedState,
    ScheduleRecord,
    SharedStore,
    Store,
    StoreError,
    StoreUnavailable,
    TaskRecord,
    WorkerRecord,
    WorkflowRecord,
)

if TYPE_CHECKING:
    from sidequest.models import WorkerList

__all__ = ["HELD_PAYLOAD_BUDGET", "MAX_OFFSET", "PROMPT_PREVIEW_CHARS", "Engine", "default_scope", "new_id"]
"""Engine, and names that lived here before the split (sidequest.engine.admission and .reads
hold them now)."""

log = logging.getLogger(__name__)

_FINISHED_KINDS = {
    NotificationKind.task_completed.value,
    NotificationKind.task_failed.value,
    NotificationKind.task_cancelled.value,
}


def _wait_result(
    ids: list[str], statuses: dict[str, str], mode: WaitMode, met: bool, started: float
) -> WaitResult:
    return WaitResult(
        timed_out=not met,
        mode=mode,
        waited_seconds=round(anyio.current_time() - started, 3),
        tasks=[
            WaitedTask(task_id=t, status=TaskStatus(statuses[t]), finished=TaskStatus(statuses[t]).finished)
            for t in ids
            if t in statuses
        ],
    )


def _submitted(
    task: TaskRecord, warnings: list[str] | None = None, deduplicated: bool = False
) -> TaskSubmitted:
    return TaskSubmitted(
        task_id=task.id,
        workflow_id=task.workflow_id,
        status=TaskStatus(task.status),
        created_at=task.created_at,
        deduplicated=deduplicated,
        warnings=warnings or [],
    )


class Engine:
    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        registry: AgentRegistry | None = None,
        clock: Clock | None = None,
        *,
        work: bool = True,
        queues: Sequence[str] | None = None,
        role: Literal["daemon", "worker"] = "daemon",
    ):
        """`work=False`: serve the API without running attempts (`serve --no-work`, shared store
        only). `role="worker"`: run attempts only (`sidequest worker`): no scheduler, no retention.
        `queues`: the queues this process takes work from (shared store)."""
        self.settings = settings
        if store is None:  # tests and tools: the store the configuration names
            from sidequest.storage.open import open_store

            store = open_store(settings)
        self.store = store
        self.shared = store.shared
        self.work = work or not store.shared  # the owned store's daemon is its only worker
        self.role = role
        self.queues = list(queues if queues is not None else settings.workers.queues)
        self.started_at = utcnow()
        self._unfinished_count: tuple[float, int] = (-math.inf, 0)
        self.agents = registry or AgentRegistry.from_settings(settings)
        self._retired_registries: list[AgentRegistry] = []
        """Registries a reload replaced: closed at shutdown, since running attempts may use them."""
        self.worker_id = new_id("w")
        self.notifier = Notifier(store)
        self.tasklog = TaskLog(store, settings.task_log)
        self._live: dict[str, TaskRecord] = {}
        """Unfinished tasks, ahead of their rows in the store."""
        self.ledger = WorkflowLedger(self.notifier)
        self._idempotency = IdempotencyKeys()
        self._budget = PayloadBudget()
        self._inserting: dict[str, anyio.Event] = {}
        self._limits: dict[str, int | None] = {}
        self._seq = 0
        self._started = False
        self.failure: StoreUnavailable | None = None
        self.failed = anyio.Event()
        """Set when the store failed: the process must stop (fail-stop) and recover at its next start."""
        self.attempts = Attempts(
            settings,
            self.agents,
            store,
            self.notifier,
            self.tasklog,
            self.worker_id,
            self._live,
            self._task_finished,
            self.workdir_roots,
        )
        self.dispatcher = Dispatcher(
            settings.max_concurrency,
            self._agent_limit,
            self.attempts.start,
            self.attempts.run,
            self._ready_task,
        )
        self.attempts.dispatcher = self.dispatcher
        self.worksource: WorkSource
        if self.shared:
            self.worksource = ClaimingQueue(
                cast(SharedStore, store),
                self.dispatcher,
                self._claim_request,
                self._claimed,
                self.attempts.give_back,
            )
            self.dispatcher.slot_freed = self.worksource.wake
            self.attempts.wake_source = self.worksource.wake
        else:
            self.worksource = MemoryQueue(self.dispatcher)
        # Reads on a shared store go to the database: another process may have changed any row.
        self.reads = Reads(store, {} if self.shared else self._live, self.notifier)
        self.scheduler = Scheduler(self, clock)

    @property
    def _shared_store(self) -> SharedStore:
        return cast(SharedStore, self.store)

    # ---- lifecycle -------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        """Open the store, recover lapsed work, run the pool; on exit drain gracefully."""
        state = await anyio.to_thread.run_sync(self.store.open)
        self.store.on_failure(self._on_store_failure)
        self.attempts.loop_thread = threading.get_ident()
        try:
            self._load(state)
            # Recovery's writes (lost attempts, poisonous failures) are durable before anything runs
            # again: an agent that kills the process at once must find its death counted next time.
            await self.store.sync()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.store.run_writer, self.notifier.committed)
                if self.shared:
                    if self.role == "daemon":  # its event stream, pushes and waiters hear of others' commits
                        self._shared_store.on_remote_commit(self.notifier.committed)
                    self._shared_store.on_work(self.worksource.wake)
                    self.notifier.add_listener(self._wake_scheduler_on_finish)
                    tg.start_soon(self.attempts.reap_lapsed)
                if self.work:
                    tg.start_soon(self.dispatcher.run)
                    tg.start_soon(self.worksource.run)
                    tg.start_soon(self.attempts.renew_leases)
                if self.shared:
                    tg.start_soon(self._heartbeat)
                if self.role == "daemon":
                    tg.start_soon(self._forget_idempotency_keys)
                    tg.start_soon(self.scheduler.run)
                    tg.start_soon(self.retention.run)
                self._started = True
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._shutdown()
                    tg.cancel_scope.cancel()
        finally:
            self._started = False
            with anyio.CancelScope(shield=True):
                await self.agents.aclose()
                for retired in self._retired_registries:
                    await retired.aclose()
            await anyio.to_thread.run_sync(self.store.close)

    def apply_settings(self, settings: Settings, registry: AgentRegistry) -> None:
        """A reloaded configuration (sidequest.reload), built and checked by the caller.

        Attempts already running keep the executor they started with; the old registry's
        connections are closed when the engine stops, not now, because those attempts may
        still use them. New limits apply to the next dispatch, new agents to the next submit.
        """
        self._retired_registries.append(self.agents)
        self.settings = settings
        self.agents = registry
        self.attempts.settings = settings
        self.attempts.agents = registry
        for name, agent in registry.config_agents().items():
            self._limits[name] = agent.max_concurrency
        self.dispatcher.max_concurrency = settings.max_concurrency
        self.dispatcher.wake()
        self.scheduler.config = settings.schedules
        self.retention.reconfigure(settings)
        self.tasklog.reconfigure(settings.task_log)

    def _load(self, state: LoadedState) -> None:
        if self.shared:
            return  # nothing is held in memory: other processes change the rows (reap_lapsed recovers)
        self._seq = state.max_seq
        self.notifier.start_at(state.max_cursor)
        self.ledger.load(state.live_workflows, state.workflow_counts)
        self._idempotency.load(
            state.idempotency, utcnow() - timedelta(seconds=self.settings.idempotency_window)
        )
        for task in state.live_tasks:
            self._live[task.id] = task
            if task.prompt is not None:
                self._budget.hold(task, payload_size(task.prompt, task.options or {}))
            if task.agent not in self._limits:
                try:
                    found = self.agents.get(task.agent, task.project)
                except OSError:  # an unreadable agent folder: the attempt will say so, not the start
                    found = None
                self._limits[task.agent] = found.max_concurrency if found else None
        exclusive = not self.store.shared
        now = utcnow()
        for task in state.live_tasks:
            if task.status == TaskStatus.running:
                lapsed = exclusive or task.lease_expires_at is None or task.lease_expires_at <= now
                if lapsed:
                    self.attempts.recover_lapsed(task, now)
                    continue
            if task.id in self._live:
                self.dispatcher.enqueue(task)
        # A workflow left running with nothing open (a crash between writes) is finished now.
        self.ledger.finish_idle(now)

    def _on_store_failure(self, failure: StoreUnavailable) -> None:
        """Fail-stop: start nothing more, stop what runs (its writes could not be kept; it runs
        again after the restart), and tell whoever runs us to stop the process."""
        self.failure = failure
        self.attempts.failure = failure
        self.dispatcher.accepting = False
        self.dispatcher.stop_all("store_failed")
        self.failed.set()

    async def _shutdown(self) -> None:
        grace = 0.0 if self.failure is not None else self.settings.shutdown_grace
        stopped = await self.dispatcher.drain(grace)
        if stopped and self.failure is None:
            log.info("put %d running task(s) back in the queue at shutdown", len(stopped))
        try:
            await self.store.flush()
            if self.shared and self.failure is None:
                await self._shared_store.remove_worker(self.worker_id)
        except StoreError as exc:
            log.error("not everything could be written at shutdown: %s", exc)

    # ---- shared store: claiming, heartbeats, workers ----------------------

    def _claim_request(self, free: int) -> ClaimRequest:
        # Agent files' limits travel in their task rows (agent_limit); a config agent's current
        # limit (after a reload) is this machine's to say.
        limits = {
            name: agent.max_concurrency
            for name, agent in self.agents.config_agents().items()
            if agent.max_concurrency is not None
        }
        return ClaimRequest(
            worker_id=self.worker_id,
            limit=free,
            lease_seconds=self.settings.lease_seconds,
            queues=self.queues,
            agents=sorted(self.agents.config_agents()),
            agent_limits=limits,
        )

    def _claimed(self, task: TaskRecord) -> bool:
        """A task this worker's claim took: run it now (the claim counted the limits). False
        when the pool has stopped (shutdown): the caller gives it back."""
        if task.id in self.dispatcher.running:  # its cancelled attempt here has not stopped yet
            return False
        self._live[task.id] = task
        if task.attempts == 1:  # its first attempt: nothing has logged for it yet, no need to read
            self.tasklog.created(task.id)
        if self.dispatcher.start_claimed(task):
            return True
        self._live.pop(task.id, None)
        return False

    def _worker_record(self) -> WorkerRecord:
        return WorkerRecord(
            id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=list(self.queues) if self.work else [],
            agents=sorted(self.agents.config_agents()) if self.work and self.shared else None,
            concurrency=self.settings.max_concurrency if self.work else 0,
            running=len(self.dispatcher.running),
            started_at=self.started_at,
            heartbeat_at=utcnow(),
            kind=self.role,
        )

    async def _heartbeat(self) -> None:
        """Say this process is alive (and what it runs), so `sidequest workers` and the status
        hints know who can take which work."""
        while True:
            try:
                await self._shared_store.heartbeat(self._worker_record())
            except StoreError as exc:
                log.warning("could not write this worker's heartbeat: %s", exc)
            await anyio.sleep(min(self.settings.workers.heartbeat_seconds, self.settings.lease_seconds / 3))

    async def list_workers(self) -> WorkerList:
        """Processes running attempts: on the owned store, this daemon; on a shared store, every
        process whose heartbeat is fresher than a lease."""
        from sidequest.models import WorkerInfo, WorkerList

        lease = self.settings.lease_seconds
        if not self.shared:
            records = [self._worker_record()]
        else:  # the recently gone too, marked: a worker killed with -9 never says goodbye
            records = await self._shared_store.list_workers(max(60.0, 10 * lease))
        now = utcnow()
        return WorkerList(
            as_of=now,
            workers=[
                WorkerInfo(**dataclasses.asdict(r), alive=(now - r.heartbeat_at).total_seconds() <= lease)
                for r in records
            ],
        )

    async def _forget_idempotency_keys(self) -> None:
        """Keys outlive their task by `idempotency_window`; then memory and the store drop them."""
        while True:
            horizon = utcnow() - timedelta(seconds=self.settings.idempotency_window)
            self._idempotency.expire(horizon)
            try:
                await self.store.purge_idempotency_keys(horizon)
            except StoreError:
                return  # fail-stop is under way
            await anyio.sleep(min(3600.0, max(1.0, self.settings.idempotency_window / 10)))

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        return self.notifier.add_listener(listener)

    # ---- submit ----------------------------------------------------------

    def admit_scope(self, requested: str | None, project: str | None) -> tuple[str, str | None]:
        """(the task's scope, the caller's trusted project) for one request: see
        sidequest.engine.admission.admit_scope."""
        return admit_scope(requested, project, self.settings.allowed_roots)

    def workdir_roots(self, scope: str, project: str | None) -> list[str]:
        """Where a task's processes may run: see sidequest.engine.admission.workdir_roots."""
        return workdir_roots(scope, project, self.settings.allowed_roots)

    def list_agents(
        self, scope: str | None = None, project: str | None = None
    ) -> tuple[list[AgentInfo], list[AgentProblem]]:
        """Agents this caller may launch, and agent files that are broken (so the user can fix them).

        Agent files come from the caller's project, the user's folder and configured folders,
        never from a folder a model typed (`scope` is accepted for the surfaces' sake)."""
        try:
            catalog = self.agents.catalog(project)
        except OSError as exc:  # e.g. a project path the OS refuses (name too long)
            raise InvalidRequest(f"cannot read the agent folders of {project!r}: {exc}") from exc
        return [a.info() for a in catalog.agents.values()], catalog.problems

    async def agent_list(self, scope: str | None = None, project: str | None = None) -> AgentList:
        """`list_agents` for async surfaces: reading agent files is disk work, kept off the loop."""
        agents, problems = await anyio.to_thread.run_sync(self.list_agents, scope, project)
        return AgentList(agents=agents, problems=problems)

    def _resolve_agent(self, agent: str, project: str | None) -> Agent:
        try:
            found = self.agents.resolve(agent, project)
        except AgentLookupError as exc:
            hint = (
                " (no trusted project is known for this request or schedule, so no project agent "
                "files are read: a schedule made before projects were tracked must be made again "
                "from its project)"
                if project is None
                else ""
            )
            raise InvalidRequest(f"{exc}{hint}") from exc
        except OSError as exc:  # e.g. a project path the OS refuses (name too long)
            raise InvalidRequest(f"cannot look up agent {agent!r} in {project!r}: {exc}") from exc
        self._limits[agent] = found.max_concurrency
        return found

    def check_task(self, agent: str, prompt: str, options: TaskOptions, project: str | None) -> Agent:
        """What submit would refuse, without submitting (a schedule's runs must be able to start)."""
        validate_submit(self.settings, agent, prompt, options, nul=not self.shared)
        self._check_selectable_queue(options)
        return self._resolve_agent(agent, project)

    def _check_selectable_queue(self, options: TaskOptions) -> None:
        """A queue picks which machines run the task (and with what secrets): a submitter (a
        model) may only choose among the queues the configuration opens to it."""
        if options.queue and options.queue not in self.settings.workers.selectable_queues:
            allowed = ", ".join(self.settings.workers.selectable_queues) or "none"
            raise InvalidRequest(
                f"queue {options.queue!r} is not open to submitters; allowed: {allowed} "
                "([workers] selectable_queues in the config; agent files may name any queue with "
                "`sidequest: {queue: …}`)"
            )

    def _new_task(
        self,
        resolved: Agent,
        agent: str,
        prompt: str,
        options: TaskOptions,
        scope: str,
        workflow_id: str,
        now: datetime,
    ) -> TaskRecord:
        """The queued row of a new task, whoever starts it (a client's submit, a schedule's run)."""
        timeout = options.timeout
        if timeout is None:
            timeout = resolved.timeout if resolved.timeout is not None else self.settings.default_timeout
        definition = resolved.definition
        self._check_selectable_queue(options)
        queue = options.queue or (definition.keys.queue if definition else None) or "default"
        self._seq += 1
        return TaskRecord(
            id=new_id("t"),
            seq=self._seq,
            workflow_id=workflow_id,
            agent=agent,
            prompt=prompt,
            status=TaskStatus.queued.value,
            priority=options.priority,
            scope=scope,
            options=options.model_dump(mode="json", exclude_defaults=True),
            max_retries=options.max_retries,
            created_at=now,
            updated_at=now,
            callback_url=str(options.callback_url) if options.callback_url else None,
            timeout_s=timeout,
            queue=queue,
            agent_snapshot=agent_snapshot(definition) if definition is not None else None,
            agent_limit=resolved.max_concurrency,
        )

    async def submit(
        self, agent: str, prompt: str, options: TaskOptions | None = None, *, project: str | None = None
    ) -> TaskSubmitted:
        """Durably record a task and hand it to the pool; returns once the row is committed.

        `project` is the caller's own project, from the surface (never from the arguments a
        model types): see `admit_scope`."""
        self._require_running()
        options = options or TaskOptions()
        payload = validate_submit(self.settings, agent, prompt, options, nul=not self.shared)
        scope, project = self.admit_scope(options.scope, project)

        if options.idempotency_key and not self.shared:
            earlier = await self._existing_submission(scope, options.idempotency_key)
            if earlier is not None:
                return earlier
        await self._check_queue()

        now = utcnow()
        new_workflow: WorkflowRecord | None = None
        reopen: WorkflowRecord | None = None
        reopen_counts: Counter[str] = Counter()
        if options.workflow_id:
            workflow = (None if self.shared else self.ledger.get(options.workflow_id)) or (
                await self.store.get_workflow(options.workflow_id)
            )
            if workflow is None:
                raise NotFound(
                    f"unknown workflow_id {options.workflow_id!r}; omit it to start a new workflow "
                    "or pass workflow_name to name one"
                )
            if options.scope and scope != workflow.scope:
                raise InvalidRequest(
                    f"workflow {workflow.id} belongs to scope {workflow.scope!r}, not {scope!r}"
                )
            scope = workflow.scope
            if workflow.id not in self.ledger and not self.shared:
                reopen = workflow
                reopen_counts = finished_counts(
                    (await self.store.workflow_counts([workflow.id]))[workflow.id]
                )
        else:
            new_workflow = WorkflowRecord(
                id=new_id("wf"),
                name=options.workflow_name or agent,
                scope=scope,
                status=WorkflowStatus.running.value,
                created_at=now,
                updated_at=now,
            )
        workflow_id = options.workflow_id or new_workflow.id  # type: ignore[union-attr]

        resolved = self._resolve_agent(agent, project)
        warnings = await self._preflight(resolved, options, scope, project)
        if self.shared:
            return await self._submit_shared(
                resolved, agent, prompt, options, scope, project, workflow_id, new_workflow, warnings
            )

        if options.idempotency_key:  # re-check: the workflow lookup may have awaited
            earlier = await self._existing_submission(scope, options.idempotency_key)
            if earlier is not None:
                return earlier
        await self._check_queue()  # on this store it never suspends: nothing slips in before the insert

        task = self._submitted_task(resolved, agent, prompt, options, scope, project, workflow_id, now)
        inserted = anyio.Event()
        self._inserting[task.id] = inserted
        key = (scope, options.idempotency_key) if options.idempotency_key else None
        earlier = self._idempotency.claim(key, task.id) if key else None
        try:
            with anyio.CancelScope(shield=True):  # committed means queued here too, even if we are cancelled
                await self.store.insert([new_workflow] if new_workflow else [], [task])
        except BaseException:
            if key:
                self._idempotency.undo(key, earlier)
            raise
        finally:
            self._inserting.pop(task.id, None)
            inserted.set()

        self._live[task.id] = task
        self.tasklog.created(task.id)
        self._budget.hold(task, payload)
        if new_workflow is not None:
            self.ledger.opened(new_workflow)
        elif reopen is not None and reopen.id not in self.ledger:  # a concurrent join may have reopened it
            self.ledger.reopened(reopen, reopen_counts, now)
        self.ledger.task_added(workflow_id)
        self.worksource.submitted(task)
        return _submitted(task, warnings)

    def _submitted_task(
        self,
        resolved: Agent,
        agent: str,
        prompt: str,
        options: TaskOptions,
        scope: str,
        project: str | None,
        workflow_id: str,
        now: datetime,
    ) -> TaskRecord:
        """The row a submit inserts, on either store."""
        task = self._new_task(resolved, agent, prompt, options, scope, workflow_id, now)
        task.project = project
        task.idempotency_key = options.idempotency_key
        task.not_before = now + timedelta(seconds=options.delay) if options.delay else options.not_before
        return task

    async def _submit_shared(
        self,
        resolved: Agent,
        agent: str,
        prompt: str,
        options: TaskOptions,
        scope: str,
        project: str | None,
        workflow_id: str,
        new_workflow: WorkflowRecord | None,
        warnings: list[str],
    ) -> TaskSubmitted:
        """Submit on a shared store: one transaction decides it, idempotency key included (a
        unique index, so two processes given the same key make one task)."""
        task = self._submitted_task(resolved, agent, prompt, options, scope, project, workflow_id, utcnow())
        with anyio.CancelScope(shield=True):  # committed means queued, even if we are cancelled
            duplicates = await self._shared_store.enqueue([new_workflow] if new_workflow else [], [task])
        earlier_id = duplicates.get(task.id)
        if earlier_id is not None:
            earlier = await self.store.get_task(earlier_id)
            if earlier is None:  # deleted by retention between the key check and this read
                raise InvalidRequest(
                    f"the task idempotency_key {task.idempotency_key!r} named was just deleted; submit again"
                )
            return _submitted(earlier, deduplicated=True)
        self._unfinished_count = (self._unfinished_count[0], self._unfinished_count[1] + 1)
        self.worksource.submitted(task)
        return _submitted(task, warnings)

    async def _check_queue(self) -> None:
        """The queue limit. The owned store counts its live tasks in memory (and never suspends
        here); a shared store counts every process's work, read at most once a second (the limit
        protects memory and disk from a runaway caller, it need not be exact there)."""
        if not self.shared:
            check_queue(len(self._live) + len(self._inserting), self.settings.max_queued_tasks)
            return
        at, count = self._unfinished_count
        if anyio.current_time() - at > 1.0:
            count = await self._shared_store.unfinished_count()
            self._unfinished_count = (anyio.current_time(), count)
        check_queue(count, self.settings.max_queued_tasks)

    async def _preflight(
        self, agent: Agent, options: TaskOptions, scope: str, project: str | None
    ) -> list[str]:
        """Reject what cannot work (a session that does not exist); warn about what may fail (no key)."""
        if options.resume_task_id:
            earlier = await self._record(options.resume_task_id)
            if earlier is None or earlier.scope != scope:
                raise InvalidRequest(f"resume_task_id {options.resume_task_id!r}: no such task in this scope")
            if agent.executor.name != "claude-code":
                raise InvalidRequest(
                    f"resume_task_id only works with claude-code agents; {agent.name!r} runs on "
                    f"{agent.executor.name!r}"
                )
        if not isinstance(agent.executor, Preflight):
            return []
        return list(agent.executor.preflight(options, scope, self.workdir_roots(scope, project)))

    async def _existing_submission(self, scope: str, key: str) -> TaskSubmitted | None:
        """The earlier task this key made, or None when the key is free (never used, past its
        window, or its task is gone: deleted by retention, or its insert failed)."""
        task_id = self._idempotency.known((scope, key), self.settings.idempotency_window)
        if task_id is None:
            return None
        pending = self._inserting.get(task_id)
        if pending is not None:
            await pending.wait()
        task = await self._record(task_id)
        if task is None:
            self._idempotency.forget((scope, key), task_id)
            return None
        return _submitted(task, deduplicated=True)

    async def _record(self, task_id: str) -> TaskRecord | None:
        """The live record when there is one (it is ahead of the store), else the stored row."""
        return self._live.get(task_id) or await self.store.get_task(task_id)

    def _require_running(self) -> None:
        if self.failure is not None:
            raise self.failure
        if not self._started:
            raise InvalidRequest("the engine is not running")

    # ---- running attempts ------------------------------------------------

    def _agent_limit(self, agent: str) -> int | None:
        """Set when the agent is resolved (submit, restart); files are never read on the dispatch path."""
        return self._limits.get(agent)

    def _ready_task(self, task_id: str) -> TaskRecord | None:
        task = self._live.get(task_id)
        if task is None or task.status not in (TaskStatus.queued, TaskStatus.retrying):
            return None
        return task

    def _wake_scheduler_on_finish(self, committed: Committed) -> None:
        """Shared store: a task finished here or in any process (its finish notification says so)
        may be the run a queued scheduled run waits for. `_task_finished` wakes the scheduler on
        the owned store; here finishes are not held in memory, and other workers make them."""
        if self.scheduler.waiting and any(n.kind in _FINISHED_KINDS for n in committed.notifications):
            self.scheduler.wake()

    def _task_finished(self, task: TaskRecord, now: datetime) -> None:
        self._live.pop(task.id, None)
        if task.id not in self.dispatcher.running:  # else its attempt's finish is still to be logged
            self.tasklog.forget(task.id)
        self._budget.release(task.id)
        if task.schedule_id:
            self.scheduler.wake()  # a run queued behind this one (overlap=queue) may start now
        if task.idempotency_key:  # it still deduplicates for the window
            self._idempotency.finished((task.scope, task.idempotency_key), task.id, now)
        self.ledger.task_finished(task.workflow_id, task.status, now, task.agent)

    # ---- cancel ----------------------------------------------------------

    async def cancel(self, task_id: str | None = None, workflow_id: str | None = None) -> CancelResult:
        if bool(task_id) == bool(workflow_id):
            raise InvalidRequest("give exactly one of task_id or workflow_id")
        if self.shared:
            return await self._cancel_shared(task_id, workflow_id)
        if task_id:
            if task_id in self._live:
                await self._resume_logs([self._live[task_id]])
            if task_id in self._live:
                self._cancel_live(self._live[task_id])
                return CancelResult(cancelled=[task_id])
            await self.store.flush()
            task = await self.store.get_task(task_id)
            if task is None:
                raise NotFound(f"unknown task_id {task_id!r}")
            return CancelResult(cancelled=[], already_finished=[task_id])
        assert workflow_id is not None
        await self.store.flush()
        if workflow_id not in self.ledger and await self.store.get_workflow(workflow_id) is None:
            raise NotFound(f"unknown workflow_id {workflow_id!r}")
        await self._resume_logs([t for t in list(self._live.values()) if t.workflow_id == workflow_id])
        live = [t for t in list(self._live.values()) if t.workflow_id == workflow_id]
        finished = [t.id for t in await self.store.get_tasks(workflow_id) if t.id not in self._live]
        for task in live:
            self._cancel_live(task)
        return CancelResult(cancelled=[t.id for t in live], already_finished=finished)

    async def _cancel_shared(self, task_id: str | None, workflow_id: str | None) -> CancelResult:
        """One transaction cancels what is unfinished; attempts running here stop now, those on
        other workers at their next lease renewal (within a second)."""
        if workflow_id and await self.store.get_workflow(workflow_id) is None:
            raise NotFound(f"unknown workflow_id {workflow_id!r}")
        effects, finished = await self._shared_store.cancel(
            [task_id] if task_id else None, workflow_id, utcnow()
        )
        cancelled = [t.id for t in effects.tasks]
        if task_id and not cancelled and not finished:
            raise NotFound(f"unknown task_id {task_id!r}")
        for stopped, worker in effects.stop:
            if worker == self.worker_id:
                self.dispatcher.cancel_running(stopped)
        elsewhere = {t for t, worker in effects.stop if worker != self.worker_id}
        for task in effects.tasks:
            if task.id not in self.dispatcher.running and task.id not in elsewhere:
                # a running attempt (here or on another worker) logs its own end
                await self.tasklog.resume(task)
                self.tasklog.add(task, "cancelled", "the task was cancelled")
                self.tasklog.forget(task.id)
        return CancelResult(cancelled=cancelled, already_finished=finished)

    async def _resume_logs(self, tasks: list[TaskRecord]) -> None:
        """Where these tasks' logs continue, so that a cancel of a task that never ran in this
        process (loaded at start, still queued) is logged too. A task that finished meanwhile is
        forgotten again."""
        for task in tasks:
            await self.tasklog.resume(task)
            if task.id not in self._live and task.id not in self.dispatcher.running:
                self.tasklog.forget(task.id)

    def _cancel_live(self, task: TaskRecord) -> None:
        now = utcnow()
        self.dispatcher.cancel_running(task.id)
        task.status = TaskStatus.cancelled.value
        task.finished_at = now
        task.updated_at = now
        task.next_attempt_at = None
        self.store.update_task(task)
        self.tasklog.add(task, "cancelled", "the task was cancelled", now=now)
        self.notifier.emit(
            NotificationKind.task_cancelled,
            task.workflow_id,
            task.scope,
            f"Task {task.id} ({task.agent}) was cancelled",
            task_id=task.id,
        )
        self._task_finished(task, now)

    # ---- wait ------------------------------------------------------------

    async def wait_for_tasks(
        self,
        task_ids: list[str] | None = None,
        workflow_id: str | None = None,
        mode: WaitMode = "any",
        timeout: float = 30.0,
    ) -> WaitResult:
        """Return once any (or all) of the tasks finished, or when `timeout` passes.

        A model has no clock: without this it can only poll and burn turns. The wait is woken by
        the engine's commits (never a sleep loop), and it ends after the commit that finished the
        task, so a read right after it sees the final state. `timeout` stays under the clients'
        own tool timeouts (MAX_WAIT_SECONDS)."""
        if bool(task_ids) == bool(workflow_id):
            raise InvalidRequest("give task_ids (a non-empty list) or workflow_id, not both")
        if mode not in ("any", "all"):
            raise InvalidRequest(f"mode must be 'any' or 'all', got {mode!r}")
        if not 0 <= timeout <= MAX_WAIT_SECONDS:
            raise InvalidRequest(
                f"timeout must be between 0 and {MAX_WAIT_SECONDS:g} seconds, got {timeout:g}"
            )
        if workflow_id:
            await self.store.flush()
            if (self.shared or workflow_id not in self.ledger) and await self.store.get_workflow(
                workflow_id
            ) is None:
                raise NotFound(f"unknown workflow_id {workflow_id!r}")
            ids = [t.id for t in await self.store.get_tasks(workflow_id)]
        else:
            ids = list(dict.fromkeys(task_ids or []))
            if len(ids) > MAX_WAIT_TASKS:
                raise InvalidRequest(f"task_ids names {len(ids)} tasks; wait for at most {MAX_WAIT_TASKS}")
            known = await self.task_statuses(ids)
            unknown = [t for t in ids if t not in known]
            if unknown:
                raise NotFound(f"unknown task_id{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        watched = set(ids)
        started = anyio.current_time()
        if self.shared:
            return await self._wait_shared(ids, mode, timeout, started)

        def holds() -> bool:
            done = [t not in self._live and t not in self._inserting for t in ids]
            return (any(done) if mode == "any" else all(done)) or not ids

        changed = anyio.Event()

        def on_commit(committed: Committed) -> None:
            if watched & committed.task_ids:
                changed.set()

        remove = self.add_listener(on_commit)
        try:
            with anyio.move_on_after(timeout):
                # A finish is visible in memory before its commit; wait for the commit so the
                # statuses below (read through the store) are the final ones.
                while not holds():
                    await changed.wait()
                    changed = anyio.Event()
                await self.store.flush()
        finally:
            remove()
        met = holds()
        statuses = await self.task_statuses(ids)
        return _wait_result(ids, statuses, mode, met, started)

    async def _wait_shared(
        self, ids: list[str], mode: WaitMode, timeout: float, started: float
    ) -> WaitResult:
        """wait_for_tasks on a shared store: the statuses are read from the database each time a
        commit (this process's or, announced, another's) touches a watched task, and at least
        every second in case an announcement was lost."""
        watched = set(ids)
        changed = anyio.Event()

        def on_commit(committed: Committed) -> None:
            if watched & committed.task_ids:
                changed.set()

        def met(statuses: dict[str, str]) -> bool:
            done = [TaskStatus(statuses[t]).finished for t in ids if t in statuses]
            return (any(done) if mode == "any" else all(done)) or not ids

        remove = self.add_listener(on_commit)
        try:
            statuses = await self.task_statuses(ids)
            with anyio.move_on_after(timeout):
                while not met(statuses):
                    with anyio.move_on_after(1.0):
                        await changed.wait()
                    changed = anyio.Event()
                    statuses = await self.task_statuses(ids)
        finally:
            remove()
        statuses = await self.task_statuses(ids)
        return _wait_result(ids, statuses, mode, met(statuses), started)

    # ---- retry -----------------------------------------------------------

    async def retry(self, task_id: str) -> TaskInfo:
        """Put a failed or cancelled task back in the queue, as the same task.

        Its history stays (attempt rows, `attempts` counts on), and it gets a fresh set of
        retries (`failures` and `lost_attempts` start again at zero). Its workflow runs again if
        it had finished. A completed task is not rerun: its result would be replaced."""
        self._require_running()
        live = self._live.get(task_id)
        if live is not None or task_id in self._inserting:
            status = live.status if live is not None else TaskStatus.queued.value
            raise InvalidRequest(
                f"task {task_id} is {status}; only a failed or cancelled task can be retried "
                "(cancel_task stops one that is still running)"
            )
        await self.store.flush()
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"unknown task_id {task_id!r}")
        previous = task.status
        if previous == TaskStatus.completed:
            raise InvalidRequest(
                f"task {task_id} completed; only a failed or cancelled task can be retried "
                "(submit a new task to run the work again)"
            )
        if self.shared and previous not in (TaskStatus.failed, TaskStatus.cancelled):
            # nothing is held in memory to answer this above: the row says what the task is
            raise InvalidRequest(
                f"task {task_id} is {previous}; only a failed or cancelled task can be retried "
                "(cancel_task stops one that is still running)"
            )
        if task_id in self.dispatcher.running:
            raise InvalidRequest(
                f"task {task_id} was cancelled and its attempt is still stopping; retry it in a moment"
            )
        self._resolve_agent(task.agent, task.project)  # the agent may be gone: say so now
        await self._check_queue()
        if self.shared:
            requeued = await self._shared_store.requeue(task_id, utcnow())
            if requeued is None:
                raise InvalidRequest(
                    f"task {task_id} could not be queued again: it was retried meanwhile, or its "
                    "cancelled attempt is still stopping on a worker; retry it in a moment"
                )
            self.notifier.emit(
                NotificationKind.task_retried,
                requeued.workflow_id,
                requeued.scope,
                f"Task {task_id} ({requeued.agent}) was {previous} and is queued again "
                f"(attempt {requeued.attempts + 1} next)",
                task_id=task_id,
            )
            self.worksource.submitted(requeued)
            return self.reads.task_info(requeued)
        wid = task.workflow_id
        workflow: WorkflowRecord | None = None
        counts: Counter[str] = Counter()
        if wid not in self.ledger:
            workflow = await self.store.get_workflow(wid)
            counts = finished_counts((await self.store.workflow_counts([wid])).get(wid, {}))
        if task_id in self._live:  # a concurrent retry won while we read
            raise InvalidRequest(f"task {task_id} is {self._live[task_id].status}; it was already retried")

        now = utcnow()
        task.status = TaskStatus.queued.value
        task.failures = 0
        task.lost_attempts = 0
        task.finished_at = None
        task.next_attempt_at = None
        task.not_before = None
        task.error = None
        task.result_preview = None
        task.progress_percent = None
        task.progress_message = None
        task.worker_id = None
        task.lease_expires_at = None
        task.updated_at = now
        if wid in self.ledger:  # still open (or reopened by a submit while we read)
            self.ledger.uncount(wid, previous)
        elif workflow is not None:
            counts[previous] -= 1
            self.ledger.reopened(workflow, counts, now)
        self.ledger.task_added(wid)
        self._live[task_id] = task
        if task.prompt is not None:
            self._budget.hold(task, payload_size(task.prompt, task.options or {}))
        if task.idempotency_key:
            self._idempotency.requeued((task.scope, task.idempotency_key), task_id)
        self.store.update_task(task)
        self.notifier.emit(
            NotificationKind.task_retried,
            wid,
            task.scope,
            f"Task {task_id} ({task.agent}) was {previous} and is queued again "
            f"(attempt {task.attempts + 1} next)",
            task_id=task_id,
        )
        self.dispatcher.enqueue(task)
        return self.reads.task_info(task)

    # ---- reads -----------------------------------------------------------

    # ---- reads (sidequest.engine.reads) ---------------------------------

    async def get_task(self, task_id: str, history: bool = True, prompt: bool = False) -> TaskInfo:
        return await self.reads.get_task(task_id, history, prompt)

    async def get_workflow(self, workflow_id: str) -> WorkflowInfo:
        return await self.reads.get_workflow(workflow_id)

    async def status(self, task_id: str | None = None, workflow_id: str | None = None) -> StatusReport:
        report = await self.reads.status(task_id, workflow_id)
        if self.shared:
            await self._unserved_hint(report)
        return report

    async def _unserved_hint(self, report: StatusReport) -> None:
        """On a shared store a queued task may wait forever for a worker nobody started: say so."""
        tasks = [report.task] if report.task else list((report.workflow and report.workflow.tasks) or [])
        waiting = [t for t in tasks if t.status in (TaskStatus.queued, TaskStatus.retrying)]
        if not waiting:
            return
        workers = [
            w for w in await self._shared_store.list_workers(self.settings.lease_seconds) if w.concurrency
        ]
        if report.workflow is not None:  # one read for the workflow's rows, not one per task
            rows = {t.id: t for t in await self.store.get_tasks(report.workflow.workflow_id)}
        else:
            rows = {t.id: t for t in [await self.store.get_task(waiting[0].task_id)] if t is not None}
        for info in waiting:
            row = rows.get(info.task_id)
            if row is None:
                continue
            able = [
                w
                for w in workers
                if row.queue in w.queues
                and (row.agent_snapshot is not None or w.agents is None or row.agent in w.agents)
            ]
            if not able:
                report.hint = (
                    f"no worker serves agent {row.agent} on queue {row.queue!r}: start one with "
                    f"`sidequest worker --queue {row.queue}` on a machine whose config has that agent; "
                    f"{report.hint}"
                )
                return

    async def list_active_workflows(
        self, scope: str | None = None, all_scopes: bool = False, limit: int = 20, offset: int = 0
    ) -> WorkflowPage:
        return await self.reads.list_active_workflows(scope, all_scopes, limit, offset)

    async def workflow_history(
        self,
        scope: str | None = None,
        all_scopes: bool = False,
        status: list[WorkflowStatus] | None = None,
        agent: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> WorkflowPage:
        return await self.reads.workflow_history(
            scope, all_scopes, status, agent, since, until, limit, offset
        )

    async def notifications(
        self,
        scope: str | None = None,
        all_scopes: bool = False,
        since: int | None = None,
        workflow_id: str | None = None,
        mark_delivered: bool = True,
        include_delivered: bool = False,
        limit: int = 50,
        *,
        reader: str = DEFAULT_READER,
    ) -> NotificationPage:
        return await self.reads.notifications(
            scope, all_scopes, since, workflow_id, mark_delivered, include_delivered, limit, reader=reader
        )

    async def schedule_task(
        self, spec: ScheduleSpec, scope: str | None = None, *, project: str | None = None
    ) -> ScheduleCreated:
        self._require_running()
        return await self.scheduler.create(spec, scope, project)

    async def list_schedules(
        self, scope: str | None = None, all_scopes: bool = False, limit: int = 20, offset: int = 0
    ) -> SchedulePage:
        check_paging(offset, limit, max_limit=1000)
        return await self.scheduler.list(None if all_scopes else (scope or default_scope()), limit, offset)

    async def get_schedule(self, schedule_id: str) -> ScheduleInfo:
        return await self.scheduler.get(schedule_id)

    async def update_schedule(
        self, schedule_id: str, change: ScheduleUpdate, *, project: str | None = None
    ) -> ScheduleInfo:
        self._require_running()
        return await self.scheduler.update(schedule_id, change, project)

    async def delete_schedule(self, schedule_id: str) -> ScheduleDeleted:
        self._require_running()
        return await self.scheduler.delete(schedule_id)

    async def schedule_runs(self, schedule_id: str, limit: int = 20, offset: int = 0) -> ScheduleRuns:
        check_paging(offset, limit, max_limit=1000)
        return await self.scheduler.runs(schedule_id, limit, offset)

    async def is_unfinished(self, task_id: str) -> bool:
        if not self.shared:
            return task_id in self._live
        status = (await self.store.task_statuses([task_id])).get(task_id)
        return status is not None and not TaskStatus(status).finished

    async def task_statuses(self, task_ids: list[str]) -> dict[str, str]:
        return await self.reads.task_statuses(task_ids)

    def task_info(self, task: TaskRecord) -> TaskInfo:
        return self.reads.task_info(task)

    def notify_schedule(
        self, kind: NotificationKind, schedule: ScheduleRecord, message: str, task_id: str | None
    ) -> None:
        """Schedule events land in the schedule's scope; a run's events also name its workflow."""
        workflow_id = self._live[task_id].workflow_id if task_id and task_id in self._live else ""
        self.notifier.emit(kind, workflow_id, schedule.scope, message, task_id=task_id)

    async def fire_scheduled(
        self, schedule: ScheduleRecord, due: datetime, after: ScheduleRecord, expected: datetime
    ) -> str | None:
        """Start the run of `schedule` due at `due`: the task, its fire key and the schedule's
        new state in one transaction. None when that due time was already fired or the
        schedule changed since it was read (the scheduler reads again)."""
        self._require_running()
        options = TaskOptions.model_validate({**schedule.options, "scope": schedule.scope})
        resolved = self.check_task(schedule.agent, schedule.prompt, options, schedule.project)
        await self._check_queue()
        now = utcnow()
        workflow = WorkflowRecord(
            id=new_id("wf"),
            name=schedule.name,
            scope=schedule.scope,
            status=WorkflowStatus.running.value,
            created_at=now,
            updated_at=now,
        )
        task = self._new_task(
            resolved, schedule.agent, schedule.prompt, options, schedule.scope, workflow.id, now
        )
        task.schedule_id = schedule.id
        task.project = schedule.project
        after = dataclasses.replace(after, last_task_id=task.id)
        fire = FireRecord(schedule.id, due, task.id, now)
        if not await self.store.record_fire(fire, after, workflow, task, expected):
            return None
        if self.shared:
            self.worksource.submitted(task)
            return task.id
        self._live[task.id] = task
        self.tasklog.created(task.id)
        self._budget.hold(task, payload_size(schedule.prompt, task.options or {}))
        self.ledger.opened(workflow)
        self.ledger.task_added(workflow.id)
        self.dispatcher.enqueue(task)
        return task.id

    async def acknowledge(
        self, cursors: list[int], scope: str | None = None, *, reader: str = DEFAULT_READER
    ) -> int:
        return await self.reads.acknowledge(cursors, scope, reader=reader)

    async def task_counts(self) -> dict[str, int]:
        return await self.reads.task_counts()

    @property
    def running_count(self) -> int:
        return len(self.dispatcher.running)

    async def get_result(self, task_id: str, offset: int = 0, max_chars: int = 20_000) -> ResultPage:
        return await self.reads.get_result(task_id, offset, max_chars)

    async def get_task_log(self, task_id: str, offset: int = 0, limit: int = 100) -> TaskLogPage:
        return await self.reads.get_task_log(task_id, offset, limit)

    @cached_property
    def retention(self) -> Retention:
        """Built on first use. Tasks the engine holds (unfinished, or with an attempt still winding
        down after a cancel) are never deleted, whatever their row says."""
        return Retention(
            self.store, self.settings, held=lambda: self._live.keys() | self.dispatcher.running.keys()
        )

    async def gc(self, older_than: float | None = None, dry_run: bool = False) -> GcReport:
        """Delete (or with dry_run count) finished tasks older than `older_than` seconds (default:
        the retention setting) and their rows; see sidequest.engine.retention."""
        self._require_running()
        return await self.retention.collect(older_than, dry_run=dry_run)
