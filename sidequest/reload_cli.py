"""`sidequest reload`: the running daemon reads its config file and env files again.

It never starts a daemon: one that starts reads the files anyway. The daemon also notices a
changed file by itself within a few seconds (`watch_config`); this is for not waiting, and for
hearing what changed or why the new version was refused.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from sidequest.config import Settings

if TYPE_CHECKING:
    from sidequest.commands import Handler, Output
    from sidequest.models import ReloadResult

EXIT_NOT_RUNNING = 3


def add_reload_command(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    text = "make the running daemon read its config file and env files again; says what changed"
    reload = sub.add_parser(
        "reload",
        help=text,
        description=text + ". A file that does not parse or validate is not applied: the old "
        "configuration keeps serving (exit 1). Exit 3 when no daemon runs.",
    )
    reload.add_argument("--config", help=config_help)
    reload.add_argument("--json", action="store_true", help="print the result as one JSON document")


def describe(result: ReloadResult) -> list[str]:
    """The lines a person reads: what changed, what waits for a restart, or why nothing changed."""
    if not result.applied:
        return [
            f"not reloaded: {result.problem}",
            f"the configuration loaded at {result.config.loaded_at:%Y-%m-%d %H:%M:%S} UTC keeps serving",
        ]
    lines = [f"reloaded {result.config.file or '(no config file: defaults)'}"]
    changed = [*result.changed, *(f"environment {name}" for name in result.environment)]
    lines.append(f"changed: {', '.join(changed)}" if changed else "nothing changed")
    if result.needs_restart:
        lines.append(
            f"needs restart: {', '.join(result.needs_restart)} "
            "(`sidequest stop`; the next command starts the daemon with them)"
        )
    return lines


async def _reload(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from sidequest.engine.errors import Unavailable
    from sidequest.server.client import DaemonClient, Endpoint
    from sidequest.server.daemon import find_daemon
    from sidequest.server.runner import _default_scope

    state = await find_daemon(settings.home)
    if state is None:
        out.error(f"no sidequest daemon is running for {settings.home}; the next one reads the files")
        return EXIT_NOT_RUNNING
    endpoint = state.endpoint()

    async def here(_: bool) -> Endpoint:
        return endpoint

    async with DaemonClient(here, _default_scope()) as client:
        try:
            result = await client.reload_config()
        except Unavailable as exc:
            out.error(str(exc))
            return 1
    if out.as_json:
        out.emit(result)
    else:
        for line in describe(result):
            out.print(line, soft_wrap=True, markup=False)
    return 0 if result.applied else 1


HANDLERS: dict[str, Handler] = {"reload": _reload}
