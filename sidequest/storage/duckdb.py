"""The embedded store: one DuckDB file, one writer, group commit.

DuckDB costs ~2-5 ms per statement whatever its size and aborts a
transaction when two writers touch one row. So exactly one writer task owns
every write; writes that arrive while a commit is in flight wait for the
next one and go in together, one statement per kind of write (task updates
coalesced so only the latest state of each task is written).
Reads run on per-thread cursors and never block the writer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from operator import attrgetter
from pathlib import Path
from typing import Any

import anyio
import duckdb

from sidequest.storage.base import (
    SCHEDULE_COLUMNS,
    TASK_MUTABLE_COLUMNS,
    AttemptRecord,
    Committed,
    DiskUsage,
    FireRecord,
    LoadedState,
    NotificationRecord,
    PurgeCounts,
    ResultRecord,
    ScheduleRecord,
    StoreError,
    StoreUnavailable,
    TaskEventRecord,
    TaskRecord,
    UsageRecord,
    UsageTotals,
    WorkflowQuery,
    WorkflowRecord,
)
from sidequest.storage.queries import load_queries

log = logging.getLogger(__name__)

LINGER = 0.005
"""Seconds background writes wait for a submit to commit first."""
MAX_DEFER = 0.05
"""Background writes are never held back longer than this."""
HELD_PAYLOAD_CHARS = 2048
"""At start, a queued task's prompt and options are loaded only when this small (else on its attempt)."""
LINGER_MAX_ROWS = 256
"""A batch this large is committed without lingering: throughput wins."""
JOURNAL_MAX_BYTES = 1 << 20
"""The attempt journal is emptied once it is this large and every start in it is committed."""

Q = load_queries("sidequest.storage", "duckdb.sql")

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str]]:
    """(version, sql) in order: schema.sql is version 1, then sidequest/migrations/NNNN_*.sql."""
    package = resources.files("sidequest")
    found = [(1, package.joinpath("schema.sql").read_text(encoding="utf-8"))]
    folder = package.joinpath("migrations")
    if folder.is_dir():
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            match = _MIGRATION_NAME.match(entry.name)
            if match:
                found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    return found


def _naive(value: datetime | None) -> datetime | None:
    """UTC-aware → naive UTC for a TIMESTAMP column."""
    if value is None or value.tzinfo is None:
        return value  # naive values are UTC already
    return value.astimezone(UTC).replace(tzinfo=None)


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


_TASK_COLUMNS = [f.name for f in TaskRecord.__dataclass_fields__.values()]  # type: ignore[attr-defined]
_TIME_FIELDS = {
    "created_at",
    "updated_at",
    "not_before",
    "next_attempt_at",
    "started_at",
    "finished_at",
    "lease_expires_at",
}


def _task_from_row(columns: Sequence[str], row: Sequence[Any]) -> TaskRecord:
    values = dict(zip(columns, row, strict=True))
    kwargs = {}
    for name in _TASK_COLUMNS:
        value = values[name]
        if name in _TIME_FIELDS:
            value = _aware(value)
        elif (
            name in ("options", "agent_snapshot") and value is not None
        ):  # None: options not held (live_tasks)
            value = json.loads(value) if isinstance(value, str) else value
        kwargs[name] = value
    return TaskRecord(**kwargs)


def _workflow_from_row(row: Sequence[Any]) -> WorkflowRecord:
    return WorkflowRecord(
        id=row[0],
        name=row[1],
        scope=row[2],
        status=row[3],
        created_at=_aware(row[4]),  # type: ignore[arg-type]
        updated_at=_aware(row[5]),  # type: ignore[arg-type]
        finished_at=_aware(row[6]),
    )


_CONVERT: dict[str, Callable[[Any], Any]] = {
    **dict.fromkeys(_TIME_FIELDS | {"recorded_at", "logged_at"}, _naive),
    "options": json.dumps,
    "sources": lambda sources: json.dumps(sources) if sources else None,
    "agent_snapshot": lambda snapshot: json.dumps(snapshot) if snapshot is not None else None,
}
"""Per-column conversion from a record's value to what the appender takes."""


class _Write:
    """One kind of write: its table, columns and appender action, and how a record becomes a row."""

    def __init__(
        self,
        table: str,
        columns: Sequence[str],
        action: str = "insert",
        key: str | None = None,
        source: Mapping[str, str] | None = None,
    ):
        """`source`: the record attribute a column is read from, where the names differ."""
        self.table, self.columns, self.action, self.key = table, tuple(columns), action, key
        self._get = attrgetter(*((source or {}).get(c, c) for c in self.columns))
        self._convert = [(i, _CONVERT[c]) for i, c in enumerate(self.columns) if c in _CONVERT]

    def rows(self, items: Sequence[Any], are_tuples: bool = False) -> list[tuple[Any, ...]]:
        """Records (or tuples already in column order) → rows."""
        rows = []
        for item in items:
            row = list(item if are_tuples else self._get(item))
            for i, convert in self._convert:
                row[i] = convert(row[i])
            rows.append(tuple(row))
        return rows


_WRITES: dict[str, _Write] = {
    "workflows_new": _Write("workflow_executions", ("id", "name", "scope", "created_at")),
    "tasks_new": _Write(
        "task_executions",
        (
            "id",
            "seq",
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
            "project",
            "queue",
            "agent_snapshot",
            "agent_limit",
        ),
    ),
    "task_updates": _Write("task_executions", TASK_MUTABLE_COLUMNS, "update", "id"),
    # upsert: a key whose window ran out may be used again before the purge removed its row
    "idempotency_keys": _Write("idempotency_keys", ("scope", "key", "task_id", "created_at"), "upsert"),
    "attempts": _Write(
        "task_attempts", ("task_id", "attempt", "status", "started_at", "finished_at", "error", "worker_id")
    ),
    # a task completes once: its result and its completion share one commit, so plain insert
    "results": _Write(
        "task_results", ("task_id", "content_type", "content", "size_chars", "created_at", "sources")
    ),
    "notifications": _Write(
        "notifications", ("cursor", "kind", "task_id", "workflow_id", "scope", "message", "created_at")
    ),
    "usage": _Write(
        "token_usage",
        (
            "task_id",
            "attempt",
            "model",
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "cost_usd",
            "recorded_at",
        ),
    ),
    "task_events": _Write(
        "task_events",
        ("task_id", "seq", "logged_at", "attempt", "kind", "message", "data"),
        # the text TaskLog made when it checked the entry, not serialised again
        source={"data": "data_json"},
    ),
}


@dataclass(eq=False)
class _Waiter:
    """Someone waiting for a write to be durable, and what became of it."""

    event: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None

    def done(self, error: BaseException | None) -> None:
        self.error = error
        self.event.set()


@dataclass
class _Pending:
    """Writes waiting for the next group commit."""

    workflows_new: list[WorkflowRecord] = field(default_factory=list)
    tasks_new: list[TaskRecord] = field(default_factory=list)
    task_updates: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    touched_workflows: set[str] = field(default_factory=set)
    attempts: list[AttemptRecord] = field(default_factory=list)
    results: list[ResultRecord] = field(default_factory=list)
    notifications: list[NotificationRecord] = field(default_factory=list)
    usage: list[UsageRecord] = field(default_factory=list)
    task_events: list[TaskEventRecord] = field(default_factory=list)
    delivered: list[tuple[str, list[int], datetime]] = field(default_factory=list)
    """(reader, cursors it has had, when): see mark_delivered."""
    waiters: list[_Waiter] = field(default_factory=list)
    flush_requested: bool = False
    error: BaseException | None = None
    starts_upto: int = 0
    """The number of the newest attempt start (see attempt_started) whose running mark is here."""

    def describe(self) -> str:
        kinds = [(name, len(items)) for name, items in self.appends()]
        if self.delivered:
            kinds.append(("delivery marks", len(self.delivered)))
        return ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in kinds) or "nothing"

    def _background(self) -> tuple[Sized, ...]:
        """Everything but new tasks: the writes nobody waits for."""
        return (
            self.workflows_new,
            self.task_updates,
            self.attempts,
            self.results,
            self.notifications,
            self.usage,
            self.task_events,
            self.delivered,
        )

    def has_background(self) -> bool:
        return any(self._background())

    def background_rows(self) -> int:
        return sum(map(len, self._background()))

    def appends(self) -> list[tuple[str, Sequence[Any]]]:
        """(kind of write, its items) for every non-empty kind, in commit order."""
        keys = [(t.scope, t.idempotency_key, t.id, t.created_at) for t in self.tasks_new if t.idempotency_key]
        kinds: list[tuple[str, Sequence[Any]]] = [
            ("workflows_new", self.workflows_new),
            ("tasks_new", self.tasks_new),
            ("idempotency_keys", keys),
            ("task_updates", list(self.task_updates.values())),
            ("attempts", self.attempts),
            ("results", self.results),
            ("notifications", self.notifications),
            ("usage", self.usage),
            ("task_events", self.task_events),
        ]
        return [(name, items) for name, items in kinds if items]

    def split_urgent(self) -> tuple[_Pending, _Pending]:
        """(new tasks and their waiters, everything else)."""
        urgent = _Pending(tasks_new=self.tasks_new, waiters=self.waiters)
        rest = _Pending(
            workflows_new=self.workflows_new,
            task_updates=self.task_updates,
            touched_workflows=self.touched_workflows,
            attempts=self.attempts,
            results=self.results,
            notifications=self.notifications,
            usage=self.usage,
            task_events=self.task_events,
            delivered=self.delivered,
            starts_upto=self.starts_upto,
        )
        return urgent, rest

    def absorb(self, newer: _Pending) -> None:
        """Append writes that arrived later; for a task, its newer state wins."""
        self.workflows_new += newer.workflows_new
        self.tasks_new += newer.tasks_new
        self.task_updates.update(newer.task_updates)
        self.touched_workflows |= newer.touched_workflows
        self.attempts += newer.attempts
        self.results += newer.results
        self.notifications += newer.notifications
        self.usage += newer.usage
        self.task_events += newer.task_events
        self.delivered += newer.delivered
        self.waiters += newer.waiters
        self.flush_requested = self.flush_requested or newer.flush_requested
        self.starts_upto = max(self.starts_upto, newer.starts_upto)

    def empty(self) -> bool:
        return not (self.tasks_new or self.waiters or self.has_background())


class AttemptJournal:
    """Attempt starts, made durable against a crash of this process before an executor runs.

    A DuckDB commit costs milliseconds; a crash-safe start must not. One `write` to an
    append-only file costs microseconds and survives the process dying (the kernel holds the
    page; it is the process, not the machine, that a crashing agent takes down). At the next
    open, a start found here but not in its row is applied to the loaded row as `running`, so
    the engine counts that attempt as lost. Applying a line twice changes nothing (only a start
    newer than the row counts), so the file need only be emptied now and then.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.size = 0

    def read(self) -> dict[str, tuple[int, datetime]]:
        """task id -> (latest attempt number started, when)."""
        try:
            text = self.path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return {}
        starts: dict[str, tuple[int, datetime]] = {}
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) != 3:
                continue  # a torn last line: its attempt never ran past the write
            try:
                attempt, at = int(parts[1]), datetime.fromisoformat(parts[2])
            except ValueError:
                continue
            if attempt > starts.get(parts[0], (0, at))[0]:
                starts[parts[0]] = (attempt, at)
        return starts

    def open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = os.fstat(self._fd).st_size

    def append(self, task_id: str, attempt: int, at: datetime) -> None:
        if self._fd is None:
            return
        line = f"{task_id}\t{attempt}\t{at.isoformat()}\n".encode()
        os.write(self._fd, line)  # one small O_APPEND write: whole or absent
        self.size += len(line)

    def clear(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            self.size = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---- opening a file that may not be what it should be ------------------------

_CONNECT_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
"""DuckDB, handed a file it does not recognise (a SQLite file, say), would otherwise download and
load an extension to read it: a store must never reach the network or run code it fetched."""

_SQLITE_MAGIC = b"SQLite format 3\x00"
_WAL_FLUSH = b"\x64\x00\x64\xff\xff"
"""A DuckDB 2.x log entry that ends a commit: field 100 (the entry type) = 100 (WAL_FLUSH), end."""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _narrow_mode(path: Path) -> None:
    """Take group and other access away from a store file we own (one from an older version)."""
    with contextlib.suppress(OSError):
        info = path.stat()
        if info.st_uid == os.geteuid() and info.st_mode & 0o077:
            path.chmod(stat.S_IMODE(info.st_mode) & 0o700)


def _check_store_path(path: Path) -> None:
    """Refuse, in one line naming the file, what DuckDB would refuse with a traceback or not at all.

    A read-only folder is caught here because DuckDB would open the file and fail only at the
    first write, when it creates `<file>.wal` next to it: the daemon would start and then lose
    every submit.
    """
    folder = path.parent
    uid = os.geteuid()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreError(
            f"cannot create {folder}, the folder of the store {path}: {exc.strerror or exc}; "
            "point `database` (or SIDEQUEST_HOME) at a folder this user can write"
        ) from exc
    if path.is_dir():
        raise StoreError(f"{path} is a folder, not a database file; point `database` at a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(
            f"{folder} is not writable by this user (uid {uid}), and DuckDB writes {path.name}.wal there "
            f"next to the store {path}; make the folder writable, or point `database` (or SIDEQUEST_HOME) "
            "elsewhere"
        )
    for name in (path, path.with_name(path.name + ".wal")):
        if name.exists() and not os.access(name, os.R_OK | os.W_OK):
            raise StoreError(
                f"{name} is not readable and writable by this user (uid {uid}), and sidequest writes to its "
                f"store; give this user read and write access (chmod u+rw {name}) or point `database` "
                "elsewhere"
            )
    if not path.exists():
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head == _SQLITE_MAGIC:
        raise StoreError(
            f"{path} is a SQLite database, not a sidequest (DuckDB) store; point `database` (or "
            "SIDEQUEST_HOME) at another file"
        )
    _narrow_mode(path)
    _narrow_mode(path.with_name(path.name + ".wal"))


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError: the data ends inside the number
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _wal_header_end(data: bytes) -> int | None:
    """The end of a DuckDB 2.x log's unframed version entry; None for a log this code does not know.

    The entry is (u16 field id, value)* up to field 0xFFFF: 100 = entry type (98, WAL_VERSION),
    101 = log version (2: framed and checksummed), optionally 102 = the database id (a list)
    and 103 = the checkpoint iteration. IndexError: the log ends inside it.
    """

    def field(at: int) -> tuple[int, int]:
        if at + 2 > len(data):
            raise IndexError("log ends in its header")
        return int.from_bytes(data[at : at + 2], "little"), at + 2

    fid, pos = field(0)
    kind, pos = _varint(data, pos) if fid == 100 else (None, pos)
    fid, pos = field(pos)
    version, pos = _varint(data, pos) if fid == 101 else (None, pos)
    if kind != 98 or version != 2:
        return None
    fid, pos = field(pos)
    if fid == 102:
        count, pos = _varint(data, pos)
        for _ in range(count):
            _, pos = _varint(data, pos)
        fid, pos = field(pos)
    if fid == 103:
        _, pos = _varint(data, pos)
        fid, pos = field(pos)
    return pos if fid == 0xFFFF else None


def _torn_wal(path: Path) -> str | None:
    """A warning when the store's log ends in a write DuckDB will silently skip; else None.

    DuckDB 2.x replays a log entry by entry and commits at each flush marker; an entry that runs
    past the end of the file (a torn write, or a damaged length) ends the replay without an
    error, and everything from there on is dropped (and truncated at the next write). A bad
    checksum is an error instead, which `open` reports. So the log is read here first, by its
    framing (u64 length, u64 checksum, entry), to say what DuckDB is about to drop.

    What this cannot see: a log cut exactly at the end of a commit looks like a shorter, intact
    log; and when a damaged length ends the replay early, whole commits after it are lost too
    but cannot be counted (the framing after a bad length is unreadable).
    """
    wal = path.with_name(path.name + ".wal")
    try:
        data = wal.read_bytes()
    except OSError:
        return None
    if not data:
        return None
    try:
        pos = _wal_header_end(data)
    except (IndexError, ValueError):
        pos = 0  # the log ends inside its own header: nothing in it can be replayed
    else:
        if pos is None:
            log.debug("%s: not a DuckDB 2.x log this code can read; not checked for a torn end", wal)
            return None
    committed = pos
    while pos + 16 <= len(data):
        size = int.from_bytes(data[pos : pos + 8], "little")
        if pos + 16 + size > len(data):
            break
        entry = data[pos + 16 : pos + 16 + size]
        pos += 16 + size
        if entry == _WAL_FLUSH:
            committed = pos
    if committed == len(data):
        return None
    return (
        f"{wal} ends in an incomplete write: its last {len(data) - committed} of {len(data)} bytes (from "
        f"byte {committed}) hold no complete commit, so DuckDB skips them and whatever sidequest was "
        "writing when it stopped is lost; writes it had confirmed are kept unless the disk lost or "
        "damaged them, so check the tasks submitted just before it stopped"
    )


def _open_failure(path: Path, exc: duckdb.Error) -> str:
    """DuckDB's reason a file cannot be opened, as one line naming the file and what to do."""
    text = str(exc)
    detail = _first_line(exc)
    wal = path.with_name(path.name + ".wal")
    if "lock" in text.lower():
        return (
            f"{path} is in use by another process (DuckDB allows one writer per file); "
            "stop the other sidequest process or point SIDEQUEST_HOME elsewhere"
        )
    if "WAL" in text:
        detail = detail.split('": ', 1)[-1]
        return (
            f"{wal}, the write-ahead log of {path}, is damaged ({detail}); sidequest will not guess which "
            f"writes to drop: move {wal.name} aside to open the store as of its last checkpoint (the writes "
            "in that log are then lost), or restore both files from a backup"
        )
    if "not a valid DuckDB database file" in text:
        return (
            f"{path} is not a DuckDB database (empty, damaged, or another program's file); move it aside "
            "to start with an empty store, or point `database` (or SIDEQUEST_HOME) at another file"
        )
    if "Could not read enough bytes" in text or "truncated" in text.lower():
        return (
            f"{path} is truncated or damaged ({detail}); restore it from a backup, or move it (and "
            f"{wal.name}, if any) aside to start with an empty store"
        )
    if "Permission denied" in text or "Read-only file system" in text:
        return (
            f"{path} cannot be written by this user ({detail}); make the file and its folder writable, "
            "or point `database` (or SIDEQUEST_HOME) elsewhere"
        )
    return f"cannot open {path}: {detail}"


@functools.cache
def _expected_columns() -> dict[str, dict[str, str]]:
    """{table or view: {column: type}} as the migrations create them (built once, in memory)."""
    con = duckdb.connect(":memory:", config=_CONNECT_CONFIG)
    try:
        con.execute(Q["create_schema_version"])
        for _, sql in migrations():
            con.execute(sql)
        return _columns(con)
    finally:
        con.close()


def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for table, column, kind in con.execute(Q["store_columns"]).fetchall():
        found.setdefault(table, {})[column] = kind
    return found


def _schema_differences(con: duckdb.DuckDBPyConnection) -> list[str]:
    """What the file lacks or types differently from the schema the migrations made; extras are allowed."""
    have = _columns(con)
    problems = []
    for table, columns in _expected_columns().items():
        if table not in have:
            problems.append(f"no {table}")
            continue
        missing = [c for c in columns if c not in have[table]]
        retyped = [
            f"{c} is {have[table][c]}, not {t}" for c, t in columns.items() if have[table].get(c, t) != t
        ]
        if missing:
            problems.append(f"{table} lacks {', '.join(missing)}")
        if retyped:
            problems.append(f"in {table}, {'; '.join(retyped)}")
    return problems


class DuckDBStore:
    """The store for one DuckDB file, owned by this process alone."""

    shared = False

    def __init__(self, path: Path | str, *, attempt_journal: bool = True) -> None:
        """`attempt_journal=False` only to measure what the journal costs (bench.engine_bench):
        without it a crash right after an attempt starts is not counted against its task."""
        self.path = Path(path)
        self._journal_on = attempt_journal
        self._con: duckdb.DuckDBPyConnection | None = None
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._cursors_lock = threading.Lock()
        self._pending = _Pending()
        self._has_work = anyio.Event()
        self._inflight: _Pending | None = None
        self._urgent = anyio.Event()
        self._deferred_since: float | None = None
        self._deferred_workflows: list[WorkflowRecord] = []
        self._inflight_done: anyio.Event | None = None
        self._writer_limiter = anyio.CapacityLimiter(1)
        self._on_commit: Callable[[Committed], None] | None = None
        self._writer_running = False
        self._appenders: dict[str, Any] = {}
        self._failure: StoreUnavailable | None = None
        self._failure_handler: Callable[[StoreUnavailable], None] | None = None
        self._journal = AttemptJournal(self.path.with_name(self.path.name + ".attempts"))
        self._starts_enqueued = 0
        self._starts_committed = 0
        self._stopped_clean = False
        """The writer ended with everything committed: only then may close() empty the journal."""

    # ---- lifecycle -------------------------------------------------------

    def open(self) -> LoadedState:
        """Open (or create) the file, bring its schema up to date, and read what the engine needs.

        Every way the file can be unusable (damaged, truncated, another program's, read-only,
        locked) is a StoreError whose one line names the file and what to do.
        """
        _check_store_path(self.path)
        torn = _torn_wal(self.path)  # before DuckDB replays the log and later truncates its torn end
        try:
            self._con = duckdb.connect(str(self.path), config=_CONNECT_CONFIG)
        except duckdb.Error as exc:
            raise StoreError(_open_failure(self.path, exc)) from exc
        if torn:
            log.warning("%s", torn)
        try:
            self._migrate()
            state = self._load_state()
        except StoreError:
            self.close()
            raise
        except duckdb.Error as exc:
            self.close()
            raise StoreError(
                f"{self.path}: cannot read sidequest's tables ({_first_line(exc)}); the file is damaged or "
                "was changed by another program: restore it from a backup, or move it aside to start "
                "with an empty store"
            ) from exc
        self._apply_journal(state)
        if self._journal_on:
            self._journal.open()
        return state

    def _apply_journal(self, state: LoadedState) -> None:
        """Starts the crashed process journaled but never committed become `running` rows, so
        the engine's recovery counts them as lost attempts of the task that was running."""
        starts = self._journal.read()
        if not starts:
            return
        # The recovery the engine writes next counts as a start: the journal is kept until it commits.
        self._starts_enqueued = 1
        self._pending.starts_upto = 1
        for task in state.live_tasks:
            found = starts.get(task.id)
            if found is not None and found[0] > task.attempts:
                task.attempts, task.started_at = found[0], found[1]
                task.status, task.worker_id, task.lease_expires_at = "running", None, None

    def close(self) -> None:
        if self._stopped_clean and self._failure is None and self._pending.empty() and self._con is not None:
            self._journal.clear()  # a clean stop: every start in it and every recovery is committed
        self._stopped_clean = False
        self._journal.close()
        self._appenders.clear()
        with self._cursors_lock:
            for cursor in self._cursors:
                with contextlib.suppress(duckdb.Error):
                    cursor.close()
            self._cursors.clear()
        if self._con is not None:
            self._con.close()
            self._con = None

    def _migrate(self) -> None:
        """Apply the missing schema versions, never to a file that is not (yet) a sidequest store.

        A file with tables but no recorded version belongs to someone else: "migrating" it would
        write our tables into their database, so it is refused. After migrating, the tables must
        have the columns the migrations make (a same-named table of another program would
        otherwise fail later, mid-request).
        """
        con = self._require()
        tables = sorted(name for (name,) in con.execute(Q["store_tables"]).fetchall())
        foreign = [name for name in tables if name != "schema_version"]
        not_ours = (
            f"{self.path} holds tables ({', '.join(tables[:5])}{', …' if len(tables) > 5 else ''}) but no "
            "sidequest schema version: it is not a sidequest database, and sidequest leaves it alone; "
            "point `database` (or SIDEQUEST_HOME) at another file"
        )
        if foreign and "schema_version" not in tables:
            raise StoreError(not_ours)
        if "schema_version" in tables:  # many programs keep a table of that name: is it ours?
            theirs = _columns(con).get("schema_version")
            if theirs != _expected_columns()["schema_version"]:
                raise StoreError(not_ours)
        con.execute(Q["create_schema_version"])
        try:
            current = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]  # type: ignore[index]
        except duckdb.Error as exc:
            raise StoreError(not_ours) from exc
        if current == 0 and foreign:
            raise StoreError(not_ours)
        available = migrations()
        newest = available[-1][0]
        if current > newest:
            raise StoreError(
                f"{self.path} has schema version {current}, newer than this sidequest understands "
                f"(up to {newest}); upgrade sidequest or use another data dir"
            )
        for version, sql in available:
            if version <= current:
                continue
            con.execute("BEGIN")
            try:
                con.execute(sql)
                con.execute("INSERT INTO schema_version VALUES (?, ?)", [version, _naive(datetime.now(UTC))])
                con.execute("COMMIT")
            except duckdb.Error as exc:
                con.execute("ROLLBACK")
                raise StoreError(
                    f"{self.path}: upgrading to schema version {version} failed ({_first_line(exc)}); "
                    "that version was rolled back: restore the file if it was edited by hand, or report this"
                ) from exc
            log.info("applied schema version %d to %s", version, self.path)
        problems = _schema_differences(con)
        if problems:
            raise StoreError(
                f"{self.path} has sidequest schema version {newest} but not its tables "
                f"({'; '.join(problems[:4])}): it was changed outside sidequest; restore it from a backup "
                "or point `database` (or SIDEQUEST_HOME) at another file"
            )

    def schema_version(self) -> int:
        row = self._require().execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _load_state(self) -> LoadedState:
        con = self._require()
        con.execute(Q["recreate_orphan_workflows"])
        cur = con.execute(Q["live_tasks"], [HELD_PAYLOAD_CHARS])
        columns = [d[0] for d in cur.description]  # type: ignore[union-attr]
        live = [_task_from_row(columns, row) for row in cur.fetchall()]
        keys = [
            (str(scope), str(key), str(task_id), _aware(finished))
            for scope, key, task_id, finished in con.execute(Q["idempotency_keys"]).fetchall()
        ]
        max_seq = con.execute(Q["max_seq"]).fetchone()[0]  # type: ignore[index]
        max_cursor = con.execute(Q["max_cursor"]).fetchone()[0]  # type: ignore[index]
        workflows = {row[0]: _workflow_from_row(row) for row in con.execute(Q["live_workflows"]).fetchall()}
        counts: dict[str, dict[str, int]] = {wid: {} for wid in workflows}
        for wid, status, n in con.execute(Q["counts_for_running_workflows"]).fetchall():
            counts.setdefault(wid, {})[status] = int(n)
        return LoadedState(live, int(max_seq), int(max_cursor), workflows, counts, keys)

    def _require(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise StoreError("the store is not open")
        return self._con

    # ---- writes ----------------------------------------------------------

    async def run_writer(self, on_commit: Callable[[Committed], None]) -> None:
        """The one writer. A submit waits for the disk; everything else may wait a little.

        Background writes (running marks, progress, completions) linger up to
        LINGER seconds for a submit to go first, and when a batch holds new
        tasks as well as background writes, the tasks are committed alone and
        the rest goes back to the queue — for at most MAX_DEFER seconds, after
        which it is committed whatever arrives. So `task_async` pays for one
        small statement, not for the completion writes of the task before it.
        """
        self._writer_running = True
        self._stopped_clean = False
        self._on_commit = on_commit
        try:
            while True:
                await self._has_work.wait()
                self._has_work = anyio.Event()
                if self._should_linger():
                    with anyio.move_on_after(LINGER):
                        await self._urgent.wait()
                self._urgent = anyio.Event()
                batch, self._pending = self._pending, _Pending()
                if batch.empty():
                    continue
                split = batch.tasks_new and not batch.flush_requested and batch.has_background()
                if split and self._may_defer():
                    urgent, rest = batch.split_urgent()
                    if not await self._commit_batch(urgent, on_commit, whole=False):
                        return
                    rest.absorb(self._pending)
                    self._pending = rest
                    if self._deferred_since is None:
                        self._deferred_since = time.monotonic()
                    self._wake()
                    continue
                if not await self._commit_batch(batch, on_commit):
                    return  # fail-stop: nothing after the first failed commit is written
                if batch.has_background():
                    self._deferred_since = None
        finally:
            self._writer_running = False
            batch, self._pending = self._pending, _Pending()
            if self._failure is None:
                # Anything still pending is written now so a clean stop loses nothing: under the
                # writer's limiter (a direct write may still be running on this connection) and
                # shielded (we are most likely here because we were cancelled).
                batch.workflows_new.extend(self._deferred_workflows)
                self._deferred_workflows = []
                with anyio.CancelScope(shield=True):
                    if not batch.empty() and self._con is not None:
                        try:
                            await anyio.to_thread.run_sync(self._commit, batch, limiter=self._writer_limiter)
                        except Exception as exc:
                            batch.error = self._fail(
                                exc, f"the final commit at shutdown ({batch.describe()})"
                            )
                if self._failure is None:
                    self._stopped_clean = True
            for waiter in batch.waiters:
                waiter.done(self._failure)

    def _may_defer(self) -> bool:
        return self._deferred_since is None or time.monotonic() - self._deferred_since < MAX_DEFER

    def _should_linger(self) -> bool:
        pending = self._pending
        return (
            LINGER > 0
            and not pending.tasks_new
            and not pending.waiters
            and pending.background_rows() < LINGER_MAX_ROWS
            and self._may_defer()
        )

    async def _commit_batch(
        self, batch: _Pending, on_commit: Callable[[Committed], None], whole: bool = True
    ) -> bool:
        """Commit one batch; False when it failed (the store is then fail-stop).

        `whole` is False for the new tasks of a split batch: its other writes are still held."""
        done = anyio.Event()
        self._inflight, self._inflight_done = batch, done
        committed: Committed | None = None
        try:
            # Shielded, limiter included: a batch taken from pending is committed or failed, never
            # dropped by a cancellation that would then wake its waiters as if it were durable.
            with anyio.CancelScope(shield=True):
                committed = await anyio.to_thread.run_sync(self._commit, batch, limiter=self._writer_limiter)
        except Exception as exc:
            batch.error = self._fail(exc, f"a group commit of {batch.describe()}")
        finally:
            self._inflight, self._inflight_done = None, None
            if self._failure is None:
                self._undefer()
            done.set()
            for waiter in batch.waiters:
                waiter.done(batch.error)
        if committed is not None:
            if whole:
                self._starts_committed = max(self._starts_committed, batch.starts_upto)
            if self._journal.size > JOURNAL_MAX_BYTES and self._starts_committed == self._starts_enqueued:
                # Every start journaled so far is in a committed row: background writes commit in
                # order (a deferred rest is absorbed into the next batch), so this holds under load.
                self._journal.clear()
            try:
                on_commit(committed)
            except Exception:
                log.exception("on_commit listener failed")
        return committed is not None

    # ---- fail-stop -------------------------------------------------------

    @property
    def failure(self) -> StoreUnavailable | None:
        return self._failure

    def on_failure(self, handler: Callable[[StoreUnavailable], None]) -> None:
        self._failure_handler = handler

    def _fail(self, exc: BaseException, during: str) -> StoreUnavailable:
        """The first failed write stops the store: after it DuckDB may have invalidated the
        database, and a later commit that "succeeds" may still be lost. So nobody is told a write
        succeeded after this point: every waiter gets the error, background writes are dropped
        (their tasks run again after the restart), and the engine is told to stop."""
        if self._failure is not None:
            return self._failure
        reason = " ".join(str(exc).split()) or type(exc).__name__
        self._failure = StoreUnavailable(
            f"the store {self.path} failed during {during}: {reason}. Nothing is acknowledged after "
            "this; sidequest stops, and the next start recovers every acknowledged task "
            "(free disk space first if the disk is full)"
        )
        log.critical("%s", self._failure)
        pending, self._pending = self._pending, _Pending()
        self._deferred_workflows = []
        for waiter in pending.waiters:
            waiter.done(self._failure)
        if self._failure_handler is not None:
            try:
                self._failure_handler(self._failure)
            except Exception:
                log.exception("the store failure handler failed")
        return self._failure

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _undefer(self) -> None:
        """Workflow rows follow their first task's commit (see insert)."""
        if self._deferred_workflows:
            self._pending.workflows_new.extend(self._deferred_workflows)
            self._deferred_workflows = []
            self._wake()

    def _wake(self) -> None:
        self._has_work.set()

    def _waiter(self, flush: bool) -> _Waiter:
        """A waiter in the batch now pending: every write enqueued so far commits with it or before.

        `flush` keeps the batch whole (no early commit of its new tasks alone), so the waiter is
        only woken once every write in it is durable."""
        self._check()
        waiter = _Waiter()
        pending = self._pending
        pending.waiters.append(waiter)
        pending.flush_requested = pending.flush_requested or flush
        self._urgent.set()
        self._wake()
        return waiter

    async def _wait(self, waiter: _Waiter) -> None:
        if not self._writer_running:
            # No writer task (tests of the store alone, or shutdown): commit inline.
            batch, self._pending = self._pending, _Pending()
            batch.workflows_new.extend(self._deferred_workflows)
            self._deferred_workflows = []
            try:
                await anyio.to_thread.run_sync(self._commit, batch, limiter=self._writer_limiter)
                self._starts_committed = max(self._starts_committed, batch.starts_upto)
            except Exception as exc:
                batch.error = self._fail(exc, f"a commit of {batch.describe()}")
            for other in batch.waiters:
                other.done(batch.error)
        await waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error

    async def sync(self) -> None:
        """Wait until every write enqueued so far is durable (an attempt's start, before it runs)."""
        await self._wait(self._waiter(flush=True))

    async def insert(self, workflows: Sequence[WorkflowRecord], tasks: Sequence[TaskRecord]) -> None:
        """Wait only for the task rows; new workflow rows ride the next commit.

        That keeps one statement off the path `task_async` waits on. A crash in
        between leaves tasks without their workflow row; `open()` recreates it
        from the tasks (`orphan_workflows`).
        """
        self._check()
        pending = self._pending
        pending.tasks_new.extend(tasks)
        if self._writer_running:
            self._deferred_workflows.extend(workflows)
        else:
            pending.workflows_new.extend(workflows)
        await self._wait(self._waiter(flush=False))

    # Background writes after a failure are dropped: the process is stopping, and the restart
    # runs their tasks again from the last durable state.

    def attempt_started(self, task: TaskRecord) -> None:
        self.update_task(task)
        self._starts_enqueued += 1
        self._pending.starts_upto = self._starts_enqueued
        if self._failure is None:
            try:
                self._journal.append(task.id, task.attempts, task.started_at or datetime.now(UTC))
            except OSError as exc:  # disk full, I/O error: the start is not crash-safe
                self._fail(exc, f"writing the attempt journal {self._journal.path}")

    def update_task(self, task: TaskRecord) -> None:
        if self._failure is not None:
            return
        self._pending.task_updates[task.id] = task.mutable_state()
        self._pending.touched_workflows.add(task.workflow_id)
        self._wake()

    def add_attempt(self, attempt: AttemptRecord) -> None:
        if self._failure is not None:
            return
        self._pending.attempts.append(attempt)
        self._wake()

    def add_result(self, result: ResultRecord) -> None:
        if self._failure is not None:
            return
        self._pending.results.append(result)
        self._wake()

    def add_notification(self, notification: NotificationRecord) -> None:
        if self._failure is not None:
            return
        self._pending.notifications.append(notification)
        self._wake()

    def add_usage(self, usage: UsageRecord) -> None:
        if self._failure is not None:
            return
        self._pending.usage.append(usage)
        self._wake()

    def add_task_event(self, event: TaskEventRecord) -> None:
        if self._failure is not None:
            return
        self._pending.task_events.append(event)
        self._wake()

    def mark_delivered(self, reader: str, cursors: Sequence[int], at: datetime) -> None:
        if cursors and self._failure is None:
            self._pending.delivered.append((reader, list(cursors), at))
            self._wake()

    async def flush(self) -> None:
        self._check()
        while not self._pending.empty() or self._deferred_workflows or self._inflight_done is not None:
            if not self._pending.empty():
                await self._wait(self._waiter(flush=True))
            elif self._inflight_done is not None:
                await self._inflight_done.wait()
                self._check()
            else:
                self._undefer()
        self._check()

    def _appender(self, name: str) -> Any:
        """Appenders are DuckDB's cheapest write path: one per kind of write, reused across commits."""
        appender = self._appenders.get(name)
        if appender is None:
            write = _WRITES[name]
            kwargs: dict[str, Any] = {"columns": list(write.columns), "action": write.action}
            if write.key:
                kwargs["key"] = [write.key]
            appender = self._require().appender(write.table, **kwargs)
            self._appenders[name] = appender
        return appender

    def _append(self, name: str, items: Sequence[Any]) -> None:
        appender = self._appender(name)
        try:
            tuples = name in ("task_updates", "idempotency_keys")
            appender.append_rows(_WRITES[name].rows(items, are_tuples=tuples))
            appender.flush()
        except BaseException:
            self._appenders.pop(name, None)  # a failed appender may hold rows; start afresh
            raise

    def _commit(self, batch: _Pending) -> Committed:
        """Runs on the writer thread: one transaction, one append per kind of write."""
        con = self._require()
        appends = batch.appends()
        # one statement commits on its own; BEGIN/COMMIT would cost ~0.6 ms more
        explicit = len(appends) + len(batch.delivered) > 1
        if explicit:
            con.execute("BEGIN")
        try:
            for name, items in appends:
                self._append(name, items)
            for reader, cursors, at in batch.delivered:
                con.execute(Q["mark_delivered"], [reader, cursors, _naive(at)])
            if explicit:
                con.execute("COMMIT")
        except BaseException:
            if explicit:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
            raise
        committed = Committed(notifications=list(batch.notifications), task_events=list(batch.task_events))
        committed.task_ids.update(t.id for t in batch.tasks_new)
        committed.task_ids.update(batch.task_updates)
        committed.workflow_ids.update(w.id for w in batch.workflows_new)
        committed.workflow_ids.update(batch.touched_workflows)
        return committed

    # ---- reads -----------------------------------------------------------

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._require().cursor()
            self._local.cursor = cursor
            with self._cursors_lock:
                self._cursors.append(cursor)
        return cursor

    async def _read(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        def run() -> Any:
            cursor = self._cursor()
            try:
                return fn(cursor)
            finally:
                # A result read with fetchone() stays open, and so does its transaction, until the
                # thread's cursor runs its next statement. An open transaction older than an update
                # blocks every checkpoint, DuckDB's automatic ones included, so the WAL grew without
                # bound. Draining what is left (nothing, for the reads here) ends it.
                with contextlib.suppress(duckdb.Error):
                    cursor.fetchall()

        self._check()
        try:
            return await anyio.to_thread.run_sync(run)
        except duckdb.Error as exc:
            if "invalidated" in str(exc):  # DuckDB gave up on the file after a failed write
                raise self._fail(exc, "a read") from exc
            raise

    async def get_task(self, task_id: str) -> TaskRecord | None:
        def run(cur: duckdb.DuckDBPyConnection) -> TaskRecord | None:
            result = cur.execute(Q["get_task"], [task_id])
            row = result.fetchone()
            if row is None:
                return None
            return _task_from_row([d[0] for d in result.description], row)  # type: ignore[union-attr]

        return await self._read(run)

    async def get_tasks(self, workflow_id: str) -> list[TaskRecord]:
        def run(cur: duckdb.DuckDBPyConnection) -> list[TaskRecord]:
            result = cur.execute(Q["get_tasks_of_workflow"], [workflow_id])
            columns = [d[0] for d in result.description]  # type: ignore[union-attr]
            return [_task_from_row(columns, row) for row in result.fetchall()]

        return await self._read(run)

    async def get_attempts(self, task_id: str) -> list[AttemptRecord]:
        def run(cur: duckdb.DuckDBPyConnection) -> list[AttemptRecord]:
            rows = cur.execute(Q["get_attempts"], [task_id]).fetchall()
            return [
                AttemptRecord(r[0], r[1], r[2], _aware(r[3]), _aware(r[4]), r[5], r[6])  # type: ignore[arg-type]
                for r in rows
            ]

        return await self._read(run)

    async def get_payload(self, task_id: str) -> tuple[str, dict[str, Any]] | None:
        row = await self._read(lambda cur: cur.execute(Q["task_payload"], [task_id]).fetchone())
        if row is None:
            return None
        options = json.loads(row[1]) if isinstance(row[1], str) else (row[1] or {})
        return str(row[0]), options

    async def purge_idempotency_keys(self, finished_before: datetime) -> int:
        def run(con: duckdb.DuckDBPyConnection) -> int:
            return len(con.execute(Q["purge_idempotency_keys"], [_naive(finished_before)]).fetchall())

        return await self._write(run)

    async def get_result_size(self, task_ids: Sequence[str]) -> dict[str, int]:
        if not task_ids:
            return {}
        ids = list(task_ids)
        rows = await self._read(lambda cur: cur.execute(Q["result_sizes"], [ids]).fetchall())
        return {r[0]: int(r[1]) for r in rows}

    async def get_result_page(
        self, task_id: str, offset: int, limit: int
    ) -> tuple[str, str, int, list[dict[str, Any]] | None] | None:
        row = await self._read(lambda cur: cur.execute(Q["result_page"], [task_id, offset, limit]).fetchone())
        if row is None:
            return None
        return row[0], row[1] or "", int(row[2]), json.loads(row[3]) if row[3] else None

    async def get_task_events(
        self, task_id: str, offset: int, limit: int
    ) -> tuple[list[TaskEventRecord], int]:
        def run(cur: duckdb.DuckDBPyConnection) -> tuple[list[TaskEventRecord], int]:
            rows = cur.execute(Q["task_events"], [task_id, offset, limit]).fetchall()
            total = rows[0][0] if rows else 0
            events = [
                TaskEventRecord(
                    task_id,
                    seq,
                    _aware(at),
                    attempt,
                    kind,
                    message,
                    None if data is None else json.loads(data),
                    data,
                )  # type: ignore[arg-type]
                for _, seq, at, attempt, kind, message, data in rows
                if seq is not None
            ]
            return events, int(total)

        return await self._read(run)

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        row = await self._read(lambda cur: cur.execute(Q["get_workflow"], [workflow_id]).fetchone())
        return None if row is None else _workflow_from_row(row)

    async def list_workflows(self, query: WorkflowQuery) -> tuple[list[WorkflowRecord], int]:
        params = [
            query.scope,
            query.finished,
            list(query.statuses),
            query.agent,
            _naive(query.since),
            _naive(query.until),
            query.limit,
            query.offset,
        ]
        rows = await self._read(lambda cur: cur.execute(Q["list_workflows"], params).fetchall())
        total = int(rows[0][7]) if rows else 0
        return [_workflow_from_row(r) for r in rows], total

    async def workflow_counts(self, workflow_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        ids = list(workflow_ids)
        if not ids:
            return {}
        rows = await self._read(lambda cur: cur.execute(Q["workflow_counts"], [ids]).fetchall())
        counts: dict[str, dict[str, int]] = {wid: {} for wid in ids}
        for wid, status, n in rows:
            counts[wid][status] = int(n)
        return counts

    async def task_statuses(self, task_ids: Sequence[str]) -> dict[str, str]:
        ids = list(task_ids)
        rows = await self._read(lambda cur: cur.execute(Q["task_statuses"], [ids]).fetchall())
        return {str(task_id): str(status) for task_id, status in rows}

    async def task_counts(self) -> dict[str, int]:
        rows = await self._read(lambda cur: cur.execute(Q["task_counts"]).fetchall())
        return {str(status): int(n) for status, n in rows}

    async def list_notifications(
        self,
        scope: str | None,
        since: int,
        workflow_id: str | None,
        include_delivered: bool,
        limit: int,
        reader: str,
    ) -> list[NotificationRecord]:
        """`delivered_at` of each is when `reader` had it (None: not yet); others' reads do not count."""
        params = [scope, since, workflow_id, include_delivered, limit, reader]
        rows = await self._read(lambda cur: cur.execute(Q["list_notifications"], params).fetchall())
        return [
            NotificationRecord(r[0], r[1], r[2], r[3], r[4], r[5], _aware(r[6]), _aware(r[7]))  # type: ignore[arg-type]
            for r in rows
        ]

    async def get_usage(self, task_ids: Sequence[str]) -> dict[str, UsageTotals]:
        if not task_ids:
            return {}
        ids = list(task_ids)
        rows = await self._read(lambda cur: cur.execute(Q["usage_totals"], [ids]).fetchall())
        return {r[0]: UsageTotals(list(r[1] or []), *map(int, r[2:6]), r[6]) for r in rows}

    # ---- schedules ------------------------------------------------------------

    async def _write(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """A statement outside the group commit, on the writer's connection and never beside it.

        Our own statements do not fail on good data, so any database error here is the store
        failing (disk full, I/O): fail-stop, as for a group commit."""
        self._check()
        try:
            return await anyio.to_thread.run_sync(lambda: fn(self._require()), limiter=self._writer_limiter)
        except (duckdb.Error, OSError) as exc:
            raise self._fail(exc, "a direct write") from exc

    @staticmethod
    def _schedule_values(schedule: ScheduleRecord) -> list[Any]:
        values = []
        for name in SCHEDULE_COLUMNS:
            value = getattr(schedule, name)
            if isinstance(value, datetime):
                value = _naive(value)
            elif name == "options":
                value = json.dumps(value)
            values.append(value)
        return values

    @staticmethod
    def _put_schedule(con: duckdb.DuckDBPyConnection, schedule: ScheduleRecord) -> None:
        # UPDATE, else INSERT: DuckDB's upsert cannot change an indexed column (next_run_at).
        values = DuckDBStore._schedule_values(schedule)
        assignments = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(SCHEDULE_COLUMNS[1:]))
        changed = con.execute(
            f"UPDATE scheduled_tasks SET {assignments} WHERE id = $1 RETURNING id", values
        ).fetchall()
        if not changed:
            placeholders = ", ".join(f"${i + 1}" for i in range(len(SCHEDULE_COLUMNS)))
            con.execute(
                f"INSERT INTO scheduled_tasks ({', '.join(SCHEDULE_COLUMNS)}) VALUES ({placeholders})", values
            )

    async def save_schedule(self, schedule: ScheduleRecord) -> None:
        await self._write(lambda con: self._put_schedule(con, schedule))

    @staticmethod
    def _update_schedule_if(
        con: duckdb.DuckDBPyConnection, schedule: ScheduleRecord, expected: datetime
    ) -> bool:
        values = DuckDBStore._schedule_values(schedule)
        assignments = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(SCHEDULE_COLUMNS[1:]))
        where = f"id = $1 AND updated_at = ${len(SCHEDULE_COLUMNS) + 1}"
        changed = con.execute(
            f"UPDATE scheduled_tasks SET {assignments} WHERE {where} RETURNING id",
            [*values, _naive(expected)],
        ).fetchall()
        return bool(changed)

    async def update_schedule_if(self, schedule: ScheduleRecord, expected: datetime) -> bool:
        return await self._write(lambda con: self._update_schedule_if(con, schedule, expected))

    async def delete_schedule(self, schedule_id: str) -> bool:
        def run(con: duckdb.DuckDBPyConnection) -> bool:
            return bool(
                con.execute(
                    "DELETE FROM scheduled_tasks WHERE id = $1 RETURNING id", [schedule_id]
                ).fetchall()
            )

        return await self._write(run)

    @staticmethod
    def _schedules_from(result: duckdb.DuckDBPyConnection) -> list[ScheduleRecord]:
        columns = [d[0] for d in result.description]  # type: ignore[union-attr]
        return DuckDBStore._schedules_from_rows(columns, result.fetchall())

    @staticmethod
    def _schedules_from_rows(columns: list[str], rows: list[Any]) -> list[ScheduleRecord]:
        records = []
        for row in rows:
            values = dict(zip(columns, row, strict=True))
            kwargs: dict[str, Any] = {}
            for name in SCHEDULE_COLUMNS:
                value = values[name]
                if isinstance(value, datetime):
                    value = _aware(value)
                elif name == "options":
                    value = json.loads(value) if isinstance(value, str) else (value or {})
                kwargs[name] = value
            records.append(ScheduleRecord(**kwargs))
        return records

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        def run(cur: duckdb.DuckDBPyConnection) -> ScheduleRecord | None:
            found = self._schedules_from(cur.execute(Q["get_schedule"], [schedule_id]))
            return found[0] if found else None

        return await self._read(run)

    async def list_schedules(
        self, scope: str | None, limit: int, offset: int
    ) -> tuple[list[ScheduleRecord], int]:
        def run(cur: duckdb.DuckDBPyConnection) -> tuple[list[ScheduleRecord], int]:
            result = cur.execute(Q["list_schedules"], [scope, limit, offset])
            columns = [d[0] for d in result.description]  # type: ignore[union-attr]
            rows = result.fetchall()
            records = self._schedules_from_rows(columns, rows)
            if rows:  # the page and its total from one statement: one snapshot
                return records, int(rows[0][columns.index("total_rows")])
            total = cur.execute(Q["count_schedules_in"], [scope]).fetchone()[0]  # type: ignore[index]
            return records, int(total)

        return await self._read(run)

    async def count_schedules(self) -> int:
        return await self._read(lambda cur: int(cur.execute(Q["count_schedules_in"], [None]).fetchone()[0]))

    async def due_schedules(self, now: datetime, limit: int) -> list[ScheduleRecord]:
        return await self._read(
            lambda cur: self._schedules_from(cur.execute(Q["due_schedules"], [_naive(now), limit]))
        )

    async def next_due(self) -> datetime | None:
        row = await self._read(lambda cur: cur.execute(Q["next_due"]).fetchone())
        return _aware(row[0]) if row else None

    async def record_fire(
        self,
        fire: FireRecord,
        schedule: ScheduleRecord,
        workflow: WorkflowRecord | None,
        task: TaskRecord | None,
        expected: datetime,
    ) -> bool:
        def run(con: duckdb.DuckDBPyConnection) -> bool:
            con.execute("BEGIN")
            try:
                claimed = con.execute(
                    Q["claim_fire"],
                    [fire.schedule_id, _naive(fire.due_at), fire.task_id, _naive(fire.fired_at)],
                ).fetchall()
                if not claimed:
                    con.execute("ROLLBACK")
                    return False
                if not self._update_schedule_if(con, schedule, expected):
                    con.execute("ROLLBACK")  # changed since it was read: the caller reads again
                    return False
                if workflow is not None:
                    self._append("workflows_new", [workflow])
                if task is not None:
                    self._append("tasks_new", [task])
                con.execute("COMMIT")
                return True
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise

        fired = await self._write(run)
        if fired and task is not None and self._on_commit is not None:
            committed = Committed()
            committed.task_ids.add(task.id)
            if workflow is not None:
                committed.workflow_ids.add(workflow.id)
            self._on_commit(committed)
        return fired

    async def schedule_tasks(self, schedule_id: str, limit: int, offset: int) -> tuple[list[TaskRecord], int]:
        await self.flush()

        def run(cur: duckdb.DuckDBPyConnection) -> tuple[list[TaskRecord], int]:
            result = cur.execute(Q["schedule_tasks"], [schedule_id, limit, offset])
            columns = [d[0] for d in result.description]  # type: ignore[union-attr]
            rows = result.fetchall()
            total_at = columns.index("total_rows")
            columns, rows = columns[:total_at], [(row[:total_at], row[total_at]) for row in rows]
            tasks = [_task_from_row(columns, row) for row, _ in rows]
            if rows:
                return tasks, int(rows[0][1])
            total = cur.execute(Q["count_schedule_tasks"], [schedule_id]).fetchone()[0]  # type: ignore[index]
            return tasks, int(total)

        return await self._read(run)

    async def count_rows(self) -> dict[str, int]:
        tables = [
            "workflow_executions",
            "task_executions",
            "task_attempts",
            "task_results",
            "notifications",
            "token_usage",
            "scheduled_tasks",
            "schedule_fires",
            "task_events",
        ]

        def run(cur: duckdb.DuckDBPyConnection) -> dict[str, int]:
            return {t: int(cur.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}  # type: ignore[index]

        return await self._read(run)

    # ---- retention ----------------------------------------------------------------

    async def purge_finished(
        self, before: datetime, keep: Callable[[], Collection[str]], batch_size: int
    ) -> tuple[PurgeCounts, int]:
        """Each batch is one transaction on the writer (never beside a group commit: DuckDB can
        lose an update that races a delete of its row, issue 17223), so group commits run between
        batches and a big purge delays a submit by one batch, not by the whole purge."""
        cutoff = _naive(before)
        total, batches = PurgeCounts(), 0
        while True:
            await self._yield_to_writes()
            # Asked again each time: what the engine holds and what is queued change between batches.
            held = set(keep()) | _task_ids_in(self._pending) | _task_ids_in(self._inflight)
            held_ids = sorted(held)
            counts, more = await self._write(
                lambda con: self._purge_batch(con, cutoff, held_ids, batch_size)  # noqa: B023
            )
            if counts.tasks or counts.notifications:
                total.add(counts)
                batches += 1
            if not more:
                return total, batches

    async def _yield_to_writes(self) -> None:
        """Writes waiting for the writer commit before the next retention batch. Without this a
        submit waited two batches or more: a released limiter is taken again by the releaser
        (the purge, asking for its next batch) before the waiting group commit gets to run."""
        if not self._writer_running:
            return  # no group commits to compete with (a store used alone)
        if self._inflight_done is not None:
            await self._inflight_done.wait()
        if not self._pending.empty():
            await self._wait(self._waiter(flush=True))

    @staticmethod
    def _purge_batch(
        con: duckdb.DuckDBPyConnection, cutoff: datetime | None, held: list[str], batch_size: int
    ) -> tuple[PurgeCounts, bool]:
        """One transaction: up to `batch_size` tasks and their rows. True when more may remain."""
        con.execute("BEGIN")
        try:
            rows = con.execute(Q["gc_batch"], [cutoff, held, batch_size]).fetchall()
            ids = [row[0] for row in rows]
            counts = PurgeCounts()
            if ids:
                for counter, query in _GC_TASK_ROWS:
                    setattr(counts, counter, getattr(counts, counter) + _deleted(con, query, [ids]))
                counts.tasks = _deleted(con, "gc_delete_tasks", [ids])
                workflows = sorted({row[1] for row in rows})
                emptied = [row[0] for row in con.execute(Q["gc_delete_workflows"], [workflows]).fetchall()]
                counts.workflows = len(emptied)
                if emptied:
                    counts.notifications += _deleted(con, "gc_delete_workflow_notifications", [emptied])
            notices = _deleted(con, "gc_delete_schedule_notices", [cutoff, batch_size])
            counts.notifications += notices
            if counts.notifications:
                con.execute(Q["gc_delete_deliveries"])  # marks of what is gone; not counted apart
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        return counts, len(ids) == batch_size or notices == batch_size

    async def count_finished(self, before: datetime, keep: Collection[str]) -> PurgeCounts:
        held = sorted(set(keep) | _task_ids_in(self._pending) | _task_ids_in(self._inflight))
        row = await self._read(lambda cur: cur.execute(Q["gc_count"], [_naive(before), held]).fetchone())
        return PurgeCounts(*map(int, row))

    async def checkpoint(self) -> bool:
        """A checkpoint that fails (disk full while the log is written into the file) is a store
        failure like any other write: fail-stop (`_write`), since DuckDB may have invalidated the
        database. True once it is done."""
        await self._write(lambda con: con.execute(Q["checkpoint"]))
        return True

    async def disk_usage(self) -> DiskUsage:
        free = await self._read(lambda cur: cur.execute(Q["free_bytes"]).fetchone()[0])  # type: ignore[index]
        sizes = []
        for path in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:
                sizes.append(0)
        return DiskUsage(file_bytes=sizes[0], wal_bytes=sizes[1], free_bytes=int(free or 0))


_GC_TASK_ROWS: tuple[tuple[str, str], ...] = (
    ("attempts", "gc_delete_attempts"),
    ("results", "gc_delete_results"),
    ("usage", "gc_delete_usage"),
    ("notifications", "gc_delete_task_notifications"),
    ("schedule_fires", "gc_delete_fires"),
    ("webhook_callbacks", "gc_delete_webhooks"),
    ("events", "gc_delete_task_events"),
)
"""Rows keyed by task id that retention deletes with their task: (PurgeCounts field, named query
taking $1 = the batch's task ids). The hook for tables to come: a new table of per-task rows (e.g.
`idempotency_keys`) adds its `gc_delete_*` block to duckdb.sql and an entry here, and a column to
`gc_count` so dry runs count it too."""


def _deleted(con: duckdb.DuckDBPyConnection, query: str, params: list[Any]) -> int:
    """Run a named DELETE; DuckDB answers with the number of rows it deleted."""
    row = con.execute(Q[query], params).fetchone()
    return int(row[0]) if row else 0


def _task_ids_in(batch: _Pending | None) -> set[str]:
    """Tasks with writes queued (or being committed): retention leaves them for the next pass, so
    a write never lands on a row that was just deleted."""
    if batch is None:
        return set()
    ids = {t.id for t in batch.tasks_new}
    ids.update(batch.task_updates)
    for rows in (batch.attempts, batch.results, batch.notifications, batch.usage, batch.task_events):
        ids.update(r.task_id for r in rows if r.task_id is not None)
    return ids
