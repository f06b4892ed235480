"""What the engine needs from a database, and the records it passes.

The engine owns behaviour; a store only persists and reads. Writes are
enqueued and group-committed by the store (DuckDB pays per statement, so a
store that committed each write alone would cap us at a few hundred tasks/s).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter
from typing import Any, Protocol


class StoreError(Exception):
    """The store cannot be used (locked, newer than this code, unreadable)."""


class StoreUnavailable(StoreError):
    """A write failed (disk full, I/O error): the store is fail-stop from then on.

    Nothing is acknowledged after the first failure; the process says why, stops, and the next
    start recovers from what was durable (unfinished work runs again: at-least-once).
    """

    code = "store_unavailable"


@dataclass(slots=True)
class TaskRecord:
    id: str
    seq: int
    workflow_id: str
    agent: str
    prompt: str | None
    status: str
    priority: str
    scope: str
    options: dict[str, Any] | None  # None (and prompt None): held on disk only, read per attempt
    max_retries: int
    created_at: datetime
    updated_at: datetime
    idempotency_key: str | None = None
    callback_url: str | None = None
    schedule_id: str | None = None
    attempts: int = 0
    failures: int = 0
    timeout_s: float | None = None
    not_before: datetime | None = None
    next_attempt_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress_percent: float | None = None
    progress_message: str | None = None
    error: str | None = None
    result_preview: str | None = None
    worker_id: str | None = None
    lease_expires_at: datetime | None = None
    session_id: str | None = None
    batch_id: str | None = None
    lost_attempts: int = 0
    project: str | None = None
    """The caller's trusted project (never model-typed); None: only allowed_roots are trusted."""
    queue: str = "default"
    """Which workers may take it (`options.queue`, or the agent file's `sidequest: {queue: …}`)."""
    agent_snapshot: dict[str, Any] | None = None
    """The agent file resolved at submit (front matter, body, source path, content hash), so a
    worker on another machine runs exactly what was submitted; None for config agents."""
    agent_limit: int | None = None
    """The agent's `max_concurrency` at submit: a shared store's claims honour it over every
    worker, including workers that never read the agent's file or config."""

    def mutable_state(self) -> tuple[Any, ...]:
        """Snapshot of the columns that change after insert, in TASK_MUTABLE_COLUMNS order."""
        return _mutable_state(self)


TASK_MUTABLE_COLUMNS = (
    "id",
    "status",
    "attempts",
    "failures",
    "updated_at",
    "next_attempt_at",
    "started_at",
    "finished_at",
    "progress_percent",
    "progress_message",
    "error",
    "result_preview",
    "worker_id",
    "lease_expires_at",
    "session_id",
    "batch_id",
    "lost_attempts",
)
_mutable_state = attrgetter(*TASK_MUTABLE_COLUMNS)


@dataclass(slots=True)
class WorkflowRecord:
    id: str
    name: str
    scope: str
    status: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None


@dataclass(slots=True)
class AttemptRecord:
    task_id: str
    attempt: int
    status: str
    started_at: datetime | None
    finished_at: datetime
    error: str | None
    worker_id: str | None


@dataclass(slots=True)
class ResultRecord:
    task_id: str
    content_type: str
    content: str
    created_at: datetime
    sources: list[dict[str, Any]] | None = None
    """Cited pages, `{"n", "title", "url"}` (research results); None when nothing was cited."""

    @property
    def size_chars(self) -> int:
        return len(self.content)


@dataclass(slots=True)
class NotificationRecord:
    cursor: int
    kind: str
    task_id: str | None
    workflow_id: str
    scope: str
    message: str
    created_at: datetime
    delivered_at: datetime | None = None
    """When the reader that asked had it (reads are per reader); None on new rows and when not yet."""


@dataclass(slots=True)
class UsageRecord:
    task_id: str
    attempt: int
    model: str | None
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: float | None
    recorded_at: datetime


@dataclass(slots=True)
class TaskEventRecord:
    """One entry of a task's run log; `seq` counts from 0 per task with no gaps."""

    task_id: str
    seq: int
    logged_at: datetime
    attempt: int
    kind: str
    message: str
    data: dict[str, Any] | None = None
    data_json: str | None = None
    """`data` as the JSON text that is (or was) stored: made once, when the entry is checked, so the
    writer and the readers that size a page do not serialise it again."""


@dataclass(slots=True)
class UsageTotals:
    """A task's usage summed over its attempts and turns."""

    models: list[str]
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: float | None


@dataclass(slots=True)
class ScheduleRecord:
    """A cron schedule as stored; times are UTC."""

    id: str
    name: str
    agent: str
    prompt: str
    cron: str
    timezone: str
    options: dict[str, Any]
    scope: str
    enabled: bool
    overlap: str
    misfire: str
    created_at: datetime
    updated_at: datetime
    next_run_at: datetime | None = None
    last_run_at: datetime | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None
    max_runs: int | None = None
    runs: int = 0
    last_task_id: str | None = None
    queued_run_at: datetime | None = None
    finished_at: datetime | None = None
    last_error: str | None = None
    project: str | None = None


SCHEDULE_COLUMNS = tuple(ScheduleRecord.__dataclass_fields__)


@dataclass(slots=True)
class FireRecord:
    """One due time of a schedule, and the task it started (None: the due time was skipped)."""

    schedule_id: str
    due_at: datetime
    task_id: str | None
    fired_at: datetime


@dataclass(slots=True)
class Committed:
    """What one group commit made durable; the engine turns it into push events."""

    task_ids: set[str] = field(default_factory=set)
    workflow_ids: set[str] = field(default_factory=set)
    notifications: list[NotificationRecord] = field(default_factory=list)
    task_events: list[TaskEventRecord] = field(default_factory=list)
    """Run-log entries made durable by this commit (the event stream carries them live)."""


@dataclass(slots=True)
class LoadedState:
    """What the engine needs in memory at start."""

    live_tasks: list[TaskRecord]
    max_seq: int
    max_cursor: int
    live_workflows: dict[str, WorkflowRecord]
    workflow_counts: dict[str, dict[str, int]]
    idempotency: list[tuple[str, str, str, datetime | None]] = field(default_factory=list)
    """(scope, key, task id, when the task finished) for every kept idempotency key."""


@dataclass(slots=True)
class WorkflowQuery:
    scope: str | None  # None = every scope
    finished: bool  # False: workflows with unfinished tasks; True: finished workflows
    statuses: Sequence[str] = ()
    agent: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 20
    offset: int = 0


class Store(Protocol):
    shared: bool
    """False: this process owns the store (DuckDB), so its memory is ahead of the rows and it decides
    every transition itself. True: other processes write it too (see SharedStore)."""

    def open(self) -> LoadedState: ...

    def close(self) -> None: ...

    async def run_writer(self, on_commit: Callable[[Committed], None]) -> None:
        """Serve writes until cancelled or until a write fails; after each commit call on_commit."""
        ...

    def on_failure(self, handler: Callable[[StoreUnavailable], None]) -> None:
        """Call `handler` once, on the event loop, when a write fails and the store stops."""
        ...

    @property
    def failure(self) -> StoreUnavailable | None:
        """The first write failure, if any (then every call raises it)."""
        ...

    async def insert(self, workflows: Sequence[WorkflowRecord], tasks: Sequence[TaskRecord]) -> None:
        """Insert and wait until durable."""
        ...

    def update_task(self, task: TaskRecord) -> None: ...

    def attempt_started(self, task: TaskRecord) -> None:
        """Record the running mark. On return the start survives this process dying (the
        restart counts the attempt as lost), though the row itself may be written later."""
        ...

    def add_attempt(self, attempt: AttemptRecord) -> None: ...

    def add_result(self, result: ResultRecord) -> None: ...

    def add_notification(self, notification: NotificationRecord) -> None: ...

    def add_usage(self, usage: UsageRecord) -> None: ...

    def add_task_event(self, event: TaskEventRecord) -> None:
        """Enqueue a run-log entry for the next group commit (never a commit of its own)."""
        ...

    def mark_delivered(self, reader: str, cursors: Sequence[int], at: datetime) -> None:
        """`reader` has had these notifications; every other reader still gets them."""
        ...

    async def flush(self) -> None:
        """Wait until everything enqueued so far is durable (read-your-writes)."""
        ...

    async def sync(self) -> None:
        """Wait until the writes enqueued so far are durable (bounded: later writes do not extend it)."""
        ...

    async def get_payload(self, task_id: str) -> tuple[str, dict[str, Any]] | None:
        """(prompt, options) of a task whose payload the engine does not hold in memory."""
        ...

    async def purge_idempotency_keys(self, finished_before: datetime) -> int:
        """Forget keys whose task finished before the cutoff (or is gone); how many."""
        ...

    async def get_task(self, task_id: str) -> TaskRecord | None: ...

    async def get_tasks(self, workflow_id: str) -> list[TaskRecord]: ...

    async def get_attempts(self, task_id: str) -> list[AttemptRecord]: ...

    async def get_result_size(self, task_ids: Sequence[str]) -> dict[str, int]: ...

    async def get_result_page(
        self, task_id: str, offset: int, limit: int
    ) -> tuple[str, str, int, list[dict[str, Any]] | None] | None:
        """(content_type, content slice, total chars, cited sources), or None when there is no result."""
        ...

    async def get_task_events(
        self, task_id: str, offset: int, limit: int
    ) -> tuple[list[TaskEventRecord], int]:
        """Up to `limit` run-log entries of a task from seq `offset` on, and how many it has in all."""
        ...

    async def get_usage(self, task_ids: Sequence[str]) -> dict[str, UsageTotals]:
        """Usage summed per task (tasks without usage are absent)."""
        ...

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None: ...

    async def list_workflows(self, query: WorkflowQuery) -> tuple[list[WorkflowRecord], int]: ...

    async def workflow_counts(self, workflow_ids: Sequence[str]) -> dict[str, dict[str, int]]: ...

    async def task_statuses(self, task_ids: Sequence[str]) -> dict[str, str]:
        """Status of each known task id."""
        ...

    async def task_counts(self) -> dict[str, int]:
        """Tasks by status, every scope."""
        ...

    async def list_notifications(
        self,
        scope: str | None,
        since: int,
        workflow_id: str | None,
        include_delivered: bool,
        limit: int,
        reader: str,
    ) -> list[NotificationRecord]: ...

    # ---- schedules (rare writes, each its own transaction, serialized with the group commits)

    async def save_schedule(self, schedule: ScheduleRecord) -> None:
        """Insert or replace the whole row."""
        ...

    async def update_schedule_if(self, schedule: ScheduleRecord, expected: datetime) -> bool:
        """Replace the row only if its updated_at is still `expected` (optimistic concurrency)."""
        ...

    async def delete_schedule(self, schedule_id: str) -> bool: ...

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None: ...

    async def list_schedules(
        self, scope: str | None, limit: int, offset: int
    ) -> tuple[list[ScheduleRecord], int]: ...

    async def count_schedules(self) -> int: ...

    async def due_schedules(self, now: datetime, limit: int) -> list[ScheduleRecord]:
        """Enabled schedules whose next run is at or before `now`, or that hold a queued run; oldest first."""
        ...

    async def next_due(self) -> datetime | None:
        """The earliest next run of any enabled schedule (an index read)."""
        ...

    async def record_fire(
        self,
        fire: FireRecord,
        schedule: ScheduleRecord,
        workflow: WorkflowRecord | None,
        task: TaskRecord | None,
        expected: datetime,
    ) -> bool:
        """In one transaction: claim the fire key, write the schedule (if its updated_at is still
        `expected`) and the task.

        False, and nothing written, when that due time was already fired or the row changed.
        """
        ...

    async def schedule_tasks(
        self, schedule_id: str, limit: int, offset: int
    ) -> tuple[list[TaskRecord], int]: ...

    async def count_rows(self) -> dict[str, int]:
        """Row counts per table (for tests that check a rejected call wrote nothing)."""
        ...

    # ---- retention (deletes run on the writer, one bounded transaction at a time) ----------------

    async def purge_finished(
        self, before: datetime, keep: Callable[[], Collection[str]], batch_size: int
    ) -> tuple[PurgeCounts, int]:
        """Delete tasks that finished before `before`, with every row that hangs off them, in
        transactions of at most `batch_size` tasks; returns what was deleted and how many batches.

        `keep()` is asked before each batch: ids it returns are never touched (tasks the engine
        still holds). Tasks with writes still queued in the store are skipped as well. A workflow
        row goes with its last task; schedules stay. The newest notification always stays, so the
        cursor never goes back.
        """
        ...

    async def count_finished(self, before: datetime, keep: Collection[str]) -> PurgeCounts:
        """What `purge_finished` would delete now, deleting nothing (a dry run)."""
        ...

    async def checkpoint(self) -> bool:
        """Write deletions into the file so their space can be reused; False if it could not run."""
        ...

    async def disk_usage(self) -> DiskUsage:
        """Bytes the database takes on disk, and how much of that is free for new rows."""
        ...


@dataclass(slots=True)
class PurgeCounts:
    """Rows a retention pass deleted (or would delete), per kind."""

    tasks: int = 0
    attempts: int = 0
    results: int = 0
    usage: int = 0
    notifications: int = 0
    schedule_fires: int = 0
    webhook_callbacks: int = 0
    workflows: int = 0
    events: int = 0

    def add(self, other: PurgeCounts) -> None:
        for name in self.__dataclass_fields__:  # type: ignore[attr-defined]
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class DiskUsage:
    file_bytes: int
    """The database file."""
    wal_bytes: int
    """Its write-ahead log: commits not yet checkpointed into the file."""
    free_bytes: int
    """Blocks inside the file that hold no data and will be reused for new rows."""


# ---- shared stores (PostgreSQL): awaited state transitions, each decided in one transaction -------
#
# A store several processes use at once (`Store.shared` is True) cannot be written behind a
# process's memory: "was this task cancelled while it ran", "did another worker take it", "is this
# workflow finished" are answered inside the transaction that changes the row. Every transition is
# guarded by compare-and-set on (worker id, attempt number, status), so a late completion never
# overwrites a cancel or a re-claim by another worker. The embedded DuckDB store (one owner) keeps
# its memory-first queue and group commit and does not offer these.


@dataclass(slots=True)
class ClaimRequest:
    """What one worker asks for when it has free slots."""

    worker_id: str
    limit: int
    """Free slots: at most this many tasks are claimed."""
    lease_seconds: float
    queues: Sequence[str] = ("default",)
    agents: Collection[str] | None = None
    """Config agents this worker has (they are code and settings on its machine); a task that
    carries its agent file (`agent_snapshot`) runs anywhere. None: any task."""
    agent_limits: dict[str, int] = field(default_factory=dict)
    """Per-agent `max_concurrency`, counted over every worker (running rows in the store)."""


@dataclass(slots=True)
class Outcome:
    """How an attempt ended, decided by the worker that ran it; the store applies it only if the
    attempt is still the task's current one (status running, same worker, same attempt number)."""

    task: TaskRecord
    """The task's new state (status completed | failed | retrying | queued, counters, error, times)."""
    worker_id: str
    attempt: AttemptRecord
    result: ResultRecord | None = None
    notification: tuple[str, str] | None = None
    """(kind, message) of the notification this outcome writes (the store assigns the cursor)."""


@dataclass(slots=True)
class WorkflowFinished:
    workflow_id: str
    status: str  # completed | failed | cancelled


@dataclass(slots=True)
class Effects:
    """What one transition changed, for the caller (push events, waking waiters)."""

    applied: bool = True
    """False: the guard failed (cancelled or taken by another worker meanwhile); nothing was
    changed except the attempt's own history row."""
    status: str | None = None
    """The task's status in the store after the transition."""
    tasks: list[TaskRecord] = field(default_factory=list)
    """Rows the transition changed, as they are now."""
    workflows_finished: list[WorkflowFinished] = field(default_factory=list)
    notifications: list[NotificationRecord] = field(default_factory=list)
    stop: list[tuple[str, str]] = field(default_factory=list)
    """(task id, worker id) of running attempts the owning workers must stop (a cancel)."""


@dataclass(slots=True)
class WorkerRecord:
    """A process that runs attempts on a shared store, as its heartbeat last said."""

    id: str
    host: str
    pid: int
    queues: list[str]
    agents: list[str] | None
    concurrency: int
    running: int
    started_at: datetime
    heartbeat_at: datetime
    kind: str = "worker"  # worker | serve


class SharedStore(Store, Protocol):
    """A store several processes share (PostgreSQL). Besides the Store calls (reads, schedules,
    retention, and the write-behind run-log/usage/progress writes, which it guards by worker and
    attempt), it offers the transitions below."""

    async def enqueue(
        self, workflows: Sequence[WorkflowRecord], tasks: Sequence[TaskRecord]
    ) -> dict[str, str]:
        """Insert in one transaction and wake the workers; returns {new task id: existing task id}
        for tasks whose (scope, idempotency_key) was already taken within its window (those are
        not inserted; their workflow is not created if it would be empty). `seq` is issued by the
        database."""
        ...

    async def claim(self, request: ClaimRequest) -> list[TaskRecord]:
        """Take up to `limit` ready tasks (queued, or retrying/delayed whose time has come) in
        priority then submission order, skipping rows other workers hold (SKIP LOCKED) and agents
        at their limit over all workers; each comes back running under this worker with
        `attempts` counted and its lease set."""
        ...

    async def renew_leases(self, worker_id: str, attempts: dict[str, int], lease_seconds: float) -> list[str]:
        """Extend the leases of {task id: attempt} this worker runs; returns the ids it must stop
        (cancelled, re-claimed after a lapse, or gone)."""
        ...

    async def finish_attempt(self, outcome: Outcome) -> Effects:
        """Apply an attempt's outcome if the attempt is still current; writes its attempt row,
        result, notification and, when it was the workflow's last open task, the workflow's one
        workflow_completed notification. Write-behind writes queued before the call (the attempt's
        run-log entries and usage) are committed before it."""
        ...

    async def cancel(
        self, task_ids: Sequence[str] | None, workflow_id: str | None, now: datetime
    ) -> tuple[Effects, list[str]]:
        """Cancel unfinished tasks (queued, waiting, retrying, running): running ones are marked
        cancelled at once and listed in `stop` for their workers. Returns the effects and the ids
        that were already finished."""
        ...

    async def requeue(self, task_id: str, now: datetime) -> TaskRecord | None:
        """Put a failed or cancelled task back in the queue (failures and lost attempts reset);
        None if it is not failed or cancelled (any more)."""
        ...

    async def reap_lapsed(self, now: datetime, max_lost_attempts: int, limit: int) -> Effects:
        """Tasks whose lease lapsed (their process died): each gets a 'lost' attempt row and its
        lost attempt counted, and is queued again, or failed as poisonous at `max_lost_attempts`."""
        ...

    async def unfinished_count(self) -> int:
        """Tasks not yet finished, every scope (the queue limit)."""
        ...

    async def max_cursor(self) -> int:
        """The newest notification cursor (0: none): the database issues them, not this process."""
        ...

    async def heartbeat(self, worker: WorkerRecord) -> None:
        """Insert or refresh this worker's row."""
        ...

    async def remove_worker(self, worker_id: str) -> None: ...

    async def list_workers(self, alive_within: float) -> list[WorkerRecord]:
        """Workers whose heartbeat is newer than `alive_within` seconds ago."""
        ...

    def on_remote_commit(self, handler: Callable[[Committed], None]) -> None:
        """Call `handler` (on the event loop) for changes other processes committed, as they are
        announced (LISTEN/NOTIFY), so pushes and waiters see a remote worker's finish."""
        ...

    def on_work(self, handler: Callable[[], None]) -> None:
        """Call `handler` when another process enqueued or released work (a wake-up hint)."""
        ...
