"""The key notice: a client whose shell holds a key that the daemon lacks says so, once.

The daemon does not inherit the environment of later clients (sidequest.config.DAEMON_ENV_ALLOW
explains why), so a user who exports ANTHROPIC_API_KEY in a new shell can be surprised that
tasks fail with "no Anthropic API key". The client compares names only: the daemon tells which
names it has (`GET /api/v1/daemon/environment`), never values, and the client never sends its
own. Said once per daemon start, remembered in the data dir, so every command and every MCP
session does not repeat it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sidequest.config import Settings

if TYPE_CHECKING:
    from sidequest.server.client import DaemonClient

log = logging.getLogger("sidequest")

NOTICE_FILE = "key-notice.json"
"""Which daemon start (pid and start time) the names were checked against."""

_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)


def keys_that_matter(settings: Settings) -> list[str]:
    """The API key the anthropic executors read, plus secret-looking names the configuration passes
    on to agents (`env_allow`): the variables whose absence makes tasks fail."""
    names = {settings.anthropic.api_key_env}
    allowed = [*settings.claude_code.env_allow]
    for agent in settings.agents.values():
        allowed.extend(agent.env_allow)
    names.update(name for name in allowed if _SECRET_NAME.search(name))
    return sorted(names)


def _daemon_id(home: Path) -> str | None:
    from sidequest.server.daemon import read_state

    state = read_state(home)
    return f"{state.pid}@{state.started_at.isoformat()}" if state is not None else None


def _already_checked(path: Path, daemon: str) -> set[str]:
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("daemon") == daemon:
            return {str(name) for name in data.get("names", [])}
    return set()


def _remember(path: Path, daemon: str, names: set[str]) -> None:
    """Atomically, 0600: the data dir is private, and so is what its files say."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"daemon": daemon, "names": sorted(names)}, fh)
        os.replace(tmp, path)


def missing_key_message(name: str) -> str:
    return (
        f"this shell has {name} but the sidequest daemon does not, so its agents cannot use it; "
        f"fix: `sidequest env set {name}` (it asks for the value), then `sidequest reload`"
    )


async def notice_missing_keys(
    client: DaemonClient,
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    *,
    quiet: bool = False,
) -> list[str]:
    """Warn on `stream` (stderr: stdout may be the MCP protocol) about each key this process has and
    the daemon lacks, once per daemon start; the names warned about. Never fails the command.

    `quiet` (a `--json` command, whose stderr holds nothing but one JSON error object): say nothing
    and remember nothing, so the next plain command still says it."""
    if quiet:
        return []
    environ = os.environ if environ is None else environ
    have = [name for name in keys_that_matter(settings) if environ.get(name)]
    if not have:
        return []  # nothing to compare: no request at all
    daemon = _daemon_id(settings.home)
    if daemon is None:
        return []
    path = settings.home / NOTICE_FILE
    checked = _already_checked(path, daemon)
    todo = [name for name in have if name not in checked]
    if not todo:
        return []
    try:
        names = set((await client.environment_names()).names)
    except Exception as exc:  # an older daemon without the route, or one going away: say nothing
        log.debug("key notice skipped: %r", exc)
        return []
    missing = [name for name in todo if name not in names]
    out = stream or sys.stderr
    for name in missing:
        print(f"sidequest: warning: {missing_key_message(name)}", file=out, flush=True)
    _remember(path, daemon, checked | set(todo))
    return missing
