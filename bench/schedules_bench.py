"""The scheduler at 10,000 active schedules: what a tick costs, and memory.

    .venv/bin/python -m bench.schedules_bench [--n 10000]

- next due: `store.next_due()` (what the loop reads before it sleeps) and
  `store.due_schedules(now, 100)` when nothing is due (what a wake-up reads);
- a tick that fires 100 due schedules (task + fire key + schedule row, each
  in one transaction);
- creating schedules through `engine.schedule_task` (validation + insert);
- memory: RSS before and after loading N schedules (the scheduler keeps none
  in memory; the store holds them).
This file only measures.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio

from sidequest.config import AgentConfig, ScheduleConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.engine.scheduler import Scheduler
from sidequest.models import ScheduleSpec
from sidequest.testing.clock import ManualClock


def _ms(samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"p50 {statistics.median(samples) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms (n={len(samples)})"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="sidequest-schedules-bench-") as tmp:
        start = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)
        clock = ManualClock(start)
        settings = Settings(
            home=Path(tmp),
            user_agent_dir=Path(tmp) / "no-agents",
            agents={"noop": AgentConfig(callable="sidequest.testing.agents:noop")},
            schedules=ScheduleConfig(max_schedules=n + 1000),
            max_concurrency=8,
        )
        engine = Engine(settings, clock=clock)
        async with engine.running():
            rss_before = _rss_mb()
            creates = []
            began = time.perf_counter()
            for i in range(n):
                minute, hour = i % 60, (i // 60) % 24
                spec = ScheduleSpec(
                    agent_definition="noop",
                    prompt=f"run {i}",
                    cron=f"{minute} {hour} * * *",
                    timezone=("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo")[i % 4],
                    overlap="allow",
                )
                t0 = time.perf_counter()
                await engine.schedule_task(spec, "/bench")
                creates.append(time.perf_counter() - t0)
            print(f"create {n} schedules: {time.perf_counter() - began:.1f} s; schedule_task {_ms(creates)}")
            print(f"RSS max: {rss_before:.0f} MB before, {_rss_mb():.0f} MB after {n} schedules")

            store = engine.store
            nexts, idle = [], []
            for _ in range(200):
                t0 = time.perf_counter()
                await store.next_due()
                nexts.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                due = await store.due_schedules(start, 100)
                idle.append(time.perf_counter() - t0)
                assert not due
            print(f"next due (min next_run_at over {n}): {_ms(nexts)}")
            print(f"due_schedules when nothing is due: {_ms(idle)}")

            # A tick an hour later (~n/24 due), by a scheduler on its own clock so the engine's
            # loop (which sleeps on the other clock) does not take the work.
            later = ManualClock(start + timedelta(hours=1))
            ticker = Scheduler(engine, later)
            due = await store.due_schedules(later.now(), 100_000)
            t0 = time.perf_counter()
            fired = await ticker.run_due()
            tick = time.perf_counter() - t0
            print(
                f"tick firing {fired} due schedules ({len(due)} due): {tick * 1000:.0f} ms, "
                f"{tick / max(fired, 1) * 1000:.2f} ms per run"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    anyio.run(main, parser.parse_args().n)
