"""Fixtures shared by every test module: real settings, a real engine on a DuckDB file in tmp_path."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import psycopg
import pytest

from sidequest.config import AgentConfig, Settings
from sidequest.engine.engine import Engine

T = TypeVar("T")

TEST_AGENTS = (
    "echo",
    "echo_sync",
    "noop",
    "sleep",
    "sleep_sync",
    "fail",
    "fail_permanently",
    "raises_timeout",
    "flaky",
    "record_and_sleep",
    "big_result",
    "json_result",
    "bad_unicode",
    "exits",
    "reports_usage",
    "environment",
    "logs_deeply",
    "cites_badly",
)


def all_test_agents() -> dict[str, AgentConfig]:
    """Every agent in sidequest.testing.agents, named after its function."""
    return {
        name: AgentConfig(callable=f"sidequest.testing.agents:{name}", description=f"test agent {name}")
        for name in TEST_AGENTS
    }


def agents_toml() -> str:
    """The same agents as a config file, for tests that start a real server process."""
    return "".join(
        f'[agents.{name}]\nexecutor = "python"\ncallable = "sidequest.testing.agents:{name}"\n\n'
        for name in TEST_AGENTS
    )


@pytest.fixture(autouse=True)
def no_real_anthropic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in the suite may reach the real API: tests that need one point at the fake."""
    for name in list(os.environ):
        if name.startswith(("ANTHROPIC_", "CLAUDE_CODE_")) or name == "CLAUDE_PROJECT_DIR":
            monkeypatch.delenv(name)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Fast leases and a short drain so shutdown and recovery happen within a test's patience."""
    return Settings(
        home=tmp_path,
        agents=all_test_agents(),
        lease_seconds=2.0,
        shutdown_grace=1.0,
        max_concurrency=8,
        **store_database(),
    )


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    eng = Engine(settings)
    async with eng.running():
        yield eng


async def wait_for(
    check: Callable[[], Awaitable[T | None]], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await anyio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what or check!r} (last value: {last!r})")


# ---- one test, both stores ----------------------------------------------------------------------
#
# A module marked `pytestmark = pytest.mark.both_stores` runs each of its tests twice, as
# test[duckdb] and test[postgres], except the tests marked `@pytest.mark.duckdb_only("why")`, which
# run once, on DuckDB: nothing is skipped, a DuckDB-only test is simply not parametrized. The test
# does not change: the `store_kind` fixture (parametrized here) gives the run a fresh PostgreSQL
# database, and every Settings a test builds through `settings` or `store_database()` points at it.

STORE_KINDS = ("duckdb", "postgres")

_current_database: str | None = None
"""The DSN of the running test's PostgreSQL database (None: the test runs on DuckDB)."""


def store_database() -> dict[str, str]:
    """Settings fields that put a test's engine on the store it runs against: `database=<dsn>` for
    the postgres run of a both-stores test, nothing (DuckDB in `home`) otherwise. Every engine a
    test starts shares the one database, as every engine in one `home` shares its DuckDB file."""
    return {"database": _current_database} if _current_database is not None else {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    definition = metafunc.definition
    if definition.get_closest_marker("both_stores") and not definition.get_closest_marker("duckdb_only"):
        metafunc.parametrize("store_kind", STORE_KINDS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A DuckDB-only test says why: a bare marker would hide a test from PostgreSQL silently.

    A module's `POSTGRES_RUNS_WITH = {"param": value}` keeps the postgres runs of a test to that
    value of a store-independent parameter (the MCP transport mode): the other values run on
    DuckDB; the postgres runs left out are reported as deselected."""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("duckdb_only")
        if marker is not None and not (marker.args and str(marker.args[0]).strip()):
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.duckdb_only needs a reason")
        params = getattr(getattr(item, "callspec", None), "params", {})
        only = getattr(getattr(item, "module", None), "POSTGRES_RUNS_WITH", {})
        if params.get("store_kind") == "postgres" and any(
            name in params and params[name] != value for name, value in only.items()
        ):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def store_kind() -> str:
    """Which store the test runs on; "duckdb" unless its module is marked both_stores."""
    return "duckdb"


@pytest.fixture(scope="session")
def _both_stores_database() -> Iterator[str]:
    """One migrated database for every postgres run, emptied after each (creating, migrating and
    dropping a database per test costs ~0.5 s; emptying it ~0.05 s)."""
    from sidequest.storage.postgres import migrate

    with fresh_pg_database() as dsn:
        migrate(dsn)
        yield dsn


def _empty_database(dsn: str) -> None:
    """Every row gone (schema_version aside), identities restarted, no connection left behind."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables "
                "WHERE schemaname = 'public' AND tablename <> 'schema_version'"
            )
        ]
        conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")


@pytest.fixture(autouse=True)
def _store_for_test(store_kind: str, request: pytest.FixtureRequest) -> Iterator[None]:
    """For the postgres run, an empty, migrated database on the test server for this test."""
    global _current_database
    if store_kind != "postgres":
        yield
        return
    dsn: str = request.getfixturevalue("_both_stores_database")
    _current_database = dsn
    try:
        yield
    finally:
        _current_database = None
        _empty_database(dsn)


# ---- PostgreSQL (the shared store): a real server, a fresh schema per test ----------------------

POSTGRES_DSN = os.environ.get("SIDEQUEST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
"""Tests of the shared store run against a real PostgreSQL; CI provides one at this address."""


@contextlib.contextmanager
def fresh_pg_schema() -> Iterator[tuple[str, str]]:
    """(dsn, schema name) of a schema nobody has used; dropped afterwards with everything in it.

    A schema per test, not a database: creating a database costs ~100 ms and needs a connection
    outside it, while a schema is free and tests in one database cannot see each other's rows."""
    schema = f"sq_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield POSTGRES_DSN, schema
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@contextlib.contextmanager
def fresh_pg_database(password: str | None = None) -> Iterator[str]:
    """The DSN of a new, empty database on the test server, dropped afterwards (connections and all).

    For tests that start processes configured by `database = "postgresql://…"` alone (a schema
    would need a setting of its own). `password` goes into the DSN: the server's trust
    authentication ignores it, so a test can check it never leaks into output."""
    name = f"sq_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(POSTGRES_DSN)
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{(user.split(':')[0] or 'postgres')}:{password}@{host}"
    try:
        yield urlunsplit((parts.scheme, netloc, f"/{name}", parts.query, ""))
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, str]]:
    """(dsn, schema): a fresh, empty PostgreSQL schema for one test (the store migrates it)."""
    with fresh_pg_schema() as found:
        yield found
