"""How long a kill -9'd worker's tasks wait before they run again elsewhere (shared PostgreSQL store).

    .venv/bin/python -m bench.pg_failover [--tasks N] [--lease S] [--rounds R]

Per round: two `sidequest worker` processes on a fresh database; N long tasks are submitted and
run; the worker holding the most of them is killed with SIGKILL; the time from the kill until each
of its tasks has started its next attempt on the other worker is printed (its new `started_at`,
the database's clock, against the kill time on the same machine). The goal is lease + 1 s: the
lease has to lapse (a dead worker says nothing) and a reaper pass must see it (every lease/2 s,
at most 5 s) before another worker claims the task.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def one_round(server_dsn: str, tasks: int, lease: float) -> list[float]:
    from sidequest.config import AgentConfig, Settings
    from sidequest.engine.engine import Engine
    from sidequest.storage.open import open_store

    name = f"sqbench_fo_{secrets.token_hex(4)}"
    with psycopg.connect(server_dsn, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    dsn = urlsplit(server_dsn)._replace(path=f"/{name}").geturl()
    home = Path(tempfile.mkdtemp(prefix="sqbench-fo-"))
    config = home / "sidequest.toml"
    config.write_text(
        f'database = "{dsn}"\nlease_seconds = {lease}\nmax_concurrency = {tasks}\n\n'
        '[agents.sleep]\nexecutor = "python"\ncallable = "sidequest.testing.agents:sleep"\n',
        encoding="utf-8",
    )
    env = {
        **os.environ,
        "SIDEQUEST_HOME": str(home),
        "SIDEQUEST_CONFIG": str(config),
        "PYTHONPATH": str(REPO),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sidequest.cli", "worker"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    settings = Settings(
        home=home,
        database=dsn,  # type: ignore[arg-type]
        lease_seconds=lease,
        agents={"sleep": AgentConfig(callable="sidequest.testing.agents:sleep")},
    )
    engine = Engine(settings, open_store(settings), work=False)
    try:
        async with engine.running():
            while len((await engine.list_workers()).workers) < 2:
                await asyncio.sleep(0.1)
            ids = [(await engine.submit("sleep", "120")).task_id for _ in range(tasks)]
            while True:
                rows = [await engine.store.get_task(t) for t in ids]
                if all(r is not None and r.status == "running" for r in rows):
                    break
                await asyncio.sleep(0.1)
            holders: dict[str, list[str]] = {}
            for r in rows:
                assert r is not None and r.worker_id is not None
                holders.setdefault(r.worker_id, []).append(r.id)
            victim_id, victims = max(holders.items(), key=lambda kv: len(kv[1]))
            pid = next(w.pid for w in (await engine.list_workers()).workers if w.id == victim_id)
            killed = datetime.now(UTC)
            os.kill(pid, signal.SIGKILL)
            waits: dict[str, float] = {}
            deadline = time.monotonic() + lease * 4 + 30
            while len(waits) < len(victims) and time.monotonic() < deadline:
                for task_id in victims:
                    row = await engine.store.get_task(task_id)
                    if (
                        task_id not in waits
                        and row is not None
                        and row.status == "running"
                        and row.worker_id not in (None, victim_id)
                        and row.started_at is not None
                    ):
                        waits[task_id] = (row.started_at - killed).total_seconds()
                await asyncio.sleep(0.05)
            if len(waits) < len(victims):
                raise SystemExit(f"only {len(waits)} of {len(victims)} tasks ran again within the deadline")
            for t in ids:
                await engine.cancel(task_id=t)
            return list(waits.values())
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        with psycopg.connect(server_dsn, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_failover", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=6, help="long tasks per round (default 6)")
    parser.add_argument("--lease", type=float, default=5.0, help="lease_seconds (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--dsn", default=os.environ.get("SIDEQUEST_TEST_POSTGRES_DSN", DEFAULT_DSN))
    args = parser.parse_args()
    print(f"run: .venv/bin/python -m bench.pg_failover {' '.join(sys.argv[1:])}")
    print(f"lease_seconds = {args.lease:g}; goal: every task running again within {args.lease + 1:g} s")
    everything: list[float] = []
    for k in range(args.rounds):
        waits = asyncio.run(one_round(args.dsn, args.tasks, args.lease))
        everything += waits
        print(
            f"  round {k + 1}: {len(waits)} tasks of the killed worker ran again after "
            f"min {min(waits):.2f} / max {max(waits):.2f} s"
        )
    worst = max(everything)
    print(
        f"kill -9 -> running elsewhere: n={len(everything)} p50={_percentile(everything, 50):.2f} "
        f"max={worst:.2f} s (lease {args.lease:g} s; goal <= {args.lease + 1:g} s: "
        f"{'met' if worst <= args.lease + 1 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
