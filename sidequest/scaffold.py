"""`sidequest init`: a commented starter config in the data dir and an example agent file in the
project, so that a fresh machine has an agent to submit to (`echo`, which works offline) and an
example of an agent file to copy (`research`, which needs an API key)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sidequest.config import Settings

if TYPE_CHECKING:
    from sidequest.commands import Handler, Output

STARTER_CONFIG = """\
# sidequest configuration, written by `sidequest init`. Every key is optional and
# docs/configuration.md lists them all; a key sidequest does not know is an error.
# The daemon reads this file when it starts: after a change, run `sidequest stop`
# (the next command starts it again).

# max_concurrency = 4        # attempts running at once, over all agents
# retention = "30d"          # finished tasks older than this are deleted; "off" keeps them
# default_model = "sonnet"   # for agent files that name no model
# database = "postgresql://sidequest:PASSWORD@db.example/sidequest"
#                            # a PostgreSQL store instead of <data dir>/sidequest.duckdb: run
#                            # `sidequest migrate`, then `sidequest worker` on other machines

# API keys do not belong here: `sidequest env set ANTHROPIC_API_KEY` keeps them in
# <data dir>/env (0600). Other variables for the daemon and its python agents:
# [env]
# HTTPS_PROXY = "http://proxy.example:3128"

# Agents defined here run a python function or a program. Agent files
# (.claude/agents/NAME.md in a project, or ~/.claude/agents/) define agents that
# call the Anthropic API or run Claude Code; see the `research` example that
# `sidequest init` wrote.

# An agent that works offline and prints the prompt back. Try it:
#   sidequest submit echo "hello" --wait
[agents.echo]
executor = "command"
description = "prints the prompt back (works offline: a first test of sidequest)"
argv = ["printf", '%s\\n', "{prompt}"]
"""

EXAMPLE_AGENT = """\
---
name: research
description: Researches a question on the web and answers with the sources it used.
model: sonnet
sidequest:
  server_tools: [web_search, web_fetch]
---
You are a careful researcher. Search the web for the question you are given,
read the most relevant sources, and answer in a few paragraphs. Name the source
of every claim, and say plainly when the sources disagree or you found nothing.
"""
"""An anthropic agent: it needs ANTHROPIC_API_KEY in the daemon (`sidequest env set`)."""


def add_init_command(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    text = (
        "write a commented sidequest.toml (with an offline `echo` agent) in the data dir and an example "
        "agent file in this project's .claude/agents/"
    )
    init = sub.add_parser("init", help=text, description=text)
    init.add_argument("--config", help=config_help)
    init.add_argument("--force", action="store_true", help="overwrite files that exist")


def _write(path: Path, text: str, force: bool, mode: int) -> bool:
    """Write a new file (or replace one with force); False when it exists and may not be replaced."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        return False
    os.fchmod(fd, mode)  # a replaced file keeps its old mode otherwise
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return True


async def _init(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from sidequest.commands import _project
    from sidequest.server.daemon import daemon_alive, data_dir_errors, make_private_dir

    config = settings.home / "sidequest.toml"
    agents = Path(_project()) / ".claude" / "agents"
    agent = agents / "research.md"
    refused = []
    with data_dir_errors(settings.home):
        make_private_dir(settings.home)
        if _write(config, STARTER_CONFIG, args.force, 0o600):
            out.note(
                f"wrote {config}: an `echo` agent that works offline (`sidequest submit echo hi --wait`)"
            )
        else:
            refused.append(config)
    try:
        agents.mkdir(parents=True, exist_ok=True)
        if _write(agent, EXAMPLE_AGENT, args.force, 0o644):
            out.note(f"wrote {agent}: a `research` agent (it needs `sidequest env set ANTHROPIC_API_KEY`)")
        else:
            refused.append(agent)
    except OSError as exc:
        out.error(
            f"cannot write {agent}: {exc.strerror or exc}; run `sidequest init` in a project you can write"
        )
        return 1
    explicit = os.environ.get("SIDEQUEST_CONFIG")
    if explicit and Path(explicit).expanduser().resolve() != config.resolve():
        out.warn(f"the config in use is {explicit} (SIDEQUEST_CONFIG or --config), not {config}")
    if not refused and daemon_alive(settings.home):
        out.warn("a daemon is running with the old config: run `sidequest stop` to load the new one")
    if refused:
        out.error(f"{' and '.join(map(str, refused))} already exist(s); `sidequest init --force` overwrites")
        return 1
    return 0


HANDLERS: dict[str, Handler] = {"init": _init}
