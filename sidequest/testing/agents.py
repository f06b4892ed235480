"""Small agents for tests, benchmarks and trying sidequest by hand.

Point an `[agents.NAME]` table at them, e.g. `callable = "sidequest.testing.agents:echo"`.
Prompts that steer them are plain text so a test can say what should happen.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from sidequest.executors.base import (
    ExecutionResult,
    PermanentError,
    ReportedUsage,
    RetryableError,
    TaskContext,
)


async def echo(prompt: str, ctx: TaskContext) -> str:
    """Returns the prompt."""
    return prompt


async def noop(prompt: str, ctx: TaskContext) -> None:
    """Does nothing: for measuring the engine alone."""
    return None


def echo_sync(prompt: str, ctx: TaskContext) -> str:
    return prompt


async def json_result(prompt: str, ctx: TaskContext) -> dict[str, Any]:
    return {"prompt": prompt, "length": len(prompt), "attempt": ctx.attempt}


async def sleep(prompt: str, ctx: TaskContext) -> str:
    """Sleeps for the number of seconds in the prompt, reporting progress, then returns 'slept N'."""
    seconds = float(prompt.split()[0])
    steps = 10
    for i in range(steps):
        ctx.report_progress(100 * i / steps, f"step {i + 1} of {steps}")
        await anyio.sleep(seconds / steps)
    return f"slept {seconds:g}"


def sleep_sync(prompt: str, ctx: TaskContext) -> str:
    """A blocking sleeper that polls for cancellation, as a well-behaved sync callable should."""
    deadline = time.monotonic() + float(prompt.split()[0])
    while time.monotonic() < deadline:
        if ctx.is_cancelled:
            return "stopped early"
        ctx.report_progress(None, "sleeping")
        time.sleep(0.01)
    return "slept"


async def fail(prompt: str, ctx: TaskContext) -> str:
    raise RuntimeError(f"failing on purpose: {prompt}")


async def raises_timeout(prompt: str, ctx: TaskContext) -> str:
    """Its own TimeoutError (a socket timeout, say) is a failure, not the engine's deadline."""
    raise TimeoutError(f"socket timed out: {prompt}")


async def fail_permanently(prompt: str, ctx: TaskContext) -> str:
    raise PermanentError(f"cannot do this: {prompt}")


async def flaky(prompt: str, ctx: TaskContext) -> str:
    """Fails until attempt N (prompt: 'succeed on N'), then succeeds."""
    succeed_on = int(prompt.split()[-1])
    if ctx.attempt < succeed_on:
        raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
    return f"succeeded on attempt {ctx.attempt}"


async def record_and_sleep(prompt: str, ctx: TaskContext) -> str:
    """Appends 'task_id attempt' to the file named in the prompt's first word, then sleeps the second.

    Lets a test that kills the server see which attempts started.
    """
    path, seconds = prompt.split()[:2]
    with Path(path).open("a", encoding="utf-8") as fh:
        fh.write(f"{ctx.task_id} {ctx.attempt}\n")
    await anyio.sleep(float(seconds))
    return f"done on attempt {ctx.attempt}"


async def big_result(prompt: str, ctx: TaskContext) -> str:
    """Returns N characters (prompt: N) of a repeating alphabet."""
    n = int(prompt)
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    return (alphabet * (n // len(alphabet) + 1))[:n]


async def bad_unicode(prompt: str, ctx: TaskContext) -> str:
    """Returns text with a lone surrogate, as a careless decoder might."""
    ctx.report_progress(50, "half \udcff way")
    return "before \ud800 after"


def exits(prompt: str, ctx: TaskContext) -> str:
    """Calls sys.exit, as a script pasted into an agent might."""
    import sys

    sys.exit(3)


async def reports_usage(prompt: str, ctx: TaskContext) -> str:
    """Records token usage the way a model-calling executor does."""

    ctx.record_usage(ReportedUsage("test-model", 120, 30, 0, 10, 0.0012))
    return "used some tokens"


async def environment(prompt: str, ctx: TaskContext) -> dict[str, str]:
    """Returns the variables this agent can read: for a python agent, the daemon's own environment."""
    return dict(os.environ)


# ---- for isolated python agents (isolation = "process"); most would take a daemon down inline ----


def hard_exit(prompt: str, ctx: TaskContext) -> str:
    """`os._exit(STATUS)` after DELAY seconds (prompt: 'STATUS [DELAY]'), skipping every cleanup."""
    status, *rest = prompt.split()
    print(f"about to exit with status {status}", flush=True)
    time.sleep(float(rest[0]) if rest else 0.0)
    os._exit(int(status))


def kill_self(prompt: str, ctx: TaskContext) -> str:
    """Sends its own process the signal numbered in the prompt, as a crash in C code would."""
    os.kill(os.getpid(), int(prompt))
    time.sleep(10)
    return "the signal did not arrive"


def spin(prompt: str, ctx: TaskContext) -> str:
    """Busy-loops forever without looking at ctx.is_cancelled.

    Prompt: 'PIDFILE [stubborn]'. Starts a `sleep` child, writes 'OWN_PID CHILD_PID'
    to PIDFILE, then spins. 'stubborn' ignores SIGTERM as well, so only SIGKILL stops it.
    """
    path, *flags = prompt.split()
    if "stubborn" in flags:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(path).write_text(f"{os.getpid()} {child.pid}", encoding="utf-8")
    while True:
        pass


def reports_all(prompt: str, ctx: TaskContext) -> dict[str, Any]:
    """Reports progress, usage and a session id, prints to stdout, sleeps (prompt: seconds), and
    returns what it saw: its pid, working directory, environment names and context fields."""

    print("noise on stdout that must not reach the result", flush=True)
    os.write(1, b"\x00\x00\x00\x05{oops")  # even raw bytes on fd 1 look nothing like a frame to the parent
    ctx.report_progress(40, "working")
    ctx.record_usage(ReportedUsage("test-model", 120, 30, 0, 10, 0.0012))
    ctx.save_state(session_id="session-1")
    time.sleep(float(prompt or 0))
    return {
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "env": sorted(os.environ),
        "task_id": ctx.task_id,
        "attempt": ctx.attempt,
        "scope": ctx.scope,
        "metadata": ctx.metadata,
        "session_id": ctx.session_id,
    }


def retry_later(prompt: str, ctx: TaskContext) -> str:
    """Raises RetryableError(retry_after=SECONDS) on the first attempt (prompt: seconds), then succeeds."""
    if ctx.attempt == 1:
        raise RetryableError("busy, come back later", retry_after=float(prompt))
    return f"succeeded on attempt {ctx.attempt}"


def chatty(prompt: str, ctx: TaskContext) -> str:
    """Writes N entries to the task's run log (prompt: N, default 3) from a child process (a sync
    callable is isolated), every other one claiming a kind reserved for the engine, then returns
    'logged N'."""
    count = int(prompt or 3)
    for i in range(count):
        # a kind of the engine's own: it must not let an agent write past the cap
        ctx.log("attempt_finished" if i % 2 else "log", f"entry {i + 1} of {count}", {"i": i})
    return f"logged {count}"


async def wait_for_file(prompt: str, ctx: TaskContext) -> str:
    """Waits until the file named by the prompt exists (a test's gate), reporting progress while it
    waits, then returns 'gate opened'."""
    path = Path(prompt)
    ctx.report_progress(0, f"waiting for {path.name}")
    while not path.exists():
        await anyio.sleep(0.05)
    ctx.report_progress(100, "gate opened")
    return "gate opened"


async def logs_deeply(prompt: str, ctx: TaskContext) -> str:
    """One short entry nested 300 deep (a model's tool input can be): readers refuse such JSON, so
    the engine must store it as text, or the whole log becomes unreadable."""
    deep: Any = "bottom"
    for _ in range(300):
        deep = [deep]
    ctx.log("tool_use", "deep input", {"input": deep})
    ctx.log("text", "after the deep one")
    return "logged"


async def cites_badly(prompt: str, ctx: TaskContext) -> ExecutionResult:
    """Sources as agent code may hand them back: a value JSON cannot hold, a page without a url, not
    a page at all, a lone surrogate. The good ones are kept; none may fail the store."""
    from datetime import UTC, datetime

    sources: Any = [
        {"n": 1, "url": "https://a.example/", "when": datetime.now(UTC)},
        {"n": 2, "url": None},
        "junk",
        {"n": 3, "title": "T\ud800", "url": "https://b.example/", "score": float("nan")},
    ]
    return ExecutionResult("cited [1][3]", sources=sources)


async def logs_badly(prompt: str, ctx: TaskContext) -> str:
    """Writes run-log entries the store could not hold as given: a long message ending in a lone
    surrogate with NaN in its data, then data far too large. The engine must cut them, not fail."""
    ctx.log("text", "x" * 50_000 + "\ud800", {"n": float("nan")})
    ctx.log("text", "big data", {"blob": "y" * 50_000})
    return "logged"
