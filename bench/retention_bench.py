"""Retention on a store of finished tasks: how long the writer is held, what a submit waits meanwhile,
and what deleting + CHECKPOINT (and VACUUM, FORCE CHECKPOINT, a copy) do to the file's size.

    .venv/bin/python -m bench.retention_bench [--tasks 100000] [--old 0.9] [--batch 500]

Builds the store through DuckDBStore (each task: a prompt, one attempt, a result of --result-chars
random hex characters, a notification, a usage row), checkpoints it, makes --old of the tasks 40 days
old, then runs `Engine.gc` with the default 30-day age while a client submits a task every 10 ms.
This file only measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import anyio
import duckdb

from sidequest.config import AgentConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.engine.retention import BATCH_SIZE
from sidequest.models import TaskOptions, utcnow
from sidequest.storage.base import (
    AttemptRecord,
    NotificationRecord,
    ResultRecord,
    TaskRecord,
    UsageRecord,
    WorkflowRecord,
)
from sidequest.storage.duckdb import DuckDBStore

CHUNK = 5000


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _ms(samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return (
        f"p50 {statistics.median(samples) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {samples[-1] * 1000:.1f} ms (n={len(samples)})"
    )


def _sizes(path: Path) -> str:
    wal = path.with_name(path.name + ".wal")
    with duckdb.connect(str(path), read_only=True) as con:
        free = con.execute("SELECT free_blocks * block_size FROM pragma_database_size()").fetchone()[0]  # type: ignore[index]
    wal_size = wal.stat().st_size if wal.exists() else 0
    return f"file {_mb(path.stat().st_size)}, WAL {_mb(wal_size)}, free inside {_mb(free)}"


async def fill(path: Path, tasks: int, old: float, result_chars: int, seq0: int = 0) -> None:
    """Finished tasks with their rows; the first `old` fraction finished 40 days ago, the rest today."""
    store = DuckDBStore(path)
    state = store.open()
    cursor = state.max_cursor
    now = utcnow()
    try:
        for start in range(0, tasks, CHUNK):
            workflows, records = [], []
            for i in range(start, min(start + CHUNK, tasks)):
                finished = now - timedelta(days=40 if i < tasks * old else 0, seconds=tasks - i)
                wid, tid = f"wf_{seq0 + i}", f"t_{seq0 + i}"
                workflows.append(WorkflowRecord(wid, "bench", "/bench", "running", finished, finished))
                records.append(
                    TaskRecord(
                        id=tid,
                        seq=seq0 + i + 1,
                        workflow_id=wid,
                        agent="bench",
                        prompt=f"task {i}: " + "p" * 400,
                        status="queued",
                        priority="normal",
                        scope="/bench",
                        options={},
                        max_retries=3,
                        created_at=finished,
                        updated_at=finished,
                    )
                )
            await store.insert(workflows, records)
            for record in records:
                finished = record.created_at
                record.status, record.attempts, record.finished_at = "completed", 1, finished
                record.result_preview = "r" * 200
                store.update_task(record)
                store.add_attempt(AttemptRecord(record.id, 1, "completed", finished, finished, None, "w"))
                store.add_result(
                    ResultRecord(record.id, "text", os.urandom(result_chars // 2).hex(), finished)
                )
                cursor += 1
                store.add_notification(
                    NotificationRecord(
                        cursor, "task_completed", record.id, record.workflow_id, "/bench", "done", finished
                    )
                )
                store.add_usage(UsageRecord(record.id, 1, "m", 100, 50, 0, 0, 0.001, finished))
            await store.flush()
        assert await store.checkpoint()
    finally:
        store.close()


async def purge(path: Path, batch: int) -> None:
    settings = Settings(
        home=path.parent,
        database=path,
        retention=None,  # no pass at start: this one is measured
        user_agent_dir=path.parent / "no-agents",
        agents={"noop": AgentConfig(callable="sidequest.testing.agents:noop")},
    )
    engine = Engine(settings)
    async with engine.running():
        engine.retention.batch_size = batch
        holds: list[float] = []
        purge_batch = engine.store._purge_batch  # type: ignore[attr-defined]

        def timed(*args: object) -> object:
            began = time.perf_counter()
            try:
                return purge_batch(*args)
            finally:
                holds.append(time.perf_counter() - began)

        engine.store._purge_batch = timed  # type: ignore[attr-defined]

        async def submits(into: list[float], stop: anyio.Event) -> None:
            while not stop.is_set():
                began = time.perf_counter()
                await engine.submit("noop", "x", TaskOptions(scope="/bench"))
                into.append(time.perf_counter() - began)
                await anyio.sleep(0.01)

        baseline: list[float] = []
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(submits, baseline, stop)
            await anyio.sleep(2)
            stop.set()
        during: list[float] = []
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(submits, during, stop)
            report = await engine.gc(older_than=30 * 86400)
            stop.set()
        d = report.deleted
        print(
            f"gc (batch {batch}): deleted {d.tasks:,} tasks, {d.attempts:,} attempts, {d.results:,} results, "
            f"{d.usage:,} usage rows, {d.notifications:,} notifications, {d.workflows:,} workflows "
            f"in {report.batches} batches, {report.seconds:.1f} s"
        )
        print(f"  writer held per batch: {_ms(holds)}")
        print(f"  task_async before the purge: {_ms(baseline)}")
        print(f"  task_async during the purge: {_ms(during)}")
        print(
            f"  file {_mb(report.file_bytes_before)} (+ WAL {_mb(report.wal_bytes_before)}) -> "
            f"{_mb(report.file_bytes_after)} (+ WAL {_mb(report.wal_bytes_after)}), "
            f"{_mb(report.free_bytes_after)} free inside, checkpointed={report.checkpointed}"
        )


def compact_statements(path: Path) -> None:
    with duckdb.connect(str(path)) as con:
        for statement in ("VACUUM", "VACUUM ANALYZE", "FORCE CHECKPOINT"):
            con.execute(statement)
            size = path.stat().st_size
            print(f"  after {statement}: file {_mb(size)}")


def copy_size(path: Path) -> None:
    target = path.with_name("copy.duckdb")
    began = time.perf_counter()
    with duckdb.connect() as con:
        con.execute(
            f"ATTACH '{path}' AS src (READ_ONLY); ATTACH '{target}' AS dst; COPY FROM DATABASE src TO dst"
        )
    print(
        f"  COPY FROM DATABASE into a new file (offline; needs the daemon stopped): "
        f"{_mb(target.stat().st_size)} in {time.perf_counter() - began:.1f} s"
    )


async def main(tasks: int, old: float, batch: int, result_chars: int) -> None:
    with tempfile.TemporaryDirectory(prefix="sidequest-retention-bench-") as tmp:
        path = Path(tmp) / "sidequest.duckdb"
        began = time.perf_counter()
        await fill(path, tasks, old, result_chars)
        print(
            f"built {tasks:,} finished tasks ({old:.0%} of them 40 days old) "
            f"in {time.perf_counter() - began:.0f} s"
        )
        print(f"  {_sizes(path)}")
        await purge(path, batch)
        print(f"  after the daemon stopped: {_sizes(path)}")
        compact_statements(path)
        copy_size(path)
        refill = int(tasks * old)
        await fill(path, refill, 0.0, result_chars, seq0=tasks * 10)
        print(f"after writing {refill:,} new tasks (as many as were deleted): {_sizes(path)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--old", type=float, default=0.9, help="fraction of tasks past the 30-day age")
    parser.add_argument("--batch", type=int, default=BATCH_SIZE, help="tasks per delete transaction")
    parser.add_argument("--result-chars", type=int, default=2000)
    args = parser.parse_args()
    anyio.run(main, args.tasks, args.old, args.batch, args.result_chars)
