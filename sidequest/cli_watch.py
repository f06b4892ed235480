"""Following the daemon from the command line: `submit --wait` (with a live progress bar on a terminal)
and `tasks --watch` (a task table redrawn as it changes).

Why the event stream: the daemon says when something was committed (`/api/v1/events`), so a
watcher re-reads right after a change instead of polling tightly. The stream is only a hint: a
re-read every few seconds covers a stream that could not be opened or was lost (a daemon restart),
and each wake-up re-reads the state, so a missed event costs a delay, never a wrong answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

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


class Changes:
    """Wakes a watcher when the daemon commits a change it cares about.

    `wanted(data)` picks the `update` events that matter; `overflow` (updates were dropped) always
    wakes. Run `follow` in a task group and call `wait` between reads.
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
            await anyio.sleep(REOPEN_DELAY)

    async def wait(self, timeout: float) -> None:
        """Until a wanted change since the last `wait` returned, or `timeout`. The event is replaced
        before returning, so a change committed during the caller's next read wakes the next wait."""
        with anyio.move_on_after(timeout):
            await self._changed.wait()
        self._changed = anyio.Event()


def _about(task_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda data: task_id in (data.get("task_ids") or ())


async def wait_for_task(client: DaemonClient, task_id: str, console: Console | None = None) -> TaskInfo:
    """Returns the task once it finished; with a `console` (a terminal), shows a live progress bar
    until then: the agent's percent (a spinner when it reports none), its message, status and attempt.
    The bar is transient: what stays on screen afterwards is the result."""
    changes = Changes(client, _about(task_id))
    await client.connect()  # before the stream and the first read race to find (or start) the daemon
    async with anyio.create_task_group() as tg:
        tg.start_soon(changes.follow)
        if console is None:
            task = await _until_finished(client, task_id, changes, lambda _: None)
        else:
            with _progress_bar(console) as bar:
                row = bar.add_task("waiting for it to start", total=None, state="")
                task = await _until_finished(client, task_id, changes, lambda t: _show(bar, row, t))
        tg.cancel_scope.cancel()
    return task


async def _until_finished(
    client: DaemonClient, task_id: str, changes: Changes, show: Callable[[TaskInfo], None]
) -> TaskInfo:
    while True:
        report = await client.status(task_id=task_id)
        task = report.task
        if task is not None:
            if task.status.finished:
                return task
            show(task)
        await changes.wait(WAIT_FALLBACK)


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
    every WATCH_REFRESH seconds, until cancelled (Ctrl-C). The last frame stays on screen."""
    changes = Changes(client, lambda data: bool(data.get("task_ids") or data.get("workflow_ids")))
    await client.connect()  # before the stream and the first read race to find (or start) the daemon
    async with anyio.create_task_group() as tg:
        tg.start_soon(changes.follow)
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                body = await render()
                stamp = datetime.now(UTC).astimezone().strftime("%H:%M:%S")
                footer = Text(f"updated {stamp} · Ctrl-C to stop", style="dim")
                live.update(Group(body, footer), refresh=True)
                await changes.wait(WATCH_REFRESH)
                await anyio.sleep(WATCH_SETTLE)


__all__ = ["Changes", "wait_for_task", "watch"]
