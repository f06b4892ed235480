"""The operator's side of the shared store: `migrate`, `serve --no-work`, `sidequest worker`,
`sidequest workers`, `GET /api/v1/workers` and `status`, end to end through the command line.

These need the PostgreSQL store (sidequest/storage/postgres.py) and the engine's worker side
(Engine.list_workers, Engine(work=...), runner.run_worker), which are built on other branches: this
file is meant to pass once they are merged.

The database: a fresh one on the test server (`SIDEQUEST_TEST_POSTGRES_DSN`), dropped afterwards.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import agents_toml, fresh_pg_database
from test_cli import COMMAND_TIMEOUT, Cli, cli_session, only_line, wait_until

from sidequest.config import load_settings, redact_dsn
from sidequest.models import TaskInfo, TaskStatus, TaskSubmitted, WorkerList
from sidequest.storage.open import open_store
from sidequest.workers_cli import MigrateResult

pytestmark = pytest.mark.slow

SECRET = "pg-Secret-hunter2"
"""In every DSN below; trust authentication ignores it, so a leak shows and nothing else changes."""


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A DSN of an empty database on the test server, with SECRET as its password (ignored by the
    server's trust authentication, so a leak shows and nothing else changes)."""
    with fresh_pg_database(password=SECRET) as dsn:
        yield dsn


def _password(dsn: str) -> str | None:
    from urllib.parse import urlsplit

    return urlsplit(dsn).password


def _no_secret(dsn: str, *texts: str) -> None:
    secret = _password(dsn)
    for text in texts:
        assert not secret or secret not in text, text


def _pg_cli(base: Path, dsn: str, extra: str = "") -> contextlib.AbstractContextManager[Cli]:
    config = f"database = {dsn!r}\nshutdown_grace = 1\nlease_seconds = 5\n{extra}\n" + agents_toml()
    return cli_session(base, config)


def test_open_store_picks_the_store_the_setting_names(tmp_path: Path, postgres: str) -> None:
    from sidequest.storage import duckdb as duckdb_store
    from sidequest.storage import postgres as postgres_store

    env = {"SIDEQUEST_HOME": str(tmp_path)}
    duck = open_store(load_settings(env=env))
    assert isinstance(duck, duckdb_store.DuckDBStore) and duck.shared is False
    pg = open_store(load_settings(env={**env, "SIDEQUEST_DATABASE": postgres}))
    assert isinstance(pg, postgres_store.PostgresStore) and pg.shared is True


def test_migrate_a_postgres_database_then_again(tmp_path: Path, postgres: str) -> None:
    with _pg_cli(tmp_path, postgres) as cli:
        project = cli.project("migrate")
        shown = redact_dsn(postgres)
        first = cli(project, "migrate")
        result = MigrateResult.model_validate_json(cli(project, "migrate", "--json").stdout)
        assert result.store == "postgres" and result.database == shown
        assert result.from_version == result.to_version > 0
        line = first.stdout.strip()
        assert line in (
            f"{shown}: schema version 0 -> {result.to_version}",
            f"{shown}: already at version {result.to_version}",  # $SIDEQUEST_TEST_POSTGRES was migrated
        )
        assert cli(project, "migrate").stdout.strip() == f"{shown}: already at version {result.to_version}"
        _no_secret(postgres, first.stdout, first.stderr)


def test_migrate_a_database_that_does_not_exist_is_one_line(tmp_path: Path, postgres: str) -> None:
    missing = postgres.replace("/sidequest?", "/no_such_database?", 1)
    if "/no_such_database" not in missing:
        missing = postgres.rsplit("/", 1)[0] + "/no_such_database"
    with _pg_cli(tmp_path, missing) as cli:
        failed = cli(cli.project("missing"), "migrate", code=1)
        assert only_line(failed.stderr).startswith("sidequest: cannot migrate: ")
        assert "Traceback" not in failed.stderr
        _no_secret(postgres, failed.stderr)


def test_workers_on_duckdb_is_the_daemon_itself(tmp_path: Path) -> None:
    with cli_session(tmp_path, "shutdown_grace = 1\n" + agents_toml()) as cli:
        project = cli.project("workers")
        listing = WorkerList.model_validate_json(cli(project, "workers", "--json").stdout)
        assert len(listing.workers) == 1
        (daemon,) = listing.workers
        pid = json.loads((cli.home / "daemon.json").read_text())["pid"]
        assert (daemon.kind, daemon.pid, daemon.alive, daemon.agents) == ("daemon", pid, True, None)
        assert daemon.queues == ["default"] and daemon.concurrency == 4 and daemon.running == 0
        table = cli(project, "workers").stdout
        assert daemon.id in table and "daemon" in table and "0/4" in table
        assert "ago" in table or "now" in table
        status = cli(project, "status").stdout
        assert "workers" in status and "1 alive (1 daemon), running 0/4" in status
        report = json.loads(cli(project, "status", "--json").stdout)
        assert [w["id"] for w in report["workers"]] == [daemon.id]


def test_a_daemon_without_work_and_a_worker_on_postgres(tmp_path: Path, postgres: str) -> None:
    with _pg_cli(tmp_path, postgres, '[workers]\nqueues = ["default", "ops"]\n') as cli:
        project = cli.project("fleet")
        cli(project, "migrate")
        started = cli(project, "serve", "--no-work", "--detach")
        _no_secret(postgres, started.stdout, started.stderr)
        status = json.loads(cli(project, "status", "--json").stdout)
        assert status["database"] == redact_dsn(postgres)
        _no_secret(postgres, json.dumps(status), cli(project, "status").stdout)

        # Nothing runs the task until a worker comes.
        submitted = TaskSubmitted.model_validate_json(cli(project, "submit", "echo", "hi", "--json").stdout)
        time.sleep(1.0)
        shown = json.loads(cli(project, "show", submitted.task_id, "--json").stdout)
        queued = TaskInfo.model_validate(shown["task"])
        assert queued.status == TaskStatus.queued

        worker = subprocess.Popen(
            [sys.executable, "-m", "sidequest.cli", "worker", "--concurrency", "3", "--queue", "default"],
            env={**cli.env, "CLAUDE_PROJECT_DIR": str(project)},
            cwd=project,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:

            def done() -> bool:
                shown = json.loads(cli(project, "show", submitted.task_id, "--json").stdout)
                return TaskInfo.model_validate(shown["task"]).status == TaskStatus.completed

            wait_until(done, "the worker to run the task")
            listing = WorkerList.model_validate_json(cli(project, "workers", "--json").stdout)
            mine = [w for w in listing.workers if w.pid == worker.pid]
            assert len(mine) == 1 and mine[0].kind == "worker" and mine[0].alive
            assert mine[0].queues == ["default"] and mine[0].concurrency == 3
            table = cli(project, "workers").stdout
            assert mine[0].id in table and "worker" in table and "/3" in table
            assert "workers" in cli(project, "status").stdout
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                _, err = worker.communicate(timeout=COMMAND_TIMEOUT)
            except subprocess.TimeoutExpired:
                worker.kill()
                _, err = worker.communicate()
        assert worker.returncode == 0, err
        _no_secret(postgres, err)


def test_worker_refuses_nothing_on_postgres_but_a_bad_queue(tmp_path: Path, postgres: str) -> None:
    with _pg_cli(tmp_path, postgres) as cli:
        bad = cli(cli.project("queue"), "worker", "--queue", "no spaces", code=2)
        assert "not a queue name" in bad.stderr
