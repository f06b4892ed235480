"""`sidequest env set|unset|list` (the daemon's variables) and `sidequest doctor` (is it all usable).

Values never pass through argv, logs or output: `env set` reads the value from stdin or a hidden
prompt, and `env list` and `doctor` show names and where each came from.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field
from rich.table import Table
from rich.text import Text

from sidequest.config import ConfigError, Settings
from sidequest.envfile import check_name, config_file_of, defined_environment, env_file_path, set_variable
from sidequest.models import EnvVar

if TYPE_CHECKING:
    from sidequest.commands import Handler, Output

RESTART = (
    "`sidequest reload` applies it now (the daemon also notices the file within a few seconds, "
    "unless watch_config = false); new attempts see it"
)


class EnvListing(BaseModel):
    """`env list --json`."""

    running: bool = Field(description="the running daemon's list (else what a daemon started now would get)")
    variables: list[EnvVar]
    pending: list[str] = Field(
        default_factory=list, description="names set or changed in a file the running daemon has not read"
    )


def add_env_commands(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    env = sub.add_parser(
        "env",
        help="the daemon's variables (API keys): set, unset, list",
        description="Variables of the daemon's environment, kept in <data dir>/env (0600). The daemon "
        "starts with the allowlisted variables of the shell that started it, then [env] of the config, "
        "then the config's env_file, then <data dir>/env, each overriding the one before.",
    )
    actions = env.add_subparsers(dest="env_action", required=True, metavar="ACTION")
    set_ = actions.add_parser(
        "set", help="set NAME in <data dir>/env; the value is read from stdin, or asked for without echo"
    )
    set_.add_argument("name", metavar="NAME")
    unset = actions.add_parser("unset", help="remove NAME from <data dir>/env")
    unset.add_argument("name", metavar="NAME")
    listing = actions.add_parser("list", help="names in the daemon's environment and where each came from")
    listing.add_argument("--json", action="store_true", help="print the result as one JSON document")
    for parser in (set_, unset, listing):
        parser.add_argument("--config", help=config_help)


def _name(args: argparse.Namespace) -> str:
    from sidequest.commands import UsageError

    if problem := check_name(args.name):
        raise UsageError(problem)
    return str(args.name)


def _read_value(name: str) -> str:
    from sidequest.commands import UsageError

    if sys.stdin.isatty():
        value = getpass.getpass(f"value of {name} (not shown): ")
    else:
        value = sys.stdin.read()
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
    if not value:
        raise UsageError(f"no value for {name}: pipe it in (`sidequest env set {name} < file`) or type it")
    if "\n" in value or "\r" in value or "\0" in value:
        raise UsageError(f"the value of {name} holds a line break or NUL; the env file has one line per name")
    return value


async def _daemon_environment(settings: Settings) -> list[EnvVar] | None:
    """The running daemon's names and sources; None when no daemon runs."""
    from sidequest.server.daemon import find_daemon
    from sidequest.server.runner import daemon_status_of

    state = await find_daemon(settings.home)
    if state is None:
        return None
    return (await daemon_status_of(state)).environment


async def _env(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from sidequest.server.daemon import daemon_alive, data_dir_errors, make_private_dir

    path = env_file_path(settings)
    if args.env_action == "set":
        name = _name(args)
        value = _read_value(name)
        with data_dir_errors(settings.home):
            make_private_dir(settings.home)
            set_variable(path, name, value)
        out.note(f"set {name} in {path}")
    elif args.env_action == "unset":
        name = _name(args)
        if not path.exists() or not set_variable(path, name, None):
            out.note(f"{name} is not in {path}; nothing changed")
            return 0
        out.note(f"removed {name} from {path}")
    else:
        return await _env_list(settings, out)
    shadow = [v for v in _planned(settings) if v.name == name and v.file != str(path)]
    if args.env_action == "unset" and shadow:
        where = f"{shadow[0].source} {shadow[0].file}" if shadow[0].file else "this shell's environment"
        out.warn(f"a daemon started from here still gets {name}, from {where}")
    if daemon_alive(settings.home):
        out.warn(f"the running daemon does not have this change yet; {RESTART}")
    return 0


def _planned(settings: Settings) -> list[EnvVar]:
    """What a daemon started from this shell now would hold."""
    try:
        _, sources = defined_environment(
            os.environ, settings, config_file_of(settings, os.environ), allowlist=True
        )
    except ConfigError as exc:
        from sidequest.commands import UsageError

        raise UsageError(str(exc)) from exc
    return sources


async def _env_list(settings: Settings, out: Output) -> int:
    planned = _planned(settings)
    running = await _daemon_environment(settings)
    variables = running if running is not None else planned
    pending: list[str] = []
    if running is not None:
        have = {(v.name, v.source, v.file) for v in running}
        pending = [
            v.name for v in planned if v.source != "starter" and (v.name, v.source, v.file) not in have
        ]
    if out.as_json:
        out.emit(EnvListing(running=running is not None, variables=variables, pending=pending))
        return 0
    out.note(
        "the running daemon's environment"
        if running is not None
        else "no daemon runs; a daemon started from this shell would have"
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("NAME", overflow="fold")
    table.add_column("SOURCE", no_wrap=True)
    table.add_column("FILE", overflow="fold")
    for var in variables:
        table.add_row(Text(var.name, style="bold"), var.source, Text(var.file or "", style="dim"))
    out.print(table)
    for name in pending:
        out.warn(f"{name} changed in a file after the daemon started; {RESTART}")
    return 0


HANDLERS: dict[str, Handler] = {"env": _env}
