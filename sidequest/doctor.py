"""`sidequest doctor`: is everything sidequest needs in place? One line per check, with the fix.

It asks the daemon (starting it, as every command does) because what matters is what the daemon
has: its version, its store, the names in its environment (never values), the agents it sees.
Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field
from rich.text import Text

from sidequest import __version__
from sidequest.config import Settings, is_dsn
from sidequest.models import AgentList, DaemonStatus

if TYPE_CHECKING:
    from sidequest.commands import Handler, Output

LOW_DISK_BYTES = 200 * 1024 * 1024
"""Below this the store's next checkpoint may not fit; the daemon stops on a full disk."""


class Check(BaseModel):
    name: str
    status: Literal["ok", "fail", "info"]
    detail: str
    fix: str | None = Field(default=None, description="what to run or change when it failed")


class DoctorReport(BaseModel):
    """`doctor --json`."""

    ok: bool = Field(description="no check failed")
    checks: list[Check]


def add_doctor_command(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    text = "check the daemon, its store, its keys, agents and disk; one line per check with the fix"
    doctor = sub.add_parser("doctor", help=text, description=text + " (exit 1 when one fails)")
    doctor.add_argument("--config", help=config_help)
    doctor.add_argument("--json", action="store_true", help="print the result as one JSON document")


def _mb(n: int) -> str:
    from sidequest.commands import _bytes

    return _bytes(n)


def claude_code_cli(settings: Settings) -> str | None:
    """Where claude-agent-sdk would find the CLI (its search, as seen from this shell), or None."""
    if settings.claude_code.cli_path is not None:
        path = settings.claude_code.cli_path
        return str(path) if path.is_file() else None
    try:
        import claude_agent_sdk
    except ImportError:
        return None
    bundled = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
    if bundled.is_file():
        return str(bundled)
    if found := shutil.which("claude"):
        return found
    for path in (
        Path.home() / ".npm-global/bin/claude",
        Path("/usr/local/bin/claude"),
        Path.home() / ".local/bin/claude",
    ):
        if path.is_file():
            return str(path)
    return None


def checks(settings: Settings, project: str, status: DaemonStatus, agents: AgentList) -> list[Check]:
    """Every check but "is the daemon there", from what the daemon reported."""
    found: list[Check] = []
    add = found.append
    if status.version == __version__:
        add(Check(name="daemon", status="ok", detail=f"running, pid {status.pid}, version {status.version}"))
    else:
        add(
            Check(
                name="daemon",
                status="fail",
                detail=f"pid {status.pid} runs version {status.version}, this client is {__version__}",
                fix="`sidequest stop` once its tasks finish; the next command starts this version",
            )
        )
    # `database` comes redacted from the daemon (a DSN without its password); a server has no file size.
    store = status.database if is_dsn(status.database) else f"{status.database}, {_mb(status.database_bytes)}"
    store += f" + {_mb(status.wal_bytes)} write-ahead log" if status.wal_bytes else ""
    store += f", schema version {status.schema_version}" if status.schema_version is not None else ""
    if status.store_error:
        add(Check(name="store", status="fail", detail=f"{store}: {status.store_error}", fix="see daemon.log"))
    else:
        # The status the daemon sent was read from the store just now: it answers reads.
        count = sum(status.tasks.values())
        add(Check(name="store", status="ok", detail=f"{store}; readable ({count} tasks)"))
    found.extend(config_checks(status))

    sources = {var.name: var for var in status.environment}
    executors = {agent.executor for agent in agents.agents}
    key = settings.anthropic.api_key_env
    users = sorted(a.name for a in agents.agents if a.executor in ("anthropic", "claude-code"))
    if key in sources:
        where = sources[key].source + (f" {sources[key].file}" if sources[key].file else "")
        add(Check(name=key, status="ok", detail=f"set in the daemon (from {where})"))
    elif "anthropic" in executors:
        add(
            Check(
                name=key,
                status="fail",
                detail=f"missing in the daemon's environment; needed by {', '.join(users)}",
                fix=f"`sidequest env set {key}`, then `sidequest reload`",
            )
        )
    else:
        add(Check(name=key, status="info", detail="not set in the daemon; no anthropic agent needs it here"))
    if settings.anthropic.base_url:
        add(Check(name="ANTHROPIC_BASE_URL", status="info", detail=f"{settings.anthropic.base_url} (config)"))
    elif "ANTHROPIC_BASE_URL" in sources:
        var = sources["ANTHROPIC_BASE_URL"]
        where = var.source + (f" {var.file}" if var.file else "")
        add(Check(name="ANTHROPIC_BASE_URL", status="info", detail=f"set in the daemon (from {where})"))

    if "claude-code" in executors:
        cli = claude_code_cli(settings)
        if cli:
            add(Check(name="claude code", status="ok", detail=f"CLI found: {cli}"))
        else:
            add(
                Check(
                    name="claude code",
                    status="fail",
                    detail="the Claude Code CLI is not found, and claude-code agents are configured",
                    fix="install sidequest[claude-code], or set claude_code.cli_path in the config",
                )
            )

    folders = [str(Path(project) / ".claude" / "agents"), str(settings.user_agent_dir)]
    folders += [str(path) for path in settings.agent_dirs]
    names = ", ".join(sorted(a.name for a in agents.agents)) or "none"
    add(Check(name="agents", status="ok", detail=f"{names}; folders searched: {', '.join(folders)}"))
    for problem in agents.problems:
        fix = f"fix or remove {problem.file}"
        add(Check(name="agent file", status="fail", detail=problem.error, fix=fix))

    free = status.disk_free_bytes
    if free is None:
        add(Check(name="disk", status="info", detail=f"free space of {status.data_dir} unknown"))
    elif free < LOW_DISK_BYTES:
        add(
            Check(
                name="disk",
                status="fail",
                detail=f"{_mb(free)} free for {status.data_dir}",
                fix="free disk space, or `sidequest gc --older-than 7d`",
            )
        )
    else:
        add(Check(name="disk", status="ok", detail=f"{_mb(free)} free for {status.data_dir}"))
    return found


def config_checks(status: DaemonStatus) -> list[Check]:
    """The configuration the daemon serves against the files on disk now."""
    config = status.config
    if config is None:
        return []  # a daemon from before reloads existed
    loaded = f"{config.file or 'no config file (defaults)'}, loaded {config.loaded_at:%Y-%m-%d %H:%M:%S} UTC"
    found = []
    if config.problem:
        found.append(
            Check(
                name="config",
                status="fail",
                detail=f"the version on disk was not applied: {config.problem}; {loaded} still serves",
                fix="fix the file, then `sidequest reload`",
            )
        )
    elif config.differs_on_disk:
        found.append(
            Check(
                name="config",
                status="fail",
                detail=f"{loaded}; the config or env files on disk changed since",
                fix="`sidequest reload`",
            )
        )
    else:
        found.append(Check(name="config", status="ok", detail=f"{loaded}; the same as on disk"))
    if config.needs_restart:
        found.append(
            Check(
                name="needs restart",
                status="fail",
                detail=f"changed on disk, applied only at a start: {', '.join(config.needs_restart)}",
                fix="`sidequest stop` once its tasks finish; the next command starts the daemon with them",
            )
        )
    return found


async def _doctor(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from sidequest.commands import _connect, _project
    from sidequest.engine.errors import EngineError

    report: list[Check] = []
    if getattr(args, "config_error", None):  # set by the command line when the file did not load
        report.append(
            Check(
                name="config file",
                status="fail",
                detail=f"{args.config_error} (this command used the defaults)",
                fix="fix the file; the daemon keeps the version it loaded until then",
            )
        )
    try:
        async with _connect(settings, args.config, quiet=out.as_json) as client:
            status = await client.daemon_status()
            agents = await client.agent_list()
    except EngineError as exc:
        report.append(
            Check(
                name="daemon",
                status="fail",
                detail=f"cannot start or reach it: {' '.join(str(exc).split())}",
                fix=f"read {settings.home / 'daemon.log'}",
            )
        )
    else:
        report += checks(settings, _project(), status, agents)
    ok = all(check.status != "fail" for check in report)
    if out.as_json:
        out.emit(DoctorReport(ok=ok, checks=report))
    else:
        style = {"ok": "green", "fail": "bold red", "info": "dim"}
        for check in report:
            line = Text.assemble((f"{check.status:<4} ", style[check.status]), (check.name, "bold"), ": ")
            line.append(check.detail)
            if check.fix:
                line.append(f" — fix: {check.fix}")
            out.print(line, soft_wrap=True)
    return 0 if ok else 1


HANDLERS: dict[str, Handler] = {"doctor": _doctor}
