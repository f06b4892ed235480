"""The reference docs name what the code offers: every tool, REST route and command, and nothing
that is gone. A surface added without its docs fails here, so docs/ stays true as the code grows."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fastapi.routing import APIRoute
from mcp import Client

from sidequest.cli import _parser
from sidequest.engine.engine import Engine
from sidequest.models import DaemonStatus
from sidequest.scaffold import EXAMPLE_AGENT
from sidequest.server.mcp import build_server
from sidequest.server.rest import build_rest_app

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _section(text: str, start: str, end: str) -> str:
    begin = text.index(start) + len(start)
    return text[begin : text.index(end, begin)]


async def test_tools_md_has_a_section_per_tool_and_no_other(engine: Engine) -> None:
    async with Client(build_server(engine, "/projects/docs")) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
    text = (DOCS / "tools.md").read_text()
    documented = set(re.findall(r"^## (\w+)$", text.split("## Tool annotations")[0], re.M))
    assert documented == tools, f"missing: {tools - documented}; gone: {documented - tools}"


async def _no_status() -> DaemonStatus:
    raise AssertionError("not called")


async def test_rest_md_lists_every_route_and_no_other(engine: Engine) -> None:
    app = build_rest_app(engine, _no_status)
    routes = {
        f"{method} {route.path}"
        for route in app.routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in route.methods
        if method != "HEAD"
    }
    routes |= {f"GET {r.path}" for r in app.routes if getattr(r, "path", None) == "/events"}
    table = _section((DOCS / "rest.md").read_text(), "## Routes", "\n## ")
    documented = set(re.findall(r"^\| `(\w+ /[^`]*)` \|", table, re.M))
    assert documented == routes, f"missing: {routes - documented}; gone: {documented - routes}"


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_configuration_md_shows_every_command_with_its_options() -> None:
    block = _section((DOCS / "configuration.md").read_text(), "## Command line\n\n```", "\n```\n")
    lines: dict[str, list[str]] = {}
    current = ""
    for line in block.splitlines():
        if m := re.match(r"sidequest ([a-z-]+)", line):
            current = m.group(1)
        if current:  # an indented line goes on the command above it
            lines.setdefault(current, []).append(line)
    commands = _commands()
    assert set(lines) == set(commands), (
        f"missing: {set(commands) - set(lines)}; gone: {set(lines) - set(commands)}"
    )
    for name, parser in commands.items():
        options = {
            o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"
        }
        shown = " ".join(lines[name])
        assert {o for o in options if o not in shown} == set(), f"sidequest {name}: options not documented"


def test_the_agent_file_example_is_the_one_init_writes() -> None:
    text = (DOCS / "configuration.md").read_text()
    example = _section(text, "`.claude/agents/research.md`:\n\n```markdown\n", "```\n")
    assert example == EXAMPLE_AGENT
