"""PostgreSQL job-queue baselines: PgQueuer and Procrastinate side by side on the same PostgreSQL.

    .venv/bin/python -m bench.pg_baselines [--tasks N] [--workers W] [--only drain|pickup]
                                            [--runners pgqueuer,procrastinate] [--baseline pgqueuer]

Two measurements per library, each on a fresh schema in a database this run creates (and drops):

- drain: enqueue N no-op jobs with no worker running, then spawn W worker processes (each the library's
  own worker command) and time until the library's own status says all N are done. Printed from the first
  job start (interpreter start and imports excluded) and from the spawn (included).
- pickup: W idle workers; jobs submitted open-loop at --rate per second for --seconds; latency from
  "enqueue returned" to "job function started" (the job stamps time.time(); same machine, same clock).

Every job appends "id time pid" to a per-process file (`bench.pg_workers.record`): no database write in
the job, and every job is checked to have run exactly once. A new library is one more `Runner` subclass
in RUNNERS; with more than one runner the summary prints ratios against --baseline.
sidequest runs as users run it (its `worker` command on its PostgreSQL store); nothing is changed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
BENCHMARKS = ("drain", "pickup")
WARM_BASE = 1_000_000  # ids of warm-up jobs, apart from the measured ones
CHUNK = 1_000  # jobs per bulk enqueue call


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an unsorted sequence."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def read_stamps(out_dir: Path) -> list[tuple[int, float, int]]:
    """Every (job id, start time.time(), worker pid) the worker processes recorded."""
    rows: list[tuple[int, float, int]] = []
    for path in sorted(out_dir.glob("*.stamps")):
        for line in path.read_text().splitlines():
            i, t, pid = line.split()
            rows.append((int(i), float(t), int(pid)))
    return rows


def once_check(stamps: list[tuple[int, float, int]], expected: set[int]) -> tuple[bool, str]:
    """Did every expected id run exactly once, and nothing else run?"""
    counts = collections.Counter(i for i, _, _ in stamps)
    missing = len(expected - counts.keys())
    twice = sum(1 for i, c in counts.items() if c > 1)
    extra = len(counts.keys() - expected)
    ok = not missing and not twice and not extra
    detail = f"{len(counts)} distinct ids ran, {missing} missing, {twice} more than once, {extra} unexpected"
    return ok, detail


# ---- the runner interface ------------------------------------------------------------------------


class Runner:
    """One job-queue library under test. A subclass supplies the library calls; the base class runs the
    worker subprocesses. Lifecycle, per measurement, driven by the harness:

        prepare(dsn, schema) -> enqueue(ids) | submit_one(i) ... -> start_workers(w) -> wait_done(n)
        -> stop_workers() -> teardown()

    The schema exists (empty) before prepare and the harness drops it after teardown. Worker processes
    get SQBENCH_PG_DSN, SQBENCH_PG_SCHEMA and SQBENCH_PG_OUT in their environment, and their job function
    must call `bench.pg_workers.record(i)` with the id it was enqueued with.
    """

    name: ClassVar[str]
    distribution: ClassVar[str]  # for the version line

    def __init__(self) -> None:
        self.dsn = ""
        self.schema = ""
        self.out_dir = Path()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    # -- what a library implements --
    async def prepare(self, dsn: str, schema: str) -> None:
        """Install the library's tables into `schema` and open the submitting connection."""
        raise NotImplementedError

    async def enqueue(self, ids: Sequence[int]) -> None:
        """Enqueue one no-op job per id, as fast as the library's bulk API allows."""
        raise NotImplementedError

    async def submit_one(self, i: int) -> None:
        """Enqueue one no-op job; return when the library's enqueue returns (the job is committed)."""
        raise NotImplementedError

    async def done_count(self) -> int:
        """How many jobs the library's own bookkeeping records as finished successfully."""
        raise NotImplementedError

    def worker_command(self) -> list[str]:
        """argv of one worker process: the library's own worker."""
        raise NotImplementedError

    def worker_env(self) -> dict[str, str]:
        return {}

    def settings(self) -> str:
        """One line: the worker settings that matter for these numbers."""
        return ""

    async def teardown(self) -> None:
        """Close what prepare opened (the harness drops the schema)."""

    # -- shared --
    @classmethod
    def version(cls) -> str:
        return metadata.version(cls.distribution)

    def start_workers(self, w: int, out_dir: Path) -> None:
        self.out_dir = out_dir
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "SQBENCH_PG_DSN": self.dsn,
            "SQBENCH_PG_SCHEMA": self.schema,
            "SQBENCH_PG_OUT": str(out_dir),
            **self.worker_env(),
        }
        for k in range(w):
            log = out_dir / f"worker{k}.log"
            with log.open("wb") as fh:
                self.procs.append(
                    subprocess.Popen(
                        self.worker_command(), cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT
                    )
                )
            self.logs.append(log)

    def workers_alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def worker_failure(self) -> str:
        dead = [(p, log) for p, log in zip(self.procs, self.logs, strict=True) if p.poll() is not None]
        if not dead:
            return ""
        p, log = dead[0]
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        return f"worker pid {p.pid} exited with {p.returncode}; its output ends:\n{tail}"

    async def wait_done(self, n: int, timeout: float, step: float = 0.02) -> float | None:
        """Poll done_count() until it reaches n; return the time.time() it was seen, None on timeout or
        when a worker died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.done_count() >= n:
                return time.time()
            if not self.workers_alive():
                return None
            await asyncio.sleep(step)
        return None

    def stop_workers(self, grace: float = 15.0) -> list[int | None]:
        """SIGTERM every worker (each library drains on it), SIGKILL what is left after `grace`."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        codes = [p.returncode for p in self.procs]
        self.procs, self.logs = [], []
        return codes


class PgQueuerRunner(Runner):
    """PgQueuer on asyncpg. Workers: `python -m bench.pg_workers pgqueuer`, which is `pgq run
    bench.pg_workers:pgqueuer_factory` without the typer glue (see there why), with its defaults (batch
    size 10, no concurrency limit, uvloop, table durability 'durable')."""

    name = "pgqueuer"
    distribution = "pgqueuer"

    async def prepare(self, dsn: str, schema: str) -> None:
        import asyncpg
        from pgqueuer import AsyncpgPoolDriver, Queries
        from pgqueuer.adapters.persistence import qb

        self.dsn, self.schema = dsn, schema
        settings = qb.DBSettings(db_schema=schema)
        # a pool, so that pickup's overlapping submits are not queued behind each other on one connection
        self.pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        self.queries = Queries(
            AsyncpgPoolDriver(self.pool),
            qbe=qb.QueryBuilderEnvironment(settings),
            qbq=qb.QueryQueueBuilder(settings),
            qbs=qb.QuerySchedulerBuilder(settings),
        )
        await self.queries.install(create_schema=False)
        self.log_table = f"{schema}.{settings.queue_table_log}"

    async def enqueue(self, ids: Sequence[int]) -> None:
        for k in range(0, len(ids), CHUNK):
            chunk = ids[k : k + CHUNK]
            await self.queries.enqueue(
                ["noop"] * len(chunk), [str(i).encode() for i in chunk], [0] * len(chunk)
            )

    async def submit_one(self, i: int) -> None:
        await self.queries.enqueue("noop", str(i).encode())

    async def done_count(self) -> int:
        # A finished job leaves the queue table and gets a 'successful' row in the log table.
        return await self.pool.fetchval(f"SELECT count(*) FROM {self.log_table} WHERE status = 'successful'")

    def worker_command(self) -> list[str]:
        return [sys.executable, "-m", "bench.pg_workers", "pgqueuer"]

    def worker_env(self) -> dict[str, str]:
        return {"PGQUEUER_SCHEMA": self.schema}

    def settings(self) -> str:
        return (
            "pgqueuer.run() as `pgq run` calls it: batch size 10, dequeue timeout 30 s, "
            "no concurrency limit, uvloop"
        )

    async def teardown(self) -> None:
        await self.pool.close()


class ProcrastinateRunner(Runner):
    """Procrastinate on psycopg 3. Workers: `python -m procrastinate --app bench.pg_workers.procrastinate_app
    worker` with its defaults (concurrency 1, LISTEN/NOTIFY on, polling fallback every 5 s)."""

    name = "procrastinate"
    distribution = "procrastinate"

    async def prepare(self, dsn: str, schema: str) -> None:
        from bench.pg_workers import make_procrastinate_app

        self.dsn, self.schema = dsn, schema
        self.app = make_procrastinate_app(dsn, schema)
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()
        self.task = self.app.tasks["noop"]
        self.conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

    async def enqueue(self, ids: Sequence[int]) -> None:
        for k in range(0, len(ids), CHUNK):
            await self.task.batch_defer_async(*({"i": i} for i in ids[k : k + CHUNK]))

    async def submit_one(self, i: int) -> None:
        await self.task.defer_async(i=i)

    async def done_count(self) -> int:
        query = sql.SQL("SELECT count(*) FROM {}.procrastinate_jobs WHERE status = 'succeeded'").format(
            sql.Identifier(self.schema)
        )
        row = await (await self.conn.execute(query)).fetchone()
        return int(row[0]) if row else 0

    def worker_command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "procrastinate",
            "--app",
            "bench.pg_workers.procrastinate_app",
            "--log-level",
            "warning",
            "worker",
        ]

    def settings(self) -> str:
        return "procrastinate worker defaults: concurrency 1, listen-notify on, fetch polling 5 s"

    async def teardown(self) -> None:
        await self.conn.close()
        await self.app.close_async()


class SidequestRunner(Runner):
    """sidequest's shared store. Bulk enqueue is `PostgresStore.enqueue` (one transaction per chunk,
    one task and its workflow per job, as submits make them); a single submit is the engine's
    `submit` (validation, agent lookup, the insert, NOTIFY), as every surface calls it. Workers:
    `python -m sidequest.cli worker --concurrency C`, the command users run."""

    name = "sidequest"
    distribution = "sidequest"
    concurrency = 64

    async def prepare(self, dsn: str, schema: str) -> None:
        from contextlib import AsyncExitStack

        from sidequest.config import AgentConfig, Settings
        from sidequest.engine.engine import Engine
        from sidequest.storage.postgres import PostgresStore

        self.dsn, self.schema = dsn, schema
        self.home = Path(tempfile.mkdtemp(prefix="sqbench-home-"))
        sep = "&" if "?" in dsn else "?"
        self.store_dsn = f"{dsn}{sep}options=-csearch_path%3D{schema}"
        self.config = self.home / "sidequest.toml"
        self.config.write_text(
            f'database = "{self.store_dsn}"\nlease_seconds = 10\nmax_concurrency = {self.concurrency}\n\n'
            '[agents.bench_noop]\nexecutor = "python"\ncallable = "bench.pg_workers:sidequest_noop"\n',
            encoding="utf-8",
        )
        settings = Settings(
            home=self.home,
            database=self.store_dsn,  # type: ignore[arg-type]
            agents={"bench_noop": AgentConfig(callable="bench.pg_workers:sidequest_noop")},
        )
        self.stack = AsyncExitStack()
        self.engine = Engine(settings, PostgresStore(self.store_dsn, schema=schema), work=False)
        await self.stack.enter_async_context(self.engine.running())
        self.conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

    async def enqueue(self, ids: Sequence[int]) -> None:
        from sidequest.engine.admission import new_id
        from sidequest.models import utcnow
        from sidequest.storage.base import TaskRecord, WorkflowRecord

        for k in range(0, len(ids), CHUNK):
            now = utcnow()
            workflows, tasks = [], []
            for i in ids[k : k + CHUNK]:
                wid = new_id("wf")
                workflows.append(WorkflowRecord(wid, "bench_noop", "/bench", "running", now, now))
                tasks.append(
                    TaskRecord(
                        id=new_id("t"), seq=0, workflow_id=wid, agent="bench_noop", prompt=str(i),
                        status="queued", priority="normal", scope="/bench", options={}, max_retries=0,
                        created_at=now, updated_at=now,
                    )
                )  # fmt: skip
            await self.engine._shared_store.enqueue(workflows, tasks)

    async def submit_one(self, i: int) -> None:
        await self.engine.submit("bench_noop", str(i))

    async def done_count(self) -> int:
        query = sql.SQL("SELECT count(*) FROM {}.task_executions WHERE status = 'completed'").format(
            sql.Identifier(self.schema)
        )
        row = await (await self.conn.execute(query)).fetchone()
        return int(row[0]) if row else 0

    def worker_command(self) -> list[str]:
        return [sys.executable, "-m", "sidequest.cli", "worker", "--concurrency", str(self.concurrency)]

    def worker_env(self) -> dict[str, str]:
        return {"SIDEQUEST_HOME": str(self.home), "SIDEQUEST_CONFIG": str(self.config)}

    def settings(self) -> str:
        return f"sidequest worker --concurrency {self.concurrency}: LISTEN/NOTIFY, poll 0.5 s, lease 10 s"

    async def teardown(self) -> None:
        await self.conn.close()
        await self.stack.aclose()
        shutil.rmtree(self.home, ignore_errors=True)

    @classmethod
    def version(cls) -> str:
        from sidequest import __version__

        return __version__


RUNNERS: dict[str, type[Runner]] = {
    "sidequest": SidequestRunner,
    "pgqueuer": PgQueuerRunner,
    "procrastinate": ProcrastinateRunner,
}


# ---- the database of one run ---------------------------------------------------------------------


class Database:
    """A database of this run's own on the given server (NOTIFY channels are per database, so the
    libraries' fixed channel names cannot meet another suite's); one fresh schema per measurement.
    Everything is dropped at the end, and only what this run created."""

    def __init__(self, server_dsn: str) -> None:
        parts = urlsplit(server_dsn)
        if parts.scheme not in ("postgres", "postgresql"):
            raise SystemExit(f"the DSN must be a postgresql:// URI, got {server_dsn!r}")
        self.server_dsn = server_dsn
        self.name = f"sqbench_pg_{os.getpid()}_{secrets.token_hex(3)}"
        self.dsn = parts._replace(path=f"/{self.name}").geturl()
        self.created = False

    def __enter__(self) -> Database:
        with psycopg.connect(self.server_dsn, autocommit=True) as con:
            # template0: never has connections, so CREATE DATABASE cannot collide with other suites
            con.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(self.name)))
        self.created = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.created:
            return
        with psycopg.connect(self.server_dsn, autocommit=True) as con:
            con.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name)))

    def create_schema(self, name: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as con:
            con.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))

    def drop_schema(self, name: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as con:
            con.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


# ---- measurements ----------------------------------------------------------------------------------


@dataclass
class Result:
    runner: str
    version: str
    drain_rate: float | None = None  # first job start -> last done
    drain_rate_spawn: float | None = None  # worker spawn -> last done
    drain_rate_all: float | None = None  # every worker has started a job -> last done (jobs started since)
    drain_ok: bool | None = None
    pickup: list[float] = field(default_factory=list)  # ms, enqueue returned -> job started
    pickup_ok: bool | None = None

    def pickup_p(self, p: float) -> float | None:
        return percentile(self.pickup, p) if self.pickup else None


async def measure(db: Database, cls: type[Runner], kind: str, tmp: Path, run: Any, *args: Any) -> None:
    """Fresh schema and runner around one measurement; always stops the workers and drops the schema."""
    schema = f"{cls.name}_{kind}"
    out_dir = tmp / schema
    out_dir.mkdir()
    db.create_schema(schema)
    runner = cls()
    try:
        await runner.prepare(db.dsn, schema)
        try:
            await run(runner, out_dir, *args)
        finally:
            runner.stop_workers()
            await runner.teardown()
    finally:
        db.drop_schema(schema)


async def drain(runner: Runner, out_dir: Path, n: int, w: int, res: Result) -> None:
    ids = list(range(n))
    e0 = time.perf_counter()
    await runner.enqueue(ids)
    enqueue_s = time.perf_counter() - e0
    t_spawn = time.time()
    runner.start_workers(w, out_dir)
    t_done = await runner.wait_done(n, timeout=max(120.0, n / 20))
    codes = runner.stop_workers()
    stamps = read_stamps(out_dir)
    ok, detail = once_check(stamps, set(ids))
    print(f"  enqueue (bulk, {CHUNK} per call): {n} in {enqueue_s:.2f} s = {n / enqueue_s:,.0f} jobs/s")
    if t_done is None:
        print(f"  NOT DONE: library reports {await runner.done_count()} of {n} done")
        print("  " + (runner.worker_failure() or "timed out").replace("\n", "\n    "))
        res.drain_ok = False
        return
    first = min(t for _, t, _ in stamps)
    res.drain_rate = n / (t_done - first)
    res.drain_rate_spawn = n / (t_done - t_spawn)
    per_pid = collections.Counter(pid for _, _, pid in stamps)
    res.drain_ok = ok and await runner.done_count() == n
    print(
        f"  spawn -> first job started {first - t_spawn:.2f} s; first start -> all {n} done "
        f"{t_done - first:.2f} s = {res.drain_rate:,.0f} jobs/s; "
        f"spawn -> done {t_done - t_spawn:.2f} s = {res.drain_rate_spawn:,.0f} jobs/s"
    )
    firsts = sorted(min(t for _, t, p in stamps if p == pid) for pid in per_pid)
    all_up = firsts[-1]
    if len(firsts) == w and t_done > all_up:
        res.drain_rate_all = sum(1 for _, t, _ in stamps if t >= all_up) / (t_done - all_up)
    print(
        f"  jobs per worker process: {sorted(per_pid.values(), reverse=True)}; each worker's first job at "
        + ", ".join(f"+{x - first:.2f}" for x in firsts)
        + f" s; exit codes {codes}"
    )
    print(f"  from the moment all {w} workers had started a job: {fmt(res.drain_rate_all, ',.0f')} jobs/s")
    print(f"  exactly once: {'yes' if res.drain_ok else 'NO'} ({detail}; library says {n} done)")


async def pickup(runner: Runner, out_dir: Path, w: int, rate: float, seconds: float, res: Result) -> None:
    n = round(rate * seconds)
    warm = 5 * w
    runner.start_workers(w, out_dir)
    for k in range(warm):  # the workers are up, connected and have run a job each
        await runner.submit_one(WARM_BASE + k)
    if await runner.wait_done(warm, timeout=60) is None:
        print("  warm-up jobs did not finish: " + (runner.worker_failure() or "timed out"))
        res.pickup_ok = False
        return
    await asyncio.sleep(1.0)  # idle: whatever the workers do between jobs, they do it now
    called: dict[int, float] = {}
    returned: dict[int, float] = {}

    async def one(i: int) -> None:
        called[i] = time.time()
        await runner.submit_one(i)
        returned[i] = time.time()

    # open loop: each submit in its own task, so a slow enqueue does not lower the rate
    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tg.create_task(one(i))
        span = time.perf_counter() - t0
    done = await runner.wait_done(warm + n, timeout=30)
    runner.stop_workers()
    stamps = read_stamps(out_dir)
    ok, detail = once_check(stamps, set(range(n)) | {WARM_BASE + k for k in range(warm)})
    started = {i: t for i, t, _ in stamps if i < WARM_BASE}
    res.pickup = [(started[i] - returned[i]) * 1000 for i in range(n) if i in started]
    from_call = [(started[i] - called[i]) * 1000 for i in range(n) if i in started]
    submit_ms = [(returned[i] - called[i]) * 1000 for i in range(n)]
    res.pickup_ok = ok and done is not None
    per_pid = collections.Counter(pid for i, _, pid in stamps if i < WARM_BASE)
    print(f"  achieved rate {(n - 1) / span:.1f} submits/s over {span:.1f} s ({warm} warm-up jobs first)")
    print(
        f"  enqueue returned -> job started: n={len(res.pickup)} p50={percentile(res.pickup, 50):.2f} "
        f"p95={percentile(res.pickup, 95):.2f} p99={percentile(res.pickup, 99):.2f} "
        f"max={max(res.pickup, default=math.nan):.2f} ms; "
        f"{sum(x < 0 for x in res.pickup)} started before their enqueue had returned"
    )
    print(
        f"  enqueue called -> job started:   p50={percentile(from_call, 50):.2f} "
        f"p95={percentile(from_call, 95):.2f} p99={percentile(from_call, 99):.2f} ms"
    )
    print(
        f"  enqueue call itself: p50={percentile(submit_ms, 50):.2f} p99={percentile(submit_ms, 99):.2f} ms; "
        f"jobs per worker process: {sorted(per_pid.values(), reverse=True)}"
    )
    print(f"  exactly once: {'yes' if res.pickup_ok else 'NO'} ({detail})")


# ---- output ------------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print("  " + "  ".join(h.ljust(widths[i]) for i, h in enumerate(head)).rstrip())
    print("  " + "  ".join("-" * x for x in widths))
    for r in rows:
        print("  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())


def verdict(ok: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[ok]


def print_summary(results: list[Result], baseline: str) -> None:
    print(
        "\n=== summary (drain jobs/s to the last job done, counted from the first job start; from the "
        "spawn of\n    the worker processes; from when all of them were working. pickup: enqueue returned "
        "-> job started)"
    )
    head = ["library", "version", "drain jobs/s", "spawn", "all up", "pickup p50", "p95", "p99 ms", "once"]
    rows = [
        [
            r.runner,
            r.version,
            fmt(r.drain_rate, ",.0f"),
            fmt(r.drain_rate_spawn, ",.0f"),
            fmt(r.drain_rate_all, ",.0f"),
            fmt(r.pickup_p(50), ".2f"),
            fmt(r.pickup_p(95), ".2f"),
            fmt(r.pickup_p(99), ".2f"),
            "/".join(verdict(x) for x in (r.drain_ok, r.pickup_ok)),
        ]
        for r in results
    ]
    print_table(head, rows)
    base = next((r for r in results if r.runner == baseline), None)
    if len(results) < 2:
        return
    if base is None:
        print(f"\n(no ratios: the baseline {baseline!r} was not in this run; see --baseline)")
        return

    def ratio(a: float | None, b: float | None) -> str:
        return "n/a" if not a or not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"

    print(f"\n=== ratios against {baseline} (drain: higher is better; pickup: lower is better)")
    head = ["library", "drain", "spawn", "all up", "pickup p50", "p95", "p99"]
    rows = [
        [
            r.runner,
            ratio(r.drain_rate, base.drain_rate),
            ratio(r.drain_rate_spawn, base.drain_rate_spawn),
            ratio(r.drain_rate_all, base.drain_rate_all),
            *(ratio(r.pickup_p(p), base.pickup_p(p)) for p in (50, 95, 99)),
        ]
        for r in results
        if r is not base
    ]
    print_table(head, rows)


# ---- main ----------------------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, names: list[str], benches: list[str]) -> list[Result]:
    results = [Result(name, RUNNERS[name].version()) for name in names]
    with Database(args.dsn) as db, tempfile.TemporaryDirectory(prefix="sqbench-pg-") as tmp_name:
        tmp = Path(tmp_name)
        print(f"database: {db.name} (created for this run, dropped at the end)")
        if "drain" in benches:
            for res in results:
                cls = RUNNERS[res.runner]
                print(f"\n=== drain: {res.runner} {res.version}, {args.tasks} jobs, {args.workers} workers")
                print(f"  each worker: python {' '.join(cls().worker_command()[1:])}")
                print(f"  settings: {cls().settings()}")
                t = time.perf_counter()
                await measure(db, cls, "drain", tmp, drain, args.tasks, args.workers, res)
                print(f"  (took {time.perf_counter() - t:.1f} s)")
        if "pickup" in benches:
            for res in results:
                cls = RUNNERS[res.runner]
                print(
                    f"\n=== pickup: {res.runner} {res.version}, {args.workers} idle workers, "
                    f"{args.rate:g} jobs/s for {args.seconds:g} s"
                )
                t = time.perf_counter()
                await measure(db, cls, "pickup", tmp, pickup, args.workers, args.rate, args.seconds, res)
                print(f"  (took {time.perf_counter() - t:.1f} s)")
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_baselines", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="jobs in the drain (default 10000)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--only", choices=BENCHMARKS, help="run one benchmark (default: both)")
    parser.add_argument("--rate", type=float, default=50.0, help="pickup submits per second (default 50)")
    parser.add_argument("--seconds", type=float, default=10.0, help="pickup duration (default 10)")
    parser.add_argument(
        "--runners",
        default=",".join(RUNNERS),
        help=f"comma-separated, in order (default {','.join(RUNNERS)})",
    )
    parser.add_argument("--baseline", default="pgqueuer", help="ratios are against this runner")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("SIDEQUEST_TEST_POSTGRES_DSN", DEFAULT_DSN),
        help="server to use; a database is created there for the run "
        "(default $SIDEQUEST_TEST_POSTGRES_DSN or " + DEFAULT_DSN + ")",
    )
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.runners.split(",") if s.strip()]
    unknown = [s for s in names if s not in RUNNERS]
    if unknown:
        parser.error(f"unknown runner(s) {unknown}; choose from {', '.join(RUNNERS)}")
    benches = [args.only] if args.only else list(BENCHMARKS)

    print(f"run: .venv/bin/python -m bench.pg_baselines {' '.join(sys.argv[1:] if argv is None else argv)}")
    with psycopg.connect(args.dsn, autocommit=True) as con:
        row = con.execute("SHOW server_version").fetchone()
        server = row[0] if row else "?"
        sync = con.execute("SHOW synchronous_commit").fetchone()
    print(
        f"python {sys.version.split()[0]}, PostgreSQL {server} "
        f"(synchronous_commit={sync[0] if sync else '?'}), {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        "versions: "
        + ", ".join(f"{n} {RUNNERS[n].version()}" for n in names)
        + f", asyncpg {metadata.version('asyncpg')}, psycopg {psycopg.__version__}"
    )
    started = time.perf_counter()
    results = asyncio.run(run_all(args, names, benches))
    print_summary(results, args.baseline)
    print(
        f"\ntotal wall time {time.perf_counter() - started:.1f} s; "
        f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
