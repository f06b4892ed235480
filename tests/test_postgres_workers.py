"""Many processes on one PostgreSQL database: one `sidequest serve` and several `sidequest worker`
processes drain work exactly once, survive a worker's kill -9 and a cut of every connection, and
carry a cancel to the worker that runs the task.

Each test gets its own database (created and dropped here), real subprocesses, the real CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import psycopg
import pytest
from conftest import POSTGRES_DSN, agents_toml, all_test_agents, fresh_pg_database, wait_for

from sidequest.config import Settings
from sidequest.engine.engine import Engine
from sidequest.storage.open import open_store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LEASE = 2.0


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh database for this test; its DSN."""
    with fresh_pg_database() as dsn:
        yield dsn


def _config(home: Path, dsn: str) -> Path:
    config = home / "sidequest.toml"
    config.write_text(
        f'database = "{dsn}"\nlease_seconds = {LEASE}\nshutdown_grace = 1\nmax_concurrency = 8\n\n'
        + agents_toml(),
        encoding="utf-8",
    )
    return config


class Cluster:
    """Real `sidequest serve` / `sidequest worker` processes sharing one database."""

    def __init__(self, root: Path, dsn: str) -> None:
        self.root, self.dsn = root, dsn
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        home = self.root / f"p{len(self.procs)}"
        home.mkdir()
        env = {
            "SIDEQUEST_HOME": str(home),
            "SIDEQUEST_CONFIG": str(_config(home, self.dsn)),
            "PYTHONPATH": str(REPO),
            "PATH": os.environ.get("PATH", ""),
        }
        log = (home / "out.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidequest.cli", *args],
            env=env,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- p{i} ---\n" + (self.root / f"p{i}" / "out.log").read_text(errors="replace")[-3000:]
            for i in range(len(self.procs))
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def cluster(tmp_path: Path, database: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, database)
    try:
        yield c
    finally:
        c.stop()


@asynccontextmanager
async def client_engine(tmp_path: Path, dsn: str) -> AsyncIterator[Engine]:
    """An API-only engine in the test process (as `serve --no-work` would run): it submits, reads
    and cancels, and runs nothing."""
    home = tmp_path / "client"
    home.mkdir(exist_ok=True)
    settings = Settings(home=home, database=dsn, agents=all_test_agents(), lease_seconds=LEASE)  # type: ignore[arg-type]
    engine = Engine(settings, open_store(settings), work=False)
    async with engine.running():
        yield engine


def rows(dsn: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as con:
        return con.execute(sql, params).fetchall()  # type: ignore[arg-type]


async def workers_alive(engine: Engine, n: int) -> bool:
    return len([w for w in (await engine.list_workers()).workers if w.concurrency > 0]) >= n


async def test_one_serve_and_three_workers_drain_2000_tasks_each_exactly_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start("serve")
    for _ in range(3):
        cluster.start("worker", "--concurrency", "8")
    async with client_engine(tmp_path, cluster.dsn) as engine:
        await wait_for(lambda: workers_alive(engine, 4), timeout=60, what=f"4 workers\n{cluster.logs()}")
        ids: list[str] = []

        async def submit(n: int) -> None:
            for _ in range(n):
                ids.append((await engine.submit("noop", "x")).task_id)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(submit, 100)

        async def drained() -> bool:
            counts = await engine.task_counts()
            return counts.get("completed", 0) == 2000

        await wait_for(drained, timeout=120, interval=0.5, what=f"2000 completed\n{cluster.logs()}")
    per_task = rows(
        cluster.dsn,
        "SELECT t.id, count(a.*) FILTER (WHERE a.status = 'completed'), count(a.*) "
        "FROM task_executions t LEFT JOIN task_attempts a ON a.task_id = t.id GROUP BY t.id",
    )
    assert len(per_task) == 2000 == len(set(ids))
    assert all(done == 1 == total for _, done, total in per_task), [r for r in per_task if r[1] != 1][:5]
    assert rows(cluster.dsn, "SELECT count(*) FROM task_results")[0][0] == 2000
    spread = rows(cluster.dsn, "SELECT worker_id, count(*) FROM task_attempts GROUP BY worker_id")
    assert len(spread) >= 3, spread  # the work went to several processes


async def test_a_worker_killed_mid_task_its_task_runs_again_elsewhere_counted_as_lost(
    cluster: Cluster, tmp_path: Path
) -> None:
    victim = cluster.start("worker", "--concurrency", "2")
    cluster.start("worker", "--concurrency", "2")
    async with client_engine(tmp_path, cluster.dsn) as engine:
        await wait_for(lambda: workers_alive(engine, 2), timeout=60, what=f"2 workers\n{cluster.logs()}")
        bystander = await engine.submit("sleep", "1")
        held = await engine.submit("sleep", "4")

        async def running_on() -> str | None:
            task = await engine.store.get_task(held.task_id)
            return task.worker_id if task and task.status == "running" else None

        worker_id = await wait_for(running_on, timeout=30, what="the task running")
        pids = {w.id: w.pid for w in (await engine.list_workers()).workers}
        if pids[worker_id] != victim.pid:  # kill whichever worker holds it
            victim = next(p for p in cluster.procs if p.pid == pids[worker_id])
        os.kill(victim.pid, signal.SIGKILL)

        async def finished() -> bool:
            statuses = await engine.task_statuses([held.task_id, bystander.task_id])
            return all(s == "completed" for s in statuses.values())

        await wait_for(finished, timeout=60, interval=0.2, what=f"the task completed again\n{cluster.logs()}")
        task = await engine.store.get_task(held.task_id)
        assert task is not None and task.lost_attempts == 1 and task.failures == 0
        history = [(a.status, a.worker_id) for a in await engine.store.get_attempts(held.task_id)]
        assert [s for s, _ in history] == ["lost", "completed"], history
        assert history[0][1] == worker_id and history[1][1] != worker_id


async def test_cancel_reaches_the_worker_running_the_task_and_a_late_end_does_not_undo_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start("worker", "--concurrency", "2")
    async with client_engine(tmp_path, cluster.dsn) as engine:
        await wait_for(lambda: workers_alive(engine, 1), timeout=60, what=f"a worker\n{cluster.logs()}")
        submitted = await engine.submit("sleep", "30")

        async def running() -> bool:
            task = await engine.store.get_task(submitted.task_id)
            return task is not None and task.status == "running"

        await wait_for(running, timeout=30, what="the task running")
        result = await engine.cancel(task_id=submitted.task_id)
        assert result.cancelled == [submitted.task_id]

        async def stopped() -> list[str]:
            return [a.status for a in await engine.store.get_attempts(submitted.task_id)]

        history = await wait_for(stopped, timeout=10, interval=0.1, what="the attempt stopped")
        assert history == ["cancelled"]
        await anyio.sleep(LEASE)  # a renewal or a late write would show by now
        task = await engine.store.get_task(submitted.task_id)
        assert task is not None and task.status == "cancelled"
        kinds = [
            n.kind
            for n in (await engine.notifications(all_scopes=True, include_delivered=True)).notifications
        ]
        assert kinds.count("task_cancelled") == 1


async def test_every_connection_cut_mid_run_loses_nothing(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start("worker", "--concurrency", "8")
    cluster.start("worker", "--concurrency", "8")
    async with client_engine(tmp_path, cluster.dsn) as engine:
        await wait_for(lambda: workers_alive(engine, 2), timeout=60, what=f"2 workers\n{cluster.logs()}")
        ids = [(await engine.submit("sleep", "0.2")).task_id for _ in range(200)]
        await anyio.sleep(0.5)
        name = cluster.dsn.rpartition("/")[2]
        cut = rows(
            POSTGRES_DSN,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            name,
        )[0][0]
        assert cut > 0

        async def drained() -> bool:
            statuses = await engine.task_statuses(ids)
            return all(s == "completed" for s in statuses.values())

        await wait_for(drained, timeout=90, interval=0.5, what=f"200 completed\n{cluster.logs()}")
    assert all(p.poll() is None for p in cluster.procs), cluster.logs()  # nobody died of it
    results = rows(cluster.dsn, "SELECT count(*) FROM task_results")[0][0]
    assert results == 200


async def test_a_finish_on_another_worker_reaches_this_processes_listeners(
    cluster: Cluster, tmp_path: Path
) -> None:
    """What feeds the daemon's event stream and MCP resource pushes: a task finished by a worker
    elsewhere arrives as a commit with its notification (LISTEN/NOTIFY), not only by polling."""
    cluster.start("worker", "--concurrency", "2")
    async with client_engine(tmp_path, cluster.dsn) as engine:
        await wait_for(lambda: workers_alive(engine, 1), timeout=60, what=f"a worker\n{cluster.logs()}")
        heard: list[tuple[str | None, str]] = []
        engine.add_listener(lambda c: heard.extend((n.task_id, n.kind) for n in c.notifications))
        submitted = await engine.submit("echo", "over the wire")

        async def told() -> bool:
            return (submitted.task_id, "task_completed") in heard

        await wait_for(told, timeout=30, interval=0.05, what="the remote finish announced here")
        page = await engine.notifications(all_scopes=True, include_delivered=True)
        assert [n.kind for n in page.notifications if n.task_id == submitted.task_id] == ["task_completed"]


async def test_a_task_claimed_as_the_worker_stops_goes_back_to_the_queue(
    database: str, tmp_path: Path
) -> None:
    """A claim in flight when the pool stops (shutdown) returns a task nothing can start any more:
    it goes back to the queue, the claim not one of its tries, and the engine does not crash."""
    settings = Settings(home=tmp_path, database=database, agents=all_test_agents(), lease_seconds=LEASE)  # type: ignore[arg-type]
    engine = Engine(settings)
    async with engine.running():
        engine.dispatcher.accepting = False  # stopping: the worksource claims nothing more itself
        submitted = await engine.submit("echo", "later")
        [task] = await engine._shared_store.claim(engine._claim_request(1))  # the claim in flight
        assert task.id == submitted.task_id and task.attempts == 1
        assert engine._claimed(task) is False
        await engine.attempts.give_back(task)
        info = await engine.get_task(task.id)
        assert info.status == "queued" and info.attempts == 0
    assert rows(database, "SELECT attempt, status FROM task_attempts WHERE task_id = %s", task.id) == [
        (1, "interrupted")
    ]


async def test_status_says_when_no_worker_serves_a_queued_tasks_queue(database: str, tmp_path: Path) -> None:
    """An API-only daemon and no worker: the task waits, and check_workflow_status says why."""
    async with client_engine(tmp_path, database) as engine:
        submitted = await engine.submit("echo", "nobody takes this")
        report = await engine.status(task_id=submitted.task_id)
        assert report.hint is not None
        assert report.hint.startswith("no worker serves agent echo on queue 'default'"), report.hint
        workflow = await engine.status(workflow_id=submitted.workflow_id)
        assert workflow.hint is not None and workflow.hint.startswith("no worker serves agent echo"), (
            workflow.hint
        )
