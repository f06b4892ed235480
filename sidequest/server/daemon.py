"""One daemon per data dir: find it, start it (exactly once, however many clients race), stop it.

Why a daemon: an MCP client kills its stdio server when the session ends, and DuckDB lets one
process write a file. So the work lives in `sidequest serve`, and every `sidequest stdio` and CLI
command is a client of it (the gopls `-remote=auto` model).

Files in the data dir:
- `daemon.lock`: held (flock) by the running daemon for its whole life. The lock, not the pid,
  says whether a daemon lives: the kernel drops it when the process dies, however it dies, and
  a recycled pid cannot fake it.
- `daemon.json` (0600): pid, host, port, token and version of the live daemon, written once it
  serves. A file whose lock is free is stale and is removed.
- `start.lock`: starters take it in turn, so when many clients start at once one daemon starts
  and the rest find it.
- `daemon.log`: stdout and stderr of a detached daemon.
- the DuckDB file and its `.wal` (unless `database` points elsewhere) and `token`.

The data dir is private: created 0700 (an existing one we own loses group and other access), and
every process that writes in it (the daemon, `stdio --embedded`) runs with umask 077, so each file
is 0600 whatever umask the user's shell had. The store holds every prompt and result, and the
token lets its holder run agents.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import anyio
import httpx2
from pydantic import BaseModel, ValidationError

from sidequest import __version__
from sidequest.config import ConfigError, Settings
from sidequest.engine.errors import Unavailable
from sidequest.server.client import DaemonClient, Endpoint

log = logging.getLogger(__name__)

STATE_FILE = "daemon.json"
LOCK_FILE = "daemon.lock"
START_LOCK_FILE = "start.lock"
LOG_FILE = "daemon.log"
START_TIMEOUT = 30.0
"""A cold start (imports, DuckDB open, WAL replay) takes about a second; 30 s means something broke."""
PRIVATE_UMASK = 0o077
"""The umask of every process that writes in the data dir: files 0600, folders 0700."""


class DaemonState(BaseModel):
    """What `daemon.json` holds: enough for a client to reach and check the daemon."""

    pid: int
    host: str
    port: int
    token: str
    version: str
    started_at: datetime
    database: str

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def endpoint(self) -> Endpoint:
        return Endpoint(url=self.url, token=self.token, version=self.version, pid=self.pid)


# ---- the data dir ---------------------------------------------------------------


def make_private_dir(home: Path) -> None:
    """Create the data dir 0700, or take group and other access away from an existing one we own.

    Only ever narrows: a folder the user made read-only stays read-only (and is then reported
    as such), and a folder someone else owns is left alone, with a warning when others can
    write in it.
    """
    home.mkdir(parents=True, exist_ok=True, mode=0o700)  # parents get the usual mode
    info = home.stat()
    if info.st_uid == os.geteuid():
        if info.st_mode & 0o077:
            home.chmod(stat.S_IMODE(info.st_mode) & 0o700)
    elif info.st_mode & 0o022:
        log.warning("the data dir %s belongs to uid %d and others may write in it", home, info.st_uid)


def secure_data_dir(home: Path) -> None:
    """What the daemon does before it writes: a private data dir whose files (ours) are 0600.

    Files written by an older version, or under another umask, are narrowed too, so upgrading
    closes what was open. Raises Unavailable naming the folder when it cannot be written.
    """
    with data_dir_errors(home):
        make_private_dir(home)
        for entry in os.scandir(home):
            if entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                if info.st_uid == os.geteuid() and info.st_mode & 0o077:
                    os.chmod(entry.path, stat.S_IMODE(info.st_mode) & 0o700)
    if not os.access(home, os.W_OK | os.X_OK):
        raise Unavailable(
            f"the data dir {home} is not writable by this user (uid {os.geteuid()}); sidequest keeps its "
            "store, token and locks there: make it writable, or set SIDEQUEST_HOME to another folder"
        )


@contextlib.contextmanager
def data_dir_errors(home: Path) -> Iterator[None]:
    """An OSError while creating or locking files in the data dir becomes one line naming the file."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or home
        raise Unavailable(
            f"cannot use the sidequest data dir {home}: {where}: {exc.strerror or exc}; make it readable "
            "and writable by this user, or set SIDEQUEST_HOME to another folder"
        ) from exc


# ---- the daemon's side ----------------------------------------------------------


class DaemonLock:
    """The running daemon's claim on its data dir, held until the process ends."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, home: Path) -> DaemonLock | None:
        """None when another live daemon holds it; Unavailable when the data dir is unusable."""
        path = home / LOCK_FILE
        with data_dir_errors(home):
            make_private_dir(home)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        lock = cls(fd, path)
        # A fork (multiprocessing in an agent) shares the lock; a child outliving us must not
        # keep it, or no daemon could start until that child ends. exec already closes it.
        os.register_at_fork(after_in_child=lock._close_in_child)
        return lock

    def _close_in_child(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def write_state(home: Path, state: DaemonState) -> None:
    """Atomically, and never readable by others: it holds the token."""
    path = home / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(state.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)


def clear_state(home: Path, pid: int) -> None:
    """Remove the state file if it is still ours (a successor may have written its own)."""
    path = home / STATE_FILE
    with contextlib.suppress(OSError, ValidationError, ValueError):
        if DaemonState.model_validate_json(path.read_bytes()).pid == pid:
            path.unlink()


# ---- the clients' side ------------------------------------------------------------


def daemon_alive(home: Path) -> bool:
    """Whether a daemon holds the data dir's lock right now."""
    lock = DaemonLock.acquire(home)
    if lock is None:
        return True
    lock.release()
    return False


def read_state(home: Path) -> DaemonState | None:
    """The live daemon's state; a stale file (no daemon holds the lock) is removed."""
    path = home / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        state = DaemonState.model_validate_json(raw)
    except (ValidationError, ValueError):
        state = None
    if daemon_alive(home):
        return state  # None while a starting daemon has not written it yet
    log.info("removing stale %s (no daemon holds %s)", path, LOCK_FILE)
    with contextlib.suppress(OSError):
        if path.read_bytes() == raw:
            path.unlink()
    return None


def http_client(timeout: float) -> httpx2.AsyncClient:
    """Never through a proxy from the environment: it would see the bearer token."""
    return httpx2.AsyncClient(timeout=timeout, trust_env=False)


async def healthy(state: DaemonState, timeout: float = 2.0) -> bool:
    """The daemon answers, and it is the one the state file names (not whoever has the port now)."""
    try:
        async with http_client(timeout) as http:
            response = await http.get(state.url + "/health")
        return response.status_code == 200 and response.json().get("pid") == state.pid
    except (httpx2.HTTPError, ValueError, AttributeError):
        return False


async def find_daemon(home: Path) -> DaemonState | None:
    """The daemon serving this data dir, if one is up and answering."""
    state = read_state(home)
    if state is not None and await healthy(state):
        return state
    return None


@asynccontextmanager
async def _start_lock(home: Path) -> AsyncIterator[None]:
    with data_dir_errors(home):
        make_private_dir(home)
        fd = os.open(home / START_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + START_TIMEOUT * 2
        while True:  # non-blocking tries: a thread blocked in flock could not be cancelled
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"another process has been starting the sidequest daemon in {home} for too long"
                )
            await anyio.sleep(0.02)
        yield
    finally:
        os.close(fd)


def daemon_command(config_path: str | Path | None, serve_args: list[str] | None = None) -> list[str]:
    command = [sys.executable, "-m", "sidequest.cli", "serve", *(serve_args or [])]
    if config_path:
        command += ["--config", str(Path(config_path).expanduser().resolve())]
    return command


def spawn_daemon(
    settings: Settings, config_path: str | Path | None, serve_args: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `sidequest serve` detached: its own session, no terminal, output to daemon.log.

    The daemon outlives this client and serves every project, so it gets a defined start rather
    than this process's: the environment is `config.DAEMON_ENV_ALLOW` (plus what the configuration
    passes to agents), never this shell's other variables or its `CLAUDE_PROJECT_DIR`, and the
    umask is PRIVATE_UMASK, never the one this shell happened to have. The variables of
    `<data dir>/env`, `env_file` and `[env]` go on top (`sidequest.envfile`), already at exec so
    that a PYTHONPATH set there reaches the interpreter's start.
    """
    from sidequest.envfile import config_file_of, defined_environment

    home = settings.home
    try:
        env, _ = defined_environment(
            os.environ, settings, config_file_of(settings, os.environ), allowlist=True
        )
    except ConfigError as exc:
        raise Unavailable(f"cannot start the sidequest daemon: {exc}") from exc
    env["SIDEQUEST_HOME"] = str(home)
    with data_dir_errors(home):
        make_private_dir(home)
        log_fd = os.open(home / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if os.fstat(log_fd).st_mode & 0o077:
            os.fchmod(log_fd, 0o600)  # written by an older version
        return subprocess.Popen(
            daemon_command(config_path, serve_args),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            cwd=home,
            env=env,
            umask=PRIVATE_UMASK,
            start_new_session=True,  # a client's Ctrl-C or exit must not reach the daemon
        )
    finally:
        os.close(log_fd)


def _log_size(home: Path) -> int:
    try:
        return (home / LOG_FILE).stat().st_size
    except OSError:
        return 0


def _start_failure(home: Path, since: int, lines: int = 15) -> str:
    """Why a daemon we started did not come up, from what it wrote to daemon.log after `since`.

    `sidequest serve` reports a failure it understands (a damaged store, a locked data dir) as
    one line starting with "sidequest: "; that line is the answer. Anything else (a crash) is
    shown as the end of the log.
    """
    try:
        with open(home / LOG_FILE, "rb") as fh:
            fh.seek(since)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return f"see {home / LOG_FILE}"
    written = text.splitlines()
    reasons = [line.removeprefix("sidequest: ") for line in written if line.startswith("sidequest: ")]
    if reasons:
        return f"{reasons[-1]} (log: {home / LOG_FILE})"
    tail = "\n".join(written[-lines:])
    return f"its log ({home / LOG_FILE}) ends with:\n{tail}"


async def ensure_daemon(
    settings: Settings, config_path: str | Path | None = None, serve_args: list[str] | None = None
) -> DaemonState:
    """The live daemon for `settings.home`, started (detached) if none answers."""
    home = settings.home
    found = await find_daemon(home)
    if found is not None:
        return found
    async with _start_lock(home):
        found = await find_daemon(home)  # someone may have started it while we waited
        if found is not None:
            return found
        if daemon_alive(home):
            # Holding the lock but not answering: starting, draining after a stop, or wedged.
            state = await _wait_for_state(home, None, START_TIMEOUT + settings.shutdown_grace)
            if state is not None:
                return state
            if daemon_alive(home):
                raise Unavailable(
                    f"a sidequest daemon holds {home / LOCK_FILE} but does not answer; see "
                    f"{home / LOG_FILE}, or stop it with `sidequest stop`"
                )
            # It finished stopping while we waited: start the next one.
        log_start = _log_size(home)
        child = spawn_daemon(settings, config_path, serve_args)
        log.info("started the sidequest daemon (pid %d) for %s", child.pid, home)
        state = await _wait_for_state(home, child, START_TIMEOUT)
        if state is None:
            code = child.poll()
            if code is None:
                child.kill()
            how = f"exited with status {code}" if code is not None else "did not answer in time"
            raise Unavailable(f"the sidequest daemon {how}: {_start_failure(home, log_start)}")
        return state


async def _wait_for_state(
    home: Path, child: subprocess.Popen[bytes] | None, timeout: float
) -> DaemonState | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(home)
        if state is not None and (child is None or state.pid == child.pid) and await healthy(state):
            return state
        if child is not None and child.poll() is not None:
            return None
        if child is None and not daemon_alive(home):
            return None  # the one we waited for let go (a stop's drain ended)
        await anyio.sleep(0.03)
    return None


async def stop_daemon(
    home: Path, timeout: float = 30.0, expected_pid: int | None = None
) -> DaemonState | None:
    """SIGTERM the daemon and wait until it let go of the data dir; the state it had, or None."""
    state = read_state(home)
    if state is None:
        if daemon_alive(home):
            raise Unavailable(f"a daemon holds {home / LOCK_FILE} but left no {STATE_FILE}; find it with ps")
        return None
    if expected_pid is not None and state.pid != expected_pid:
        return None  # another daemon took over since the caller looked: not ours to stop
    if not await healthy(state):
        # Never signal a pid we cannot confirm: it may have been recycled by an unrelated process.
        raise Unavailable(
            f"the daemon recorded in {home / STATE_FILE} (pid {state.pid}) does not answer; if it is "
            "wedged, kill it by hand"
        )
    try:
        os.kill(state.pid, signal.SIGTERM)
    except ProcessLookupError:
        return state
    deadline = time.monotonic() + timeout
    while daemon_alive(home):
        if time.monotonic() > deadline:
            log.warning("daemon %d did not stop in %.0f s; killing it", state.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while daemon_alive(home) and time.monotonic() < deadline:
                await anyio.sleep(0.05)
            break
        await anyio.sleep(0.05)
    clear_state(home, state.pid)
    return state


# ---- what fronts and CLI commands use ------------------------------------------


class DaemonLocator:
    """`Locate` for a `DaemonClient`: attach to the data dir's daemon, starting it when asked.

    The first daemon a client meets is checked for its version: a different one is replaced
    when it runs nothing (an upgrade takes effect at once), else kept with a warning, since
    killing someone's running agents to upgrade is worse than an old daemon.
    """

    def __init__(self, settings: Settings, config_path: str | Path | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.version_warning: str | None = None
        self._checked: set[int] = set()

    async def __call__(self, start: bool) -> Endpoint:
        home = self.settings.home
        state = await ensure_daemon(self.settings, self.config_path) if start else await find_daemon(home)
        if state is None:
            raise Unavailable(f"no sidequest daemon is running for {home}")
        if start and state.pid not in self._checked:  # the event relay (start=False) never restarts
            self._checked.add(state.pid)
            if state.version != __version__:
                state = await self._on_version_mismatch(state)
                self._checked.add(state.pid)
        return state.endpoint()

    async def _on_version_mismatch(self, state: DaemonState) -> DaemonState:
        running = await _running_count(state)
        if running == 0:
            log.warning(
                "the sidequest daemon (pid %d) runs version %s but this is %s; nothing is running, "
                "so restarting it",
                state.pid,
                state.version,
                __version__,
            )
            await stop_daemon(self.settings.home, expected_pid=state.pid)
            return await ensure_daemon(self.settings, self.config_path)
        self.version_warning = (
            f"the sidequest daemon (pid {state.pid}) runs version {state.version} but this client is "
            f"{__version__}; it is running {'some' if running is None else running} task(s), so it was "
            "kept. Run `sidequest stop` when they finish to upgrade it."
        )
        log.warning("%s", self.version_warning)
        return state


async def _running_count(state: DaemonState) -> int | None:
    """Attempts running in that daemon; None when it cannot tell (treated as busy)."""
    try:
        async with http_client(5.0) as http:
            response = await http.get(
                state.url + "/api/v1/daemon", headers={"Authorization": f"Bearer {state.token}"}
            )
        return int(response.json()["running"]) if response.status_code == 200 else None
    except (httpx2.HTTPError, ValueError, KeyError, TypeError):
        return None


@asynccontextmanager
async def open_client(
    settings: Settings, project: str, config_path: str | Path | None = None
) -> AsyncIterator[DaemonClient]:
    """A connected client of this data dir's daemon (started if needed), for CLI commands."""
    client = DaemonClient(DaemonLocator(settings, config_path), project)
    async with client:
        await client.connect()
        yield client
