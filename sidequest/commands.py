"""The user's commands against the shared daemon: submit, tasks, show, cancel, retry, notifications,
agents, cron schedules (schedule, schedules, schedule-show, pause, resume, unschedule) and gc.

They speak to the daemon through `DaemonClient`, the same API the MCP tools use, so a task
submitted here is the task a model sees, with the same validation and the same messages.

Output contract, so scripts can rely on it: stdout holds the command's output and nothing else
(with `--json`, exactly one JSON document); errors are one line `sidequest: <message>` on stderr
with exit status 1, and bad usage exits 2 before anything is sent to the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, get_args
from zoneinfo import ZoneInfo

import anyio
from pydantic import BaseModel, Field, ValidationError
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from sidequest.cli_errors import report
from sidequest.cli_watch import wait_for_task, watch
from sidequest.config import Settings
from sidequest.engine.errors import EngineError, NotFound
from sidequest.engine.notifier import CLI_READER
from sidequest.engine.retention import describe_age
from sidequest.models import (
    AgentList,
    CancelResult,
    GcReport,
    Misfire,
    NotificationPage,
    Overlap,
    ResultPage,
    RetryBackoff,
    ScheduleCreated,
    ScheduleInfo,
    SchedulePage,
    ScheduleRuns,
    ScheduleSpec,
    ScheduleUpdate,
    TaskInfo,
    TaskOptions,
    TaskStatus,
    TaskSubmitted,
    WorkflowInfo,
    parse_age,
)
from sidequest.terminal import printable

if TYPE_CHECKING:
    from sidequest.server.client import DaemonClient

COMMANDS: frozenset[str] = frozenset(
    {
        "submit",
        "tasks",
        "show",
        "cancel",
        "retry",
        "notifications",
        "agents",
        "schedule",
        "schedules",
        "schedule-show",
        "pause",
        "resume",
        "unschedule",
        "gc",
    }
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

CONFIG_HELP = "TOML config file (default: $SIDEQUEST_CONFIG or <home>/sidequest.toml)"

STATUS_STYLE: dict[str, str] = {
    "queued": "cyan",
    "waiting": "blue",
    "running": "yellow",
    "retrying": "magenta",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "dim",
}
SCHEDULE_STYLE: dict[str, str] = {"active": "green", "paused": "yellow", "finished": "dim"}
KIND_STYLE: dict[str, str] = {
    "task_completed": "green",
    "task_failed": "bold red",
    "task_cancelled": "dim",
    "task_retried": "cyan",
    "workflow_completed": "green",
}

PAGE_SIZE = 100
"""Largest workflow page the REST API serves; fewer round trips for long listings."""
RESULT_PAGE_CHARS = 50_000
"""Largest result page the REST API serves."""
MAX_NOTIFICATIONS = 200
PARALLEL_FETCHES = 8
"""`tasks` reads each workflow's tasks separately; a few at a time keeps long lists quick."""
MAX_RUNS_SHOWN = 100
"""Largest page of a schedule's runs the REST API serves."""


class UsageError(Exception):
    """The command line is wrong (exit 2); raised before the daemon is contacted."""


class TaskDetail(BaseModel):
    """`show t_…` / `submit --wait` with `--json`: the task and its whole result in one document."""

    task: TaskInfo
    result: ResultPage | None = Field(
        default=None, description="every page joined into one (next_offset null); null until the task ends"
    )


class TaskListing(BaseModel):
    """`tasks --json`."""

    tasks: list[TaskInfo]
    truncated: bool = Field(default=False, description="more tasks matched than --limit allowed")


class ScheduleDetail(BaseModel):
    """`schedule-show sch_… --json`: the schedule and its newest runs in one document."""

    schedule: ScheduleInfo
    runs: ScheduleRuns


# ---- argument parsing ---------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def add(name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, **kwargs
        )
        parser.add_argument("--config", help=CONFIG_HELP)
        parser.add_argument("--json", action="store_true", help="print the result as one JSON document")
        return parser

    submit = add(
        "submit",
        "start a background task",
        epilog=(
            "options (--option KEY=VALUE, repeatable): "
            + ", ".join(TaskOptions.model_fields)
            + '. VALUE is read as JSON when it parses (max_retries=2, batch=true, tags=\'["a","b"]\'), '
            "else as text (timeout=30m, priority=high, tags=a,b); a dotted KEY fills a nested value "
            "(retry_backoff.initial=2, metadata.ticket=ABC-1)."
        ),
    )
    submit.add_argument("agent", metavar="AGENT", help="agent name (see `sidequest agents`) or agent file")
    submit.add_argument("prompt", metavar="PROMPT", help="what the agent should do; '-' reads it from stdin")
    submit.add_argument(
        "-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="a task option (repeatable)"
    )
    submit.add_argument(
        "--wait", action="store_true", help="wait for the task to finish and print its result"
    )

    tasks = add("tasks", "list this project's active tasks")
    tasks.add_argument("--all", action="store_true", help="include tasks of finished workflows")
    tasks.add_argument("--all-scopes", action="store_true", help="every project, not only this one")
    tasks.add_argument("--limit", type=_positive_int, default=50, help="show at most N tasks (default 50)")
    tasks.add_argument(
        "--watch",
        action="store_true",
        help="redraw the table as tasks change (and every 2 s) until Ctrl-C; not with --json",
    )

    show = add(
        "show", "show a task (and its result), a workflow (and its tasks) or a schedule (and its runs)"
    )
    show.add_argument("id", metavar="ID", help="a task id (t_…), workflow id (wf_…) or schedule id (sch_…)")

    cancel = add("cancel", "cancel a task, or every unfinished task of a workflow")
    cancel.add_argument("id", metavar="ID", help="a task id (t_…) or workflow id (wf_…)")

    retry = add("retry", "queue a failed or cancelled task again (its history is kept)")
    retry.add_argument("id", metavar="ID", help="a task id (t_…)")

    notes = add(
        "notifications",
        "read notifications of finished work (marking them read here only: Claude sessions still get them)",
    )
    notes.add_argument("--all-scopes", action="store_true", help="every project, not only this one")
    notes.add_argument(
        "--since", type=_cursor, metavar="CURSOR", help="every notification after this cursor, read or not"
    )
    notes.add_argument("--peek", action="store_true", help="show them without marking them read")
    notes.add_argument(
        "--limit", type=_positive_int_upto(MAX_NOTIFICATIONS), default=50, help="at most N (default 50)"
    )

    add("agents", "list the agents this project may launch")

    schedule = add(
        "schedule",
        "run an agent on a cron schedule",
        epilog=(
            "CRON has 5 fields: minute hour day-of-month month day-of-week, e.g. '0 9 * * 1-5' "
            "(weekdays at 09:00) or '*/15 * * * *' (every 15 minutes); 6 with seconds first when the "
            "config sets [schedules] allow_seconds. Fire times follow --tz, daylight saving included. "
            "Each run is a task with the --option values (as for submit; workflow_id, idempotency_key, "
            "delay and not_before are not allowed)."
        ),
    )
    schedule.add_argument("agent", metavar="AGENT", help="agent name (see `sidequest agents`)")
    schedule.add_argument("prompt", metavar="PROMPT", help="what each run should do; '-' reads it from stdin")
    schedule.add_argument("--cron", required=True, metavar="EXPR", help="when to run (quote it)")
    schedule.add_argument(
        "--tz", default="UTC", metavar="ZONE", help="IANA time zone of EXPR, e.g. Europe/Berlin (default UTC)"
    )
    schedule.add_argument("--name", help="a name to recognise it by (default: the agent's)")
    schedule.add_argument(
        "--overlap",
        choices=get_args(Overlap),
        default="skip",
        help="a run is due while the previous one is unfinished: skip it (default), queue it, or allow both",
    )
    schedule.add_argument(
        "--misfire",
        choices=get_args(Misfire),
        default="run_once",
        help="runs missed while sidequest was down: one catch-up run (run_once, default) or none (skip)",
    )
    schedule.add_argument(
        "--start-at",
        type=_iso_time,
        metavar="ISO",
        help="no runs before this time (UTC if no zone given, as in the tools and REST; --tz does not apply)",
    )
    schedule.add_argument(
        "--end-at", type=_iso_time, metavar="ISO", help="no runs after this time (UTC if no zone given)"
    )
    schedule.add_argument("--max-runs", type=_positive_int, metavar="N", help="finish after N runs")
    schedule.add_argument(
        "-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="a task option (repeatable)"
    )

    schedules = add("schedules", "list this project's schedules")
    schedules.add_argument("--all-scopes", action="store_true", help="every project, not only this one")

    schedule_show = add("schedule-show", "show a schedule and its latest runs")
    schedule_show.add_argument("id", metavar="ID", help="a schedule id (sch_…)")
    schedule_show.add_argument(
        "--runs",
        type=_positive_int_upto(MAX_RUNS_SHOWN),
        default=20,
        metavar="N",
        help=f"show the newest N runs (default 20, at most {MAX_RUNS_SHOWN})",
    )

    pause = add("pause", "pause a schedule: no runs until it is resumed")
    pause.add_argument("id", metavar="ID", help="a schedule id (sch_…)")
    resume = add("resume", "resume a paused schedule from its next fire time (missed runs are not made up)")
    resume.add_argument("id", metavar="ID", help="a schedule id (sch_…)")
    unschedule = add("unschedule", "delete a schedule (runs already started go on)")
    unschedule.add_argument("id", metavar="ID", help="a schedule id (sch_…)")

    gc = add(
        "gc",
        "delete finished tasks older than an age now, and say how much that freed",
        epilog=(
            "Deletes tasks that completed, failed or were cancelled longer ago than the age, in every "
            "project, with their attempts, results, usage, notifications and schedule fire keys, and "
            "workflows none of whose tasks remain; unfinished tasks and schedules stay. The daemon does "
            "this by itself (config key `retention`, default 30d); this runs it now."
        ),
    )
    gc.add_argument(
        "--older-than",
        type=_age,
        metavar="AGE",
        help="finished longer ago than this, e.g. 7d, 12h, 90m (default: the daemon's retention setting)",
    )
    gc.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")

    from sidequest.doctor import add_doctor_command
    from sidequest.env_cli import add_env_commands
    from sidequest.logs_cli import add_logs_command
    from sidequest.reload_cli import add_reload_command
    from sidequest.scaffold import add_init_command
    from sidequest.workers_cli import add_workers_commands

    add_env_commands(sub, CONFIG_HELP)
    add_doctor_command(sub, CONFIG_HELP)
    add_init_command(sub, CONFIG_HELP)
    add_reload_command(sub, CONFIG_HELP)
    add_logs_command(sub, CONFIG_HELP)
    add_workers_commands(sub, CONFIG_HELP)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_int_upto(maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def _age(text: str) -> float:
    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _iso_time(text: str) -> datetime:
    """Parsed here so a typo is a usage error; a time without a zone is UTC, as every surface reads it
    (the model does that), so a script moved from REST to the CLI means the same instant."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2030-01-31T09:00 or 2030-01-31T09:00+01:00, got {text!r}"
        ) from None


def _cursor(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a cursor is a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a cursor is zero or more, got {value}")
    return value


# ---- --option KEY=VALUE -> TaskOptions ------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(name)  # NaN/Infinity are not JSON; keep them as text


def _value(raw: str) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return raw


def parse_options(pairs: list[str]) -> TaskOptions:
    """TaskOptions from `KEY=VALUE` strings, validated here so a typo is caught before anything
    is sent, and reported by the option the user typed rather than by a pydantic location."""
    entries: list[tuple[tuple[str, ...], str, Any]] = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        path = tuple(key.strip().split("."))
        if not sep or any(not part for part in path):
            raise UsageError(f"--option {pair!r}: expected KEY=VALUE, e.g. priority=high or timeout=30m")
        for earlier, _, _ in entries:
            shorter = min(len(earlier), len(path))
            if earlier == path:
                raise UsageError(f"--option {key.strip()} is given twice")
            if earlier[:shorter] == path[:shorter]:
                raise UsageError(f"--option {'.'.join(path)} conflicts with --option {'.'.join(earlier)}")
        entries.append((path, pair, _value(raw)))

    while True:
        try:
            return TaskOptions.model_validate(_nest(entries))
        except ValidationError as exc:
            if not _reread(entries, exc):
                raise UsageError(_option_errors(entries, exc)) from None


def _reread(entries: list[tuple[tuple[str, ...], str, Any]], exc: ValidationError) -> bool:
    """Second readings for values the first guess got wrong: JSON that belongs in a text field
    (workflow_name=2024) is text, and plain text for a list (tags=a,b) is a comma-separated list."""
    changed = False
    for err in exc.errors():
        i = _entry_for(entries, err["loc"])
        if i is None or len(err["loc"]) != len(entries[i][0]):
            continue
        path, pair, value = entries[i]
        raw = pair.partition("=")[2]
        if err["type"] == "string_type" and not isinstance(value, str):
            entries[i] = (path, pair, raw)
            changed = True
        elif err["type"] == "list_type" and isinstance(value, str):
            entries[i] = (path, pair, [part.strip() for part in raw.split(",")])
            changed = True
    return changed


def _nest(entries: list[tuple[tuple[str, ...], str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for path, _, value in entries:
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return data


def _entry_for(entries: list[tuple[tuple[str, ...], str, Any]], loc: tuple[int | str, ...]) -> int | None:
    where = tuple(str(p) for p in loc)
    for i, (path, _, _) in enumerate(entries):
        shorter = min(len(path), len(where))
        if where and path[:shorter] == where[:shorter]:
            return i
    return None


def _option_errors(entries: list[tuple[tuple[str, ...], str, Any]], exc: ValidationError) -> str:
    messages = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        i = _entry_for(entries, err["loc"])
        named = f"--option {entries[i][1]}" if i is not None else "--option"
        if err["type"] == "extra_forbidden":
            parent = loc[:-1]
            fields = RetryBackoff.model_fields if parent == ("retry_backoff",) else TaskOptions.model_fields
            msg = f"unknown option {'.'.join(loc)!r}; known: {', '.join(fields)}"
        elif len(loc) > 1 and i is not None and entries[i][0] != loc:
            msg = f"{'.'.join(loc)}: {msg}"
        messages.append(f"{named}: {msg}")
    return "; ".join(messages)


# ---- running ------------------------------------------------------------------------------------


Handler = Callable[[argparse.Namespace, Settings, "Output"], Awaitable[int]]


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    from sidequest import doctor, env_cli, logs_cli, reload_cli, scaffold, workers_cli

    handlers = {**_HANDLERS, **env_cli.HANDLERS, **doctor.HANDLERS, **scaffold.HANDLERS}
    handlers |= workers_cli.HANDLERS
    handler = {**handlers, **reload_cli.HANDLERS, **logs_cli.HANDLERS}[args.command]
    out = Output(as_json=bool(getattr(args, "json", False)))
    try:
        return anyio.run(handler, args, settings, out)
    except UsageError as exc:
        out.error(str(exc), code="usage")
        return EXIT_USAGE
    except EngineError as exc:
        out.error(str(exc) or type(exc).__name__, code=exc.code)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if out.watching:
            return EXIT_OK  # Ctrl-C is how a watch ends
        if out.waiting_for:
            task = out.waiting_for
            out.error(
                f"stopped waiting; task {task} goes on: follow it with `sidequest show {task}` "
                "or `sidequest tasks --watch`",
                code="interrupted",
            )
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `sidequest tasks | head`: the reader left; say nothing, and keep Python's exit-time
        # flush from failing on the same closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:
        import httpx2  # only reached on failure; the client imports it anyway

        if isinstance(exc, httpx2.HTTPError):
            out.error(f"cannot talk to the sidequest daemon: {exc!r}", code="unavailable")
            return EXIT_FAILED
        raise


def _project() -> str:
    """The same default the engine uses, so the CLI and the MCP tools in a project agree."""
    return os.environ.get("CLAUDE_PROJECT_DIR") or os.getcwd()


@asynccontextmanager
async def _connect(
    settings: Settings, config_path: str | None, *, quiet: bool = False
) -> AsyncIterator[DaemonClient]:
    """A daemon started from here must read the same config file this command read. `quiet` (under
    --json) skips the key notice: stderr then holds nothing but an error's JSON object."""
    from sidequest.keynotice import notice_missing_keys
    from sidequest.server.daemon import open_client  # imported late: `serve` needs none of it

    async with open_client(settings, project=_project(), config_path=config_path) as client:
        await notice_missing_keys(client, settings, quiet=quiet)
        yield client


class Output:
    """Where results go: rich on stdout for people, one JSON document for programs."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.waiting_for: str | None = None
        """A task `submit --wait` submitted: on Ctrl-C the user learns its id, not just that it exists."""
        self.watching = False
        """`tasks --watch` is running: Ctrl-C is its normal end, not an error."""
        width = None
        if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
            width = 200  # piped: don't cut ids at rich's default 80 columns
        self.console = Console(highlight=False, width=width)
        self.stderr = Console(stderr=True, highlight=False)

    def emit(self, model: BaseModel) -> None:
        sys.stdout.write(model.model_dump_json(indent=2) + "\n")
        sys.stdout.flush()

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.console.print(*objects, **kwargs)

    def text(self, content: str) -> None:
        """Agent output as it is (no markup, wrapping or colour), ending in one newline, except that
        control characters are shown as visible stand-ins (`sidequest.terminal.printable`): an
        escape sequence from an agent or model must not act on the user's terminal."""
        self.console.file.flush()
        content = printable(content)
        sys.stdout.write(content if content.endswith("\n") else content + "\n")
        sys.stdout.flush()

    def warn(self, message: str) -> None:
        self.stderr.print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)

    def note(self, message: str) -> None:
        self.stderr.print(Text(message, style="dim"), soft_wrap=True)

    def error(self, message: str, code: str = "failed") -> None:
        """One line on stderr; under --json one JSON object (`code`: usage, not_found, invalid_request,
        unavailable, interrupted, failed, …) that a script can parse."""
        report(message, code=code, as_json=self.as_json)


# ---- commands -----------------------------------------------------------------------------------


async def _submit(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    options = parse_options(args.option)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UsageError(
            "the prompt is empty; say what the agent should do"
            + (" (stdin was empty)" if args.prompt == "-" else "")
        )
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        submitted = await client.submit(args.agent, prompt, options)
        if not args.wait:
            if out.as_json:
                out.emit(submitted)
            else:
                _print_submitted(out, submitted)
            return EXIT_OK
        for warning in submitted.warnings:
            out.warn(warning)
        if not out.as_json:
            out.note(f"submitted {submitted.task_id} (workflow {submitted.workflow_id}); waiting for it…")
        out.waiting_for = submitted.task_id
        live = out.console.is_terminal and not out.as_json
        task = await wait_for_task(client, submitted.task_id, out.console if live else None)
        out.waiting_for = None
        detail = await _detail(client, task)
    if out.as_json:
        out.emit(detail)
    elif task.status == TaskStatus.completed:
        _print_result(out, detail.result, rule=False)
    else:
        error = f": {printable(task.error)}" if task.error else ""
        out.error(f"task {task.task_id} {task.status.value}{error}")
    return EXIT_OK if task.status == TaskStatus.completed else EXIT_FAILED


def _print_submitted(out: Output, submitted: TaskSubmitted) -> None:
    line = Text.assemble(
        ("deduplicated: existing task " if submitted.deduplicated else "submitted task ", ""),
        (submitted.task_id, "bold"),
        " in workflow ",
        (submitted.workflow_id, "bold"),
        " (",
        _status(submitted.status.value),
        ")",
    )
    out.print(line, soft_wrap=True)
    for warning in submitted.warnings:
        out.warn(warning)
    out.note(f"follow it with: sidequest show {submitted.task_id}")


async def _detail(client: DaemonClient, task: TaskInfo) -> TaskDetail:
    if not task.status.finished:
        return TaskDetail(task=task)
    return TaskDetail(task=task, result=await _full_result(client, task.task_id))


async def _full_result(client: DaemonClient, task_id: str) -> ResultPage:
    page = await client.get_result(task_id, 0, RESULT_PAGE_CHARS)
    parts = [page.content]
    offset = page.next_offset
    while offset is not None:
        more = await client.get_result(task_id, offset, RESULT_PAGE_CHARS)
        parts.append(more.content)
        offset = more.next_offset
    return page.model_copy(update={"content": "".join(parts), "next_offset": None})


async def _tasks(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    if args.watch:
        if out.as_json:
            raise UsageError(
                "--watch redraws a table for a person and has no JSON form; a program can follow "
                "GET /api/v1/events (docs/rest.md) and run `sidequest tasks --json` on each update"
            )
        return await _watch_tasks(args, settings, out)
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        listing = await _collect_tasks(client, args.all, args.all_scopes, args.limit)
    if out.as_json:
        out.emit(listing)
        return EXIT_OK
    out.print(_listing_view(listing, args))
    if listing.truncated:
        out.note(f"showing the newest {len(listing.tasks)}; --limit N shows more")
    return EXIT_OK


def _listing_view(listing: TaskListing, args: argparse.Namespace) -> RenderableType:
    if not listing.tasks:
        where = "any project" if args.all_scopes else _project()
        hint = "" if args.all else " (--all includes finished ones)"
        return Text(f"no {'' if args.all else 'active '}tasks in {where}{hint}", style="dim")
    schedule = any(t.schedule_id for t in listing.tasks)
    return _task_table(listing.tasks, workflow=True, scope=args.all_scopes, schedule=schedule)


async def _watch_tasks(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    async def render() -> RenderableType:
        listing = await _collect_tasks(client, args.all, args.all_scopes, args.limit)
        view = _listing_view(listing, args)
        if listing.truncated:
            note = Text(f"showing the newest {len(listing.tasks)}; --limit N shows more", style="dim")
            return Group(view, note)
        return view

    out.watching = True
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        await watch(client, out.console, render)
    return EXIT_OK


async def _collect_tasks(
    client: DaemonClient, include_finished: bool, all_scopes: bool, limit: int
) -> TaskListing:
    """Tasks are listed per workflow by the engine; gather them, newest first."""
    from sidequest.server.client import iterate_pages

    workflows = [
        w
        async for w in iterate_pages(
            lambda offset: client.list_active_workflows(all_scopes=all_scopes, limit=PAGE_SIZE, offset=offset)
        )
    ]
    tasks = await _tasks_of(client, workflows)
    if not include_finished:
        tasks = [t for t in tasks if not t.status.finished]
    else:
        offset: int | None = 0
        while offset is not None and len(tasks) <= limit:
            page = await client.workflow_history(
                all_scopes=all_scopes, limit=min(PAGE_SIZE, limit), offset=offset
            )
            tasks += await _tasks_of(client, page.workflows)
            offset = page.next_offset
        if offset is not None:
            return _listing(tasks, limit, more=True)
    return _listing(tasks, limit, more=False)


def _listing(tasks: list[TaskInfo], limit: int, more: bool) -> TaskListing:
    unique = list({t.task_id: t for t in tasks}.values())  # a workflow may finish between two pages
    unique.sort(key=lambda t: t.created_at, reverse=True)
    return TaskListing(tasks=unique[:limit], truncated=more or len(unique) > limit)


async def _tasks_of(client: DaemonClient, workflows: list[WorkflowInfo]) -> list[TaskInfo]:
    found: dict[str, list[TaskInfo]] = {}
    limiter = anyio.CapacityLimiter(PARALLEL_FETCHES)

    async def fetch(workflow: WorkflowInfo) -> None:
        if workflow.tasks is not None:
            found[workflow.workflow_id] = workflow.tasks
            return
        async with limiter:
            try:
                full = await client.get_workflow(workflow.workflow_id)
            except NotFound:  # pruned between the listing and this read
                return
        found[workflow.workflow_id] = full.tasks or []

    async with anyio.create_task_group() as tg:
        for workflow in workflows:
            tg.start_soon(fetch, workflow)
    return [task for w in workflows for task in found.get(w.workflow_id, [])]


async def _show(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    if args.id.startswith("sch_"):
        return await _schedule_show(args, settings, out)
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        found = await _lookup(client, args.id)
        if isinstance(found, WorkflowInfo):
            if out.as_json:
                out.emit(found)
            else:
                _print_workflow(out, found)
            return EXIT_OK
        detail = await _detail(client, found)
    if out.as_json:
        out.emit(detail)
    else:
        _print_task(out, detail)
    return EXIT_OK


async def _lookup(client: DaemonClient, ident: str) -> TaskInfo | WorkflowInfo:
    """Ids carry their kind in the prefix; anything else is tried as both before giving up."""
    if ident.startswith("wf_"):
        return await client.get_workflow(ident)
    if ident.startswith("t_"):
        return await client.get_task(ident)
    try:
        return await client.get_task(ident)
    except NotFound:
        pass
    try:
        return await client.get_workflow(ident)
    except NotFound:
        raise NotFound(
            f"unknown id {ident[:100]!r}: task ids look like 't_…', workflow ids like 'wf_…'"
        ) from None


async def _cancel(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    ident: str = args.id
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        if ident.startswith("wf_"):
            result = await client.cancel(workflow_id=ident)
        elif ident.startswith("t_"):
            result = await client.cancel(task_id=ident)
        else:
            found = await _lookup(client, ident)
            if isinstance(found, WorkflowInfo):
                result = await client.cancel(workflow_id=found.workflow_id)
            else:
                result = await client.cancel(task_id=found.task_id)
    if out.as_json:
        out.emit(result)
    else:
        _print_cancel(out, result)
    return EXIT_OK


def _print_cancel(out: Output, result: CancelResult) -> None:
    if result.cancelled:
        out.print(Text.assemble(("cancelled: ", "green"), ", ".join(result.cancelled)), soft_wrap=True)
    if result.already_finished:
        out.print(
            Text(f"already finished: {', '.join(result.already_finished)}", style="dim"), soft_wrap=True
        )
    if not result.cancelled and not result.already_finished:
        out.print(Text("nothing to cancel", style="dim"))


async def _retry(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        task = await client.retry(args.id)
    if out.as_json:
        out.emit(task)
    else:
        out.print(
            Text.assemble(
                ("queued again: ", "green"),
                f"{task.task_id} ({task.agent}), attempt {task.attempts + 1} next",
            ),
            soft_wrap=True,
        )
    return EXIT_OK


async def _notifications(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        page = await client.notifications(
            all_scopes=args.all_scopes,
            since=args.since,
            mark_delivered=not args.peek,
            limit=args.limit,
            reader=CLI_READER,  # the terminal's own deliveries: a Claude session still gets these
        )
    if out.as_json:
        out.emit(page)
    else:
        _print_notifications(out, page, scope=args.all_scopes)
    return EXIT_OK


def _print_notifications(out: Output, page: NotificationPage, scope: bool) -> None:
    if not page.notifications:
        out.print(Text("no new notifications", style="dim"))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("CURSOR", justify="right", no_wrap=True)
    table.add_column("KIND", no_wrap=True)
    table.add_column("ID", overflow="fold")
    table.add_column("MESSAGE", overflow="fold")
    table.add_column("TIME", no_wrap=True)
    if scope:
        table.add_column("SCOPE", overflow="fold")
    for n in page.notifications:
        row: list[Any] = [
            str(n.cursor),
            Text(n.kind.value, style=KIND_STYLE.get(n.kind.value, "")),
            n.task_id or n.workflow_id,
            Text(printable(n.message)),
            _ago(n.created_at),
        ]
        if scope:
            row.append(n.scope)
        table.add_row(*row)
    out.print(table)
    out.note(f"next cursor: {page.next_cursor}")


async def _agents(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        agents = await client.agent_list()
    if out.as_json:
        out.emit(agents)
    else:
        _print_agents(out, agents)
    return EXIT_OK


def _print_agents(out: Output, listing: AgentList) -> None:
    if listing.agents:
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("NAME", overflow="fold")
        table.add_column("EXECUTOR", no_wrap=True)
        table.add_column("MODEL", overflow="fold")
        table.add_column("DESCRIPTION", overflow="fold", ratio=1)
        table.add_column("SOURCE", overflow="fold")
        for agent in sorted(listing.agents, key=lambda a: a.name):
            table.add_row(
                Text(agent.name, style="bold"),
                agent.executor,
                agent.model or "-",
                Text(printable(agent.description)),
                Text(agent.source, style="dim"),
            )
        out.print(table)
    else:
        out.print(
            Text(
                "no agents: write agent files in .claude/agents/ or add [agents.NAME] tables to the config",
                style="dim",
            )
        )
    for agent in listing.agents:
        for warning in agent.warnings:
            out.print(Text(printable(f"{agent.name}: {warning}"), style="yellow"), soft_wrap=True)
    for problem in listing.problems:
        line = printable(f"broken agent file {problem.file}: {problem.error}")
        out.print(Text(line, style="red"), soft_wrap=True)


# ---- schedules ------------------------------------------------------------------------------------


async def _schedule(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    options = parse_options(args.option) if args.option else None
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UsageError(
            "the prompt is empty; say what each run should do"
            + (" (stdin was empty)" if args.prompt == "-" else "")
        )
    try:
        spec = ScheduleSpec(
            agent_definition=args.agent,
            prompt=prompt,
            cron=args.cron,
            timezone=args.tz,
            name=args.name,
            options=options,
            overlap=args.overlap,
            misfire=args.misfire,
            start_at=args.start_at,
            end_at=args.end_at,
            max_runs=args.max_runs,
        )
    except ValidationError as exc:
        raise UsageError(_spec_errors(exc)) from None
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        created = await client.schedule_task(spec)
    if out.as_json:
        out.emit(created)
    else:
        _print_created(out, created, args.tz)
    return EXIT_OK


_SPEC_FLAGS = {"agent_definition": "AGENT", "prompt": "PROMPT", "cron": "--cron", "timezone": "--tz"}


def _spec_errors(exc: ValidationError) -> str:
    """Pydantic's locations renamed to the flags the user typed (--start-at, not start_at)."""
    messages = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        flag = _SPEC_FLAGS.get(field, "--" + field.replace("_", "-"))
        messages.append(f"{flag}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(messages)


def _print_created(out: Output, created: ScheduleCreated, zone: str) -> None:
    out.print(Text.assemble("scheduled ", (created.schedule_id, "bold")), soft_wrap=True)
    for warning in created.warnings:
        out.warn(warning)
    if created.next_runs:
        out.print(Text("next runs:", style="bold"))
        for when in created.next_runs:
            out.print(Text(f"  {_zoned(when, zone)}"), soft_wrap=True)
    out.note(f"follow it with: sidequest schedule-show {created.schedule_id}")


async def _schedules(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        schedules: list[ScheduleInfo] = []
        offset: int | None = 0
        while offset is not None:
            page = await client.list_schedules(all_scopes=args.all_scopes, limit=PAGE_SIZE, offset=offset)
            schedules += page.schedules
            offset = page.next_offset
    unique = list({s.schedule_id: s for s in schedules}.values())  # one may move between two pages
    if out.as_json:
        out.emit(SchedulePage(schedules=unique, total=len(unique)))
        return EXIT_OK
    if not unique:
        where = "any project" if args.all_scopes else _project()
        out.print(Text(f"no schedules in {where}", style="dim"))
        return EXIT_OK
    out.print(_schedule_table(unique, scope=args.all_scopes))
    return EXIT_OK


def _schedule_table(schedules: list[ScheduleInfo], scope: bool) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("SCHEDULE", overflow="fold")
    table.add_column("NAME", overflow="fold")
    table.add_column("AGENT", overflow="fold")
    table.add_column("CRON", no_wrap=True)
    table.add_column("TZ", overflow="fold")
    table.add_column("STATE", no_wrap=True)
    table.add_column("NEXT RUN", no_wrap=True)
    table.add_column("LAST RUN", no_wrap=True)
    table.add_column("LAST STATUS", no_wrap=True)
    table.add_column("RUNS", justify="right", no_wrap=True)
    if scope:
        table.add_column("SCOPE", overflow="fold")
    for s in schedules:
        row: list[Any] = [
            s.schedule_id,
            Text(s.name),
            s.agent,
            Text(s.cron),
            s.timezone,
            Text(s.state, style=SCHEDULE_STYLE.get(s.state, "")),
            _ago(s.next_run_at),
            _ago(s.last_run_at),
            _status(s.last_status.value) if s.last_status else "-",
            str(s.runs) if s.max_runs is None else f"{s.runs}/{s.max_runs}",
        ]
        if scope:
            row.append(s.scope)
        table.add_row(*row)
    return table


async def _schedule_show(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        detail = await _schedule_detail(client, args.id, getattr(args, "runs", 20))
    if out.as_json:
        out.emit(detail)
    else:
        _print_schedule(out, detail)
    return EXIT_OK


async def _schedule_detail(client: DaemonClient, schedule_id: str, runs: int) -> ScheduleDetail:
    schedule = await client.get_schedule(schedule_id)
    return ScheduleDetail(schedule=schedule, runs=await client.schedule_runs(schedule_id, limit=runs))


def _print_schedule(out: Output, detail: ScheduleDetail) -> None:
    s = detail.schedule
    grid = _Fields()
    grid.add_row("schedule", s.schedule_id)
    grid.add_row("name", Text(printable(s.name)))
    grid.add_row("agent", s.agent)
    grid.add_row("cron", Text(f"{s.cron}  ({s.timezone})"))
    grid.add_row("state", Text(s.state, style=SCHEDULE_STYLE.get(s.state, "")))
    grid.add_row("scope", s.scope)
    grid.add_row("overlap", s.overlap)
    grid.add_row("misfire", s.misfire)
    if s.start_at is not None:
        grid.add_row("start at", _zoned(s.start_at, s.timezone))
    if s.end_at is not None:
        grid.add_row("end at", _zoned(s.end_at, s.timezone))
    grid.add_row("runs", str(s.runs) if s.max_runs is None else f"{s.runs} of {s.max_runs}")
    if s.last_run_at is not None:
        status = f" ({s.last_status.value})" if s.last_status else ""
        grid.add_row(
            "last run", Text(f"{_zoned(s.last_run_at, s.timezone)}: {s.last_task_id or '-'}{status}")
        )
    if s.queued_run_at is not None:
        grid.add_row("queued", _zoned(s.queued_run_at, s.timezone))
    if s.last_error:
        grid.add_row("last error", Text(printable(s.last_error), style="red"))
    if s.options:
        grid.add_row("options", Text(json.dumps(s.options, ensure_ascii=False)))
    grid.add_row("created", _when(s.created_at))
    grid.add_row("prompt", Text(printable(s.prompt)))
    grid.render(out)
    if s.next_runs:
        out.print()
        out.print(Text("next runs:", style="bold"))
        for when in s.next_runs:
            out.print(Text(f"  {_zoned(when, s.timezone)}"), soft_wrap=True)
    out.print()
    if not detail.runs.tasks:
        out.print(Text("no runs yet", style="dim"))
        return
    out.print(Text(f"runs ({detail.runs.total}, newest first):", style="bold"))
    out.print(_task_table(detail.runs.tasks, workflow=True, scope=False))
    if detail.runs.next_offset is not None:
        out.note(f"showing the newest {len(detail.runs.tasks)}; --runs N shows more")


async def _pause(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    return await _set_paused(args, settings, out, paused=True)


async def _resume(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    return await _set_paused(args, settings, out, paused=False)


async def _set_paused(args: argparse.Namespace, settings: Settings, out: Output, paused: bool) -> int:
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        info = await client.update_schedule(args.id, ScheduleUpdate(paused=paused))
    if out.as_json:
        out.emit(info)
        return EXIT_OK
    line = Text.assemble(
        ("paused " if paused else "resumed ", ""),
        (info.schedule_id, "bold"),
        f" ({info.name}): ",
        (info.state, SCHEDULE_STYLE.get(info.state, "")),
    )
    if info.next_run_at is not None:
        line.append(f", next run {_zoned(info.next_run_at, info.timezone)}")
    out.print(line, soft_wrap=True)
    return EXIT_OK


async def _unschedule(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        deleted = await client.delete_schedule(args.id)
    if out.as_json:
        out.emit(deleted)
    else:
        out.print(Text.assemble("deleted schedule ", (deleted.schedule_id, "bold")), soft_wrap=True)
    return EXIT_OK


async def _gc(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    async with _connect(settings, args.config, quiet=out.as_json) as client:
        report = await client.gc(args.older_than, dry_run=args.dry_run)
    if out.as_json:
        out.emit(report)
    else:
        _print_gc(out, report)
    return EXIT_OK


_HANDLERS: dict[str, Handler] = {
    "submit": _submit,
    "tasks": _tasks,
    "show": _show,
    "cancel": _cancel,
    "retry": _retry,
    "notifications": _notifications,
    "agents": _agents,
    "schedule": _schedule,
    "schedules": _schedules,
    "schedule-show": _schedule_show,
    "pause": _pause,
    "resume": _resume,
    "unschedule": _unschedule,
    "gc": _gc,
}
assert set(_HANDLERS) == COMMANDS


# ---- rendering ----------------------------------------------------------------------------------


def _status(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def _ago(when: datetime | None, now: datetime | None = None) -> str:
    """Relative for recent times (what a person scanning a list wants), a local date beyond a week."""
    if when is None:
        return "-"
    now = now or datetime.now(UTC)
    seconds = (now - when).total_seconds()
    span = abs(seconds)
    if span < 1:
        return "now"
    if span >= 7 * 86400:
        return when.astimezone().strftime("%Y-%m-%d %H:%M")
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if span >= size:
            amount = f"{int(span // size)}{unit}"
            break
    return f"in {amount}" if seconds < 0 else f"{amount} ago"


def _when(when: datetime | None) -> str:
    if when is None:
        return "-"
    return f"{when.astimezone().strftime('%Y-%m-%d %H:%M:%S')} ({_ago(when)})"


def _zoned(when: datetime, zone: str) -> str:
    """A fire time in the schedule's zone, where its cron reads it (09:00 there, not 08:00 here)."""
    try:
        local = when.astimezone(ZoneInfo(zone))
    except (LookupError, ValueError, OSError, OverflowError):
        local = when
    relative = _ago(when)
    if relative[:1].isdigit() and not relative.endswith(" ago"):
        return local.strftime("%Y-%m-%d %H:%M:%S %Z")  # over a week away: _ago gave a date, not a span
    return f"{local.strftime('%Y-%m-%d %H:%M:%S %Z')} ({relative})"


def _progress(task: TaskInfo) -> str:
    if task.status == TaskStatus.waiting and task.not_before is not None:
        return f"starts {_ago(task.not_before)}"
    if task.status == TaskStatus.retrying and task.next_attempt_at is not None:
        return f"attempt {task.attempts + 1} {_ago(task.next_attempt_at)}"
    if task.status.finished or task.progress is None:
        return ""
    parts = []
    if task.progress.percent is not None:
        parts.append(f"{task.progress.percent:.0f}%")
    if task.progress.message:
        parts.append(task.progress.message)
    return " ".join(parts)


def _task_table(tasks: list[TaskInfo], workflow: bool, scope: bool, schedule: bool = False) -> Table:
    """`schedule` adds the schedule that started each task, shown only when some listed task has one."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("TASK", overflow="fold")
    table.add_column("AGENT", overflow="fold")
    table.add_column("STATUS", no_wrap=True)
    table.add_column("PROGRESS", overflow="fold")
    if workflow:
        table.add_column("WORKFLOW", overflow="fold")
    if schedule:
        table.add_column("SCHEDULE", overflow="fold")
    table.add_column("CREATED", no_wrap=True)
    if scope:
        table.add_column("SCOPE", overflow="fold")
    for task in tasks:
        progress = Text(printable(_progress(task)))
        row: list[Any] = [task.task_id, task.agent, _status(task.status.value), progress]
        if workflow:
            row.append(task.workflow_id)
        if schedule:
            row.append(task.schedule_id or "-")
        row.append(_ago(task.created_at))
        if scope:
            row.append(task.scope)
        table.add_row(*row)
    return table


class _Fields:
    """`key  value` lines; not a rich grid, which pads every line to the widest value."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, Text]] = []

    def add_row(self, key: str, value: str | Text) -> None:
        self.rows.append((key, value if isinstance(value, Text) else Text(value)))

    def render(self, out: Output) -> None:
        width = max(len(key) for key, _ in self.rows) + 2
        for key, value in self.rows:
            out.print(Text.assemble((key.ljust(width), "bold"), value), soft_wrap=True)


def _print_task(out: Output, detail: TaskDetail) -> None:
    task = detail.task
    grid = _Fields()
    grid.add_row("task", task.task_id)
    grid.add_row("workflow", task.workflow_id)
    grid.add_row("agent", task.agent)
    grid.add_row("status", _status(task.status.value))
    grid.add_row("priority", task.priority)
    grid.add_row("scope", task.scope)
    grid.add_row("created", _when(task.created_at))
    if task.prompt or task.prompt_preview:
        grid.add_row("prompt", Text(printable(task.prompt or task.prompt_preview or "")))
    if task.not_before is not None and not task.status.finished:
        grid.add_row("not before", _when(task.not_before))
    if task.started_at is not None:
        grid.add_row("started", _when(task.started_at))
    if task.finished_at is not None:
        grid.add_row("finished", _when(task.finished_at))
    if task.next_attempt_at is not None and not task.status.finished:
        grid.add_row("next attempt", _when(task.next_attempt_at))
    grid.add_row("attempts", f"{task.attempts} of {task.max_retries + 1}")
    if task.timeout is not None:
        grid.add_row("timeout", f"{task.timeout:g}s per attempt")
    if progress := _progress(task):
        grid.add_row("progress", Text(printable(progress)))
    if task.tags:
        grid.add_row("tags", Text(printable(", ".join(task.tags))))
    if task.metadata:
        grid.add_row("metadata", Text(json.dumps(task.metadata, ensure_ascii=False)))
    if task.session_id:
        grid.add_row("session", task.session_id)
    if task.usage is not None:
        grid.add_row("usage", _usage(task))
    if task.error:
        grid.add_row("error", Text(printable(task.error), style="red"))
    grid.render(out)

    if task.attempt_history and (len(task.attempt_history) > 1 or task.attempt_history[0].error):
        history = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
        for name in ("ATTEMPT", "STATUS", "STARTED", "FINISHED", "ERROR"):
            history.add_column(name, overflow="fold")
        for attempt in task.attempt_history:
            history.add_row(
                str(attempt.attempt),
                _status(attempt.status),
                _ago(attempt.started_at),
                _ago(attempt.finished_at),
                Text(printable(attempt.error or ""), style="red"),
            )
        out.print()
        out.print(history)

    if detail.result is not None and (detail.result.total_chars or task.status == TaskStatus.completed):
        _print_result(out, detail.result, rule=True)


def _usage(task: TaskInfo) -> str:
    usage = task.usage
    assert usage is not None
    parts = [f"{usage.input_tokens:,} in / {usage.output_tokens:,} out tokens"]
    if usage.cache_read_input_tokens or usage.cache_creation_input_tokens:
        parts.append(
            f"cache {usage.cache_read_input_tokens:,} read / {usage.cache_creation_input_tokens:,} written"
        )
    if usage.cost_usd is not None:
        parts.append(f"~${usage.cost_usd:.4f}")
    if usage.models:
        parts.append(", ".join(usage.models))
    return " · ".join(parts)


def _print_result(out: Output, page: ResultPage | None, rule: bool) -> None:
    if page is None:
        return
    content = page.content
    if page.content_type == "json":
        with suppress(ValueError):
            content = json.dumps(json.loads(content), indent=2, ensure_ascii=False)
    if rule:
        out.print()
        out.print(Text(f"── result ({page.total_chars:,} characters) ──", style="dim"))
    out.text(content)


def _print_workflow(out: Output, workflow: WorkflowInfo) -> None:
    grid = _Fields()
    grid.add_row("workflow", workflow.workflow_id)
    grid.add_row("name", Text(printable(workflow.name)))
    grid.add_row("status", _status(workflow.status.value))
    grid.add_row("scope", workflow.scope)
    grid.add_row("created", _when(workflow.created_at))
    grid.add_row("updated", _when(workflow.updated_at))
    if workflow.finished_at is not None:
        grid.add_row("finished", _when(workflow.finished_at))
    if workflow.counts:
        counts = Text(", ").join(
            Text(f"{n} {status}", style=STATUS_STYLE.get(status, ""))
            for status, n in sorted(workflow.counts.items())
        )
        grid.add_row("tasks", counts)
    grid.render(out)
    if workflow.tasks:
        out.print()
        out.print(_task_table(workflow.tasks, workflow=False, scope=False))


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _disk(file_bytes: int, wal_bytes: int) -> str:
    """The file, and its write-ahead log when it holds anything (a checkpoint moves it into the file)."""
    return _bytes(file_bytes) + (f" + {_bytes(wal_bytes)} write-ahead log" if wal_bytes else "")


def _print_gc(out: Output, report: GcReport) -> None:
    d = report.deleted
    verb = "would delete" if report.dry_run else "deleted"
    age = describe_age(report.older_than_seconds)
    out.print(
        Text.assemble(
            f"{verb} ",
            (f"{d.tasks:,}", "bold"),
            f" finished task{'s' if d.tasks != 1 else ''} older than {age} (finished before "
            f"{report.finished_before.astimezone().strftime('%Y-%m-%d %H:%M:%S')})",
        ),
        soft_wrap=True,
    )
    grid = _Fields()
    for label, n in (
        ("attempts", d.attempts),
        ("results", d.results),
        ("usage rows", d.usage),
        ("notifications", d.notifications),
        ("schedule fires", d.schedule_fires),
        ("webhooks", d.webhook_callbacks),
        ("workflows", d.workflows),
        ("run-log entries", d.events),
    ):
        grid.add_row(f"  {label}", f"{n:,}")
    grid.render(out)
    before = _disk(report.file_bytes_before, report.wal_bytes_before)
    if report.dry_run:
        out.print(f"nothing was deleted (dry run); the database takes {before}")
        return
    line = f"database {before} → {_disk(report.file_bytes_after, report.wal_bytes_after)}"
    line += f"; {_bytes(report.free_bytes_after)} inside the file free for new rows"
    if d.tasks and not report.checkpointed:
        line += " (not checkpointed yet: DuckDB will do it on its own)"
    out.print(f"{line}; {report.batches} batch{'es' if report.batches != 1 else ''}, {report.seconds:g}s")


__all__ = [
    "COMMANDS",
    "ScheduleDetail",
    "TaskDetail",
    "TaskListing",
    "add_commands",
    "parse_options",
    "run_command",
]
