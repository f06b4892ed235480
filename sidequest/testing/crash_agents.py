"""Agents that take their process down, for testing crash recovery by hand or in the suite.

A python agent runs inside the process that runs it (the daemon, by default), so `os._exit`
here is what a segfaulting extension, an OOM kill or a stray `os._exit` in a user's agent does
to that process: no cleanup, no `finally`, no last write. Point `[agents.NAME]` tables at them,
e.g. `callable = "sidequest.testing.crash_agents:exit_at_once"`.
"""

from __future__ import annotations

import os
import time

import anyio

from sidequest.executors.base import TaskContext

EXIT_CODE = 137
"""What a shell reports for a process killed by SIGKILL (128 + 9): an OOM kill, say."""


async def exit_at_once(prompt: str, ctx: TaskContext) -> str:
    """Ends the process the moment its attempt starts: before the attempt's `running` mark can
    reach the database, so only a start recorded before the executor ran can count it."""
    os._exit(EXIT_CODE)


def exit_after_half_a_second(prompt: str, ctx: TaskContext) -> str:
    """A sync agent (worker thread) that works a little, then ends the process: tasks running
    beside it are lost with it."""
    time.sleep(0.5)
    os._exit(EXIT_CODE)


async def exit_on_first_attempt(prompt: str, ctx: TaskContext) -> str:
    """Ends the process on its first attempt, succeeds on any later one (a one-off OOM kill)."""
    if ctx.attempt == 1:
        os._exit(EXIT_CODE)
    return f"ok on attempt {ctx.attempt}"


async def sleep_then_ok(prompt: str, ctx: TaskContext) -> str:
    """A healthy bystander: sleeps float(prompt) seconds, then returns 'ok'."""
    await anyio.sleep(float(prompt))
    return "ok"
