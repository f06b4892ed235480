"""Pydantic models shared by every surface (MCP tools, REST, CLI) and the engine.

The same models validate input at every boundary, so a bad option is rejected
with the same message whichever way it arrived.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

MAX_DURATION_SECONDS = 30 * 24 * 3600.0
"""Nothing we run should need more than 30 days; a larger value is a typo."""

_DURATION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _seconds(value: Any) -> float:
    """Seconds from a number or a string like "90s", "30m", "2h", "1d", "500ms"; no range checks."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '90s', '30m', '2h'")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(
                f"{value!r} is not a duration; "
                "use seconds (e.g. 90) or a string like '90s', '30m', '2h', '1d'"
            )
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError("a duration is a number of seconds or a string like '90s', '30m', '2h'")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like "90s", "30m", "2h", "1d", "500ms"."""
    seconds = _seconds(value)
    if seconds != seconds or seconds < 0:  # NaN or negative
        raise ValueError(f"a duration must be zero or positive, got {value!r}")
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"{value!r} is longer than the 30-day maximum")
    return seconds


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": ["number", "string"]}, mode="validation"),
]
"""Seconds, or a string like '30m': declared as both, so clients that coerce arguments by their
schema send "30m" as it is, not null (the value is always stored and returned as seconds)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Naive datetimes are taken to be UTC: the store keeps UTC only."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # year 1 with a positive offset: before the first representable UTC instant
        raise ValueError(f"{value.isoformat()} is out of range once converted to UTC") from None


class TaskStatus(StrEnum):
    queued = "queued"
    waiting = "waiting"
    running = "running"
    retrying = "retrying"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({TaskStatus.completed, TaskStatus.failed, TaskStatus.cancelled})


class WorkflowStatus(StrEnum):
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


class NotificationKind(StrEnum):
    task_completed = "task_completed"
    task_failed = "task_failed"
    task_cancelled = "task_cancelled"
    task_retried = "task_retried"
    workflow_completed = "workflow_completed"
    schedule_fired = "schedule_fired"
    schedule_skipped = "schedule_skipped"


Priority = Literal["high", "normal", "low"]
PRIORITY_RANK: dict[str, int] = {"high": 0, "normal": 1, "low": 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetryBackoff(_Strict):
    """Exponential backoff with jitter and a cap: delay = min(max, initial * factor^(n-1)), jittered down."""

    initial: Duration = Field(default=2.0, description="delay before the first retry (seconds or '2s')")
    factor: float = Field(default=2.0, ge=1.0, le=10.0, description="growth per failed attempt")
    max: Duration = Field(default=300.0, description="cap on any one delay")
    jitter: float = Field(
        default=0.5, ge=0.0, le=1.0, description="fraction of the delay that is randomised (0 = none)"
    )


Tag = Annotated[str, Field(min_length=1, max_length=64)]


class TaskOptions(_Strict):
    """Options of `task_async`. Unknown keys are rejected by name."""

    priority: Priority = "normal"
    timeout: Duration | None = Field(
        default=None, description="per-attempt limit: seconds or '90s'/'30m'/'2h'"
    )
    max_retries: int = Field(default=3, ge=0, le=20)
    retry_backoff: RetryBackoff = Field(default_factory=RetryBackoff)
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    workflow_id: str | None = Field(default=None, min_length=1, max_length=100)
    workflow_name: str | None = Field(default=None, min_length=1, max_length=200)
    delay: Duration | None = Field(
        default=None, description="start no sooner than this long from now ('10m')"
    )
    not_before: datetime | None = Field(default=None, description="start no sooner than this UTC time")
    callback_url: AnyHttpUrl | None = Field(default=None, description="stored; delivery comes later")
    scope: str | None = Field(default=None, min_length=1, max_length=1000)
    cwd: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="working directory for claude-code and command agents; must be inside the scope "
        "directory or an allowed root",
    )
    resume_task_id: str | None = Field(
        default=None, min_length=1, max_length=100, description="claude-code: continue that task's session"
    )
    batch: bool | None = Field(
        default=None, description="anthropic: send through the Message Batches API (half price, slower)"
    )
    max_budget_usd: float | None = Field(default=None, gt=0, le=10_000, description="claude-code spend cap")
    queue: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$",
        description="workers' queue (one in [workers] queues)",
    )

    @field_validator("timeout")
    @classmethod
    def _timeout_positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("timeout must be more than zero seconds")
        return value

    @field_validator("not_before")
    @classmethod
    def _not_before_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else as_utc(value)

    @staticmethod
    def scoped(options: TaskOptions | None, default_scope: str) -> TaskOptions:
        """The caller's project is the scope unless the options name another (every surface)."""
        options = options or TaskOptions()
        return options if options.scope else options.model_copy(update={"scope": default_scope})

    @model_validator(mode="after")
    def _exclusive(self) -> TaskOptions:
        if self.workflow_id and self.workflow_name:
            raise ValueError("give workflow_id (join a workflow) or workflow_name (start one), not both")
        if self.delay is not None and self.not_before is not None:
            raise ValueError("give delay or not_before, not both")
        return self


class Progress(BaseModel):
    percent: float | None = None
    message: str | None = None


class Attempt(BaseModel):
    attempt: int
    status: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None


class Usage(BaseModel):
    """Tokens and estimated cost over all of a task's attempts."""

    models: list[str] = Field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float | None = Field(default=None, description="estimate from the configured price table")


class TaskInfo(BaseModel):
    """What a client sees of one task."""

    task_id: str
    workflow_id: str
    agent: str
    status: TaskStatus
    priority: Priority
    scope: str
    created_at: datetime
    prompt_preview: str | None = Field(default=None, description="the prompt's start, on one line")
    prompt: str | None = Field(
        default=None, description="the whole prompt (REST `GET /tasks/{id}` and `sidequest show` only)"
    )
    started_at: datetime | None = None
    finished_at: datetime | None = None
    not_before: datetime | None = None
    next_attempt_at: datetime | None = None
    attempts: int = 0
    max_retries: int = 0
    timeout: float | None = None
    progress: Progress | None = None
    result_preview: str | None = None
    result_chars: int | None = None
    error: str | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    attempt_history: list[Attempt] | None = None
    session_id: str | None = Field(
        default=None, description="claude-code session; pass resume_task_id to continue it"
    )
    schedule_id: str | None = None
    usage: Usage | None = None


class TaskSubmitted(BaseModel):
    task_id: str
    workflow_id: str
    status: TaskStatus
    created_at: datetime
    deduplicated: bool = Field(
        default=False,
        description="true when idempotency_key matched an earlier task (unfinished, or finished "
        "within idempotency_window), returned instead",
    )
    warnings: list[str] = Field(default_factory=list, description="the task was accepted, but may fail: why")


class WorkflowInfo(BaseModel):
    workflow_id: str
    name: str
    status: WorkflowStatus
    scope: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    tasks: list[TaskInfo] | None = None


class WorkflowPage(BaseModel):
    workflows: list[WorkflowInfo]
    total: int
    next_offset: int | None = None


class StatusReport(BaseModel):
    """`check_workflow_status`: one task, or a workflow and all its tasks."""

    kind: Literal["task", "workflow"]
    task: TaskInfo | None = None
    workflow: WorkflowInfo | None = None
    elapsed_seconds: float | None = Field(
        default=None, description="since it was created, until it finished (or until now)"
    )
    hint: str | None = Field(default=None, description="one line: where it stands and what to do next")


class Source(BaseModel):
    """A page a result cites: `[n]` in the result's text refers to it."""

    n: int
    title: str | None = None
    url: str


class ResultPage(BaseModel):
    task_id: str
    status: TaskStatus
    content_type: Literal["text", "json"] | None = None
    offset: int
    total_chars: int
    content: str
    next_offset: int | None = Field(default=None, description="pass as offset to read on; null at the end")
    error: str | None = None
    sources: list[Source] = Field(default_factory=list, description="pages the text cites as [n]")


class Notification(BaseModel):
    cursor: int
    kind: NotificationKind
    task_id: str | None = None
    workflow_id: str
    scope: str
    message: str
    created_at: datetime
    delivered: bool = False


class NotificationPage(BaseModel):
    notifications: list[Notification]
    next_cursor: int = Field(description="pass as `since` next time")


class CancelResult(BaseModel):
    cancelled: list[str] = Field(description="task ids cancelled by this call")
    already_finished: list[str] = Field(default_factory=list)


class AgentInfo(BaseModel):
    name: str
    executor: str
    description: str = ""
    model: str | None = None
    source: str = Field(default="config", description="the agent file, or 'config' for [agents.NAME]")
    max_concurrency: int | None = None
    warnings: list[str] = Field(default_factory=list)


class AgentProblem(BaseModel):
    """An agent file that cannot be used, and why."""

    file: str
    error: str


class AgentList(BaseModel):
    """`list_agents` result; a list is wrapped so the output has an object schema."""

    agents: list[AgentInfo]
    problems: list[AgentProblem] = Field(
        default_factory=list, description="agent files that cannot be used, and why (tell the user)"
    )


class TaskCreate(_Strict):
    """Body of `POST /api/v1/tasks`: the arguments of `task_async`."""

    agent_definition: str = Field(min_length=1, max_length=4096, description="agent name or agent-file path")
    prompt: str = Field(description="complete, self-contained instructions for the agent")
    options: TaskOptions | None = None


MAX_WAIT_SECONDS = 50.0
"""Under MCP clients' tool-call timeouts (60 s in several): a wait returns before the client gives up."""
MAX_WAIT_TASKS = 200
WaitMode = Literal["any", "all"]
WaitTimeout = Annotated[
    float,
    Field(ge=0, le=MAX_WAIT_SECONDS, description=f"seconds to wait at most (0-{MAX_WAIT_SECONDS:g})"),
]


class WaitRequest(_Strict):
    """Body of `POST /api/v1/wait`: the arguments of `wait_for_tasks`."""

    task_ids: list[str] | None = Field(default=None, max_length=MAX_WAIT_TASKS)
    workflow_id: str | None = None
    mode: WaitMode = "any"
    timeout: WaitTimeout = 30.0


class WaitedTask(BaseModel):
    task_id: str
    status: TaskStatus
    finished: bool


class WaitResult(BaseModel):
    """`wait_for_tasks`: where each task stands when the wait ended."""

    timed_out: bool = Field(description="true when the timeout passed before the condition held")
    mode: WaitMode
    waited_seconds: float
    tasks: list[WaitedTask]


class AckRequest(_Strict):
    """Body of `POST /api/v1/notifications/ack`: cursors of notifications the caller has handled."""

    cursors: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] = Field(min_length=1, max_length=1000)


class AckResult(BaseModel):
    acknowledged: int = Field(description="how many cursors were marked delivered (unknown ones are ignored)")


class EnvVar(BaseModel):
    """A variable of the daemon's environment: its name and where it came from, never its value."""

    name: str
    source: Literal["env file", "config", "starter"] = Field(
        description="'env file' (<data dir>/env or env_file), 'config' ([env]), 'starter' (the environment "
        "the daemon was started with: the allowlist for a detached daemon)"
    )
    file: str | None = Field(default=None, description="the file that set it; null for the starter")


class WorkerInfo(BaseModel):
    """A process that runs attempts: the daemon itself, or a `sidequest worker` on a shared store.

    Workers register and heartbeat in the store (not in the daemon), so this is what the store
    says, and `alive` is read against the heartbeat: a worker killed with -9 never says goodbye.
    """

    id: str = Field(description="the worker id attempts record as worker_id (w_…)")
    host: str = Field(description="the machine's host name")
    pid: int
    kind: Literal["daemon", "worker"] = Field(
        description="'daemon': a `sidequest serve` that also runs work; 'worker': a `sidequest worker`"
    )
    queues: list[str] = Field(description="the queues it takes tasks from")
    agents: list[str] | None = Field(
        default=None,
        description="the config agents it has (agent files travel with their tasks and run "
        "anywhere); null: not known",
    )
    concurrency: int = Field(description="attempts it runs at once, at most")
    running: int = Field(description="attempts it runs now")
    started_at: datetime
    heartbeat_at: datetime = Field(description="when it last said it is alive (UTC)")
    alive: bool = Field(description="its heartbeat is recent; false: stopped or presumed dead")


class WorkerList(BaseModel):
    """`GET /api/v1/workers` and `sidequest workers --json`: every worker the store knows."""

    workers: list[WorkerInfo]
    as_of: datetime = Field(
        default_factory=utcnow,
        description="the daemon's clock when read: ages are taken from it, so a client's skew does not count",
    )


class DaemonStatus(BaseModel):
    """`sidequest status` and `GET /api/v1/daemon`: what is running and what it holds."""

    version: str
    pid: int
    host: str
    port: int
    started_at: datetime
    uptime_seconds: float
    data_dir: str
    database: str
    tasks: dict[str, int] = Field(description="tasks by status, every scope")
    running: int = Field(description="attempts running in this daemon now")
    store_error: str | None = Field(
        default=None, description="why the store stopped accepting writes (the daemon is stopping)"
    )
    schema_version: int | None = Field(default=None, description="the store's schema version")
    database_bytes: int = Field(default=0, description="size of the database file")
    wal_bytes: int = Field(default=0, description="size of its write-ahead log")
    disk_free_bytes: int | None = Field(default=None, description="free space on the data dir's disk")
    environment: list[EnvVar] = Field(
        default_factory=list, description="names in the daemon's environment and their sources, never values"
    )
    config: ConfigStatus | None = Field(
        default=None, description="the configuration the daemon serves with, and the last reload's problem"
    )


class ConfigStatus(BaseModel):
    """Which configuration a daemon serves with; a rejected new version leaves the old one serving."""

    file: str | None = Field(description="the config file read, or null when none exists (defaults)")
    loaded_at: datetime = Field(description="when the serving configuration was read (UTC)")
    problem: str | None = Field(
        default=None, description="why the newest version on disk was not applied (the old one serves)"
    )
    problem_at: datetime | None = Field(default=None, description="when that version was rejected (UTC)")
    needs_restart: list[str] = Field(
        default_factory=list,
        description="settings changed on disk that only a restart applies (http.host, http.port, database, "
        "lease_seconds, workers.queues, workers.heartbeat_seconds)",
    )
    differs_on_disk: bool = Field(
        default=False, description="the files on disk are not the ones loaded (a reload would read them)"
    )


class ReloadResult(BaseModel):
    """`POST /api/v1/reload` and `sidequest reload`: what changed, or why nothing did."""

    applied: bool = Field(description="the new configuration serves now (false: the old one still does)")
    changed: list[str] = Field(default_factory=list, description="settings that now have new values")
    environment: list[str] = Field(
        default_factory=list, description="variables set, changed or removed (names, never values)"
    )
    needs_restart: list[str] = Field(
        default_factory=list, description="changed settings that only a restart applies (`sidequest stop`)"
    )
    problem: str | None = Field(default=None, description="why the new configuration was refused")
    config: ConfigStatus


class EnvNames(BaseModel):
    """`GET /api/v1/daemon/environment`: the names in the daemon's environment, never values."""

    names: list[str]


class ApiError(BaseModel):
    """Every REST error: a stable code to branch on and a message to show."""

    code: str = Field(description="not_found | invalid_request | unauthorized | forbidden | internal | …")
    message: str


# ---- schedules --------------------------------------------------------------------

Overlap = Literal["skip", "queue", "allow"]
Misfire = Literal["run_once", "skip"]
ScheduleState = Literal["active", "paused", "finished"]


def _schedule_time(value: datetime) -> datetime:
    value = as_utc(value)
    if not 1970 <= value.year <= 9000:
        raise ValueError("must be between the years 1970 and 9000")
    return value


UtcTime = Annotated[datetime, AfterValidator(_schedule_time)]
"""A schedule's bound: UTC if no zone; a year far out is a typo (and overflows calendar math)."""


class ScheduleSpec(_Strict):
    """Arguments of `schedule_task`: what to run, and when."""

    agent_definition: str = Field(min_length=1, max_length=4096, description="agent name from list_agents")
    prompt: str = Field(min_length=1, description="complete, self-contained instructions for each run")
    cron: str = Field(
        min_length=1,
        max_length=200,
        description="5 fields 'minute hour day-of-month month day-of-week' (or 6, seconds first, when the "
        "config allows seconds), e.g. '0 9 * * 1-5' for weekdays at 09:00",
    )
    timezone: str = Field(
        default="UTC", min_length=1, max_length=64, description="IANA name, e.g. Europe/Berlin"
    )
    name: str | None = Field(default=None, min_length=1, max_length=200)
    options: TaskOptions | None = Field(default=None, description="task_async options for every run")
    overlap: Overlap = Field(
        default="skip",
        description="when a run is due while the previous one is unfinished: skip it, queue it to start "
        "after, or allow both",
    )
    misfire: Misfire = Field(
        default="run_once", description="after downtime: one catch-up run (run_once) or none (skip)"
    )
    start_at: UtcTime | None = Field(default=None, description="no runs before this time (UTC if no zone)")
    end_at: UtcTime | None = Field(default=None, description="no runs after this time (UTC if no zone)")
    max_runs: int | None = Field(default=None, ge=1, le=1_000_000, description="finish after this many runs")


class ScheduleUpdate(_Strict):
    """`update_schedule`: only the fields given change."""

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        """null would mean "no value" for fields that must have one; only the bounds may be cleared."""
        if isinstance(data, dict):
            for key in ("paused", "prompt", "cron", "timezone", "name", "options", "overlap", "misfire"):
                if key in data and data[key] is None:
                    raise ValueError(f"{key} cannot be null; leave it out to keep it unchanged")
        return data

    paused: bool | None = Field(default=None, description="true pauses, false resumes")
    prompt: str | None = Field(default=None, min_length=1)
    cron: str | None = Field(default=None, min_length=1, max_length=200)
    timezone: str | None = Field(default=None, min_length=1, max_length=64)
    name: str | None = Field(default=None, min_length=1, max_length=200)
    options: TaskOptions | None = None
    overlap: Overlap | None = None
    misfire: Misfire | None = None
    start_at: UtcTime | None = None
    end_at: UtcTime | None = None
    max_runs: int | None = Field(default=None, ge=1, le=1_000_000)


class ScheduleInfo(BaseModel):
    schedule_id: str
    name: str
    agent: str
    prompt: str
    cron: str
    timezone: str
    scope: str
    state: ScheduleState
    overlap: Overlap
    misfire: Misfire
    options: dict[str, JsonValue] = Field(default_factory=dict)
    start_at: datetime | None = None
    end_at: datetime | None = None
    max_runs: int | None = None
    runs: int = Field(default=0, description="runs started so far")
    next_run_at: datetime | None = Field(default=None, description="null when paused or finished")
    next_runs: list[datetime] = Field(default_factory=list, description="the next five fire times (UTC)")
    last_run_at: datetime | None = None
    last_task_id: str | None = None
    last_status: TaskStatus | None = Field(default=None, description="status of the last run's task")
    queued_run_at: datetime | None = Field(
        default=None, description="overlap=queue: a due time waiting for the previous run to finish"
    )
    last_error: str | None = Field(default=None, description="why the last due time did not start a run")
    created_at: datetime
    updated_at: datetime


class ScheduleCreated(BaseModel):
    schedule_id: str
    next_runs: list[datetime] = Field(description="the next five fire times (UTC)")
    warnings: list[str] = Field(default_factory=list)


class SchedulePage(BaseModel):
    schedules: list[ScheduleInfo]
    total: int
    next_offset: int | None = None


class ScheduleRuns(BaseModel):
    """A schedule's run history: its tasks, newest first."""

    schedule_id: str
    tasks: list[TaskInfo]
    total: int
    next_offset: int | None = None


class ScheduleDeleted(BaseModel):
    schedule_id: str
    deleted: bool = True


# ---- retention ------------------------------------------------------------------------

MAX_AGE_SECONDS = 3650 * 24 * 3600.0
"""Retention ages may be longer than other durations (keep a year of history); ten years is a typo."""


def parse_age(value: Any) -> float:
    """A retention age: a duration above zero (zero would delete a task the moment it finishes)."""
    seconds = _seconds(value)
    if not seconds > 0:  # NaN, negative or zero
        raise ValueError(f"an age must be more than zero, e.g. '7d' or '12h'; got {value!r}")
    if seconds > MAX_AGE_SECONDS:
        raise ValueError(f"{value!r} is longer than the 3650-day maximum")
    return seconds


Age = Annotated[
    float,
    Field(gt=0, le=MAX_AGE_SECONDS),
    BeforeValidator(parse_age),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_AGE_SECONDS},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
            ]
        }
    ),
]
"""How long finished tasks are kept: seconds or '12h', '7d', '90d'; more than zero, at most 3650 days."""


class GcRequest(_Strict):
    """Body of `POST /api/v1/gc`: delete (or count) finished tasks older than an age."""

    older_than: Age | None = Field(
        default=None,
        description="finished longer ago than this (seconds or '7d', '12h'); default: the daemon's "
        "retention setting",
    )
    dry_run: StrictBool = Field(default=False, description="count what would be deleted; delete nothing")


class GcCounts(BaseModel):
    """Rows deleted (or, in a dry run, that would be)."""

    tasks: int = 0
    attempts: int = 0
    results: int = 0
    usage: int = Field(default=0, description="token usage rows")
    notifications: int = 0
    schedule_fires: int = Field(default=0, description="fire keys of deleted scheduled runs")
    webhook_callbacks: int = 0
    workflows: int = Field(default=0, description="workflows none of whose tasks remain")
    events: int = Field(default=0, description="run-log entries of deleted tasks")


class GcReport(BaseModel):
    """What a garbage collection deleted (or would), and the database file around it."""

    dry_run: bool
    older_than_seconds: float
    finished_before: datetime = Field(description="tasks that finished before this time (UTC) were eligible")
    deleted: GcCounts = Field(description="rows deleted; in a dry run, rows that would be")
    batches: int = Field(description="transactions the deletion took (0 in a dry run)")
    file_bytes_before: int = Field(description="the database file, before")
    wal_bytes_before: int = Field(description="its write-ahead log (commits not yet in the file), before")
    file_bytes_after: int = Field(description="the database file after deleting and checkpointing")
    wal_bytes_after: int = Field(description="its write-ahead log after (0 once checkpointed)")
    free_bytes_after: int = Field(
        description="space inside the file that is free for new rows (DuckDB reuses it; the file "
        "itself only shrinks when the free space is at its end)"
    )
    checkpointed: bool = Field(description="the deletions were checkpointed into the file")
    seconds: float = Field(description="how long it took")


def options_error(exc: ValidationError, where: str = "options") -> str:
    """One clause per problem in task options, naming the key; unknown keys list the accepted ones."""
    parts = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        name = ".".join((where, *loc)) if loc else where
        if err["type"] == "extra_forbidden":
            fields = RetryBackoff.model_fields if loc[:-1] == ("retry_backoff",) else TaskOptions.model_fields
            parts.append(f"unknown option {name!r}; accepted: {', '.join(fields)}")
        else:
            parts.append(f"{name!r}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


class TaskLogEvent(BaseModel):
    """One entry of a task's run log."""

    seq: int = Field(description="position in the task's log, from 0 without gaps")
    at: datetime
    attempt: int = Field(description="the attempt it belongs to (0: before any attempt)")
    kind: str = Field(
        description="attempt_started, attempt_finished, retry_scheduled, progress, text, tool_use, "
        "tool_result, web_search, usage, stderr, session_message, log, log_cut"
    )
    message: str
    data: dict[str, Any] | None = Field(default=None, description="details: tool input, URLs, usage, …")


class TaskLogPage(BaseModel):
    """A page of a task's run log, oldest first."""

    task_id: str
    status: TaskStatus
    offset: int
    total: int = Field(description="entries the log holds so far")
    events: list[TaskLogEvent]
    next_offset: int | None = Field(
        default=None, description="offset of the next page; null when this page reaches the end so far"
    )
