"""`sidequest logs t_… [--follow] [--json]`: a task's run log, as lines a person can read or grep.

Following polls the daemon (at most once a second, sooner while entries keep coming) rather than
holding the event stream open: a CLI call is short-lived, and polling survives a daemon restart
in the middle, like `submit --wait`. It ends, with status 0, once the task has finished and its
last entry is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

import anyio

from sidequest.config import Settings
from sidequest.models import TaskLogEvent, TaskLogPage

if TYPE_CHECKING:
    from sidequest.commands import Handler, Output
    from sidequest.server.client import DaemonClient

PAGE = 1000
"""Entries read per request (the most the daemon returns)."""
POLL_MIN, POLL_MAX = 0.1, 1.0


def add_logs_command(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    help_text = "print a task's run log: attempts, agent turns, tool calls, stderr lines, retries"
    logs = sub.add_parser("logs", help=help_text, description=help_text)
    logs.add_argument("task_id", metavar="TASK_ID", help="a task id (t_…)")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new entries until the task finishes"
    )
    logs.add_argument(
        "--json",
        action="store_true",
        help="one JSON document (the task and every entry); with --follow, one JSON entry per line",
    )
    logs.add_argument("--config", help=config_help)


def format_event(event: TaskLogEvent) -> str:
    """`time  kind  message`; a message of several lines continues indented, so every line of the
    output starts with a time or with spaces."""
    when = event.at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    first, *rest = event.message.splitlines() or [""]
    lines = [f"{when}  {event.kind:<16} {first}".rstrip()]
    lines += [f"    {line}".rstrip() for line in rest]
    return "\n".join(lines)


async def _logs(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from sidequest.commands import _connect

    async with _connect(settings, args.config, quiet=args.json) as client:
        if args.follow:
            await _follow(client, args.task_id, out, as_json=args.json)
            return 0
        page = await _everything(client, args.task_id)
        if args.json:
            out.emit(page)
        else:
            for event in page.events:
                out.text(format_event(event))
            if not page.events:
                out.note(f"no entries yet: the task is {page.status.value}")
        return 0


async def _everything(client: DaemonClient, task_id: str) -> TaskLogPage:
    page = await client.get_task_log(task_id, 0, PAGE)
    events = list(page.events)
    while page.next_offset is not None:
        page = await client.get_task_log(task_id, page.next_offset, PAGE)
        events += page.events
    return page.model_copy(update={"offset": 0, "events": events, "next_offset": None})


async def _follow(client: DaemonClient, task_id: str, out: Output, as_json: bool) -> None:
    offset, delay = 0, POLL_MIN
    out.waiting_for = task_id
    while True:
        page = await client.get_task_log(task_id, offset, PAGE)
        client.may_start = False  # following a daemon, not bringing back one the user stopped
        for event in page.events:
            if as_json:
                sys.stdout.write(json.dumps(event.model_dump(mode="json")) + "\n")
                sys.stdout.flush()
            else:
                out.text(format_event(event))
        offset += len(page.events)
        if page.next_offset is not None:
            continue  # more is already there
        if page.status.finished:
            out.waiting_for = None
            return
        delay = POLL_MIN if page.events else min(delay * 1.5, POLL_MAX)
        await anyio.sleep(delay)


HANDLERS: dict[str, Handler] = {"logs": _logs}
