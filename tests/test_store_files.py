"""A store file sidequest cannot use is refused in one line naming the file and what to do.

Every case is a real file in tmp_path: a sidequest store cut short, a write-ahead log damaged
or torn, another program's DuckDB or SQLite database, a read-only file or folder. Each is
opened twice: by `sidequest serve` in a subprocess (what a user or a client starting the daemon
sees on stderr, and its exit status) and by `DuckDBStore.open()` (the StoreError it raises).
The log cases use the log of a real daemon killed with SIGKILL, so DuckDB never checkpointed it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from conftest import agents_toml

import sidequest
from sidequest.server.daemon import LOG_FILE, daemon_alive, read_state
from sidequest.storage.base import StoreError
from sidequest.storage.duckdb import DuckDBStore

pytestmark = pytest.mark.slow

REPO = Path(sidequest.__file__).resolve().parent.parent

UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
"""Root reads and writes any file whatever its mode; without these two capabilities it obeys file
modes like any other user, which is what the read-only cases need."""


def env_for(home: Path) -> dict[str, str]:
    """A minimal environment; HOME is a fresh folder, so an extension DuckDB fetched would show there."""
    user_home = home.parent / "user-home"
    user_home.mkdir(exist_ok=True)
    return {
        "SIDEQUEST_HOME": str(home),
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO),
        "HOME": str(user_home),
    }


def run_cli(
    home: Path, *args: str, unprivileged: bool = False, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(UNPRIVILEGED if unprivileged else []), sys.executable, "-m", "sidequest.cli", *args],
        env=env_for(home),
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def serve(home: Path, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    """`sidequest serve` in the foreground: a refused store makes it exit at once."""
    return run_cli(home, "serve", "--port", "0", unprivileged=unprivileged, timeout=60)


def refused_in_one_line(result: subprocess.CompletedProcess[str], names: Path) -> str:
    """Exit status 1, no traceback, and exactly one `sidequest: …` line, which names the file."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sidequest: ")]
    assert len(errors) == 1, result.stderr
    assert str(names) in errors[0], errors[0]
    return errors[0]


def open_error(path: Path, unprivileged: bool = False) -> str:
    """The StoreError message `DuckDBStore(path).open()` raises (in a subprocess when root must
    give up its override of file modes)."""
    if unprivileged and UNPRIVILEGED:
        code = (
            "import sys\n"
            "from sidequest.storage.base import StoreError\n"
            "from sidequest.storage.duckdb import DuckDBStore\n"
            "try:\n"
            "    DuckDBStore(sys.argv[1]).open()\n"
            "except StoreError as exc:\n"
            "    print(exc)\n"
            "else:\n"
            "    sys.exit('the store opened')\n"
        )
        done = subprocess.run(
            [*UNPRIVILEGED, sys.executable, "-c", code, str(path)],
            env=env_for(path.parent),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        message = done.stdout.strip()
    else:
        with pytest.raises(StoreError) as caught:
            DuckDBStore(path).open()
        message = str(caught.value)
    assert "\n" not in message
    return message


def needs_file_modes() -> None:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.fail(
            "root ignores file modes, and setpriv (util-linux, essential on Debian) is missing to drop "
            "that power: install util-linux"
        )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def real_store(home: Path) -> Path:
    """A valid, empty sidequest store, closed (so checkpointed: no log next to it)."""
    path = home / "sidequest.duckdb"
    store = DuckDBStore(path)
    store.open()
    store.close()
    return path


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """The store and log of a daemon killed with SIGKILL after three tasks: their rows are only in the log."""
    home = tmp_path_factory.mktemp("crashed") / "home"
    home.mkdir()
    (home / "sidequest.toml").write_text(agents_toml(), encoding="utf-8")
    pid = None
    try:
        for n in range(3):
            done = run_cli(home, "submit", "echo", f"task {n}", "--wait", "--json")
            assert done.returncode == 0, done.stderr
        state = read_state(home)
        assert state is not None
        pid = state.pid
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while daemon_alive(home) and time.monotonic() < deadline:
        time.sleep(0.05)
    wal = home / "sidequest.duckdb.wal"
    assert wal.stat().st_size > 0
    return (home / "sidequest.duckdb").read_bytes(), wal.read_bytes()


def place(home: Path, store: bytes, wal: bytes) -> tuple[Path, Path]:
    path, log = home / "sidequest.duckdb", home / "sidequest.duckdb.wal"
    path.write_bytes(store)
    log.write_bytes(wal)
    return path, log


def _count_tasks(path: Path) -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return int(con.execute("SELECT count(*) FROM task_executions").fetchone()[0])  # type: ignore[index]
    finally:
        con.close()


# ---- damaged files ------------------------------------------------------------------------


def test_truncated_database_file_is_refused_naming_it(home: Path) -> None:
    path = real_store(home)
    os.truncate(path, 8192 + 17)  # the headers survive; the blocks they point to do not

    line = refused_in_one_line(serve(home), path)
    assert "truncated or damaged" in line
    message = open_error(path)
    assert str(path) in message and "restore it from a backup" in message


@pytest.mark.parametrize(
    "content", [b"", b"notes I saved here by mistake\n" * 100], ids=["empty", "someone-else's-text"]
)
def test_a_file_that_is_not_a_duckdb_database_is_refused(home: Path, content: bytes) -> None:
    path = home / "sidequest.duckdb"
    path.write_bytes(content)

    line = refused_in_one_line(serve(home), path)
    assert "is not a DuckDB database" in line
    assert "move it aside" in open_error(path)
    assert path.read_bytes() == content


def test_log_with_a_bad_checksum_is_refused_naming_the_log(home: Path, crashed: tuple[bytes, bytes]) -> None:
    store, wal = crashed
    path, log = place(home, store, wal[:-1] + bytes([wal[-1] ^ 0xFF]))  # inside the last entry

    line = refused_in_one_line(serve(home), log)
    assert "is damaged" in line and "checksum" in line
    message = open_error(path)
    assert str(log) in message and f"move {log.name} aside" in message


# ---- a torn log: DuckDB drops its end without a word; sidequest says so ---------------------


def test_intact_log_of_a_killed_daemon_replays_every_task_without_a_warning(
    home: Path, crashed: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = place(home, *crashed)
    with caplog.at_level(logging.WARNING, logger="sidequest.storage.duckdb"):
        store = DuckDBStore(path)
        store.open()
        store.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert _count_tasks(path) == 3


@pytest.mark.parametrize("keep", [-7, 0.5], ids=["last-bytes-cut", "cut-in-half"])
def test_torn_log_end_is_reported_with_the_file_name_and_the_store_still_opens(
    home: Path, crashed: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture, keep: float
) -> None:
    store, wal = crashed
    end = int(len(wal) * keep) if isinstance(keep, float) else len(wal) + int(keep)
    path, log = place(home, store, wal[:end])

    with caplog.at_level(logging.WARNING, logger="sidequest.storage.duckdb"):
        opened = DuckDBStore(path)
        opened.open()
        opened.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{log} ends in an incomplete write")
    assert f"of {end} bytes" in warnings[0]
    assert _count_tasks(path) <= 3


def test_daemon_started_on_a_torn_log_writes_the_warning_to_its_log(
    home: Path, crashed: tuple[bytes, bytes]
) -> None:
    store, wal = crashed
    _, log = place(home, store, wal[: len(wal) // 2])
    (home / "sidequest.toml").write_text(agents_toml(), encoding="utf-8")
    try:
        started = run_cli(home, "serve", "--detach")
        assert started.returncode == 0, started.stderr
        written = (home / LOG_FILE).read_text(encoding="utf-8")
        warnings = [line for line in written.splitlines() if " WARNING " in line and str(log) in line]
        assert len(warnings) == 1, written
        assert "incomplete write" in warnings[0]
        done = run_cli(home, "submit", "echo", "after the crash", "--wait", "--json")
        assert done.returncode == 0, done.stderr  # the store is usable: the torn end was dropped
    finally:
        state = read_state(home)
        if state is not None:
            os.kill(state.pid, signal.SIGKILL)


# ---- someone else's database ----------------------------------------------------------------


@pytest.mark.parametrize(
    "tables",
    [
        ["CREATE TABLE task_executions (a INTEGER, b VARCHAR)"],
        ["CREATE TABLE customers (id INTEGER, name VARCHAR)"],
        [
            "CREATE TABLE schema_version (version INTEGER, name VARCHAR)",
            "INSERT INTO schema_version VALUES (7, 'x')",
        ],
    ],
    ids=["conflicting-task-table", "unrelated-tables", "their-own-schema-version"],
)
def test_a_duckdb_database_of_another_program_is_refused_and_left_unchanged(
    home: Path, tables: list[str]
) -> None:
    path = home / "sidequest.duckdb"
    con = duckdb.connect(str(path))
    for statement in tables:
        con.execute(statement)
    before = sorted(con.execute("SELECT table_name FROM information_schema.tables").fetchall())
    con.close()

    line = refused_in_one_line(serve(home), path)
    assert "is not a sidequest database" in line
    assert "not a sidequest database" in open_error(path)
    con = duckdb.connect(str(path), read_only=True)
    after = sorted(con.execute("SELECT table_name FROM information_schema.tables").fetchall())
    con.close()
    assert after == before  # nothing "migrated" into it


def test_a_sidequest_store_whose_table_was_replaced_is_refused(home: Path) -> None:
    path = real_store(home)
    con = duckdb.connect(str(path))
    con.execute("DROP TABLE task_results")
    con.execute("CREATE TABLE task_results (task_id VARCHAR, body BLOB)")
    con.close()

    line = refused_in_one_line(serve(home), path)
    assert "changed outside sidequest" in line and "task_results lacks" in line
    assert "task_results lacks content_type" in open_error(path)


def test_a_sqlite_file_is_refused_without_fetching_a_duckdb_extension(home: Path) -> None:
    path = home / "sidequest.duckdb"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.commit()
    con.close()

    line = refused_in_one_line(serve(home), path)
    assert "is a SQLite database" in line
    assert "SQLite" in open_error(path)
    assert not (Path(env_for(home)["HOME"]) / ".duckdb").exists()  # no extension was installed


# ---- read-only ------------------------------------------------------------------------------


def test_read_only_database_file_is_refused_naming_it(home: Path) -> None:
    needs_file_modes()
    path = real_store(home)
    path.chmod(0o400)
    try:
        line = refused_in_one_line(serve(home, unprivileged=True), path)
        assert "not readable and writable by this user" in line
        assert f"chmod u+rw {path}" in open_error(path, unprivileged=True)
    finally:
        path.chmod(0o600)


def test_read_only_data_dir_is_refused_naming_it(home: Path) -> None:
    """DuckDB would open the file and fail at the first write (creating the .wal): refused up front."""
    needs_file_modes()
    path = real_store(home)
    home.chmod(0o500)
    try:
        line = refused_in_one_line(serve(home, unprivileged=True), home)
        assert "not writable" in line
        message = open_error(path, unprivileged=True)
        assert f"{home} is not writable" in message and "sidequest.duckdb.wal" in message
    finally:
        home.chmod(0o700)


# ---- what a client starting the daemon shows --------------------------------------------------


def test_a_client_in_a_read_only_data_dir_says_so_in_one_line(home: Path) -> None:
    needs_file_modes()
    home.chmod(0o500)  # empty: not even the lock files can be created
    try:
        done = run_cli(home, "submit", "echo", "hello", unprivileged=True)
        line = refused_in_one_line(done, home)
        assert "cannot use the sidequest data dir" in line and "Permission denied" in line
    finally:
        home.chmod(0o700)


def test_a_client_that_starts_the_daemon_on_a_damaged_store_shows_the_reason_in_one_line(home: Path) -> None:
    path = real_store(home)
    os.truncate(path, 8192 + 17)
    (home / "sidequest.toml").write_text(agents_toml(), encoding="utf-8")

    done = run_cli(home, "submit", "echo", "hello")
    line = refused_in_one_line(done, path)
    assert "the sidequest daemon exited with status 1" in line and "truncated or damaged" in line
    assert str(home / LOG_FILE) in line
