"""The shared store: one PostgreSQL database that several sidequest processes use at once.

Unlike DuckDB (one owner whose memory is ahead of the rows), no process here can know what the
others did, so every state transition (claim, finish, cancel, requeue, recovery of a lapsed
lease) is decided inside one transaction, guarded by compare-and-set on (status, worker,
attempt). The write-behind calls of the Store protocol (progress, usage, run log, attempt rows,
notifications, delivery marks) are still batched: one transaction per batch, from
`run_writer`. Commits are announced with NOTIFY so other processes' listeners, waiters and
workers hear of them without polling.

The store survives the database going away for a while (a restart, a failover, a killed
backend): every statement is retried with backoff, and only after `unavailable_after` seconds
without success does it fail-stop as DuckDB does. Transitions are written so that a retry after
a commit whose answer was lost does not apply twice (guards, unique keys, batch tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import AsyncConnection, AsyncCursor, sql
from psycopg.abc import Buffer
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg.types.string import StrBinaryDumper, StrDumperUnknown
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from sidequest.storage.base import (
    SCHEDULE_COLUMNS,
    AttemptRecord,
    ClaimRequest,
    Committed,
    DiskUsage,
    Effects,
    FireRecord,
    LoadedState,
    NotificationRecord,
    Outcome,
    PurgeCounts,
    ResultRecord,
    ScheduleRecord,
    StoreError,
    StoreUnavailable,
    TaskEventRecord,
    TaskRecord,
    UsageRecord,
    UsageTotals,
    WorkerRecord,
    WorkflowFinished,
    WorkflowQuery,
    WorkflowRecord,
)
from sidequest.storage.queries import load_queries

log = logging.getLogger(__name__)

Q = load_queries("sidequest.storage", "postgres.sql")

T = TypeVar("T")

EVENTS_CHANNEL = "sidequest_events"
"""NOTIFY channel of committed changes: JSON {"o": origin, "s": schema, "t": task ids,
"w": workflow ids, "n": notification cursors, "e": [[task id, run-log seq], ...]}."""
WORK_CHANNEL = "sidequest_work"
"""NOTIFY channel of new or released work (enqueue, requeue, a retry, a lapsed lease requeued):
JSON {"o": origin, "s": schema}. A wake-up hint for workers; the claim decides."""
NOTIFY_MAX_BYTES = 7000
"""PostgreSQL refuses a NOTIFY payload of 8000 bytes or more; larger announcements are split."""
FINISHED = ("completed", "failed", "cancelled")
BASELINE = 7
"""The version 0007_baseline.sql brings an empty database to (DuckDB's versions 1 to 7 at once)."""
_NOTIFY_PREVIEW = 200
_BACKOFF_MAX = 2.0
_LISTEN_BACKOFF_MAX = 5.0
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

_RETRYABLE: tuple[type[BaseException], ...] = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
"""Connection lost, backend terminated, server restarting, pool exhausted, serialization failure,
deadlock, statement timeout: all of these are PostgreSQL's OperationalError (or the pool's), and
all are worth another try. Anything else (a programming or data error) is a bug, raised at once."""


# ---- connection strings, and never a password in a message ----------------------------------


def _check_schema(schema: str | None) -> str | None:
    """Lower-case identifiers only: they go into `-c search_path=…` unquoted, and a quoted or
    mixed-case name there is a trap (PostgreSQL folds it) that is not worth supporting."""
    if schema is not None and not _SCHEMA_NAME.match(schema):
        raise StoreError(
            f"{schema!r} is not a usable PostgreSQL schema name for sidequest: use lower-case letters, "
            "digits and underscores, starting with a letter or underscore (at most 63)"
        )
    return schema


def schema_of(dsn: str) -> str | None:
    """The schema a DSN selects with `options=-c search_path=NAME` (one name), so a store configured
    by its DSN alone keeps its locks and announcements apart from other schemas' stores."""
    try:
        options = str(conninfo_to_dict(dsn).get("options") or "")
    except psycopg.ProgrammingError:
        return None
    match = re.search(r"-c\s*search_path\s*=\s*([a-z_][a-z0-9_]*)(?:\s|$)", options)
    return match.group(1) if match else None


def describe_target(dsn: str, schema: str | None = None) -> str:
    """`postgresql://user@host:port/db` (plus the schema): what messages name, without a password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "PostgreSQL (an unparsable DSN)"
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    port = parts.get("port") or "5432"
    user = parts.get("user")
    db = parts.get("dbname") or user or "postgres"
    where = f"postgresql://{user + '@' if user else ''}{host}:{port}/{db}"
    return f"{where} (schema {schema})" if schema else where


def _scrub(text: str, dsn: str) -> str:
    """One line of `text` with the DSN's password (and any password-looking part) blanked out."""
    line = " ".join(str(text).split())
    with contextlib.suppress(psycopg.ProgrammingError):
        password = conninfo_to_dict(dsn).get("password")
        if password:
            line = line.replace(str(password), "***")
    line = line.replace(dsn, "<dsn>")
    line = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", line)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", line, flags=re.IGNORECASE)


def _without_nul(text: str) -> str:
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


class _NulSafeStrDumper(StrDumperUnknown):
    """PostgreSQL text cannot hold NUL, and psycopg passes one on to a DataError. What reaches the
    store with one is agent text (results, errors, progress; DuckDB keeps it, here it becomes
    U+FFFD as in the run log) or a lookup key that can match nothing anyway (`/tasks/a%00b`): an
    answer, not a failed statement. Submitted text is refused earlier, by the engine."""

    def dump(self, obj: str) -> Buffer | None:
        return super().dump(_without_nul(obj))


class _NulSafeStrBinaryDumper(StrBinaryDumper):
    def dump(self, obj: str) -> Buffer | None:
        return super().dump(_without_nul(obj))


async def _configure_connection(conn: AsyncConnection[Any]) -> None:
    conn.adapters.register_dumper(str, _NulSafeStrBinaryDumper)
    conn.adapters.register_dumper(str, _NulSafeStrDumper)  # last: the one %s picks


def _conninfo(dsn: str, schema: str | None, statement_timeout: float | None, connect_timeout: int) -> str:
    """The DSN with sidequest's session settings: the schema, UTC, and a statement timeout (so a
    stuck statement becomes a retried error instead of a hung worker)."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise StoreError(f"the PostgreSQL DSN is not valid: {_scrub(str(exc), dsn)}") from exc
    options = [str(parts.get("options") or "").strip(), "-c TimeZone=UTC"]
    if schema:
        options.append(f"-c search_path={schema}")
    if statement_timeout:
        options.append(f"-c statement_timeout={int(statement_timeout * 1000)}")
    extra: dict[str, Any] = {"options": " ".join(o for o in options if o)}
    if "connect_timeout" not in parts:
        extra["connect_timeout"] = connect_timeout
    if "application_name" not in parts:
        extra["application_name"] = "sidequest"
    return make_conninfo(dsn, **extra)


def _lock_key(schema: str | None, name: str) -> int:
    """A signed 64-bit advisory lock key per (schema, purpose), so stores in different schemas of
    one database (tests, or two installations) never wait for each other."""
    digest = hashlib.blake2b(f"sidequest:{schema or ''}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _lock_class(schema: str | None, name: str) -> int:
    """A signed 32-bit advisory lock class, for the two-key form (class, hashtext(value))."""
    digest = hashlib.blake2b(f"sidequest:{schema or ''}:{name}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


# ---- migrations --------------------------------------------------------------------------------


def migrations() -> list[tuple[int, str]]:
    """(version, sql) in order, from sidequest/storage/postgres_migrations/NNNN_name.sql."""
    folder = resources.files("sidequest.storage").joinpath("postgres_migrations")
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    return found


def _connect_failure(exc: BaseException, dsn: str, target: str) -> str:
    """Why PostgreSQL could not be used, as one line naming the server and database."""
    reason = _scrub(str(exc), dsn) or type(exc).__name__
    reason = re.sub(r"^connection failed: ", "", reason)
    lower = reason.lower()
    if "password authentication failed" in lower or "no password supplied" in lower:
        hint = "check the user and password in the DSN"
    elif "does not exist" in lower and "database" in lower:
        hint = "create the database or fix its name in the DSN"
    elif "refused" in lower or "could not translate host name" in lower or "timeout" in lower:
        hint = "is PostgreSQL running there, and is the host and port right?"
    elif isinstance(exc, psycopg.errors.InsufficientPrivilege) or "permission denied" in lower:
        hint = "grant this user CREATE on the database (or the schema), or use a schema it owns"
    else:
        hint = "check the DSN and that the server accepts this user"
    return f"cannot use the sidequest store at {target}: {reason}; {hint}"


def migrate(dsn: str, schema: str | None = None) -> tuple[int, int]:
    """Bring the database (or `schema` in it) to this code's schema version; (from, to).

    Concurrent first starts apply each version exactly once: the whole check-and-apply runs under a
    session advisory lock, and each version is one transaction with its schema_version row. A
    database newer than this code is refused, never downgraded or touched.
    """
    schema = _check_schema(schema)
    target = describe_target(dsn, schema)
    conninfo = _conninfo(dsn, schema, None, 10)
    try:
        conn = psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        raise StoreError(_connect_failure(exc, dsn, target)) from exc
    available = migrations()
    newest = available[-1][0]
    try:
        with conn:
            conn.execute("SELECT pg_advisory_lock(%s)", [_lock_key(schema, "migrate")])
            try:
                if schema:
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                conn.execute(Q["create_schema_version"])
                row = conn.execute(Q["schema_version"]).fetchone()
                current = int(row[0]) if row else 0
                if current > newest:
                    raise StoreError(
                        f"the sidequest store at {target} has schema version {current}, newer than this "
                        f"sidequest understands (up to {newest}); upgrade sidequest on this machine"
                    )
                if 0 < current < BASELINE:
                    raise StoreError(
                        f"the sidequest store at {target} has schema version {current}, which no PostgreSQL "
                        f"store ever had (they start at {BASELINE}); it was changed by hand"
                    )
                for version, script in available:
                    if version <= current:
                        continue
                    try:
                        with conn.transaction():
                            conn.execute(script)
                            first = 1 if version == BASELINE else version
                            for applied in range(first, version + 1):
                                conn.execute(Q["record_version"], {"version": applied})
                    except psycopg.Error as exc:
                        raise StoreError(
                            f"upgrading the sidequest store at {target} to schema version {version} failed "
                            f"({_scrub(str(exc), dsn)}); that version was rolled back"
                        ) from exc
                    log.info("applied schema version %d to %s", version, target)
                return current, max(current, newest)
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(%s)", [_lock_key(schema, "migrate")])
    except StoreError:
        raise
    except psycopg.Error as exc:
        raise StoreError(_connect_failure(exc, dsn, target)) from exc


# ---- records ------------------------------------------------------------------------------------

_TASK_COLUMNS = [f.name for f in TaskRecord.__dataclass_fields__.values()]  # type: ignore[attr-defined]
_TASK_INSERT_COLUMNS = (
    "id",
    "workflow_id",
    "agent",
    "prompt",
    "status",
    "priority",
    "scope",
    "options",
    "idempotency_key",
    "callback_url",
    "schedule_id",
    "attempts",
    "failures",
    "max_retries",
    "timeout_s",
    "created_at",
    "updated_at",
    "not_before",
    "next_attempt_at",
    "project",
    "queue",
    "agent_snapshot",
    "agent_limit",
)
_INSERT_TASK = (
    f"INSERT INTO task_executions ({', '.join(_TASK_INSERT_COLUMNS)}) "
    f"VALUES ({', '.join(f'%({c})s' for c in _TASK_INSERT_COLUMNS)}) "
    "ON CONFLICT (id) DO NOTHING RETURNING id, seq"
)
_PUT_SCHEDULE = (
    f"INSERT INTO scheduled_tasks ({', '.join(SCHEDULE_COLUMNS)}) "
    f"VALUES ({', '.join(f'%({c})s' for c in SCHEDULE_COLUMNS)}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in SCHEDULE_COLUMNS[1:])}"
)
_UPDATE_SCHEDULE_IF = (
    f"UPDATE scheduled_tasks SET {', '.join(f'{c} = %({c})s' for c in SCHEDULE_COLUMNS[1:])} "
    "WHERE id = %(id)s AND updated_at = %(expected)s RETURNING id"
)
_COUNTED_TABLES = (
    "workflow_executions",
    "task_executions",
    "task_attempts",
    "task_results",
    "notifications",
    "token_usage",
    "scheduled_tasks",
    "schedule_fires",
    "task_events",
)
_GC_TASK_ROWS: tuple[tuple[str, str], ...] = (
    ("attempts", "gc_delete_attempts"),
    ("results", "gc_delete_results"),
    ("usage", "gc_delete_usage"),
    ("notifications", "gc_delete_task_notifications"),
    ("schedule_fires", "gc_delete_fires"),
    ("webhook_callbacks", "gc_delete_webhooks"),
    ("events", "gc_delete_task_events"),
)
"""As duckdb.py's: per-task rows retention deletes with their task."""


def _utc(value: datetime | None) -> datetime | None:
    """Naive values are UTC by the codebase's convention; PostgreSQL must not read them as local."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _task_from(row: dict[str, Any]) -> TaskRecord:
    return TaskRecord(**{name: row[name] for name in _TASK_COLUMNS})


def _task_params(task: TaskRecord) -> dict[str, Any]:
    params = {c: getattr(task, c) for c in _TASK_INSERT_COLUMNS}
    params["options"] = Jsonb(task.options if task.options is not None else {})
    params["agent_snapshot"] = None if task.agent_snapshot is None else Jsonb(task.agent_snapshot)
    for name in ("created_at", "updated_at", "not_before", "next_attempt_at"):
        params[name] = _utc(params[name])
    return params


def _workflow_from(row: Sequence[Any]) -> WorkflowRecord:
    return WorkflowRecord(*row[:7])


def _notification_params(note: NotificationRecord) -> dict[str, Any]:
    return {
        "kind": note.kind,
        "task_id": note.task_id,
        "workflow_id": note.workflow_id,
        "scope": note.scope,
        "message": note.message,
        "created_at": _utc(note.created_at),
    }


def _schedule_params(schedule: ScheduleRecord) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in SCHEDULE_COLUMNS:
        value = getattr(schedule, name)
        if isinstance(value, datetime):
            value = _utc(value)
        elif name == "options":
            value = Jsonb(value or {})
        params[name] = value
    return params


def _schedule_from(row: dict[str, Any]) -> ScheduleRecord:
    values = {name: row[name] for name in SCHEDULE_COLUMNS}
    values["options"] = values["options"] or {}
    return ScheduleRecord(**values)


def _short(text: str | None, limit: int) -> str:
    """engine.text.short, which storage may not import (dependencies point engine → storage)."""
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _announcements(
    origin: str,
    schema: str | None,
    task_ids: Iterable[str] = (),
    workflow_ids: Iterable[str] = (),
    cursors: Iterable[int] = (),
    events: Iterable[tuple[str, int]] = (),
) -> list[str]:
    """NOTIFY payloads for one commit, each under PostgreSQL's 8000-byte limit (split as needed)."""
    parts: dict[str, list[Any]] = {
        "t": sorted(set(task_ids)),
        "w": sorted(set(w for w in workflow_ids if w)),
        "n": sorted(set(cursors)),
        "e": [list(e) for e in events],
    }
    head = {"o": origin, "s": schema or ""}

    def pack(body: dict[str, list[Any]]) -> list[str]:
        text = json.dumps({**head, **{k: v for k, v in body.items() if v}}, separators=(",", ":"))
        if len(text.encode()) <= NOTIFY_MAX_BYTES:
            return [text]
        key = max(body, key=lambda k: len(body[k]))
        items = body[key]
        half = len(items) // 2
        if half == 0:  # one item too large (an absurd id): announce what fits
            return [json.dumps(head, separators=(",", ":"))]
        return pack({**body, key: items[:half]}) + pack({**{k: [] for k in body}, key: items[half:]})

    if not any(parts.values()):
        return []
    return pack(parts)


def _iso(value: datetime | None) -> str | None:
    """A time for a JSON batch row (jsonb_to_recordset reads it back as timestamptz)."""
    utc = _utc(value)
    return utc.isoformat() if utc is not None else None


def _workflow_end(
    workflow_id: str,
    counts: Counter[str],
    workflow: tuple[str, str] | None,
    only_agent: str | None,
    now: datetime,
) -> tuple[WorkflowFinished | None, NotificationRecord | None]:
    """The workflow's end, if none of its tasks is left unfinished: the rule and the text of
    engine/ledger.py's WorkflowLedger.finish (no notification for an unnamed one-task workflow,
    named after its agent)."""
    if any(n for status, n in counts.items() if status not in FINISHED):
        return None, None
    if counts["failed"]:
        status = "failed"
    elif counts["completed"]:
        status = "completed"
    else:
        status = "cancelled"
    finished = WorkflowFinished(workflow_id, status)
    if workflow is None:
        return finished, None
    name, scope = workflow
    if sum(counts.values()) == 1 and name == only_agent:
        return finished, None
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if n)
    note = NotificationRecord(
        0,
        "workflow_completed",
        None,
        workflow_id,
        scope,
        f"Workflow {name!r} ({workflow_id}) finished {status}: {summary or 'no tasks'}",
        now,
    )
    return finished, note


# ---- write-behind batches -----------------------------------------------------------------------


@dataclass(eq=False)
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None

    def done(self, error: BaseException | None) -> None:
        self.error = error
        self.event.set()


@dataclass
class _Pending:
    """Write-behind writes waiting for the next batch."""

    updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    touched_workflows: set[str] = field(default_factory=set)
    attempts: list[AttemptRecord] = field(default_factory=list)
    results: list[ResultRecord] = field(default_factory=list)
    notifications: list[NotificationRecord] = field(default_factory=list)
    usage: list[UsageRecord] = field(default_factory=list)
    events: list[TaskEventRecord] = field(default_factory=list)
    delivered: list[tuple[str, list[int], datetime]] = field(default_factory=list)
    waiters: list[_Waiter] = field(default_factory=list)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Identifies the batch across retries (applied_batches), so a lost commit answer never doubles it."""

    def has_writes(self) -> bool:
        return bool(
            self.updates
            or self.attempts
            or self.results
            or self.notifications
            or self.usage
            or self.events
            or self.delivered
        )

    def empty(self) -> bool:
        return not (self.has_writes() or self.waiters)

    def task_ids(self) -> set[str]:
        ids = set(self.updates)
        for rows in (self.attempts, self.results, self.notifications, self.usage, self.events):
            ids.update(r.task_id for r in rows if r.task_id is not None)
        return ids


_FINISH_BATCH = 256
"""Finishes per transaction at most: a long batch would hold the workflow and cursor locks longer."""


@dataclass(eq=False)
class _FinishRequest:
    """One finish_attempt call waiting for its batch's commit."""

    outcome: Outcome
    done: anyio.Event = field(default_factory=anyio.Event)
    effects: Effects | None = None
    error: BaseException | None = None


class _Abort(Exception):
    """Raised inside a transaction to roll it back on purpose (a guard failed)."""


# ---- the store ------------------------------------------------------------------------------------


class PostgresStore:
    """The store several sidequest processes share (see the module docstring)."""

    shared = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        pool_min: int = 1,
        pool_max: int = 10,
        idempotency_window: float = 86400.0,
        unavailable_after: float = 60.0,
        statement_timeout: float = 30.0,
        connect_timeout: int = 5,
    ) -> None:
        """`unavailable_after`: seconds the database may stay unusable (each call retrying with
        backoff) before the store fail-stops with StoreUnavailable. `idempotency_window`: a key
        whose task finished longer ago than this no longer deduplicates (the engine's setting)."""
        self.dsn = dsn
        self.schema = _check_schema(schema)
        self.target = describe_target(dsn, self.schema)
        self._conninfo = _conninfo(dsn, self.schema, statement_timeout, connect_timeout)
        self.application_name = str(conninfo_to_dict(self._conninfo).get("application_name"))
        """What pg_stat_activity shows for this store's connections (the DSN's, else "sidequest");
        its listener's is this plus "-listener"."""
        self._pool_min, self._pool_max = pool_min, pool_max
        self.idempotency_window = idempotency_window
        self.unavailable_after = unavailable_after
        self._pool: AsyncConnectionPool | None = None
        self._pool_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.origin = uuid.uuid4().hex[:16]
        """Names this store's NOTIFY payloads, so its own listener skips what it committed itself."""
        self._notification_lock = _lock_key(self.schema, "notifications")
        self._agent_lock = _lock_class(self.schema, "agent")
        self._key_lock = _lock_class(self.schema, "idempotency")
        self._pending = _Pending()
        self._inflight: _Pending | None = None
        self._carried: list[_Pending] = []
        """Batches a cancellation interrupted, committed before anything newer."""
        self._has_work = anyio.Event()
        self._commit_lock = asyncio.Lock()
        self._on_commit: Callable[[Committed], None] | None = None
        self._writer_running = False
        self._remote_handler: Callable[[Committed], None] | None = None
        self._work_handler: Callable[[], None] | None = None
        self._failure: StoreUnavailable | None = None
        self._failure_handler: Callable[[StoreUnavailable], None] | None = None
        self._batches = 0
        self._remote_backlog: list[dict[str, Any]] = []
        self._remote_wake = anyio.Event()
        self._finishes: list[_FinishRequest] = []
        self._finish_wake = anyio.Event()
        self.listening = anyio.Event()
        """Set once the listener is subscribed (tests wait on it before committing elsewhere)."""
        self.subscriptions = 0
        """How many times the listener subscribed (more than once: it reconnected)."""

    # ---- lifecycle ------------------------------------------------------------------------

    def open(self) -> LoadedState:
        """Migrate and return what the engine loads at start: nothing, on a shared store (the rows
        are the truth and other processes change them, so the engine holds no queue in memory)."""
        migrate(self.dsn, self.schema)
        return LoadedState(live_tasks=[], max_seq=0, max_cursor=0, live_workflows={}, workflow_counts={})

    def close(self) -> None:
        """Close the pool. The pool lives on the event loop that opened it; the engine calls this
        from a worker thread while that loop runs, so it is closed there and waited for."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is loop:
            running.create_task(pool.close())  # on the loop itself: cannot block, close in the background
        elif loop is not None and loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(pool.close(timeout=5), loop).result(10)
        else:
            log.debug(
                "%s: the pool's event loop is gone; its connections close with the process", self.target
            )

    async def aclose(self) -> None:
        """Close the pool from the event loop (tests, and callers that are async anyway)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=5)

    async def _get_pool(self) -> AsyncConnectionPool:
        """Opened on first use, on the running loop (open() runs in a thread with no loop)."""
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                pool = AsyncConnectionPool(
                    self._conninfo,
                    min_size=self._pool_min,
                    max_size=self._pool_max,
                    kwargs={"autocommit": True},
                    configure=_configure_connection,
                    check=AsyncConnectionPool.check_connection,
                    timeout=min(10.0, max(0.5, self.unavailable_after / 4)),
                    name="sidequest",
                    open=False,
                )
                await pool.open(wait=False)
                self._loop = asyncio.get_running_loop()
                self._pool = pool
        return self._pool

    # ---- running statements, with retries and fail-stop ---------------------------------------

    @property
    def failure(self) -> StoreUnavailable | None:
        return self._failure

    def on_failure(self, handler: Callable[[StoreUnavailable], None]) -> None:
        self._failure_handler = handler

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, exc: BaseException, during: str, *, unreachable: bool = True) -> StoreUnavailable:
        """After `unavailable_after` seconds of failures (or a write-behind batch PostgreSQL
        refuses outright) the store stops, as DuckDB's does on its first failure: waiters get the
        error, queued writes are dropped (their tasks' leases lapse and another worker runs them
        again), and the engine is told to stop."""
        if self._failure is not None:
            return self._failure
        reason = _scrub(str(exc), self.dsn) or type(exc).__name__
        what = f"was unreachable for {self.unavailable_after:g}s" if unreachable else "refused a write"
        self._failure = StoreUnavailable(
            f"the sidequest store at {self.target} {what} (during {during}): {reason}. Nothing is "
            "acknowledged after this; this process stops, and unfinished work runs again once "
            "PostgreSQL is back"
        )
        log.critical("%s", self._failure)
        pending, self._pending = self._pending, _Pending()
        carried, self._carried = self._carried, []
        for batch in [*carried, pending]:
            for waiter in batch.waiters:
                waiter.done(self._failure)
        self._has_work.set()
        if self._failure_handler is not None:
            try:
                self._failure_handler(self._failure)
            except Exception:
                log.exception("the store failure handler failed")
        return self._failure

    async def _run(
        self, what: str, fn: Callable[[AsyncConnection[Any]], Awaitable[T]], *, transaction: bool = True
    ) -> T:
        """Run `fn` on a pooled connection (in one transaction unless told otherwise), retrying
        transient failures with backoff for up to `unavailable_after` seconds.

        Each try is shielded from cancellation: a transition cancelled between its COMMIT and the
        answer would leave the caller not knowing what it holds (a claim it never hears of)."""
        self._check()
        first_failure: float | None = None
        delay = 0.05
        while True:
            try:
                with anyio.CancelScope(shield=True):
                    pool = await self._get_pool()
                    async with pool.connection() as conn:
                        if not transaction:
                            return await fn(conn)
                        async with conn.transaction():
                            return await fn(conn)
            except _RETRYABLE as exc:
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    log.warning("%s: %s failed, retrying: %s", self.target, what, _scrub(str(exc), self.dsn))
                elif now - first_failure >= self.unavailable_after:
                    raise self._fail(exc, what) from exc
                await anyio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
            self._check()

    async def _read(self, what: str, fn: Callable[[AsyncConnection[Any]], Awaitable[T]]) -> T:
        return await self._run(what, fn, transaction=False)

    async def _fetchall(
        self, sql: str, params: dict[str, Any] | None = None, *, dicts: bool = False
    ) -> list[Any]:
        async def run(conn: AsyncConnection[Any]) -> list[Any]:
            cur = conn.cursor(row_factory=dict_row) if dicts else conn.cursor()
            await cur.execute(sql, params)
            return await cur.fetchall()

        return await self._read("a read", run)

    async def _fetchone(self, sql: str, params: dict[str, Any] | None = None, *, dicts: bool = False) -> Any:
        rows = await self._fetchall(sql, params, dicts=dicts)
        return rows[0] if rows else None

    # ---- shared pieces of transactions ---------------------------------------------------------

    async def _insert_notifications(self, cur: AsyncCursor[Any], notes: Sequence[NotificationRecord]) -> None:
        """Insert notifications last in their transaction, under the cursor lock (held to commit),
        and set the cursors the database issued on the records."""
        if not notes:
            return
        await cur.execute(Q["notification_lock"], {"key": self._notification_lock})
        await cur.executemany(
            Q["insert_notification"], [_notification_params(n) for n in notes], returning=True
        )
        for i, note in enumerate(notes):
            row = await cur.fetchone()
            note.cursor = int(row[0])  # type: ignore[index]
            if i < len(notes) - 1:
                cur.nextset()

    async def _announce(
        self,
        cur: AsyncCursor[Any],
        committed: Committed,
        work: bool = False,
        event_keys: Iterable[tuple[str, int]] = (),
    ) -> None:
        """NOTIFY (delivered at commit, and only if it commits) what this transaction changed."""
        payloads = _announcements(
            self.origin,
            self.schema,
            committed.task_ids,
            committed.workflow_ids,
            [n.cursor for n in committed.notifications],
            event_keys,
        )
        for payload in payloads:
            await cur.execute("SELECT pg_notify(%s, %s)", [EVENTS_CHANNEL, payload])
        if work:
            head = json.dumps({"o": self.origin, "s": self.schema or ""}, separators=(",", ":"))
            await cur.execute("SELECT pg_notify(%s, %s)", [WORK_CHANNEL, head])

    def _emit(self, committed: Committed) -> None:
        """Local listeners hear of transitions as they hear of write-behind batches."""
        if self._on_commit is None or not (
            committed.task_ids or committed.workflow_ids or committed.notifications or committed.task_events
        ):
            return
        try:
            self._on_commit(committed)
        except Exception:
            log.exception("on_commit listener failed")

    async def _lock_workflows(
        self, cur: AsyncCursor[Any], ids: Collection[str]
    ) -> dict[str, tuple[str, str]]:
        if not ids:
            return {}
        await cur.execute(Q["lock_workflows"], {"ids": sorted(ids)})
        return {row[0]: (row[1], row[2]) for row in await cur.fetchall()}

    async def _finish_workflow(
        self,
        cur: AsyncCursor[Any],
        workflow_id: str,
        workflow: tuple[str, str] | None,
        only_agent: str | None,
        now: datetime,
    ) -> tuple[WorkflowFinished | None, NotificationRecord | None]:
        """The workflow's end, if none of its tasks is left unfinished (see _workflow_end). Called
        with the workflow's row locked, so of two transactions finishing its last tasks, the
        second sees the first's commit and only it writes this."""
        await cur.execute(Q["workflow_tally"], {"id": workflow_id})
        counts: Counter[str] = Counter({status: int(n) for status, n in await cur.fetchall()})
        return _workflow_end(workflow_id, counts, workflow, only_agent, now)

    async def _insert_tasks(
        self, cur: AsyncCursor[Any], workflows: Sequence[WorkflowRecord], tasks: Sequence[TaskRecord]
    ) -> tuple[list[TaskRecord], dict[str, str]]:
        """Insert tasks (and the workflows they need), deduplicating idempotency keys; the
        database issues `seq`, set on the records. Returns (inserted, {duplicate: holder})."""
        duplicates: dict[str, str] = {}
        keyed = sorted({(t.scope, t.idempotency_key) for t in tasks if t.idempotency_key})
        for scope, key in keyed:  # in order, so two enqueues never wait for each other in a cycle
            await cur.execute(Q["key_lock"], {"key": self._key_lock, "scope": scope, "idem": key})
        cutoff = datetime.now(UTC) - timedelta(seconds=self.idempotency_window)
        taken: dict[tuple[str, str], str] = {}
        inserted: list[TaskRecord] = []
        for task in tasks:
            if task.idempotency_key:
                slot = (task.scope, task.idempotency_key)
                if slot in taken:
                    duplicates[task.id] = taken[slot]
                    continue
                params = {
                    "scope": task.scope,
                    "key": task.idempotency_key,
                    "task_id": task.id,
                    "created_at": _utc(task.created_at),
                    "cutoff": cutoff,
                }
                await cur.execute(Q["claim_key"], params)
                if await cur.fetchone() is None:
                    await cur.execute(Q["key_holder"], params)
                    holder = await cur.fetchone()
                    duplicates[task.id] = holder[0] if holder else task.id
                    continue
                taken[slot] = task.id
            inserted.append(task)
        needed = {t.workflow_id for t in inserted}
        rows = [
            {"id": w.id, "name": w.name, "scope": w.scope, "created_at": _utc(w.created_at)}
            for w in workflows
            if w.id in needed
        ]
        if rows:
            await cur.executemany(Q["insert_workflow"], rows)
        if inserted:
            await cur.executemany(_INSERT_TASK, [_task_params(t) for t in inserted], returning=True)
            seqs: dict[str, int] = {}
            for i in range(len(inserted)):
                for row in await cur.fetchall():
                    seqs[row[0]] = int(row[1])
                if i < len(inserted) - 1:
                    cur.nextset()
            missing = [t.id for t in inserted if t.id not in seqs]
            if missing:  # already there: a retry of an enqueue whose commit went through
                await cur.execute(Q["seq_of"], {"ids": missing})
                seqs.update({row[0]: int(row[1]) for row in await cur.fetchall()})
            for task in inserted:
                task.seq = seqs.get(task.id, task.seq)
        return inserted, duplicates

    # ---- transitions (SharedStore) ------------------------------------------------------------

    async def enqueue(
        self, workflows: Sequence[WorkflowRecord], tasks: Sequence[TaskRecord]
    ) -> dict[str, str]:
        committed = Committed()

        async def tx(conn: AsyncConnection[Any]) -> dict[str, str]:
            cur = conn.cursor()
            inserted, duplicates = await self._insert_tasks(cur, workflows, tasks)
            committed.task_ids = {t.id for t in inserted}
            committed.workflow_ids = {t.workflow_id for t in inserted}
            if inserted:
                await self._announce(cur, committed, work=True)
            return duplicates

        duplicates = await self._run("an enqueue", tx)
        self._emit(committed)
        return duplicates

    async def insert(self, workflows: Sequence[WorkflowRecord], tasks: Sequence[TaskRecord]) -> None:
        """The Store call, as an enqueue (the shared store always deduplicates in the database)."""
        duplicates = await self.enqueue(workflows, tasks)
        if duplicates:
            log.info("insert: %d task(s) not inserted, their idempotency key was taken", len(duplicates))

    async def claim(self, request: ClaimRequest) -> list[TaskRecord]:
        """Per-agent limits are exact over every worker: a claimer takes an advisory lock per
        limited agent before counting its running rows, so two claimers never both see the last
        free slot. Candidates are locked with SKIP LOCKED, so concurrent claimers never wait for
        or share a row. Each claim marks its rows with a token, so a retry after a commit whose
        answer was lost returns the rows that commit took instead of taking more."""
        if request.limit <= 0:
            return []
        committed = Committed()
        token = uuid.uuid4().hex
        tries = 0

        async def tx(conn: AsyncConnection[Any]) -> list[TaskRecord]:
            nonlocal tries
            tries += 1
            cur = conn.cursor()
            dcur = conn.cursor(row_factory=dict_row)
            if tries > 1:  # did a try whose answer was lost commit? then those rows are ours
                await dcur.execute(Q["claimed_by_token"], {"token": token, "worker_id": request.worker_id})
                earlier = [_task_from(row) for row in await dcur.fetchall()]
                if earlier:
                    committed.task_ids = {t.id for t in earlier}
                    committed.workflow_ids = {t.workflow_id for t in earlier}
                    return earlier
            limits = dict(request.agent_limits)
            room: dict[str, int] = {}
            if limits:
                for agent in sorted(limits):
                    await cur.execute(Q["agent_lock"], {"key": self._agent_lock, "agent": agent})
                await cur.execute(Q["running_per_agent"], {"agents": sorted(limits)})
                running = {agent: int(n) for agent, n in await cur.fetchall()}
                room = {agent: n - running.get(agent, 0) for agent, n in limits.items()}
            full = sorted(agent for agent, n in room.items() if n <= 0)
            params = {
                "queues": list(request.queues),
                "agents": None if request.agents is None else sorted(request.agents),
                "full": full,
                "limit": request.limit * 4 + 16 if room else request.limit,
            }
            await cur.execute(Q["claim_candidates"], params)
            candidates = await cur.fetchall()
            # Agents limited by their task rows (an agent file's max_concurrency, which this worker
            # may never have read): counted like the request's, but with a try-lock, so claimers
            # that met the agents in another order never wait for each other (no deadlock); an
            # agent another claimer is counting right now is left for the next claim.
            for agent in sorted({a for _, a, limit in candidates if limit is not None and a not in room}):
                row_limit = min(limit for _, a, limit in candidates if a == agent and limit is not None)
                await cur.execute(Q["agent_try_lock"], {"key": self._agent_lock, "agent": agent})
                got = await cur.fetchone()
                if not (got and got[0]):
                    room[agent] = 0
                    continue
                await cur.execute(Q["running_per_agent"], {"agents": [agent]})
                running_now = {a: int(n) for a, n in await cur.fetchall()}
                room[agent] = row_limit - running_now.get(agent, 0)
            chosen: list[str] = []
            for task_id, agent, _ in candidates:
                if len(chosen) >= request.limit:
                    break
                if agent in room:
                    if room[agent] <= 0:
                        continue
                    room[agent] -= 1
                chosen.append(task_id)
            if not chosen:
                return []
            await dcur.execute(
                Q["claim_tasks"],
                {
                    "ids": chosen,
                    "worker_id": request.worker_id,
                    "lease": request.lease_seconds,
                    "token": token,
                },
            )
            claimed = [_task_from(row) for row in await dcur.fetchall()]
            order = {task_id: i for i, task_id in enumerate(chosen)}
            claimed.sort(key=lambda t: order[t.id])
            committed.task_ids = {t.id for t in claimed}
            committed.workflow_ids = {t.workflow_id for t in claimed}
            await self._announce(cur, committed)
            return claimed

        claimed = await self._run("a claim", tx)
        self._emit(committed)
        return claimed

    async def renew_leases(self, worker_id: str, attempts: dict[str, int], lease_seconds: float) -> list[str]:
        """A cancel is seen here, not through a separate flag: it sets the row's status to
        cancelled, so the guarded renewal (status running, this worker, this attempt) no longer
        matches it, and neither does a row another worker re-claimed after a lapse, or one deleted."""
        if not attempts:
            return []
        ids = list(attempts)

        async def tx(conn: AsyncConnection[Any]) -> set[str]:
            cur = conn.cursor()
            params = {
                "ids": ids,
                "attempts": [attempts[i] for i in ids],
                "worker_id": worker_id,
                "lease": lease_seconds,
            }
            await cur.execute(Q["renew_leases"], params)
            return {row[0] for row in await cur.fetchall()}

        kept = await self._run("a lease renewal", tx)
        return [task_id for task_id in ids if task_id not in kept]

    async def finish_attempt(self, outcome: Outcome) -> Effects:
        """Finishes that arrive together share one transaction (group commit): the notification
        cursor lock is taken, and the commit's WAL flush paid, once per batch instead of once per
        attempt, which is what lets many workers finish short tasks at once. Each outcome is still
        guarded on its own (its task row, worker and attempt), so one stale outcome changes
        nothing for the others. Without a running writer (a tool, a test) it commits alone."""
        self._check()
        if not self._writer_running:
            return (await self._finish_batch([outcome]))[0]
        request = _FinishRequest(outcome)
        self._finishes.append(request)
        self._finish_wake.set()
        await request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.effects is not None
        return request.effects

    async def _run_finishes(self) -> None:
        """The finish batcher (beside the write-behind writer): everything queued goes in the next
        transaction, what arrives meanwhile in the one after."""
        while True:
            await self._finish_wake.wait()
            self._finish_wake = anyio.Event()
            while self._finishes:
                batch, self._finishes = self._finishes[:_FINISH_BATCH], self._finishes[_FINISH_BATCH:]
                with anyio.CancelScope(shield=True):
                    # Writes queued before these finishes (their run-log entries, usage) commit
                    # first: the next worker to take a task continues its log from the stored count.
                    with contextlib.suppress(StoreUnavailable):
                        await self._commit_pending()
                    await self._settle_finishes(batch)

    async def _settle_finishes(self, batch: list[_FinishRequest]) -> None:
        try:
            results = await self._finish_batch([r.outcome for r in batch])
        except StoreUnavailable as exc:
            for request in batch:
                request.error = exc
                request.done.set()
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                batch[0].done.set()
                return
            # One outcome the database refuses must not fail the others: settle them one by one.
            log.exception(
                "%s: a batch of %d finishes failed; finishing them one by one", self.target, len(batch)
            )
            for request in batch:
                try:
                    request.effects = (await self._finish_batch([request.outcome]))[0]
                except Exception as exc:
                    request.error = exc
                request.done.set()
            return
        for request, effects in zip(batch, results, strict=True):
            request.effects = effects
            request.done.set()

    async def _finish_batch(self, outcomes: list[Outcome]) -> list[Effects]:
        """A retry of a finish whose commit went through (its answer lost) finds its attempt rows
        (see _lost_finish). Only a retry looks: a first try never takes an attempt row written some
        other way (add_attempt) for a finished transition."""
        committed = Committed()
        tries = 0

        async def tx(conn: AsyncConnection[Any]) -> list[Effects]:
            nonlocal tries, committed
            tries += 1
            committed = Committed()
            cur = conn.cursor()
            dcur = conn.cursor(row_factory=dict_row)
            # every workflow of the batch locked up front, in order: batches never deadlock
            workflows = await self._lock_workflows(cur, {o.task.workflow_id for o in outcomes})
            found: dict[int, Effects] = {}
            if tries > 1:  # a retry: each outcome looks for what a lost commit may have written
                for i, outcome in enumerate(outcomes):
                    lost = await self._lost_finish(cur, dcur, outcome, committed)
                    if lost is not None:
                        found[i] = lost
            rest = [o for i, o in enumerate(outcomes) if i not in found]
            applied, notes = await self._finish_set(cur, dcur, rest, workflows, committed)
            fresh = iter(applied)
            results = [found[i] if i in found else next(fresh) for i in range(len(outcomes))]
            work = any(e.applied and e.status in ("queued", "retrying") for e in results)
            await self._insert_notifications(cur, notes)
            committed.notifications += notes
            await self._announce(cur, committed, work=work)
            return results

        results = await self._run("finishing attempts", tx)
        self._emit(committed)
        return results

    async def _finish_set(
        self,
        cur: AsyncCursor[Any],
        dcur: AsyncCursor[Any],
        outcomes: list[Outcome],
        workflows: dict[str, tuple[str, str]],
        committed: Committed,
    ) -> tuple[list[Effects], list[NotificationRecord]]:
        """A batch's first try, set-based: one guarded UPDATE for every outcome, one INSERT of the
        attempt rows, the results, and one tally of the workflows whose tasks finished; a few
        statements per batch instead of a few per attempt."""
        if not outcomes:
            return [], []
        rows = [
            {
                "id": o.task.id,
                "worker_id": o.worker_id,
                "attempt": o.attempt.attempt,
                "attempts": o.task.attempts,  # one less after a shutdown: not one of its tries
                "status": o.task.status,
                "failures": o.task.failures,
                "updated_at": _iso(o.task.updated_at),
                "next_attempt_at": _iso(o.task.next_attempt_at),
                "started_at": _iso(o.task.started_at),
                "finished_at": _iso(o.task.finished_at),
                "progress_percent": o.task.progress_percent,
                "progress_message": o.task.progress_message,
                "error": o.task.error,
                "result_preview": o.task.result_preview,
                "new_worker_id": o.task.worker_id,
                "lease_expires_at": _iso(o.task.lease_expires_at),
                "session_id": o.task.session_id,
                "batch_id": o.task.batch_id,
                "lost_attempts": o.task.lost_attempts,
            }
            for o in outcomes
        ]
        await dcur.execute(Q["finish_tasks"], {"rows": Jsonb(rows)})
        updated = {row["id"]: _task_from(row) for row in await dcur.fetchall()}
        attempts = [
            {
                "task_id": a.task_id,
                "attempt": a.attempt,
                "status": a.status,
                "started_at": _iso(a.started_at),
                "finished_at": _iso(a.finished_at),
                "error": a.error,
                "worker_id": a.worker_id,
            }
            for a in (o.attempt for o in outcomes)
        ]
        await cur.execute(Q["insert_attempts"], {"rows": Jsonb(attempts)})
        results_rows = [
            {
                "task_id": r.task_id,
                "content_type": r.content_type,
                "content": r.content,
                "size_chars": r.size_chars,
                "created_at": _iso(r.created_at),
                "sources": r.sources or None,
            }
            for r in (o.result for o in outcomes if o.task.id in updated)
            if r is not None
        ]
        if results_rows:
            await cur.execute(Q["insert_results"], {"rows": Jsonb(results_rows)})
        stale = [o.task.id for o in outcomes if o.task.id not in updated]
        current: dict[str, str] = {}
        if stale:
            released = [
                {"id": o.task.id, "worker_id": o.worker_id, "attempt": o.attempt.attempt}
                for o in outcomes
                if o.task.id not in updated
            ]
            await cur.execute(Q["release_cancelled"], {"rows": Jsonb(released)})
            await cur.execute(Q["task_statuses_of"], {"ids": stale})
            current = {task_id: status for task_id, status in await cur.fetchall()}
        ended = sorted({t.workflow_id for t in updated.values() if t.status in FINISHED})
        tallies: dict[str, Counter[str]] = {wid: Counter() for wid in ended}
        if ended:
            await cur.execute(Q["workflow_tallies"], {"ids": ended})
            for wid, status, n in await cur.fetchall():
                tallies[wid][status] = int(n)
        effects_list: list[Effects] = []
        notes: list[NotificationRecord] = []
        for outcome in outcomes:
            task = updated.get(outcome.task.id)
            if task is None:
                effects_list.append(Effects(applied=False, status=current.get(outcome.task.id)))
                continue
            effects = Effects(applied=True, status=task.status, tasks=[task])
            now = _utc(outcome.task.updated_at) or datetime.now(UTC)
            if outcome.notification is not None:
                kind, message = outcome.notification
                effects.notifications.append(
                    NotificationRecord(0, kind, task.id, task.workflow_id, task.scope, message, now)
                )
            wid = task.workflow_id
            if task.status in FINISHED and wid in tallies:  # decided once per workflow and batch
                finished, note = _workflow_end(wid, tallies.pop(wid), workflows.get(wid), task.agent, now)
                if finished is not None:
                    effects.workflows_finished.append(finished)
                if note is not None:
                    effects.notifications.append(note)
            notes += effects.notifications
            committed.task_ids.add(task.id)
            committed.workflow_ids.add(wid)
            effects_list.append(effects)
        return effects_list, notes

    async def _lost_finish(
        self, cur: AsyncCursor[Any], dcur: AsyncCursor[Any], outcome: Outcome, committed: Committed
    ) -> Effects | None:
        """On a retried finish transaction: what an earlier try whose answer was lost did with this
        outcome (its attempt row is there), reported as the row is now, writing nothing; None when
        that try did not commit it (the outcome is applied as on a first try)."""
        task, attempt = outcome.task, outcome.attempt
        await cur.execute(
            Q["attempt_recorded"],
            {
                "task_id": attempt.task_id,
                "attempt": attempt.attempt,
                "status": attempt.status,
                "started_at": _utc(attempt.started_at),
                "finished_at": _utc(attempt.finished_at),
                "error": attempt.error,
                "worker_id": attempt.worker_id,
            },
        )
        if await cur.fetchone() is None:
            return None
        await dcur.execute(Q["get_task"], {"id": task.id})
        row = await dcur.fetchone()
        now_row = _task_from(row) if row else None
        if now_row is None or now_row.status != task.status or now_row.updated_at != _utc(task.updated_at):
            return Effects(applied=False, status=now_row.status if now_row else None)
        # what the lost commit wrote, as far as listeners need it: the row and its notifications
        await cur.execute(Q["notifications_of_task_at"], {"id": task.id, "at": _utc(task.updated_at)})
        notes = [NotificationRecord(*r) for r in await cur.fetchall()]
        committed.task_ids.add(task.id)
        committed.workflow_ids.add(task.workflow_id)
        committed.notifications += notes
        return Effects(applied=True, status=now_row.status, tasks=[now_row], notifications=notes)

    async def cancel(
        self, task_ids: Sequence[str] | None, workflow_id: str | None, now: datetime
    ) -> tuple[Effects, list[str]]:
        """Ids that name no task are in neither the effects nor the already-finished list: the
        caller, which knows which ids it asked for, reports them as not found. A retry after a
        commit whose answer was lost reports the tasks that commit cancelled (rows cancelled at
        exactly `now`) as cancelled, with their notifications, not as already finished."""
        now = _utc(now)  # type: ignore[assignment]
        committed = Committed()
        tries = 0

        async def tx(conn: AsyncConnection[Any]) -> tuple[Effects, list[str]]:
            nonlocal tries
            tries += 1
            committed.task_ids, committed.workflow_ids, committed.notifications = set(), set(), []
            cur = conn.cursor()
            dcur = conn.cursor(row_factory=dict_row)
            ids = list(dict.fromkeys(task_ids or ()))
            if workflow_id is not None:
                await cur.execute(Q["workflow_task_ids"], {"id": workflow_id})
                ids += [row[0] for row in await cur.fetchall() if row[0] not in ids]
            effects = Effects()
            if not ids:
                return effects, []
            await cur.execute(Q["workflows_of"], {"ids": ids})
            workflows = await self._lock_workflows(cur, [row[0] for row in await cur.fetchall()])
            await dcur.execute(Q["cancel_tasks"], {"ids": ids, "now": now})
            rows = await dcur.fetchall()
            cancelled_ids = {row["id"] for row in rows}
            earlier: list[TaskRecord] = []
            if tries > 1:
                await dcur.execute(Q["cancelled_at"], {"ids": ids, "now": now})
                earlier = [_task_from(row) for row in await dcur.fetchall() if row["id"] not in cancelled_ids]
            await cur.execute(Q["finished_among"], {"ids": ids})
            skip = cancelled_ids | {t.id for t in earlier}
            already = [row[0] for row in await cur.fetchall() if row[0] not in skip]
            if earlier:
                await self._lost_cancel(cur, earlier, now, effects, committed)
            notes: list[NotificationRecord] = []
            agents: dict[str, str] = {}
            for row in sorted(rows, key=lambda r: r["seq"]):
                task = _task_from(row)
                effects.tasks.append(task)
                agents[task.workflow_id] = task.agent
                if row["old_status"] == "running" and row["old_worker_id"]:
                    effects.stop.append((task.id, row["old_worker_id"]))
                notes.append(
                    NotificationRecord(
                        0,
                        "task_cancelled",
                        task.id,
                        task.workflow_id,
                        task.scope,
                        f"Task {task.id} ({task.agent}) was cancelled",
                        now,
                    )
                )
            for wid in sorted(agents):
                finished, note = await self._finish_workflow(cur, wid, workflows.get(wid), agents[wid], now)
                if finished is not None:
                    effects.workflows_finished.append(finished)
                if note is not None:
                    notes.append(note)
            await self._insert_notifications(cur, notes)
            effects.notifications += notes
            committed.task_ids |= cancelled_ids
            committed.workflow_ids |= set(agents)
            committed.notifications += notes
            if rows:
                await self._announce(cur, committed)
            return effects, already

        result = await self._run("a cancel", tx)
        self._emit(committed)
        return result

    async def _lost_cancel(
        self,
        cur: AsyncCursor[Any],
        earlier: list[TaskRecord],
        now: datetime,
        effects: Effects,
        committed: Committed,
    ) -> None:
        """Fill `effects` with what a cancel's earlier try committed. Which of its tasks were running
        is no longer known exactly; those that had a worker are listed to stop (a worker told to
        stop what it does not run ignores it, and renewal would tell it anyway)."""
        wids = sorted({t.workflow_id for t in earlier})
        effects.tasks += earlier
        effects.stop += [(t.id, t.worker_id) for t in earlier if t.worker_id]
        await cur.execute(
            Q["notifications_at"], {"ids": [t.id for t in earlier], "workflows": wids, "at": now}
        )
        notes = [NotificationRecord(*r) for r in await cur.fetchall()]
        effects.notifications += notes
        for note in notes:
            if note.kind == "workflow_completed":
                workflow = await self._workflow_status(cur, note.workflow_id)
                if workflow is not None:
                    effects.workflows_finished.append(WorkflowFinished(note.workflow_id, workflow))
        committed.task_ids |= {t.id for t in earlier}
        committed.workflow_ids |= set(wids)
        committed.notifications += notes

    @staticmethod
    async def _workflow_status(cur: AsyncCursor[Any], workflow_id: str) -> str | None:
        await cur.execute(Q["get_workflow"], {"id": workflow_id})
        row = await cur.fetchone()
        return None if row is None else str(row[3])

    async def requeue(self, task_id: str, now: datetime) -> TaskRecord | None:
        """A retry after a commit whose answer was lost finds the row queued at `now` and returns it."""
        committed = Committed()

        tries = 0

        async def tx(conn: AsyncConnection[Any]) -> TaskRecord | None:
            nonlocal tries
            tries += 1
            dcur = conn.cursor(row_factory=dict_row)
            await dcur.execute(Q["requeue_task"], {"id": task_id, "now": _utc(now)})
            row = await dcur.fetchone()
            if row is None and tries > 1:  # requeued by a try whose answer was lost?
                await dcur.execute(Q["requeued_at"], {"id": task_id, "now": _utc(now)})
                earlier = await dcur.fetchone()
                return None if earlier is None else _task_from(earlier)
            if row is None:
                return None
            task = _task_from(row)
            committed.task_ids, committed.workflow_ids = {task.id}, {task.workflow_id}
            await self._announce(conn.cursor(), committed, work=True)
            return task

        task = await self._run("a requeue", tx)
        self._emit(committed)
        return task

    async def reap_lapsed(self, now: datetime, max_lost_attempts: int, limit: int) -> Effects:
        """Rows another transaction holds (a late finish, another reaper) are skipped; their lease
        is compared again under the lock, so a renewal that won the race keeps its attempt."""
        now = _utc(now)  # type: ignore[assignment]
        committed = Committed()

        async def tx(conn: AsyncConnection[Any]) -> Effects:
            cur = conn.cursor()
            dcur = conn.cursor(row_factory=dict_row)
            await cur.execute(Q["lapsed"], {"now": now, "limit": limit})
            candidates = await cur.fetchall()
            effects = Effects()
            if not candidates:
                return effects
            workflows = await self._lock_workflows(cur, {row[1] for row in candidates})
            await dcur.execute(Q["lock_lapsed"], {"ids": [row[0] for row in candidates], "now": now})
            notes: list[NotificationRecord] = []
            failed_in: dict[str, str] = {}
            requeued = False
            for row in await dcur.fetchall():
                old = _task_from(row)
                lost_error = (
                    f"attempt {old.attempts} was lost: the process running it stopped and its lease lapsed"
                )
                await cur.execute(
                    Q["insert_attempt"],
                    {
                        "task_id": old.id,
                        "attempt": old.attempts,
                        "status": "lost",
                        "started_at": old.started_at,
                        "finished_at": now,
                        "error": lost_error,
                        "worker_id": old.worker_id,
                    },
                )
                deaths = old.lost_attempts + 1
                params: dict[str, Any] = {
                    "id": old.id,
                    "now": now,
                    "lost_attempts": deaths,
                    "status": "queued",
                    "failures": old.failures,
                    "finished_at": None,
                    "error": old.error,
                }
                if deaths >= max_lost_attempts:
                    params.update(
                        status="failed",
                        failures=old.failures + 1,
                        finished_at=now,
                        error=(
                            f"poisonous: the process died {deaths} time{'s' if deaths != 1 else ''} while it "
                            f"ran (max_lost_attempts is {max_lost_attempts}); run it with an isolated agent "
                            '(isolation = "process") or fix what kills the process'
                        ),
                    )
                await dcur.execute(Q["reap_task"], params)
                task = _task_from(await dcur.fetchone())  # type: ignore[arg-type]
                effects.tasks.append(task)
                if task.status == "failed":
                    failed_in[task.workflow_id] = task.agent
                    tries = f"after {task.attempts} attempt{'s' if task.attempts != 1 else ''}"
                    preview = _short(task.error, _NOTIFY_PREVIEW)
                    notes.append(
                        NotificationRecord(
                            0,
                            "task_failed",
                            task.id,
                            task.workflow_id,
                            task.scope,
                            f"Task {task.id} ({task.agent}) failed {tries}: {preview}",
                            now,
                        )
                    )
                else:
                    requeued = True
            for wid in sorted(failed_in):
                finished, note = await self._finish_workflow(
                    cur, wid, workflows.get(wid), failed_in[wid], now
                )
                if finished is not None:
                    effects.workflows_finished.append(finished)
                if note is not None:
                    notes.append(note)
            await self._insert_notifications(cur, notes)
            effects.notifications = notes
            committed.task_ids = {t.id for t in effects.tasks}
            committed.workflow_ids = {t.workflow_id for t in effects.tasks}
            committed.notifications = list(notes)
            if effects.tasks:
                await self._announce(cur, committed, work=requeued)
            return effects

        effects = await self._run("recovering lapsed leases", tx)
        self._emit(committed)
        return effects

    async def unfinished_count(self) -> int:
        row = await self._fetchone(Q["unfinished_count"])
        return int(row[0])

    async def max_cursor(self) -> int:
        row = await self._fetchone(Q["max_cursor"])
        return int(row[0])

    async def heartbeat(self, worker: WorkerRecord) -> None:
        params = {
            "id": worker.id,
            "host": worker.host,
            "pid": worker.pid,
            "queues": list(worker.queues),
            "agents": None if worker.agents is None else list(worker.agents),
            "concurrency": worker.concurrency,
            "running": worker.running,
            "started_at": _utc(worker.started_at),
            "heartbeat_at": _utc(worker.heartbeat_at),
            "kind": worker.kind,
        }

        async def tx(conn: AsyncConnection[Any]) -> None:
            await conn.execute(Q["heartbeat"], params)

        await self._run("a heartbeat", tx)

    async def remove_worker(self, worker_id: str) -> None:
        async def tx(conn: AsyncConnection[Any]) -> None:
            await conn.execute(Q["remove_worker"], {"id": worker_id})

        await self._run("removing a worker", tx)

    async def list_workers(self, alive_within: float) -> list[WorkerRecord]:
        rows = await self._fetchall(Q["list_workers"], {"alive": alive_within})
        return [WorkerRecord(*row[:9], kind=row[9]) for row in rows]

    def on_remote_commit(self, handler: Callable[[Committed], None]) -> None:
        self._remote_handler = handler

    def on_work(self, handler: Callable[[], None]) -> None:
        self._work_handler = handler

    # ---- the listener ----------------------------------------------------------------------

    async def _listen(self) -> None:
        """One dedicated connection LISTENs; it is reconnected with backoff when it drops. After a
        reconnect the work handler is called once: announcements may have been missed meanwhile."""
        delay = 0.1
        reconnected = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, application_name=self.application_name + "-listener"
                )
                async with conn:
                    await conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                    await conn.execute(f"LISTEN {WORK_CHANNEL}")
                    delay = 0.1
                    self.subscriptions += 1
                    self.listening.set()
                    if reconnected:
                        self._call_work()
                    async for notice in conn.notifies():
                        await self._heard(notice.channel, notice.payload)
            except _RETRYABLE as exc:
                log.warning(
                    "%s: the listener lost its connection (%s); reconnecting",
                    self.target,
                    _scrub(str(exc), self.dsn),
                )
            except Exception:
                log.exception("%s: the listener failed; reconnecting", self.target)
            reconnected = True
            await anyio.sleep(delay)
            delay = min(delay * 2, _LISTEN_BACKOFF_MAX)

    def _call_work(self) -> None:
        if self._work_handler is not None:
            try:
                self._work_handler()
            except Exception:
                log.exception("on_work handler failed")

    async def _heard(self, channel: str, payload: str) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if data.get("o") == self.origin or data.get("s", "") != (self.schema or ""):
            return  # our own commit (already given to on_commit), or another store's schema
        if channel == WORK_CHANNEL:
            self._call_work()
            return
        if self._remote_handler is None:
            return
        # Delivered by _deliver_remote, many announcements per fetch: a busy cluster announces
        # every claim and finish, and the listener must never fall behind reading them one by one.
        self._remote_backlog.append(data)
        self._remote_wake.set()

    async def _deliver_remote(self) -> None:
        """Other processes' commits, coalesced: one read of their notifications and run-log
        entries for everything announced since the last delivery."""
        while True:
            await self._remote_wake.wait()
            self._remote_wake = anyio.Event()
            backlog, self._remote_backlog = self._remote_backlog, []
            if backlog:
                await self._deliver(backlog)

    async def _deliver(self, backlog: list[dict[str, Any]]) -> None:
        assert self._remote_handler is not None
        committed = Committed()
        cursors: list[int] = []
        events: list[tuple[str, int]] = []
        for data in backlog:
            committed.task_ids.update(data.get("t", ()))
            committed.workflow_ids.update(data.get("w", ()))
            cursors += [int(c) for c in data.get("n", ())]
            events += [(str(e[0]), int(e[1])) for e in data.get("e", ())]
        try:
            if cursors:
                rows = await self._fetchall(Q["notifications_by_cursor"], {"cursors": cursors})
                committed.notifications = [NotificationRecord(*row) for row in rows]
            if events:
                params = {"ids": [e[0] for e in events], "seqs": [e[1] for e in events]}
                rows = await self._fetchall(Q["events_by_key"], params)
                committed.task_events = [
                    TaskEventRecord(
                        r[0], r[1], r[2], r[3], r[4], r[5], None if r[6] is None else json.loads(r[6]), r[6]
                    )
                    for r in rows
                ]
        except StoreUnavailable:
            return
        try:
            self._remote_handler(committed)
        except Exception:
            log.exception("on_remote_commit handler failed")

    # ---- write-behind -------------------------------------------------------------------------

    async def run_writer(self, on_commit: Callable[[Committed], None]) -> None:
        """Commit write-behind batches (one transaction each) until cancelled, and run the listener
        beside it. Writes that arrive while a batch commits go in the next one."""
        self._on_commit = on_commit
        self._writer_running = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listen)
                tg.start_soon(self._run_finishes)
                tg.start_soon(self._deliver_remote)
                try:
                    while self._failure is None:
                        await self._has_work.wait()
                        self._has_work = anyio.Event()
                        await self._commit_pending()
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._writer_running = False
            with anyio.CancelScope(shield=True):
                while self._finishes:  # finishes queued when the batcher stopped are settled now
                    batch, self._finishes = self._finishes, []
                    await self._settle_finishes(batch)
            if self._failure is None:
                with anyio.CancelScope(shield=True), contextlib.suppress(StoreUnavailable):
                    await self._commit_pending()  # a clean stop loses nothing queued

    async def _commit_pending(self) -> None:
        """Commit what is queued (after a batch a cancellation interrupted, if any)."""
        async with self._commit_lock:
            while self._carried:
                await self._commit_one(self._carried[0])
                self._carried.pop(0)
            batch, self._pending = self._pending, _Pending()
            await self._commit_one(batch)

    async def _commit_one(self, batch: _Pending) -> None:
        """A batch is committed, or failed with its waiters told so; never dropped. Cancelled while
        it waits to retry, it is carried to the next commit (the final one at a clean stop) with
        its token, so whatever an interrupted try committed is not applied again."""
        if batch.empty():
            return
        self._inflight = batch
        error: BaseException | None = None
        committed: Committed | None = None
        carried = False
        try:
            if batch.has_writes():
                committed = await self._run(
                    "a write-behind batch", lambda conn: self._write_batch(conn, batch)
                )
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, StoreUnavailable)
                else self._fail(exc, "a write-behind batch", unreachable=False)
            )
        except BaseException:
            if batch not in self._carried:
                self._carried.append(batch)
            carried = True
            raise
        finally:
            self._inflight = None
            if not carried:
                for waiter in batch.waiters:
                    waiter.done(error)
        if committed is not None and self._on_commit is not None:
            try:
                self._on_commit(committed)
            except Exception:
                log.exception("on_commit listener failed")

    @staticmethod
    def _result_params(result: ResultRecord) -> dict[str, Any]:
        return {
            "task_id": result.task_id,
            "content_type": result.content_type,
            "content": result.content,
            "size_chars": result.size_chars,
            "created_at": _utc(result.created_at),
            "sources": Jsonb(result.sources) if result.sources else None,
        }

    async def _write_batch(self, conn: AsyncConnection[Any], batch: _Pending) -> Committed:
        """One transaction: each kind of write as one pipelined executemany, notifications last
        (under the cursor lock), then the announcements."""
        cur = conn.cursor()
        committed = Committed(notifications=list(batch.notifications), task_events=list(batch.events))
        committed.task_ids = set(batch.updates) | {r.task_id for r in batch.results}
        committed.task_ids |= {n.task_id for n in batch.notifications if n.task_id}
        committed.workflow_ids = set(batch.touched_workflows) | {
            n.workflow_id for n in batch.notifications if n.workflow_id
        }
        await cur.execute(Q["applied_batch"], {"token": batch.token})
        if await cur.fetchone() is None:  # committed by an earlier try whose answer was lost
            await cur.execute(Q["batch_cursors"], {"token": batch.token})
            row = await cur.fetchone()
            for note, cursor in zip(batch.notifications, (row[0] if row and row[0] else []), strict=False):
                note.cursor = int(cursor)
            return committed
        self._batches += 1
        if self._batches % 200 == 1:
            await cur.execute(Q["forget_batches"])
        if batch.updates:
            await cur.executemany(Q["update_running"], [batch.updates[k] for k in sorted(batch.updates)])
        if batch.attempts:
            await cur.executemany(
                Q["insert_attempt"],
                [
                    {
                        "task_id": a.task_id,
                        "attempt": a.attempt,
                        "status": a.status,
                        "started_at": _utc(a.started_at),
                        "finished_at": _utc(a.finished_at),
                        "error": a.error,
                        "worker_id": a.worker_id,
                    }
                    for a in batch.attempts
                ],
            )
        if batch.results:
            await cur.executemany(Q["insert_result"], [self._result_params(r) for r in batch.results])
        if batch.usage:
            await cur.executemany(
                Q["insert_usage"],
                [
                    {
                        "task_id": u.task_id,
                        "attempt": u.attempt,
                        "model": u.model,
                        "input_tokens": u.input_tokens,
                        "output_tokens": u.output_tokens,
                        "cache_creation_input_tokens": u.cache_creation_input_tokens,
                        "cache_read_input_tokens": u.cache_read_input_tokens,
                        "cost_usd": u.cost_usd,
                        "recorded_at": _utc(u.recorded_at),
                    }
                    for u in batch.usage
                ],
            )
        if batch.events:  # one statement: a run log writes two or more entries per attempt
            rows = [
                {
                    "task_id": e.task_id,
                    "seq": e.seq,
                    "logged_at": _iso(e.logged_at),
                    "attempt": e.attempt,
                    "kind": e.kind,
                    "message": e.message,
                    "data": e.data_json
                    if e.data_json is not None
                    else (None if e.data is None else json.dumps(e.data)),
                }
                for e in batch.events
            ]
            await cur.execute(Q["insert_task_events"], {"rows": Jsonb(rows)})
        for reader, cursors, at in batch.delivered:
            await cur.execute(Q["mark_delivered"], {"reader": reader, "cursors": cursors, "at": _utc(at)})
        await self._insert_notifications(cur, batch.notifications)
        if batch.notifications:
            await cur.execute(
                Q["set_batch_cursors"],
                {"token": batch.token, "cursors": [n.cursor for n in batch.notifications]},
            )
        if committed.task_ids or committed.notifications or batch.events:
            await self._announce(cur, committed, event_keys=[(e.task_id, e.seq) for e in batch.events])
        return committed

    def _wake(self) -> None:
        self._has_work.set()

    def update_task(self, task: TaskRecord) -> None:
        """Only the in-attempt columns of an attempt this process runs, and only while it is still
        the task's current attempt (see update_running): a late write never undoes a cancel or
        another worker's claim. Transitions go through finish_attempt and friends instead."""
        if self._failure is not None:
            return
        self._pending.updates[task.id] = {
            "id": task.id,
            "worker_id": task.worker_id,
            "attempts": task.attempts,
            "progress_percent": task.progress_percent,
            "progress_message": task.progress_message,
            "session_id": task.session_id,
            "batch_id": task.batch_id,
            "updated_at": _utc(task.updated_at),
            "lease_expires_at": _utc(task.lease_expires_at),
        }
        self._pending.touched_workflows.add(task.workflow_id)
        self._wake()

    def attempt_started(self, task: TaskRecord) -> None:
        """The claim already committed the running mark (a crash from here on is a lapsed lease,
        counted by reap_lapsed), so this is only an ordinary in-attempt update."""
        self.update_task(task)

    def add_attempt(self, attempt: AttemptRecord) -> None:
        if self._failure is None:
            self._pending.attempts.append(attempt)
            self._wake()

    def add_result(self, result: ResultRecord) -> None:
        if self._failure is None:
            self._pending.results.append(result)
            self._wake()

    def add_notification(self, notification: NotificationRecord) -> None:
        """The record's cursor is replaced by the one the database issues, before on_commit."""
        if self._failure is None:
            self._pending.notifications.append(notification)
            self._wake()

    def add_usage(self, usage: UsageRecord) -> None:
        if self._failure is None:
            self._pending.usage.append(usage)
            self._wake()

    def add_task_event(self, event: TaskEventRecord) -> None:
        if self._failure is None:
            self._pending.events.append(event)
            self._wake()

    def mark_delivered(self, reader: str, cursors: Sequence[int], at: datetime) -> None:
        if cursors and self._failure is None:
            self._pending.delivered.append((reader, list(cursors), at))
            self._wake()

    async def flush(self) -> None:
        """Wait until every write queued so far is committed (the batch in flight included)."""
        self._check()
        if self._pending.empty() and self._inflight is None and not self._carried:
            return
        waiter = _Waiter()
        self._pending.waiters.append(waiter)
        if self._writer_running:
            self._wake()
        else:
            await self._commit_pending()  # no writer task (the store used alone): commit here
        await waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error

    async def sync(self) -> None:
        await self.flush()

    # ---- reads -----------------------------------------------------------------------------------

    async def get_payload(self, task_id: str) -> tuple[str, dict[str, Any]] | None:
        row = await self._fetchone(Q["task_payload"], {"id": task_id})
        return None if row is None else (str(row[0]), row[1] or {})

    async def purge_idempotency_keys(self, finished_before: datetime) -> int:
        async def tx(conn: AsyncConnection[Any]) -> int:
            cur = await conn.execute(Q["purge_idempotency_keys"], {"cutoff": _utc(finished_before)})
            return len(await cur.fetchall())

        return await self._run("purging idempotency keys", tx)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        row = await self._fetchone(Q["get_task"], {"id": task_id}, dicts=True)
        return None if row is None else _task_from(row)

    async def get_tasks(self, workflow_id: str) -> list[TaskRecord]:
        rows = await self._fetchall(Q["get_tasks_of_workflow"], {"id": workflow_id}, dicts=True)
        return [_task_from(row) for row in rows]

    async def get_attempts(self, task_id: str) -> list[AttemptRecord]:
        rows = await self._fetchall(Q["get_attempts"], {"id": task_id})
        return [AttemptRecord(*row) for row in rows]

    async def get_result_size(self, task_ids: Sequence[str]) -> dict[str, int]:
        if not task_ids:
            return {}
        rows = await self._fetchall(Q["result_sizes"], {"ids": list(task_ids)})
        return {row[0]: int(row[1]) for row in rows}

    async def get_result_page(
        self, task_id: str, offset: int, limit: int
    ) -> tuple[str, str, int, list[dict[str, Any]] | None] | None:
        row = await self._fetchone(Q["result_page"], {"id": task_id, "offset": offset, "limit": limit})
        if row is None:
            return None
        return row[0], row[1] or "", int(row[2]), row[3] or None

    async def get_task_events(
        self, task_id: str, offset: int, limit: int
    ) -> tuple[list[TaskEventRecord], int]:
        rows = await self._fetchall(Q["task_events"], {"id": task_id, "offset": offset, "limit": limit})
        total = rows[0][0] if rows else 0
        events = [
            TaskEventRecord(
                task_id, seq, at, attempt, kind, message, None if data is None else json.loads(data), data
            )
            for _, seq, at, attempt, kind, message, data in rows
            if seq is not None
        ]
        return events, int(total)

    async def get_usage(self, task_ids: Sequence[str]) -> dict[str, UsageTotals]:
        if not task_ids:
            return {}
        rows = await self._fetchall(Q["usage_totals"], {"ids": list(task_ids)})
        return {r[0]: UsageTotals(list(r[1] or []), *map(int, r[2:6]), r[6]) for r in rows}

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        row = await self._fetchone(Q["get_workflow"], {"id": workflow_id})
        return None if row is None else _workflow_from(row)

    async def list_workflows(self, query: WorkflowQuery) -> tuple[list[WorkflowRecord], int]:
        params = {
            "scope": query.scope,
            "finished": query.finished,
            "statuses": list(query.statuses),
            "agent": query.agent,
            "since": _utc(query.since),
            "until": _utc(query.until),
            "limit": query.limit,
            "offset": query.offset,
        }
        rows = await self._fetchall(Q["list_workflows"], params)
        total = int(rows[0][7]) if rows else 0
        return [_workflow_from(r) for r in rows], total

    async def workflow_counts(self, workflow_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        ids = list(workflow_ids)
        if not ids:
            return {}
        counts: dict[str, dict[str, int]] = {wid: {} for wid in ids}
        for wid, status, n in await self._fetchall(Q["workflow_counts"], {"ids": ids}):
            counts[wid][status] = int(n)
        return counts

    async def task_statuses(self, task_ids: Sequence[str]) -> dict[str, str]:
        rows = await self._fetchall(Q["task_statuses"], {"ids": list(task_ids)})
        return {str(task_id): str(status) for task_id, status in rows}

    async def task_counts(self) -> dict[str, int]:
        return {str(status): int(n) for status, n in await self._fetchall(Q["task_counts"])}

    async def list_notifications(
        self,
        scope: str | None,
        since: int,
        workflow_id: str | None,
        include_delivered: bool,
        limit: int,
        reader: str,
    ) -> list[NotificationRecord]:
        params = {
            "scope": scope,
            "since": since,
            "workflow_id": workflow_id,
            "include_delivered": include_delivered,
            "limit": limit,
            "reader": reader,
        }
        rows = await self._fetchall(Q["list_notifications"], params)
        return [NotificationRecord(*row) for row in rows]

    # ---- schedules ---------------------------------------------------------------------------

    async def save_schedule(self, schedule: ScheduleRecord) -> None:
        async def tx(conn: AsyncConnection[Any]) -> None:
            await conn.execute(_PUT_SCHEDULE, _schedule_params(schedule))

        await self._run("saving a schedule", tx)

    async def update_schedule_if(self, schedule: ScheduleRecord, expected: datetime) -> bool:
        async def tx(conn: AsyncConnection[Any]) -> bool:
            cur = await conn.execute(
                _UPDATE_SCHEDULE_IF, {**_schedule_params(schedule), "expected": _utc(expected)}
            )
            return await cur.fetchone() is not None

        return await self._run("updating a schedule", tx)

    async def delete_schedule(self, schedule_id: str) -> bool:
        async def tx(conn: AsyncConnection[Any]) -> bool:
            cur = await conn.execute(Q["delete_schedule"], {"id": schedule_id})
            return await cur.fetchone() is not None

        return await self._run("deleting a schedule", tx)

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        row = await self._fetchone(Q["get_schedule"], {"id": schedule_id}, dicts=True)
        return None if row is None else _schedule_from(row)

    async def list_schedules(
        self, scope: str | None, limit: int, offset: int
    ) -> tuple[list[ScheduleRecord], int]:
        rows = await self._fetchall(
            Q["list_schedules"], {"scope": scope, "limit": limit, "offset": offset}, dicts=True
        )
        if rows:
            return [_schedule_from(r) for r in rows], int(rows[0]["total_rows"])
        row = await self._fetchone(Q["count_schedules_in"], {"scope": scope})
        return [], int(row[0])

    async def count_schedules(self) -> int:
        row = await self._fetchone(Q["count_schedules_in"], {"scope": None})
        return int(row[0])

    async def due_schedules(self, now: datetime, limit: int) -> list[ScheduleRecord]:
        rows = await self._fetchall(Q["due_schedules"], {"now": _utc(now), "limit": limit}, dicts=True)
        return [_schedule_from(r) for r in rows]

    async def next_due(self) -> datetime | None:
        row = await self._fetchone(Q["next_due"])
        return row[0] if row else None

    async def record_fire(
        self,
        fire: FireRecord,
        schedule: ScheduleRecord,
        workflow: WorkflowRecord | None,
        task: TaskRecord | None,
        expected: datetime,
    ) -> bool:
        """The fire key's primary key decides between schedulers: the one whose insert wins fires,
        the others roll back (and so does a scheduler holding an old copy of the row)."""
        committed = Committed()

        async def tx(conn: AsyncConnection[Any]) -> bool:
            cur = conn.cursor()
            fire_params = {
                "schedule_id": fire.schedule_id,
                "due_at": _utc(fire.due_at),
                "task_id": fire.task_id,
                "fired_at": _utc(fire.fired_at),
            }
            await cur.execute(Q["claim_fire"], fire_params)
            if await cur.fetchone() is None:
                raise _Abort
            await cur.execute(_UPDATE_SCHEDULE_IF, {**_schedule_params(schedule), "expected": _utc(expected)})
            if await cur.fetchone() is None:
                raise _Abort
            if task is not None:
                inserted, _ = await self._insert_tasks(cur, [workflow] if workflow else [], [task])
                committed.task_ids = {t.id for t in inserted}
                committed.workflow_ids = {t.workflow_id for t in inserted}
                await self._announce(cur, committed, work=bool(inserted))
            return True

        try:
            fired = await self._run("recording a schedule fire", tx)
        except _Abort:
            return False
        self._emit(committed)
        return fired

    async def schedule_tasks(self, schedule_id: str, limit: int, offset: int) -> tuple[list[TaskRecord], int]:
        rows = await self._fetchall(
            Q["schedule_tasks"], {"id": schedule_id, "limit": limit, "offset": offset}, dicts=True
        )
        if rows:
            return [_task_from(r) for r in rows], int(rows[0]["total_rows"])
        row = await self._fetchone(Q["count_schedule_tasks"], {"id": schedule_id})
        return [], int(row[0])

    async def count_rows(self) -> dict[str, int]:
        async def run(conn: AsyncConnection[Any]) -> dict[str, int]:
            counts = {}
            for table in _COUNTED_TABLES:
                cur = await conn.execute(f"SELECT count(*) FROM {table}")  # constant names, no input
                counts[table] = int((await cur.fetchone())[0])  # type: ignore[index]
            return counts

        return await self._read("counting rows", run)

    # ---- retention ---------------------------------------------------------------------------

    def _held_by_writes(self) -> set[str]:
        ids = self._pending.task_ids()
        for batch in [self._inflight, *self._carried]:
            if batch is not None:
                ids |= batch.task_ids()
        return ids

    async def purge_finished(
        self, before: datetime, keep: Callable[[], Collection[str]], batch_size: int
    ) -> tuple[PurgeCounts, int]:
        """Batches are short transactions of their own (rows locked SKIP LOCKED), so they run beside
        other processes' work without holding it up for more than a batch."""
        cutoff = _utc(before)
        total, batches = PurgeCounts(), 0
        while True:
            held = sorted(set(keep()) | self._held_by_writes())

            async def tx(conn: AsyncConnection[Any], held: list[str] = held) -> tuple[PurgeCounts, bool]:
                return await self._purge_batch(conn.cursor(), cutoff, held, batch_size)  # type: ignore[arg-type]

            counts, more = await self._run("a retention batch", tx)
            if counts.tasks or counts.notifications:
                total.add(counts)
                batches += 1
            if not more:
                return total, batches

    @staticmethod
    async def _purge_batch(
        cur: AsyncCursor[Any], cutoff: datetime, held: list[str], batch_size: int
    ) -> tuple[PurgeCounts, bool]:
        await cur.execute(Q["gc_batch"], {"cutoff": cutoff, "held": held, "limit": batch_size})
        rows = await cur.fetchall()
        ids = [row[0] for row in rows]
        counts = PurgeCounts()
        if ids:
            for counter, query in _GC_TASK_ROWS:
                await cur.execute(Q[query], {"ids": ids})
                setattr(counts, counter, getattr(counts, counter) + cur.rowcount)
            await cur.execute(Q["gc_delete_tasks"], {"ids": ids})
            counts.tasks = cur.rowcount
            await cur.execute(Q["gc_delete_workflows"], {"ids": sorted({row[1] for row in rows})})
            emptied = [row[0] for row in await cur.fetchall()]
            counts.workflows = len(emptied)
            if emptied:
                await cur.execute(Q["gc_delete_workflow_notifications"], {"ids": emptied})
                counts.notifications += cur.rowcount
        await cur.execute(Q["gc_delete_schedule_notices"], {"cutoff": cutoff, "limit": batch_size})
        notices = cur.rowcount
        counts.notifications += notices
        if counts.notifications:
            await cur.execute(Q["gc_delete_deliveries"])
        return counts, len(ids) == batch_size or notices == batch_size

    async def count_finished(self, before: datetime, keep: Collection[str]) -> PurgeCounts:
        held = sorted(set(keep) | self._held_by_writes())
        row = await self._fetchone(Q["gc_count"], {"cutoff": _utc(before), "held": held})
        return PurgeCounts(*map(int, row))

    async def checkpoint(self) -> bool:
        """Nothing to do: PostgreSQL's autovacuum makes deleted rows' space reusable."""
        return True

    async def disk_usage(self) -> DiskUsage:
        """The store's tables with their indexes; PostgreSQL's WAL and free space are the server's."""
        row = await self._fetchone(Q["disk_usage"])
        return DiskUsage(file_bytes=int(row[0]), wal_bytes=0, free_bytes=0)
