"""`sidequest` command line: serve/stop/status (the daemon), worker (runs tasks of a shared store),
stdio (what an MCP client launches), the daemon's clients (submit, tasks, show, cancel,
notifications, agents, schedules, gc, workers), migrate and version.

stdout belongs to the MCP protocol in `stdio` mode and to command output elsewhere, so logs and
banners go to stderr, in every mode, to keep one rule.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from pydantic import ValidationError

from sidequest import __version__
from sidequest.cli_errors import CliParser, report
from sidequest.commands import add_commands, run_command
from sidequest.completion import add_completion_command
from sidequest.completion import script as completion_script
from sidequest.config import (
    ConfigError,
    Settings,
    check_queue_name,
    default_home,
    format_validation_error,
    load_settings,
)
from sidequest.workers_cli import NO_WORK_NOT_SHARED, NOT_SHARED

log = logging.getLogger("sidequest")

EXIT_CONFIG = 2
EXIT_FAILED = 1


def _parser(parser_class: type[argparse.ArgumentParser] = CliParser) -> argparse.ArgumentParser:
    parser = parser_class(prog="sidequest", description="Durable background agents for MCP clients.")
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
    serve.add_argument(
        "--no-work",
        action="store_true",
        help="serve MCP, REST and schedules but run no tasks: `sidequest worker`s do (PostgreSQL store only)",
    )

    worker = sub.add_parser(
        "worker",
        help="run tasks from a shared PostgreSQL store, without HTTP (start one per machine, or more)",
        description="Take tasks from the configured PostgreSQL store and run them, until SIGTERM/SIGINT "
        "(running tasks get shutdown_grace, then go back to the queue). It needs the same database "
        "setting as the daemon, and the agents' programs and files on this machine.",
    )
    _config_option(worker)
    worker.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        help="tasks run at once by this worker (default: max_concurrency)",
    )
    worker.add_argument(
        "--queue",
        action="append",
        dest="queues",
        type=_queue_name,
        metavar="NAME",
        help="take tasks of this queue (repeatable; default: [workers] queues, else 'default')",
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
    add_completion_command(sub)
    sub.add_parser("version", help="print the version")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be 1-1000 (as max_concurrency), got {value}")
    return value


def _queue_name(text: str) -> str:
    try:
        return check_queue_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="TOML config file (default: $SIDEQUEST_CONFIG or <home>/sidequest.toml)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(CliParser.for_run(argv))
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    if args.command == "version":
        print(f"sidequest {__version__}")
        return
    if args.command == "completion":
        sys.stdout.write(completion_script(parser, args.shell))
        return
    _setup_logging(quiet=as_json)
    if args.config:
        # Exported, so a daemon this process starts reads the same file.
        os.environ["SIDEQUEST_CONFIG"] = str(Path(args.config).expanduser().resolve())
    from sidequest.server import runner as run

    try:
        settings = _load_settings(args)
        runner: Callable[[], Awaitable[None]]
        if args.command == "serve":
            settings = _with_http_overrides(settings, args.host, args.port)
            _check_bind(settings.http.host, args.allow_remote)
            serve_args = _serve_args(args)
            work = not args.no_work
            if not work and settings.store_kind != "postgres":
                _refuse(NO_WORK_NOT_SHARED, as_json)
            runner = (
                (lambda: run.detach(settings, serve_args))
                if args.detach
                else (lambda: run.serve(settings, work=work))
            )
        elif args.command == "worker":
            if settings.store_kind != "postgres":
                _refuse(NOT_SHARED, as_json)
            concurrency: int = args.concurrency or settings.max_concurrency
            queues: list[str] = list(dict.fromkeys(args.queues or settings.workers.queues))
            from sidequest.server.worker import run_worker

            runner = lambda: run_worker(settings, concurrency, queues)  # noqa: E731
        elif args.command == "stdio":
            runner = (
                (lambda: run.stdio_embedded(settings))
                if args.embedded
                else (lambda: run.stdio_front(settings))
            )
        elif args.command == "stop":
            runner = lambda: run.stop(settings)  # noqa: E731
        elif args.command == "status":
            runner = lambda: run.status(settings, args.json)  # noqa: E731
        else:
            sys.exit(run_command(args, settings))
    except ConfigError as exc:
        report(f"configuration error: {exc}", code="config", as_json=as_json)
        sys.exit(EXIT_CONFIG)
    try:
        anyio.run(runner)
    except KeyboardInterrupt:  # a second Ctrl-C during the drain
        sys.exit(130)
    except run.Fatal as exc:
        report(str(exc), code="failed", as_json=as_json)
        sys.exit(EXIT_FAILED)


def _runs_the_engine(args: argparse.Namespace) -> bool:
    """Also `migrate`: it opens the store the file names, and must not fall back to the default one."""
    return args.command in ("serve", "worker", "migrate") or (args.command == "stdio" and args.embedded)


def _refuse(message: str, as_json: bool) -> None:
    """A store that cannot do what was asked: the configuration's fault, so its exit status."""
    report(message, code="config", as_json=as_json)
    sys.exit(EXIT_CONFIG)


def _load_settings(args: argparse.Namespace) -> Settings:
    """Only a process that runs the engine needs its config file to be valid. Every other command
    is a client of the daemon and needs only the data dir (set by the environment, never by the
    file): a typo in sidequest.toml must not break new Claude Code sessions and the CLI while the
    daemon keeps serving its last good configuration, nor the commands that show and fix it."""
    try:
        return load_settings(args.config)
    except ConfigError as exc:
        if _runs_the_engine(args):
            raise
        print(
            f"sidequest: warning: configuration error: {exc}\n"
            "sidequest: a running daemon keeps its last good configuration; fix the file, then "
            "`sidequest reload`",
            file=sys.stderr,
        )
        args.config_error = str(exc)
        return Settings(home=default_home(dict(os.environ)))


def _setup_logging(quiet: bool = False) -> None:
    """`quiet` (under --json): warnings and worse only, so a script reading stderr for the JSON error
    is not handed "starting the daemon" lines on the way."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpx2", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _serve_args(args: argparse.Namespace) -> list[str]:
    """What `serve --detach` hands to the daemon it starts."""
    extra = ["--host", args.host] if args.host else []
    extra += ["--port", str(args.port)] if args.port is not None else []
    extra += ["--no-work"] if args.no_work else []
    return extra + (["--allow-remote"] if args.allow_remote else [])


def _check_bind(host: str, allow_remote: bool) -> None:
    """Anyone who can reach the port and read the token can run agents; say it out loud."""
    if host in _LOOPBACK or host.startswith("127."):
        return
    if not allow_remote:
        raise ConfigError(
            f"host {host!r} is reachable from other computers; pass --allow-remote to bind it anyway "
            "(or use 127.0.0.1)"
        )
    if host in ("0.0.0.0", "::", ""):
        raise ConfigError(
            f"host {host!r} means every interface, but requests are only accepted for the name the "
            "daemon is bound to; bind the one address clients will use (e.g. --host 192.168.1.5)"
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


if __name__ == "__main__":
    main()
