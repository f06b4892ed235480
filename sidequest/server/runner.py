"""Running the servers: the daemon (`serve`), the stdio front, `--embedded`, and the small daemon
commands (`serve --detach`, `stop`, `status`).

Kept apart from `cli.py` so argument parsing stays cheap: a CLI command that only talks to the
daemon should not pay for importing uvicorn and the MCP server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, cast

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.lowlevel import EventLoopToken

from sidequest import __version__
from sidequest.config import Settings

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from sidequest.engine.engine import Engine
    from sidequest.models import DaemonStatus, EnvVar, WorkerList
    from sidequest.reload import Reloader
    from sidequest.server.client import Endpoint
    from sidequest.server.daemon import DaemonState
    from sidequest.server.http import QuietUvicorn

log = logging.getLogger("sidequest")

EXIT_NOT_RUNNING = 3
"""`sidequest status` when no daemon runs: scripts can tell it from a failure."""


class Fatal(Exception):
    """A start-up failure the user can fix (data dir locked by another process, port taken)."""


def _default_scope() -> str:
    from sidequest.engine.admission import default_scope

    return default_scope()


@contextmanager
def _startup_errors() -> Iterator[None]:
    """Known start-up failures become one line, not a traceback."""
    from sidequest.engine.errors import Unavailable
    from sidequest.storage.base import StoreError

    try:
        yield
    except (StoreError, Unavailable) as exc:
        raise Fatal(str(exc)) from exc


def _own_data_dir(settings: Settings) -> None:
    """Before a process that owns the store writes anything: umask 077 and a private data dir.

    The umask is process-wide and stays: DuckDB creates its `.wal` again after every
    checkpoint, and each must be 0600 too. Agents inherit it, so files they create are
    private to the user (docs/configuration.md says how to widen them).
    """
    from sidequest.server.daemon import PRIVATE_UMASK, secure_data_dir

    os.umask(PRIVATE_UMASK)
    with _startup_errors():
        secure_data_dir(settings.home)


async def _stop_on_signal(
    scope: anyio.CancelScope,
    on_signal: Callable[[], None] | None = None,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """SIGTERM/SIGINT end the work gracefully: leaving engine.running() drains running tasks.

    Started with `tg.start`, so "serving" is only announced once the handler is installed; a
    SIGTERM in between would otherwise kill the process by the default action.
    """
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s; stopping", signal.Signals(signum).name)
            if on_signal is not None:
                on_signal()
            else:
                scope.cancel()
            return


def _apply_environment(settings: Settings) -> list[EnvVar]:
    """`<data dir>/env`, `env_file` and `[env]` into os.environ before the engine is built, so a
    foreground `serve` reads them as a detached one does; what each name came from, for `status`."""
    from sidequest.config import ConfigError
    from sidequest.envfile import apply_to_process

    try:
        return apply_to_process(settings)
    except ConfigError as exc:
        raise Fatal(f"configuration error: {exc}") from exc


def _reloader(settings: Settings) -> Reloader:
    """Like `_apply_environment`, but kept: the daemon reloads its config and env files live."""
    from sidequest.config import ConfigError
    from sidequest.reload import Reloader

    try:
        reloader = Reloader(settings)
    except ConfigError as exc:
        raise Fatal(f"configuration error: {exc}") from exc
    reloader.apply_environment()
    return reloader


def _schema_version(kind: str) -> int:
    """The schema the store was migrated to when it opened (it refuses to open otherwise)."""
    if kind == "postgres":
        from sidequest.storage.postgres import migrations as postgres_migrations

        return postgres_migrations()[-1][0]
    from sidequest.storage.duckdb import migrations

    return migrations()[-1][0]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _failure(engine: Engine) -> str | None:
    return str(engine.failure) if engine.failure is not None else None


FAIL_STOP_LINGER = 1.0
"""Seconds a daemon whose store failed keeps answering 503 (and /health, `status` say why)
before it exits: long enough for calls in flight to get the reason, too short to be a zombie."""


async def _stop_on_store_failure(engine: Engine, stop: Callable[[], None], linger: float = 0.0) -> None:
    """Fail-stop: a daemon whose store cannot write must not live on as a zombie. Requests in
    flight get their 503; then the process exits and the next client start recovers."""
    await engine.failed.wait()
    log.critical("stopping: %s", engine.failure)
    await anyio.sleep(linger)
    stop()


# ---- stdio ------------------------------------------------------------------


async def stdio_embedded(settings: Settings) -> None:
    from sidequest.engine.engine import Engine
    from sidequest.server.mcp import build_server
    from sidequest.storage.open import open_store

    _own_data_dir(settings)
    _apply_environment(settings)
    with _startup_errors():
        engine = Engine(settings, open_store(settings))
    with _startup_errors():
        async with engine.running():
            server = build_server(engine, _default_scope())
            async with anyio.create_task_group() as tg:
                await tg.start(_stop_on_signal, tg.cancel_scope)
                tg.start_soon(_stop_on_store_failure, engine, tg.cancel_scope.cancel)
                log.info("serving MCP over stdio (data dir %s)", settings.home)
                await _serve_stdio(server)  # returns when the client closes stdin
                tg.cancel_scope.cancel()


async def stdio_front(settings: Settings) -> None:
    """MCP over stdio, every call forwarded to the shared daemon (started if none runs)."""
    from sidequest.engine.errors import Unavailable
    from sidequest.server.client import DaemonClient
    from sidequest.server.daemon import DaemonLocator
    from sidequest.server.mcp import build_server

    project = _default_scope()
    locator = DaemonLocator(settings)
    async with DaemonClient(locator, project) as client:
        try:
            endpoint = await client.connect()
        except Unavailable as exc:
            raise Fatal(str(exc)) from exc
        from sidequest.keynotice import notice_missing_keys

        await notice_missing_keys(client, settings)  # stderr: stdout is the protocol
        server = build_server(client, project, notice=locator.version_warning)
        async with anyio.create_task_group() as tg:
            await tg.start(_stop_on_signal, tg.cancel_scope)
            tg.start_soon(client.relay_events)
            log.info(
                "serving MCP over stdio through the sidequest daemon at %s (pid %d, data dir %s)",
                endpoint.url,
                endpoint.pid,
                settings.home,
            )
            await _serve_stdio(server)  # returns when the client closes stdin
            tg.cancel_scope.cancel()


async def _serve_stdio(server: MCPServer) -> None:
    """MCPServer.run_stdio_async, but with a stdin read that a signal can abandon."""
    stdin = cast(anyio.AsyncFile[str], _StdinLines(_claim_stdin()))
    from mcp.server.stdio import stdio_server

    async with stdio_server(stdin=stdin) as (read_stream, write_stream):
        low = server._lowlevel_server
        await low.run(read_stream, write_stream, low.create_initialization_options())


def _claim_stdin() -> TextIO:
    """Read the protocol from a private copy of fd 0 and point fd 0 at /dev/null, so nothing
    else in the process (or its children) can consume protocol bytes."""
    private = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # closefd=False: an abandoned reader thread may still block on it until the process ends.
    return os.fdopen(private, "r", encoding="utf-8", errors="replace", closefd=False)


class _StdinLines:
    """Lines of stdin, read by a daemon thread.

    The SDK reads stdin in an anyio worker thread: cancellation waits for it, and
    interpreter exit joins it, so a SIGTERM'd server would live on until the
    client wrote another line. A daemon thread is simply left behind at exit.
    """

    def __init__(self, fp: TextIO) -> None:
        self._fp = fp
        self._send, self._receive = anyio.create_memory_object_stream[str](16)
        self._thread: threading.Thread | None = None

    def __aiter__(self) -> _StdinLines:
        return self

    async def __anext__(self) -> str:
        if self._thread is None:
            token = anyio.lowlevel.current_token()
            self._thread = threading.Thread(target=self._read, args=(token,), name="stdin", daemon=True)
            self._thread.start()
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def _read(self, token: EventLoopToken) -> None:
        try:
            for line in iter(self._fp.readline, ""):
                anyio.from_thread.run(self._send.send, line, token=token)
            anyio.from_thread.run_sync(self._send.close, token=token)
        except Exception:  # the event loop has ended: we are shutting down, nobody wants the line
            return


# ---- serve ------------------------------------------------------------------


async def serve(settings: Settings, *, work: bool = True) -> None:
    """`work=False` (`serve --no-work`, shared store only): MCP, REST, schedules and the reads, while
    `sidequest worker` processes run the attempts."""
    import uvicorn

    from sidequest.engine.engine import Engine
    from sidequest.models import DaemonStatus, utcnow
    from sidequest.server.daemon import DaemonLock, DaemonState, clear_state, read_state
    from sidequest.server.http import QuietUvicorn, build_app, load_or_create_token
    from sidequest.server.mcp import build_server
    from sidequest.server.rest import build_rest_app, close_event_streams
    from sidequest.storage.open import open_store

    _own_data_dir(settings)
    reloader = _reloader(settings)
    with _startup_errors():
        lock = DaemonLock.acquire(settings.home)
    if lock is None:
        other = read_state(settings.home)
        where = f" (pid {other.pid}, {other.url})" if other else ""
        raise Fatal(
            f"a sidequest daemon is already running for {settings.home}{where}; "
            "`sidequest status` shows it, `sidequest stop` stops it"
        )
    try:
        host = settings.http.host
        sock = _bind(host, settings.http.port)
        port = sock.getsockname()[1]
        try:
            token = load_or_create_token(settings.token_path)
        except OSError as exc:
            sock.close()
            raise Fatal(
                f"cannot read or create the token file {settings.token_path}: {exc.strerror or exc}; "
                "make it (and its folder) readable and writable by this user"
            ) from exc
        with _startup_errors():
            store = open_store(settings)
        engine = Engine(settings, store, work=work)
        reloader.attach(engine)
        started = utcnow()
        state = DaemonState(
            pid=os.getpid(),
            host=host,
            port=port,
            token=token,
            version=__version__,
            started_at=started,
            database=settings.database_display,  # never the DSN's password: `status` prints it
        )
        on_file = settings.store_kind == "duckdb"

        async def daemon_status() -> DaemonStatus:
            failure = engine.failure
            database = settings.database_path
            from sidequest.storage.base import StoreError

            size = 0
            if not on_file and failure is None:  # the tables' size, as the database counts it
                with contextlib.suppress(StoreError):
                    size = (await engine.store.disk_usage()).file_bytes
            return DaemonStatus(
                schema_version=None if failure else _schema_version(settings.store_kind),
                database_bytes=_size(database) if on_file else size,
                wal_bytes=_size(database.with_name(database.name + ".wal")) if on_file else 0,
                disk_free_bytes=_free_bytes(settings.home),
                environment=reloader.environment,
                config=reloader.status(),
                store_error=str(failure) if failure else None,
                version=__version__,
                pid=state.pid,
                host=host,
                port=port,
                started_at=started,
                uptime_seconds=round((utcnow() - started).total_seconds(), 3),
                data_dir=str(settings.home),
                database=state.database,
                tasks=await engine.task_counts() if failure is None else {},
                running=engine.running_count,
            )

        with _startup_errors(), sock:
            async with engine.running():
                rest = build_rest_app(engine, daemon_status, reloader)
                # HTTP MCP clients share the daemon's scope, which is no project anyone connected from.
                mcp = build_server(engine, _default_scope(), trusted=False)
                app = build_app(
                    mcp,
                    token,
                    host,
                    rest,
                    problem=lambda: _failure(engine),
                    max_body=settings.max_request_bytes * 4 + 65536,
                )
                config = uvicorn.Config(
                    app,
                    log_level="warning",
                    lifespan="on",
                    timeout_graceful_shutdown=max(1, int(settings.shutdown_grace)),
                )
                server = QuietUvicorn(config)
                try:
                    async with anyio.create_task_group() as tg:

                        def on_signal() -> None:
                            close_event_streams(rest)  # else uvicorn waits out the grace for them
                            server.stop()

                        await tg.start(_stop_on_signal, tg.cancel_scope, on_signal)
                        tg.start_soon(_stop_on_store_failure, engine, on_signal, FAIL_STOP_LINGER)
                        tg.start_soon(_announce, server, state, engine)
                        tg.start_soon(reloader.watch)
                        await server.serve(sockets=[sock])
                        tg.cancel_scope.cancel()
                finally:
                    clear_state(settings.home, state.pid)  # clients stop finding us before the drain
                if not server.started:
                    raise Fatal("the HTTP server failed to start; see the log above")
            if engine.failure is not None:
                raise Fatal(f"stopped because the store failed: {engine.failure}")
    finally:
        lock.release()
    log.info("stopped")


async def detach(settings: Settings, serve_args: list[str]) -> None:
    from sidequest.engine.errors import Unavailable
    from sidequest.server.daemon import LOG_FILE, ensure_daemon

    try:
        state = await ensure_daemon(settings, serve_args=serve_args)
    except Unavailable as exc:
        raise Fatal(str(exc)) from exc
    print(
        f"sidequest daemon (pid {state.pid}, version {state.version}) serving at {state.url}\n"
        f"  log: {settings.home / LOG_FILE}\n"
        f"  connect Claude Code: claude mcp add sidequest -- sidequest stdio\n"
        f"  stop it: sidequest stop",
        file=sys.stderr,
    )
    wanted = settings.http
    if (wanted.port and wanted.port != state.port) or state.host != wanted.host:
        log.warning(
            "the running daemon listens on %s:%d, not the %s:%d asked for; `sidequest stop` to change it",
            state.host,
            state.port,
            wanted.host,
            wanted.port,
        )


async def stop(settings: Settings) -> None:
    from sidequest.engine.errors import Unavailable
    from sidequest.server.daemon import stop_daemon

    try:
        state = await stop_daemon(settings.home, timeout=settings.shutdown_grace + 20)
    except Unavailable as exc:
        raise Fatal(str(exc)) from exc
    if state is None:
        print(f"no sidequest daemon is running for {settings.home}", file=sys.stderr)
    else:
        print(f"stopped the sidequest daemon (pid {state.pid})", file=sys.stderr)


async def status(settings: Settings, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from sidequest.engine.errors import EngineError, Unavailable
    from sidequest.server.daemon import find_daemon

    try:
        state = await find_daemon(settings.home)
    except Unavailable as exc:
        raise Fatal(str(exc)) from exc
    if state is None:
        if as_json:
            print(json.dumps({"alive": False, "data_dir": str(settings.home)}))
        else:
            print(f"no sidequest daemon is running for {settings.home}")
        raise SystemExit(EXIT_NOT_RUNNING)
    try:
        status = await daemon_status_of(state)
    except EngineError as exc:
        raise Fatal(str(exc)) from exc
    workers = await _workers_of(state)
    if as_json:
        listed = {"workers": workers.model_dump(mode="json")["workers"]} if workers is not None else {}
        print(json.dumps({"alive": True, **status.model_dump(mode="json"), **listed}))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("daemon", f"running, pid {status.pid}, version {status.version}")
    table.add_row("url", state.url)
    table.add_row("uptime", _duration(status.uptime_seconds))
    table.add_row("data dir", status.data_dir)
    table.add_row("store", status.database)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(status.tasks.items())) or "none"
    table.add_row("tasks", counts)
    table.add_row("running now", str(status.running))
    if workers is not None:
        from sidequest.workers_cli import workers_summary

        table.add_row("workers", workers_summary(workers))
    if status.config is not None:
        config = status.config
        table.add_row("config", Text(config.file or "none (defaults)"))
        table.add_row("loaded at", f"{config.loaded_at:%Y-%m-%d %H:%M:%S} UTC")
        if config.problem:
            table.add_row("CONFIG PROBLEM", Text(f"{config.problem} (not applied; the loaded one serves)"))
        elif config.differs_on_disk:
            table.add_row("config on disk", "changed since loaded; `sidequest reload` reads it")
        if config.needs_restart:
            table.add_row("needs restart", ", ".join(config.needs_restart) + " (`sidequest stop`)")
    if status.store_error:
        table.add_row("STORE FAILED", f"{status.store_error} (the daemon is stopping)")
    Console().print(table)


async def daemon_status_of(state: DaemonState) -> DaemonStatus:
    """`GET /api/v1/daemon` of the daemon `state` names (never starting one)."""
    from sidequest.server.client import DaemonClient

    endpoint = state.endpoint()

    async def here(_: bool) -> Endpoint:
        return endpoint

    async with DaemonClient(here, _default_scope()) as client:
        return await client.daemon_status()


async def _workers_of(state: DaemonState) -> WorkerList | None:
    """`GET /api/v1/workers`, or None from a daemon that cannot say (an older version): the rest of
    `status` is still worth printing."""
    from sidequest.engine.errors import EngineError
    from sidequest.server.client import DaemonClient

    endpoint = state.endpoint()

    async def here(_: bool) -> Endpoint:
        return endpoint

    async with DaemonClient(here, _default_scope()) as client:
        try:
            return await client.list_workers()
        except EngineError as exc:
            log.debug("the daemon lists no workers: %s", exc)
            return None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if hours or days else []
    parts += [f"{minutes}m", f"{secs}s"]
    return " ".join(parts)


def _bind(host: str, port: int) -> socket.socket:
    """Bind before starting so port 0 resolves to a real port we can print."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
    # it every response waits ~40 ms for a delayed ACK (headers and body are two writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Fatal(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(128)
    return sock  # not inheritable: an agent's child outliving us must not keep the port


async def _announce(server: QuietUvicorn, state: DaemonState, engine: Engine) -> None:
    """Publish the state file once HTTP answers (clients wait for it), then tell the human."""
    from sidequest.server.daemon import write_state

    settings = engine.settings
    here = _default_scope()
    agents, problems = await anyio.to_thread.run_sync(engine.list_agents, here, here)
    while not server.started:
        await anyio.sleep(0.02)
    write_state(settings.home, state)
    url = f"{state.url}/mcp"
    token_path: Path = settings.token_path
    print(
        f"sidequest {__version__} daemon (pid {state.pid}) serving at {state.url}\n"
        f"  data dir:   {settings.home}\n"
        f"  connect Claude Code (each session talks to this daemon; it is started when needed):\n"
        f"    claude mcp add sidequest -- sidequest stdio\n"
        f"  or straight over HTTP:\n"
        f"    claude mcp add --transport http sidequest {url} "
        f'-H "Authorization: Bearer $(cat {token_path})"\n'
        f"  REST: {state.url}/api/v1 (OpenAPI at /api/v1/openapi.json); health: {state.url}/health\n"
        f"  token file: {token_path} (send it as 'Authorization: Bearer <token>')\n"
        f"  agents: {_agents_line(settings, [a.name for a in agents])}"
        + "".join(f"\n  broken agent file: {problem.error}" for problem in problems),
        file=sys.stderr,
        flush=True,
    )


def _agents_line(settings: Settings, names: list[str]) -> str:
    if names:
        return ", ".join(names)
    return (
        f"none yet: write agent files in .claude/agents/ or {settings.user_agent_dir}, or add "
        f"[agents.NAME] tables to {settings.home / 'sidequest.toml'} (see examples/sidequest.toml)"
    )
