"""Following the daemon from the command line: `submit --wait` (with a live progress bar on a terminal)
and `tasks --watch` (a task table redrawn as it changes).

Why the event stream: the daemon says when something was committed (`/api/v1/events`), so a
watcher re-reads right after a change instead of polling tightly. The stream is only a hint: a
re-read every few seconds covers a stream that could not be opened or was lost (a daemon restart),
and each wake-up re-reads the state, so a missed event costs a delay, never a wrong answer.

A watcher never starts a daemon after its first connection: it follows the daemon it found, or one
that replaced it. When none answers any more (`sidequest stop`), it ends with status 1 saying the
daemon stopped, rather than bringing back a daemon the user stopped on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from sidequest.engine.errors import Unavailable
from sidequest.models import TaskInfo, TaskStatus
from sidequest.terminal import printable

if TYPE_CHECKING:
    from sidequest.server.client import DaemonClient

WAIT_FALLBACK = 1.0
"""`submit --wait` re-reads at least this often, whatever the event stream says."""
WATCH_REFRESH = 2.0
"""`tasks --watch` redraws at least this often (relative times move on even when nothing changes)."""
WATCH_SETTLE = 0.2
"""After an event, let a burst of commits (a workflow of many tasks finishing) land before one redraw."""
REOPEN_DELAY = 1.0
GONE_CHECKS = 3
"""A daemon that cannot be found is looked for this many times, REOPEN_DELAY apart, before the
watcher says it stopped: another client may be replacing it (an upgrade) at that moment."""
FALLBACK_ENV = "SIDEQUEST_WATCH_FALLBACK"
"""Seconds between the fallback re-reads, replacing WAIT_FALLBACK and WATCH_REFRESH. For tests: set
long, a change seen sooner proves the event stream woke the watcher. Read only by the CLI."""


def _fallback(default: float) -> float:
    try:
        seconds = float(os.environ.get(FALLBACK_ENV, ""))
    except ValueError:
        return default
    return seconds if 0 < seconds < float("inf") else default


class DaemonStopped(Unavailable):
    """No daemon answers any more, and the watcher will not start one."""


class Changes:
    """Wakes a watcher when the daemon commits a change it cares about.

    `wanted(data)` picks the `update` events that matter; `overflow` (updates were dropped) always
    wakes. Run `follow` in a task group and call `wait` between reads.

    A stream lost because the daemon is gone (the client forgot its address) wakes the watcher too:
    its next read finds the daemon that replaced it, or learns that none runs.
    """

    def __init__(self, client: DaemonClient, wanted: Callable[[dict[str, Any]], bool]) -> None:
        self._client = client
        self._wanted = wanted
        self._changed = anyio.Event()

    async def follow(self) -> None:
        """Reads the event stream for as long as the watcher runs, reopening it after a loss."""
        while True:
            try:
                async for kind, data in self._client.events():
                    if kind == "overflow" or (kind == "update" and self._wanted(data)):
                        self._changed.set()
            except Exception:  # a lost stream only slows the watcher to its fallback re-reads
                pass
            if self._client.endpoint is None:  # the daemon went away: re-read now
                self._changed.set()
            await anyio.sleep(REOPEN_DELAY)

    async def wait(self, timeout: float) -> None:
        """Until a wanted change since the last `wait` returned, or `timeout`. The event is replaced
        before returning, so a change committed during the caller's next read wakes the next wait."""
        with anyio.move_on_after(timeout):
            await self._changed.wait()
        self._changed = anyio.Event()


T = TypeVar("T")


async def _read(client: DaemonClient, read: Callable[[], Awaitable[T]], stopped: str) -> T:
    """`read()`, looking again for a daemon (never starting one) while none answers; `DaemonStopped`
    with the message `stopped` when none turns up."""
    last: Unavailable | None = None
    for check in range(GONE_CHECKS):
        try:
            return await read()
        except Exception as exc:
            last = _unavailable(exc)
            if last is None:
                raise
        if check < GONE_CHECKS - 1:
            await anyio.sleep(REOPEN_DELAY)
    assert last is not None
    if client.endpoint is None:  # the client found no daemon to send to
        raise DaemonStopped(stopped) from last
    raise last


def _unavailable(exc: Exception) -> Unavailable | None:
    """The daemon's absence (or its stopping, a 503 on the way there) behind `exc`, also when the
    read ran several requests in a task group and they all failed that way."""
    if isinstance(exc, Unavailable):
        return exc
    if isinstance(exc, ExceptionGroup):
        matched, rest = exc.split(Unavailable)
        if matched is not None and rest is None:
            first: BaseException = matched
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            return first if isinstance(first, Unavailable) else None
    return None


def _about(task_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda data: task_id in (data.get("task_ids") or ())


async def wait_for_task(client: DaemonClient, task_id: str, console: Console | None = None) -> TaskInfo:
    """Returns the task once it finished; with a `console` (a terminal), shows a live progress bar
    until then: the agent's percent (a spinner when it reports none), its message, status and attempt.
    The bar is transient: what stays on screen afterwards is the result."""
    changes = Changes(client, _about(task_id))
    await client.connect()  # before the stream and the first read race to find (or start) the daemon
    client.may_start = False

    async def until_finished() -> TaskInfo:
        if console is None:
            return await _until_finished(client, task_id, changes, lambda _: None)
        with _progress_bar(console) as bar:
            row = bar.add_task("waiting for it to start", total=None, state="")
            return await _until_finished(client, task_id, changes, lambda t: _show(bar, row, t))

    return await _following(changes, until_finished)


async def _following(changes: Changes, body: Callable[[], Awaitable[T]]) -> T:
    """`body()` with `changes.follow` alongside; an error of `body` comes out as itself, not wrapped
    in the task group's ExceptionGroup, so the command reports it as one line."""
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(changes.follow)
        try:
            result = await body()
        except Exception as exc:
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result


async def _until_finished(
    client: DaemonClient, task_id: str, changes: Changes, show: Callable[[TaskInfo], None]
) -> TaskInfo:
    stopped = (
        f"the sidequest daemon stopped while waiting for task {task_id}, and was not started again; "
        f"`sidequest show {task_id}` starts it and shows the task"
    )
    fallback = _fallback(WAIT_FALLBACK)
    while True:
        report = await _read(client, lambda: client.status(task_id=task_id), stopped)
        task = report.task
        if task is not None:
            if task.status.finished:
                return task
            show(task)
        await changes.wait(fallback)


def _progress_bar(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    )


def _show(bar: Progress, row: Any, task: TaskInfo) -> None:
    progress = task.progress
    percent = progress.percent if progress is not None else None
    message = progress.message if progress is not None and progress.message else ""
    if not message:
        message = {
            TaskStatus.queued: "queued",
            TaskStatus.waiting: "waiting for its start time",
            TaskStatus.retrying: f"retrying: {task.error or 'the last attempt failed'}",
        }.get(task.status, "working")
    attempt = max(task.attempts, 1)
    state = f"{task.status.value} · attempt {attempt} of {task.max_retries + 1}"
    # One line: a long or multi-line agent message must not push the bar around.
    line = printable(" ".join(message.split()))  # agent text: no escape sequence reaches the terminal
    if percent is None:
        bar.update(row, total=None, description=Text(line), state=state)
    else:
        bar.update(row, total=100.0, completed=percent, description=Text(line), state=state)


async def watch(
    client: DaemonClient,
    console: Console,
    render: Callable[[], Awaitable[RenderableType]],
) -> None:
    """Redraws `render()` on every change (any task or workflow the daemon commits) and at least
    every WATCH_REFRESH seconds, until cancelled (Ctrl-C). The last frame stays on screen.

    Raises `DaemonStopped` (exit 1, the last table still on screen) once no daemon answers: the
    watch does not start one, so a daemon the user stopped stays stopped."""
    changes = Changes(client, lambda data: bool(data.get("task_ids") or data.get("workflow_ids")))
    await client.connect()  # before the stream and the first read race to find (or start) the daemon
    client.may_start = False
    stopped = (
        "the sidequest daemon stopped, and the watch does not start it; any command (`sidequest tasks`) does"
    )
    refresh = _fallback(WATCH_REFRESH)

    async def redraw() -> None:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                body = await _read(client, render, stopped)
                stamp = datetime.now(UTC).astimezone().strftime("%H:%M:%S")
                footer = Text(f"updated {stamp} · Ctrl-C to stop", style="dim")
                live.update(Group(body, footer), refresh=True)
                await changes.wait(refresh)
                await anyio.sleep(WATCH_SETTLE)

    await _following(changes, redraw)


__all__ = ["Changes", "DaemonStopped", "wait_for_task", "watch"]
