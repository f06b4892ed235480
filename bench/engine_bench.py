"""Engine benchmarks: MCP round trip, pickup latency, drain, concurrent submitters, Huey comparison.

    .venv/bin/python -m bench.engine_bench [--only NAME[,NAME...]] [--n N]

Every benchmark uses a fresh temporary data dir (a real DuckDB file), an
`Engine(Settings(...))` inside `async with engine.running()` on anyio's asyncio
backend, and bounded loops (a count, and a time limit on every wait).
This file only measures; it changes nothing in sidequest.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import math
import os
import pstats
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
import duckdb

from bench.agents import STARTS
from sidequest.config import AgentConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.models import NotificationKind, WorkflowStatus
from sidequest.storage.base import Committed
from sidequest.storage.duckdb import DuckDBStore

perf = time.perf_counter

BENCHMARKS = ("mcp", "pickup", "drain", "submitters", "huey", "profile")
DEFAULT_N = {
    "mcp": 500,
    "pickup": 500,
    "drain": 10_000,
    "submitters": 10_000,
    "huey": 10_000,
    "profile": 10_000,
}
AGENTS = {
    "noop": AgentConfig(callable="sidequest.testing.agents:noop"),
    "stamp": AgentConfig(callable="bench.agents:stamp"),
}
WORKERS = 4


# ---- helpers -------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of an unsorted list."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def lat_line(label: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    if not ms:
        return f"  {label:<44} (no samples)"
    return (
        f"  {label:<44} n={len(ms):<6} p50={percentile(ms, 50):7.3f}  p90={percentile(ms, 90):7.3f}  "
        f"p99={percentile(ms, 99):7.3f}  max={max(ms):8.3f}  mean={sum(ms) / len(ms):7.3f} ms"
    )


def command(name: str, n: int) -> str:
    return f".venv/bin/python -m bench.engine_bench --only {name} --n {n}"


def header(title: str, name: str, n: int) -> None:
    print(f"\n=== {title}")
    print(f"command: {command(name, n)}")


@dataclass
class Row:
    benchmark: str
    metric: str
    value: float | None
    unit: str
    goal: str = "-"
    ok: bool | None = None

    def cells(self) -> list[str]:
        value = "n/a" if self.value is None or math.isnan(self.value) else f"{self.value:,.3f} {self.unit}"
        verdict = {True: "PASS", False: "FAIL", None: "info"}[self.ok]
        return [self.benchmark, self.metric, value, self.goal, verdict]


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    drain_rate: float | None = None
    huey_rate: float | None = None
    profile_text: str = ""

    def add(self, row: Row) -> None:
        self.rows.append(row)


def goal_row(bench: str, metric: str, value: float | None, unit: str, limit: float, higher: bool) -> Row:
    goal = f"{'>=' if higher else '<='} {limit:,g} {unit}"
    if value is None or math.isnan(value):
        return Row(bench, metric, value, unit, goal, False)
    return Row(bench, metric, value, unit, goal, value >= limit if higher else value <= limit)


@contextlib.contextmanager
def temp_home() -> Iterator[Path]:
    """A new data dir for one benchmark, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="sqbench-") as tmp:
        yield Path(tmp)


@contextlib.asynccontextmanager
async def running_engine(
    home: Path, max_concurrency: int = WORKERS, journal: bool = True
) -> AsyncIterator[Engine]:
    settings = Settings(home=home, max_concurrency=max_concurrency, agents=AGENTS)
    engine = Engine(settings, DuckDBStore(settings.database_path, attempt_journal=journal))
    async with engine.running():
        yield engine


@contextlib.asynccontextmanager
async def fresh_engine(
    max_concurrency: int = WORKERS, journal: bool = True
) -> AsyncIterator[tuple[Engine, dict[str, Any]]]:
    """A running engine on a new data dir. After the engine has stopped (and closed the file) but before the
    dir is removed, the DuckDB file is reopened and `after["on_disk"]` gets the task count by status."""
    after: dict[str, Any] = {}
    with temp_home() as home:
        async with running_engine(home, max_concurrency, journal) as engine:
            yield engine, after
        after["on_disk"] = db_status_counts(home)


def db_status_counts(home: Path) -> dict[str, int]:
    """Reopen the closed DuckDB file read-only: what is really on disk."""
    con = duckdb.connect(str(home / "sidequest.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT status, count(*) FROM task_executions GROUP BY status").fetchall()
    finally:
        con.close()
    return {status: int(n) for status, n in rows}


async def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.002) -> bool:
    deadline = perf() + timeout
    while not pred():
        if perf() > deadline:
            return False
        await anyio.sleep(step)
    return True


class WriterStats:
    """Times the store's group commits by wrapping the instance's `_commit` and `_append` (bench-local; the
    store's code is not edited). Both run on the writer thread, so this is also where that thread can be
    profiled: cProfile only sees the thread that enabled it. Missing hooks just disable the stats.
    """

    def __init__(self, store: Any, profile: cProfile.Profile | None = None) -> None:
        self.samples: list[tuple[float, float, int, int]] = []  # (start, seconds, new tasks, task updates)
        self.appends: list[tuple[float, float, str, int]] = []  # (start, seconds, kind, rows)
        self.profiling = False  # the writer-thread profile is only on for the timed window
        original = getattr(store, "_commit", None)
        self.enabled = original is not None
        if original is None:
            return

        def timed(batch: Any) -> Any:
            prof = profile if self.profiling else None
            if prof is not None:
                prof.enable()
            start = perf()
            try:
                return original(batch)
            finally:
                elapsed = perf() - start
                if prof is not None:
                    prof.disable()
                self.samples.append(
                    (
                        start,
                        elapsed,
                        len(getattr(batch, "tasks_new", ())),
                        len(getattr(batch, "task_updates", ())),
                    )
                )

        store._commit = timed
        append = getattr(store, "_append", None)
        if append is not None:

            def timed_append(name: str, rows: Any) -> Any:
                start = perf()
                try:
                    return append(name, rows)
                finally:
                    self.appends.append((start, perf() - start, name, len(rows)))

            store._append = timed_append

    def summary(self, t0: float, t1: float) -> str:
        if not self.enabled:
            return "  writer stats: unavailable (store has no _commit)"
        window = [s for s in self.samples if t0 <= s[0] <= t1]
        if not window:
            return "  writer: no commits in the window"
        busy = sum(s[1] for s in window)
        ms = [s[1] * 1000 for s in window]
        lines = [
            f"  writer: {len(window)} group commits in the window, busy {busy:.3f} s of {t1 - t0:.3f} s "
            f"({100 * busy / (t1 - t0):.0f}%); commit ms p50={percentile(ms, 50):.2f} "
            f"p99={percentile(ms, 99):.2f} max={max(ms):.2f}",
            f"          per commit: new tasks mean={sum(s[2] for s in window) / len(window):.1f} "
            f"max={max(s[2] for s in window)}, "
            f"task updates mean={sum(s[3] for s in window) / len(window):.1f} "
            f"max={max(s[3] for s in window)}",
        ]
        appends = [a for a in self.appends if t0 <= a[0] <= t1]
        if appends:
            by_kind: dict[str, list[float]] = {}
            rows: dict[str, int] = {}
            for _, seconds, kind, n in appends:
                by_kind.setdefault(kind, []).append(seconds)
                rows[kind] = rows.get(kind, 0) + n
            parts = [
                f"{kind} {sum(v):.3f}s ({len(v)}x, p50 {percentile(v, 50) * 1000:.2f} ms, {rows[kind]} rows)"
                for kind, v in sorted(by_kind.items(), key=lambda kv: -sum(kv[1]))
            ]
            other = busy - sum(a[1] for a in appends)
            parts.append(f"BEGIN/COMMIT/row building {other:.3f}s")
            lines.append("          writer time by write kind (appender append+flush): " + "; ".join(parts))
        return "\n".join(lines)


def open_gate(engine: Engine) -> None:
    """Let the dispatcher start work again and wake it.

    There is no public "resume"; setting `_wake` is what `Dispatcher.enqueue` does.
    """
    dispatcher = engine.dispatcher
    dispatcher.accepting = True
    dispatcher._wake.set()


# ---- 1. task_async through an in-process MCP client ----------------------


async def bench_mcp(n: int, res: Results) -> None:
    header("1. task_async round trip via in-process MCP client (and engine.submit directly)", "mcp", n)
    print(
        f"method: one engine, {WORKERS} workers, agent noop; 50 warm-up calls, then {n} sequential calls, "
        "each timed from call to return (the task row is committed when submit returns)."
    )
    warm = 50
    async with fresh_engine() as (engine, _after):
        for _ in range(warm):
            await engine.submit("noop", "x")
        stats = WriterStats(engine.store)
        direct: list[float] = []
        w0 = perf()
        with anyio.fail_after(120):
            for _ in range(n):
                t = perf()
                await engine.submit("noop", "x")
                direct.append(perf() - t)
        print(lat_line("engine.submit (direct, sequential)", direct))
        print(stats.summary(w0, perf()))
        res.add(Row("1 submit direct", "p50", percentile([d * 1000 for d in direct], 50), "ms", "(ref)"))

        try:
            from sidequest.server.mcp import build_server
        except Exception as exc:  # the module is being written by someone else right now
            print(
                "  MCP: SKIPPED, cannot import sidequest.server.mcp.build_server: "
                f"{type(exc).__name__}: {exc}"
            )
            res.add(Row("1 task_async MCP", "p50", None, "ms", "<= 3 ms (not run)", None))
            return
        from mcp import Client

        server = build_server(engine, os.getcwd())
        # MCPServer.__init__ sets the root logger to INFO; a per-call INFO line to stderr
        # is not what we measure.
        logging.getLogger().setLevel(logging.WARNING)
        args = {"agent_definition": "noop", "prompt": "x"}
        async with Client(server) as client:
            first = await client.call_tool("task_async", args)
            if first.is_error:
                text = first.content[0].text if first.content else "?"  # type: ignore[union-attr]
                print(f"  MCP: task_async returned an error, not timing it: {text}")
                res.add(Row("1 task_async MCP", "p50", None, "ms", "<= 3 ms", False))
                return
            print(f"  first result: structured_content={first.structured_content}")
            for _ in range(warm):
                await client.call_tool("task_async", args)
            via_mcp: list[float] = []
            errors = 0
            w0 = perf()
            with anyio.fail_after(120):
                for _ in range(n):
                    t = perf()
                    result = await client.call_tool("task_async", args)
                    via_mcp.append(perf() - t)
                    errors += bool(result.is_error)
        print(lat_line("task_async via MCP Client(server)", via_mcp))
        print(stats.summary(w0, perf()))
        print(
            f"  errors: {errors}; MCP layer adds "
            f"~{(percentile(via_mcp, 50) - percentile(direct, 50)) * 1000:.3f} ms at p50"
        )
        res.add(goal_row("1 task_async MCP", "p50", percentile(via_mcp, 50) * 1000, "ms", 3, higher=False))
        res.add(Row("1 task_async MCP", "p99", percentile(via_mcp, 99) * 1000, "ms"))


# ---- 2. pickup latency at a steady rate ------------------------------------


async def bench_pickup(n: int, res: Results, rate: float = 50.0) -> None:
    header(f"2. pickup latency at a steady {rate:g} tasks/s ({n} tasks, ~{n / rate:.0f} s)", "pickup", n)
    print(
        f"method: open-loop generator starts one submit every {1000 / rate:g} ms "
        "(each in its own task, so a slow "
        f"submit does not slow the rate); agent bench.agents:stamp records perf_counter() when it starts; "
        f"{WORKERS} workers; 20 warm-up tasks first."
    )
    STARTS.clear()
    async with fresh_engine() as (engine, _after):
        for i in range(20):
            await engine.submit("stamp", f"warm{i}")
        await wait_until(lambda: all(f"warm{i}" in STARTS for i in range(20)), 10)
        called: dict[str, float] = {}
        returned: dict[str, float] = {}
        stats = WriterStats(engine.store)

        async def one(key: str) -> None:
            called[key] = perf()
            await engine.submit("stamp", key)
            returned[key] = perf()

        with anyio.fail_after(n / rate + 30):
            async with anyio.create_task_group() as tg:
                t0 = perf()
                for i in range(n):
                    delay = t0 + i / rate - perf()
                    if delay > 0:
                        await anyio.sleep(delay)
                    tg.start_soon(one, f"p{i}")
            span = max(called.values()) - min(called.values())
            writer = stats.summary(t0, perf())
            keys = [f"p{i}" for i in range(n)]
            complete = await wait_until(lambda: all(k in STARTS for k in keys), 10)
    if not complete:
        print(f"  WARNING: only {sum(k in STARTS for k in keys)} of {n} tasks started within 10 s")
    keys = [k for k in keys if k in STARTS]
    after_return = [STARTS[k] - returned[k] for k in keys]
    after_call = [STARTS[k] - called[k] for k in keys]
    submit = [returned[k] - called[k] for k in keys]
    print(f"  achieved rate: {(n - 1) / span:.1f} submits/s over {span:.2f} s")
    print(lat_line("submit returned (durable) -> executor start", after_return))
    print(lat_line("submit called -> executor start", after_call))
    print(lat_line("submit call duration (call -> durable return)", submit))
    print(writer)
    ms = [x * 1000 for x in after_return]
    res.add(goal_row("2 pickup (return->start)", "p50", percentile(ms, 50), "ms", 2, higher=False))
    res.add(goal_row("2 pickup (return->start)", "p99", percentile(ms, 99), "ms", 10, higher=False))
    res.add(Row("2 pickup (call->start)", "p50", percentile([x * 1000 for x in after_call], 50), "ms"))
    res.add(Row("2 pickup (call->start)", "p99", percentile([x * 1000 for x in after_call], 99), "ms"))


# ---- 3. drain ------------------------------------------------------------


async def run_drain(
    n: int,
    loop_profile: cProfile.Profile | None = None,
    writer_profile: cProfile.Profile | None = None,
    journal: bool = True,
) -> dict[str, Any]:
    """Submit n noop tasks with the pool gated; open the gate; time until all are completed and durable."""
    out: dict[str, Any] = {}
    async with fresh_engine(journal=journal) as (engine, after):
        stats = WriterStats(engine.store, writer_profile)
        completed = 0
        done = anyio.Event()

        def on_commit(committed: Committed) -> None:
            nonlocal completed
            completed += sum(
                1 for r in committed.notifications if r.kind == NotificationKind.task_completed.value
            )
            if completed >= n:
                done.set()

        # warm-up (imports the agent, first commits), not counted
        for _ in range(20):
            await engine.submit("noop", "x")
        await wait_until(lambda: not engine.dispatcher.running and engine.dispatcher.queued_count() == 0, 10)
        await engine.store.flush()
        engine.add_listener(on_commit)

        engine.dispatcher.accepting = False  # gate: submits are recorded and queued, nothing starts
        submitters, per = 100, n // 100
        count = submitters * per

        async def submit_many() -> None:
            for _ in range(per):
                await engine.submit("noop", "x")

        s0 = perf()
        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                for _ in range(submitters):
                    tg.start_soon(submit_many)
        s1 = perf()
        queued = engine.dispatcher.queued_count()
        out["submit"] = (count, s1 - s0)

        if loop_profile is not None:
            loop_profile.enable()
        stats.profiling = True
        t0 = perf()
        open_gate(engine)
        with anyio.move_on_after(max(60.0, count / 200)) as scope:
            await done.wait()
            await engine.store.flush()
        t1 = perf()
        stats.profiling = False
        if loop_profile is not None:
            loop_profile.disable()
        out.update(
            count=count,
            queued=queued,
            seconds=t1 - t0,
            timed_out=scope.cancelled_caught,
            completed=completed,
            writer=stats.summary(t0, t1),
        )
        rows = await engine.store.count_rows()
        done_wf = await engine.workflow_history(all_scopes=True, status=[WorkflowStatus.completed], limit=1)
        out["live"] = (rows, done_wf.total)
    out["on_disk"] = after["on_disk"]
    return out


async def bench_drain(n: int, res: Results) -> None:
    header(f"3. drain of {n} no-op python tasks, concurrency {WORKERS}", "drain", n)
    print(
        "method: 20 warm-up tasks; then the dispatcher is gated (engine.dispatcher.accepting = False) "
        f"while 100 concurrent submitters record {n} tasks (each submit returns once its row is committed); "
        "the clock starts "
        "when the gate opens and stops when a commit listener has seen the last task_completed notification "
        "committed, followed by store.flush(). Verified with count_rows()/workflow_history() while running "
        "and by "
        "reopening the DuckDB file after the engine closed."
    )
    out = await run_drain(n)
    count, sub_s = out["submit"]
    rate = out["completed"] / out["seconds"]
    print(
        f"  submit phase (pool gated): {count} tasks in {sub_s:.3f} s = {count / sub_s:,.0f} tasks/s; "
        f"queued={out['queued']}"
    )
    print(
        f"  drain: {out['completed']} completed+durable in {out['seconds']:.3f} s = {rate:,.0f} tasks/s"
        + ("  (TIMED OUT)" if out["timed_out"] else "")
    )
    print(out["writer"])
    rows, completed_workflows = out["live"]
    print(f"  while running: count_rows={rows}; completed workflows={completed_workflows}")
    print(f"  on disk after close: task_executions by status={out['on_disk']}")
    ok = out["on_disk"].get("completed", 0) == count + 20 and not out["timed_out"]
    print(f"  verified: {'yes' if ok else 'NO'} (expected {count + 20} completed incl. 20 warm-up)")
    res.drain_rate = rate
    # What a crash-safe attempt start costs: the same drain with and without the attempt journal,
    # interleaved (so drift in the machine's load hits both), median of 3 each.
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):
        for journal in (False, True):
            one = await run_drain(n, journal=journal)
            rates[journal].append(one["completed"] / one["seconds"])
    before, after = (sorted(rates[j])[1] for j in (False, True))
    print(
        f"  durable attempt start: drain without the attempt journal {before:,.0f} tasks/s, with it "
        f"{after:,.0f} tasks/s (median of 3 interleaved runs each): {100 * (after / before - 1):+.1f}%"
    )
    res.add(Row("3 drain, no attempt journal", "throughput", before, "tasks/s"))
    res.add(Row("3 drain, attempt journal", "throughput", after, "tasks/s"))
    res.add(goal_row("3 drain 10k @4", "throughput", rate, "tasks/s", 6000, higher=True))
    res.add(Row("3 drain (submit phase)", "throughput", count / sub_s, "tasks/s"))


# ---- 4. concurrent submitters --------------------------------------------


async def bench_submitters(n: int, res: Results, submitters: int = 50) -> None:
    per = max(1, n // submitters)
    header(f"4. {submitters} concurrent submitters x {per} submits, pool running", "submitters", n)
    print(
        f"method: {submitters} anyio tasks each await engine.submit('noop', 'x') {per} times; "
        f"{WORKERS} workers "
        "run the tasks meanwhile; rate = rows accepted (committed; checked with count_rows) / wall time."
    )
    async with fresh_engine() as (engine, after):
        for _ in range(20):
            await engine.submit("noop", "x")
        await engine.store.flush()
        base = (await engine.store.count_rows())["task_executions"]
        stats = WriterStats(engine.store)
        latencies: list[float] = []

        async def submitter() -> None:
            for _ in range(per):
                t = perf()
                await engine.submit("noop", "x")
                latencies.append(perf() - t)

        t0 = perf()
        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                for _ in range(submitters):
                    tg.start_soon(submitter)
        t1 = perf()
        accepted = (await engine.store.count_rows())["task_executions"] - base
        finished_meanwhile = accepted - engine.dispatcher.queued_count() - len(engine.dispatcher.running)
        writer = stats.summary(t0, t1)
    on_disk = after["on_disk"]
    rate = accepted / (t1 - t0)
    print(f"  accepted {accepted} (expected {per * submitters}) in {t1 - t0:.3f} s = {rate:,.0f} tasks/s")
    print(lat_line("submit latency under load", latencies))
    print(f"  tasks already finished when the last submit returned: ~{finished_meanwhile}")
    print(writer)
    print(f"  on disk after close (shutdown drains the queue): {on_disk}")
    res.add(goal_row("4 50 submitters", "accepted", rate, "tasks/s", 3000, higher=True))
    res.add(Row("4 50 submitters", "submit p50", percentile([x * 1000 for x in latencies], 50), "ms"))


# ---- 5. Huey on SQLite ---------------------------------------------------


def bench_huey(n: int, res: Results, timeout: float = 180.0) -> None:
    import huey
    from huey.consumer import Consumer
    from huey.signals import SIGNAL_COMPLETE

    header(
        f"5. Huey {huey.__version__} SqliteHuey drain of {n} no-op tasks, {WORKERS} worker threads", "huey", n
    )
    print(
        f"method: enqueue {n} tasks with no consumer running; then start "
        f"huey.consumer.Consumer(workers={WORKERS}, "
        "worker_type='thread') in-process and time until the SIGNAL_COMPLETE handler has counted all of them "
        "(the signal fires after the result row is committed; SQLite autocommit, WAL). "
        "The task returns '' so a "
        "result row is stored, as sidequest stores one."
    )
    logging.getLogger("huey").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="sqbench-huey-") as tmp:
        db = Path(tmp) / "huey.db"
        h = huey.SqliteHuey(name="bench", filename=str(db))
        lock = threading.Lock()
        finished = threading.Event()
        count = 0

        @h.task()
        def noop() -> str:
            return ""

        @h.signal(SIGNAL_COMPLETE)
        def on_complete(sig: str, task: Any) -> None:
            nonlocal count
            with lock:
                count += 1
                if count >= n:
                    finished.set()

        sync = sqlite3.connect(str(db)).execute("pragma synchronous").fetchone()[0]
        e0 = perf()
        for _ in range(n):
            noop()
        e1 = perf()
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        consumer = Consumer(
            h,
            workers=WORKERS,
            worker_type="thread",
            periodic=False,
            check_worker_health=False,
            shutdown_timeout=10,
        )
        t0 = perf()
        consumer.start()
        for s, handler in saved.items():  # Consumer.start installs its own; give ours back
            signal.signal(s, handler)
        finished.wait(timeout)
        t1 = perf()
        consumer.stop(graceful=True)
        h.storage.close()
        con = sqlite3.connect(str(db))
        left = con.execute("select count(*) from task").fetchone()[0]
        results = con.execute("select count(*) from kv").fetchone()[0]
        con.close()
    rate = count / (t1 - t0)
    print(f"  sqlite pragma synchronous={sync} (2 = FULL), journal_mode=wal")
    print(f"  enqueue phase: {n} in {e1 - e0:.3f} s = {n / (e1 - e0):,.0f} tasks/s")
    print(
        f"  drain: {count} completed in {t1 - t0:.3f} s = {rate:,.0f} tasks/s"
        + ("" if finished.is_set() else "  (TIMED OUT)")
    )
    print(f"  on disk: task rows left={left}, result rows={results}")
    res.huey_rate = rate
    res.add(Row("5 huey sqlite drain @4", "throughput", rate, "tasks/s"))
    if res.drain_rate:
        ratio = res.drain_rate / rate
        print(f"  sidequest/Huey drain ratio: {res.drain_rate:,.0f} / {rate:,.0f} = {ratio:.2f}x")
        res.add(Row("5 sidequest/Huey", "drain ratio", ratio, "x"))
    else:
        print("  sidequest/Huey ratio: run 'drain' in the same run to get it")


# ---- profile of benchmark 3 ----------------------------------------------


async def bench_profile(n: int, res: Results) -> None:
    header(f"profile: cProfile of benchmark 3 (drain of {n}), gate-open -> durable window", "profile", n)
    print(
        "method: same as benchmark 3; one cProfile.Profile on the event-loop thread for the timed window, "
        "and a "
        "second one enabled inside each group commit on the writer thread (cProfile is per thread). "
        "Throughput under the profiler is not comparable with benchmark 3."
    )
    loop_prof, writer_prof = cProfile.Profile(), cProfile.Profile()
    out = await run_drain(n, loop_prof, writer_prof)
    print(
        f"  drain under profiler: {out['completed']} in {out['seconds']:.3f} s = "
        f"{out['completed'] / out['seconds']:,.0f} tasks/s"
    )
    print(out["writer"])
    text = []
    for title, prof, sort, limit in (
        ("event-loop thread, top 15 by cumulative time", loop_prof, "cumulative", 15),
        ("event-loop thread, top 15 by own time (tottime)", loop_prof, "tottime", 15),
        ("writer thread (inside group commits), top 10 by cumulative time", writer_prof, "cumulative", 10),
    ):
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.strip_dirs().sort_stats(sort).print_stats(limit)
        body = buf.getvalue()
        start = body.find("   ncalls")  # drop pstats' preamble lines
        text.append(f"--- {title}\n{body[start:].rstrip() if start >= 0 else body.rstrip()}")
    res.profile_text = "\n\n".join(text)
    print(res.profile_text)


# ---- main ----------------------------------------------------------------


def print_summary(res: Results) -> None:
    print("\n=== summary against the goals")
    head = ["benchmark", "metric", "result", "goal", "verdict"]
    table = [head] + [r.cells() for r in res.rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  " + "  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument(
        "--n",
        type=int,
        help="count for each selected benchmark (calls for mcp, tasks otherwise); defaults: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_N.items()),
    )
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [s for s in names if s not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    logging.basicConfig(level=logging.WARNING)

    print(f"run: .venv/bin/python -m bench.engine_bench {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"python {sys.version.split()[0]}, duckdb {duckdb.__version__}, anyio {metadata.version('anyio')}, "
        f"{os.cpu_count()} CPUs"
    )
    res = Results()
    started = perf()
    runners: dict[str, Callable[[int, Results], Any]] = {
        "mcp": bench_mcp,
        "pickup": bench_pickup,
        "drain": bench_drain,
        "submitters": bench_submitters,
        "profile": bench_profile,
    }
    for name in BENCHMARKS:
        if name not in names:
            continue
        n = args.n or DEFAULT_N[name]
        t = perf()
        if name == "huey":
            bench_huey(n, res)
        else:
            anyio.run(runners[name], n, res, backend="asyncio")
        print(f"  ({name} took {perf() - t:.1f} s)")
    print_summary(res)
    print(f"\ntotal wall time {perf() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
