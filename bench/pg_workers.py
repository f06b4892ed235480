"""What the worker processes of `bench.pg_baselines` import: the no-op job of each library, and `record`.

Kept apart from the harness so a worker imports only its own library. Each worker is the library's own
worker command (see the runners in `bench.pg_baselines`), configured from the environment:

    SQBENCH_PG_DSN     the DSN of the benchmark's database
    SQBENCH_PG_SCHEMA  the schema the runner prepared
    SQBENCH_PG_OUT     a directory; each worker process appends to its own file there

`record(i)` is the whole job: one line "i time.time() pid" appended with a single os.write on an O_APPEND
file (a few microseconds, no database write), so a benchmark can check that every job ran exactly once and
when each one started. Every runner's job function calls it first.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

_fd: int | None = None


def record(i: int) -> None:
    global _fd
    now = time.time()
    if _fd is None:
        path = os.path.join(os.environ["SQBENCH_PG_OUT"], f"{os.getpid()}.stamps")
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{i} {now:.6f} {os.getpid()}\n".encode())


def _dsn() -> str:
    return os.environ["SQBENCH_PG_DSN"]


def _schema() -> str:
    return os.environ["SQBENCH_PG_SCHEMA"]


# ---- PgQueuer: `python -m bench.pg_workers pgqueuer`, i.e. what `pgq run bench.pg_workers:pgqueuer_factory`
# does: `pgqueuer.run(factory)` (the CLI's own supervisor) on uvloop. Not the CLI itself: `pgq run` of
# pgqueuer 1.6.0 fails before starting with the typer installed here (its --log-level default reaches
# setup_fancy_logger as a str: "AttributeError: 'str' object has no attribute 'name'").
# The schema reaches PgQueuer through PGQUEUER_SCHEMA (its DBSettings reads it), set by the harness.


@contextlib.asynccontextmanager
async def pgqueuer_factory() -> AsyncIterator[Any]:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Job, PgQueuer

    connection = await asyncpg.connect(_dsn())
    try:
        pgq = PgQueuer(AsyncpgDriver(connection))

        @pgq.entrypoint("noop")
        async def noop(job: Job) -> None:
            record(int(job.payload or b"-1"))

        yield pgq
    finally:
        await connection.close()


# ---- Procrastinate: `python -m procrastinate --app bench.pg_workers.procrastinate_app worker` ----------
# Built only when the worker (or the harness) asks for it, so importing this module needs no DSN.


def make_procrastinate_app(dsn: str, schema: str) -> Any:
    import procrastinate

    connector = procrastinate.PsycopgConnector(
        conninfo=dsn,
        kwargs={"options": f"-c search_path={schema}"},
    )
    app = procrastinate.App(connector=connector)

    @app.task(name="noop")
    async def noop(i: int) -> None:
        record(i)

    return app


def __getattr__(name: str) -> Any:
    if name == "procrastinate_app":
        app = make_procrastinate_app(_dsn(), _schema())
        globals()[name] = app
        return app
    raise AttributeError(name)


# ---- sidequest: `python -m sidequest.cli worker`, configured by the harness's sidequest.toml --------


async def sidequest_noop(prompt: str, ctx: Any) -> None:
    """The no-op task of sidequest's runner: the prompt is the job id."""
    record(int(prompt))


def run_pgqueuer_worker() -> None:
    import pgqueuer
    import uvloop
    from pgqueuer.core import logconfig

    logconfig.setup_fancy_logger(logconfig.LogLevel.WARNING)
    uvloop.run(pgqueuer.run("bench.pg_workers:pgqueuer_factory"))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["pgqueuer"]:
        raise SystemExit("usage: python -m bench.pg_workers pgqueuer")
    run_pgqueuer_worker()
