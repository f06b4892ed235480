"""`sidequest` command line: serve/stop/status (the daemon), stdio (what an MCP client launches),
the daemon's clients (submit, tasks, show, cancel, notifications, agents) and version.

stdout belongs to the MCP protocol in `stdio` mode and to command output elsewhere, so logs and
banners go to stderr, in every mode, to keep one rule.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import anyio
import anyio.abc
import anyio.lowlevel
import uvicorn
from anyio.lowlevel import EventLoopToken
from mcp.server.stdio import stdio_server
from pydantic import ValidationError

from sidequest import __version__
from sidequest.commands import add_commands, run_command
from sidequest.config import ConfigError, Settings, format_validation_error, load_settings

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from sidequest.engine.engine import Engine
    from sidequest.server.client import Endpoint
    from sidequest.server.daemon import DaemonState

log = logging.getLogger("sidequest")

EXIT_CONFIG = 2
EXIT_FAILED = 1
EXIT_NOT_RUNNING = 3
"""`sidequest status` when no daemon runs: scripts can tell it from a failure."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidequest", description="Durable background agents for MCP clients."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon: the engine plus MCP, REST and events over HTTP")
    _config_option(serve)
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; http.host in the config)")
    serve.add_argument("--port", type=int, help="port to bind (default: http.port, 0 = a free port)")
    serve.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow --host to be an address other computers can reach (anyone with the token can run agents)",
    )
    serve.add_argument(
        "--detach", action="store_true", help="start the daemon in the background (if none runs) and return"
    )

    stdio = sub.add_parser("stdio", help="serve MCP over stdin/stdout (what an MCP client launches)")
    _config_option(stdio)
    stdio.add_argument(
        "--embedded",
        action="store_true",
        help="run the engine in this process instead of through the shared daemon (one process per data dir)",
    )

    stop = sub.add_parser(
        "stop", help="stop the daemon of this data dir (running tasks are put back in the queue)"
    )
    _config_option(stop)
    status = sub.add_parser(
        "status", help="is the daemon running: pid, port, uptime, version, store, task counts"
    )
    _config_option(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    add_commands(sub)
    sub.add_parser("version", help="print the version")
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="TOML config file (default: $SIDEQUEST_CONFIG or <home>/sidequest.toml)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"sidequest {__version__}")
        return
    _setup_logging()
    if args.config:
        # Exported, so a daemon this process starts reads the same file.
        os.environ["SIDEQUEST_CONFIG"] = str(Path(args.config).expanduser().resolve())
    try:
        settings = load_settings(args.config)
        runner: Callable[[], Awaitable[None]]
        if args.command == "serve":
            settings = _with_http_overrides(settings, args.host, args.port)
            _check_bind(settings.http.host, args.allow_remote)
            runner = (lambda: _detach(settings)) if args.detach else (lambda: _serve(settings))
        elif args.command == "stdio":
            runner = (lambda: _stdio(settings)) if args.embedded else (lambda: _stdio_front(settings))
        elif args.command == "stop":
            runner = lambda: _stop(settings)  # noqa: E731
        elif args.command == "status":
            runner = lambda: _status(settings, args.json)  # noqa: E731
        else:
            sys.exit(run_command(args, settings))
    except ConfigError as exc:
        print(f"sidequest: configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        anyio.run(runner)
    except KeyboardInterrupt:  # a second Ctrl-C during the drain
        sys.exit(130)
    except _Fatal as exc:
        print(f"sidequest: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)


class _Fatal(Exception):
    """A start-up failure the user can fix (data dir locked by another process, port taken)."""


def _setup_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpx2", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _check_bind(host: str, allow_remote: bool) -> None:
    """Anyone who can reach the port and read the token can run agents; say it out loud."""
    if host in _LOOPBACK or host.startswith("127."):
        return
    if not allow_remote:
        raise ConfigError(
            f"host {host!r} is reachable from other computers; pass --allow-remote to bind it anyway "
            "(or use 127.0.0.1)"
        )
    log.warning(
        "binding %s: other computers can reach this daemon; anyone holding the token can run agents", host
    )


def _with_http_overrides(settings: Settings, host: str | None, port: int | None) -> Settings:
    http: dict[str, Any] = settings.http.model_dump()
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    try:
        return Settings.model_validate({**settings.model_dump(), "http": http})
    except ValidationError as exc:
        raise ConfigError(f"--host/--port: {format_validation_error(exc)}") from exc


def _default_scope() -> str:
    from sidequest.engine.engine import default_scope

    return default_scope()


@contextmanager
def _startup_errors() -> Iterator[None]:
    """Known start-up failures become one line, not a traceback."""
    from sidequest.storage.base import StoreError

    try:
        yield
    except StoreError as exc:
        raise _Fatal(str(exc)) from exc


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


# ---- stdio ------------------------------------------------------------------


async def _stdio(settings: Settings) -> None:
    from sidequest.engine.engine import Engine
    from sidequest.server.mcp import build_server

    engine = Engine(settings)
    with _startup_errors():
        async with engine.running():
            server = build_server(engine, _default_scope())
            async with anyio.create_task_group() as tg:
                await tg.start(_stop_on_signal, tg.cancel_scope)
                log.info("serving MCP over stdio (data dir %s)", settings.home)
                await _serve_stdio(server)  # returns when the client closes stdin
                tg.cancel_scope.cancel()


async def _stdio_front(settings: Settings) -> None:
    """MCP over stdio, every call forwarded to the shared daemon (started if none runs)."""
    from sidequest.engine.errors import Unavailable
    from sidequest.server.client import DaemonClient
    from sidequest.server.daemon import DaemonLocator
    from sidequest.server.mcp import build_server

    project = _default_scope()
    async with DaemonClient(DaemonLocator(settings), project) as client:
        try:
            endpoint = await client.connect()
        except Unavailable as exc:
            raise _Fatal(str(exc)) from exc
        server = build_server(client, project)
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


async def _serve(settings: Settings) -> None:
    from sidequest.engine.engine import Engine
    from sidequest.models import DaemonStatus, utcnow
    from sidequest.server.daemon import DaemonLock, DaemonState, clear_state, read_state
    from sidequest.server.http import build_app, load_or_create_token
    from sidequest.server.mcp import build_server
    from sidequest.server.rest import build_rest_app

    lock = DaemonLock.acquire(settings.home)
    if lock is None:
        other = read_state(settings.home)
        where = f" (pid {other.pid}, {other.url})" if other else ""
        raise _Fatal(
            f"a sidequest daemon is already running for {settings.home}{where}; "
            "`sidequest status` shows it, `sidequest stop` stops it"
        )
    try:
        host = settings.http.host
        sock = _bind(host, settings.http.port)
        port = sock.getsockname()[1]
        token = load_or_create_token(settings.token_path)
        engine = Engine(settings)
        started = utcnow()
        state = DaemonState(
            pid=os.getpid(),
            host=host,
            port=port,
            token=token,
            version=__version__,
            started_at=started,
            database=str(settings.database_path),
        )

        async def daemon_status() -> DaemonStatus:
            return DaemonStatus(
                version=__version__,
                pid=state.pid,
                host=host,
                port=port,
                started_at=started,
                uptime_seconds=round((utcnow() - started).total_seconds(), 3),
                data_dir=str(settings.home),
                database=state.database,
                tasks=await engine.task_counts(),
                running=engine.running_count,
            )

        with _startup_errors(), sock:
            async with engine.running():
                rest = build_rest_app(engine, daemon_status)
                app = build_app(build_server(engine, _default_scope()), token, host, rest)
                config = uvicorn.Config(
                    app,
                    log_level="warning",
                    lifespan="on",
                    timeout_graceful_shutdown=max(1, int(settings.shutdown_grace)),
                )
                server = _Uvicorn(config)
                try:
                    async with anyio.create_task_group() as tg:
                        await tg.start(_stop_on_signal, tg.cancel_scope, server.stop)
                        tg.start_soon(_announce, server, state, engine)
                        await server.serve(sockets=[sock])
                        tg.cancel_scope.cancel()
                finally:
                    clear_state(settings.home, state.pid)  # clients stop finding us before the drain
                if not server.started:
                    raise _Fatal("the HTTP server failed to start; see the log above")
    finally:
        lock.release()
    log.info("stopped")


async def _detach(settings: Settings) -> None:
    from sidequest.engine.errors import Unavailable
    from sidequest.server.daemon import LOG_FILE, ensure_daemon

    try:
        state = await ensure_daemon(settings)
    except Unavailable as exc:
        raise _Fatal(str(exc)) from exc
    print(
        f"sidequest daemon (pid {state.pid}, version {state.version}) serving at {state.url}\n"
        f"  log: {settings.home / LOG_FILE}\n"
        f"  connect Claude Code: claude mcp add sidequest -- sidequest stdio\n"
        f"  stop it: sidequest stop",
        file=sys.stderr,
    )


async def _stop(settings: Settings) -> None:
    from sidequest.engine.errors import Unavailable
    from sidequest.server.daemon import stop_daemon

    try:
        state = await stop_daemon(settings.home, timeout=settings.shutdown_grace + 20)
    except Unavailable as exc:
        raise _Fatal(str(exc)) from exc
    if state is None:
        print(f"no sidequest daemon is running for {settings.home}", file=sys.stderr)
    else:
        print(f"stopped the sidequest daemon (pid {state.pid})", file=sys.stderr)


async def _status(settings: Settings, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from sidequest.engine.errors import EngineError
    from sidequest.server.client import DaemonClient
    from sidequest.server.daemon import find_daemon

    state = await find_daemon(settings.home)
    if state is None:
        if as_json:
            print(json.dumps({"alive": False, "data_dir": str(settings.home)}))
        else:
            print(f"no sidequest daemon is running for {settings.home}")
        raise SystemExit(EXIT_NOT_RUNNING)
    endpoint = state.endpoint()

    async def here(_: bool) -> Endpoint:
        return endpoint

    try:
        async with DaemonClient(here, _default_scope()) as client:
            status = await client.daemon_status()
    except EngineError as exc:
        raise _Fatal(str(exc)) from exc
    if as_json:
        print(json.dumps({"alive": True, **status.model_dump(mode="json")}))
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
    Console().print(table)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if hours or days else []
    parts += [f"{minutes}m", f"{secs}s"]
    return " ".join(parts)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: ours drains the engine, and uvicorn's would
    re-raise the signal after shutdown, so the process would die by it instead of exiting 0."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop(self) -> None:
        self.should_exit = True


def _bind(host: str, port: int) -> socket.socket:
    """Bind before starting so port 0 resolves to a real port we can print."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise _Fatal(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


async def _announce(server: _Uvicorn, state: DaemonState, engine: Engine) -> None:
    """Publish the state file once HTTP answers (clients wait for it), then tell the human."""
    from sidequest.server.daemon import write_state

    settings = engine.settings
    agents, problems = await anyio.to_thread.run_sync(engine.list_agents, _default_scope())
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


if __name__ == "__main__":
    main()
