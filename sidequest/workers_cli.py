"""`sidequest migrate` and `sidequest workers`: the commands of running on a shared store.

`migrate` talks to the store, never to the daemon: it is what you run before the first daemon or
worker of a new version starts, so it cannot need one. `workers` asks the daemon, like `tasks`:
workers register in the store, and the daemon reads them for every surface (REST, this command).

Neither prints a DSN's password: the store is always shown through `redact_dsn`, and an error from
the driver is scrubbed of the DSN before it is printed.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio
from pydantic import BaseModel, Field
from rich.table import Table
from rich.text import Text

from sidequest.config import Settings, scrub_dsn
from sidequest.models import WorkerInfo, WorkerList

if TYPE_CHECKING:
    from sidequest.commands import Handler, Output

NOT_SHARED = (
    'sidequest worker needs a shared store: set database = "postgresql://…"; '
    "on DuckDB the daemon runs the work itself"
)
"""Why `sidequest worker` (and `serve --no-work`) refuse a DuckDB store: one process owns the file."""

NO_WORK_NOT_SHARED = (
    'serve --no-work needs a shared store: set database = "postgresql://…" and run `sidequest worker`s; '
    "on DuckDB the daemon is the only process that can run the work"
)

EXIT_OK = 0
EXIT_FAILED = 1


class MigrateResult(BaseModel):
    """`sidequest migrate --json`."""

    store: Literal["duckdb", "postgres"]
    database: str = Field(description="the file, or the DSN without its password")
    from_version: int = Field(description="the schema version found (0: a new store)")
    to_version: int = Field(description="the schema version it has now")


def add_workers_commands(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    help_text = "bring the configured store's schema up to date (DuckDB file or PostgreSQL database)"
    migrate = sub.add_parser(
        "migrate",
        help=help_text,
        description=help_text,
        epilog="Run it once after an upgrade, before the daemon and the workers start. Safe to repeat: "
        "a store already up to date is left alone.",
    )
    migrate.add_argument("--config", help=config_help)
    migrate.add_argument("--json", action="store_true", help="print the result as one JSON document")

    help_text = "list the processes that run tasks: the daemon and each `sidequest worker`"
    workers = sub.add_parser("workers", help=help_text, description=help_text)
    workers.add_argument("--config", help=config_help)
    workers.add_argument("--json", action="store_true", help="print the result as one JSON document")


# ---- migrate ------------------------------------------------------------------------------------


class _Refused(Exception):
    """The store could not be migrated; the message is one line, already free of the password."""


def migrate_store(settings: Settings) -> MigrateResult:
    """Apply the missing schema versions to the configured store (blocking: call it off the loop)."""
    if settings.database_url is not None:
        start, end = _migrate_postgres(settings.database_url)
    else:
        start, end = _migrate_duckdb(settings)
    return MigrateResult(
        store=settings.store_kind, database=settings.database_display, from_version=start, to_version=end
    )


def _migrate_postgres(dsn: str) -> tuple[int, int]:
    """Every failure is one line: the store's own StoreError, and anything else the driver raises
    on the way (a refused connection, a missing driver), since a stack trace may show the DSN."""
    try:
        from sidequest.storage.postgres import migrate

        return migrate(dsn)
    except Exception as exc:  # the boundary: nothing gets past it with a password in it
        from sidequest.storage.base import StoreError

        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, StoreError):
            message = f"{type(exc).__name__}: {message}"
        raise _Refused(scrub_dsn(message, dsn)) from None


def _migrate_duckdb(settings: Settings) -> tuple[int, int]:
    """Opening a DuckDBStore migrates it; the version it had is read back from `schema_version`
    (every version applied by this open is stamped after `started`)."""
    from sidequest.engine.errors import EngineError
    from sidequest.server.daemon import PRIVATE_UMASK, secure_data_dir
    from sidequest.storage.base import StoreError
    from sidequest.storage.duckdb import DuckDBStore

    os.umask(PRIVATE_UMASK)  # as the daemon: the file and its .wal are the user's alone
    path = settings.database_path
    try:
        secure_data_dir(settings.home)
        existed = path.exists()
        started = datetime.now(UTC).replace(tzinfo=None)
        store = DuckDBStore(path)
        store.open()
        try:
            end = store.schema_version()
        finally:
            store.close()
    except (StoreError, EngineError) as exc:
        raise _Refused(" ".join(str(exc).split())) from None
    return (_version_before(path, started) if existed else 0), end


def _version_before(path: Path, started: datetime) -> int:
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute(
            "SELECT coalesce(max(version), 0) FROM schema_version WHERE applied_at < ?", [started]
        ).fetchone()
    return int(row[0]) if row else 0


def migrate_line(result: MigrateResult) -> str:
    if result.from_version == result.to_version:
        return f"{result.database}: already at version {result.to_version}"
    return f"{result.database}: schema version {result.from_version} -> {result.to_version}"


async def _migrate(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    try:
        result = await anyio.to_thread.run_sync(migrate_store, settings)
    except _Refused as exc:
        out.error(f"cannot migrate: {exc}", code="store")
        return EXIT_FAILED
    if out.as_json:
        out.emit(result)
    else:
        out.print(Text(migrate_line(result)), soft_wrap=True)
    return EXIT_OK


# ---- workers ------------------------------------------------------------------------------------


def _order(worker: WorkerInfo) -> tuple[bool, bool, str, str]:
    return (not worker.alive, worker.kind != "daemon", worker.host, worker.id)


def _heartbeat(worker: WorkerInfo, now: datetime) -> Text:
    from sidequest.commands import _ago

    when = _ago(worker.heartbeat_at, now)
    return Text(when) if worker.alive else Text(f"{when} (gone)", style="dim")


async def _workers(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from sidequest.commands import _connect

    async with _connect(settings, args.config, quiet=out.as_json) as client:
        listing = await client.list_workers()
    if out.as_json:
        out.emit(listing)
        return EXIT_OK
    if not listing.workers:
        out.print(Text("no workers: nothing is taking tasks from the store", style="dim"))
        return EXIT_OK
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("ID", no_wrap=True)
    table.add_column("KIND", no_wrap=True)
    table.add_column("HOST", overflow="fold")
    table.add_column("PID", justify="right", no_wrap=True)
    table.add_column("QUEUES", overflow="fold")
    table.add_column("AGENTS", overflow="fold")
    table.add_column("RUNNING", justify="right", no_wrap=True)
    table.add_column("HEARTBEAT", no_wrap=True)
    for worker in sorted(listing.workers, key=_order):
        style = "" if worker.alive else "dim"
        table.add_row(
            Text(worker.id, style="bold" if worker.alive else "dim"),
            Text(worker.kind, style=style),
            Text(worker.host, style=style),
            Text(str(worker.pid), style=style),
            Text(", ".join(worker.queues), style=style),
            Text(", ".join(worker.agents) if worker.agents is not None else "any", style=style),
            Text(f"{worker.running}/{worker.concurrency}", style=style),
            _heartbeat(worker, listing.as_of),
        )
    out.print(table)
    return EXIT_OK


def workers_summary(listing: WorkerList) -> str:
    """One line for `sidequest status`: how many run, of which kind, and how full they are."""
    alive = [w for w in listing.workers if w.alive]
    if not alive:
        return "none alive (`sidequest workers` lists the gone ones)" if listing.workers else "none"
    kinds = {kind: sum(1 for w in alive if w.kind == kind) for kind in ("daemon", "worker")}
    parts = ", ".join(
        f"{n} {kind}{'s' if n > 1 and kind == 'worker' else ''}" for kind, n in kinds.items() if n
    )
    running = sum(w.running for w in alive)
    slots = sum(w.concurrency for w in alive)
    gone = len(listing.workers) - len(alive)
    return f"{len(alive)} alive ({parts}), running {running}/{slots}" + (f", {gone} gone" if gone else "")


HANDLERS: dict[str, Handler] = {"migrate": _migrate, "workers": _workers}
