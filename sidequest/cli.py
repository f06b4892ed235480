"""`sidequest` command line: serve (HTTP daemon), stdio (what an MCP client launches), version.

stdout belongs to the MCP protocol in `stdio` mode, so everything human goes
to stderr, in every mode, to keep one rule.
"""

from __future__ import annotations

import argparse
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
from sidequest.config import ConfigError, Settings, format_validation_error, load_settings

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from sidequest.engine.engine import Engine

log = logging.getLogger("sidequest")

EXIT_CONFIG = 2
EXIT_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidequest", description="Durable background agents for MCP clients."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the engine and serve MCP over HTTP (token-protected)")
    serve.add_argument(
        "--config", help="TOML config file (default: $SIDEQUEST_CONFIG or <home>/sidequest.toml)"
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; http.host in the config)")
    serve.add_argument("--port", type=int, help="port to bind (default: http.port, 0 = a free port)")

    stdio = sub.add_parser("stdio", help="serve MCP over stdin/stdout (what an MCP client launches)")
    stdio.add_argument(
        "--config", help="TOML config file (default: $SIDEQUEST_CONFIG or <home>/sidequest.toml)"
    )
    stdio.add_argument(
        "--embedded",
        action="store_true",
        help="run the engine in this process (today the only mode; the shared daemon comes later)",
    )

    sub.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"sidequest {__version__}")
        return
    _setup_logging()
    try:
        settings = load_settings(args.config)
        if args.command == "serve":
            settings = _with_http_overrides(settings, args.host, args.port)
            runner: Callable[[], Awaitable[None]] = lambda: _serve(settings)  # noqa: E731
        else:
            runner = lambda: _stdio(settings)  # noqa: E731
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
    from sidequest.server.http import build_app, load_or_create_token
    from sidequest.server.mcp import build_server

    host = settings.http.host
    sock = _bind(host, settings.http.port)
    port = sock.getsockname()[1]
    token = load_or_create_token(settings.token_path)
    engine = Engine(settings)
    with _startup_errors(), sock:
        async with engine.running():
            app = build_app(build_server(engine, _default_scope()), token, host)
            config = uvicorn.Config(
                app,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=max(1, int(settings.shutdown_grace)),
            )
            server = _Uvicorn(config)
            async with anyio.create_task_group() as tg:
                await tg.start(_stop_on_signal, tg.cancel_scope, server.stop)
                tg.start_soon(_announce, server, host, port, engine)
                await server.serve(sockets=[sock])
                tg.cancel_scope.cancel()
            if not server.started:
                raise _Fatal("the HTTP server failed to start; see the log above")
    log.info("stopped")


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


async def _announce(server: _Uvicorn, host: str, port: int, engine: Engine) -> None:
    settings = engine.settings
    agents, problems = await anyio.to_thread.run_sync(engine.list_agents, _default_scope())
    while not server.started:
        await anyio.sleep(0.02)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/mcp"
    token_path: Path = settings.token_path
    print(
        f"sidequest {__version__} serving MCP at {url}\n"
        f"  data dir:   {settings.home}\n"
        f"  token file: {token_path} (send it as 'Authorization: Bearer <token>')\n"
        f"  connect Claude Code:\n"
        f"    claude mcp add --transport http sidequest {url} "
        f'-H "Authorization: Bearer $(cat {token_path})"\n'
        f"  or, instead of this daemon, per session over stdio (one process per data dir):\n"
        f"    claude mcp add sidequest -- sidequest stdio --embedded\n"
        f"  health: http://{shown}:{port}/health\n"
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
