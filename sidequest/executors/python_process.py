"""Python agents in a child process (`isolation = "process"`): one fresh interpreter per attempt.

Why: a callable running inside the daemon can take the daemon down with it
(`os._exit`, a segfault in a C extension, an out-of-memory kill) along with
every other running task, and a sync callable stuck in a loop cannot be
stopped, only abandoned in its thread. In a child process the worst it can do
is fail its own attempt, and cancel or timeout ends it for certain.

How an attempt runs:
- `python -P -m sidequest.executors.python_child` starts in its own session
  (process group), gets one `start` frame on stdin (callable, prompt, the
  task's context fields) and answers on stdout with frames: progress, usage
  and saved state, which are applied to the real TaskContext as they arrive,
  then one `result` or `error`. See `python_child.py` for the frame format.
- The agent's module is imported only in the child; the daemon never runs it.
- Errors keep their meaning: `PermanentError` is not retried,
  `RetryableError(retry_after=…)` keeps its delay, `sys.exit(n)` reads as in
  the daemon, and any other exception is reported under its own class name
  (`ValueError: …`).
- The child dying without an answer (a signal, `os._exit`, a crash) is an
  ordinary, retried failure whose message names the exit status or signal and
  ends with the last lines the child wrote to stdout/stderr.
- Cancellation and timeouts: SIGTERM to the whole process group (the callable
  is unwound with SystemExit, so its `finally` blocks run), SIGKILL after
  STOP_GRACE. This runs shielded, so it completes while the attempt is being
  cancelled. A finished child's group is ended too: nothing an attempt started
  outlives it.

What the child sees:
- sys.path: the daemon's (as PYTHONPATH, after any PYTHONPATH the agent's
  `env` sets), so everything the daemon can import, the child can; `-P` keeps
  the working directory off it, as it is off the daemon's.
- Environment: only `env_allow` (copied from the daemon's environment when
  set) and the agent's fixed `env`, plus PYTHONPATH and SIDEQUEST_TASK_ID,
  SIDEQUEST_WORKFLOW_ID, SIDEQUEST_ATTEMPT, SIDEQUEST_SCOPE. API keys reach the
  agent only if listed, as for command agents.
- Working directory: the task's scope when it is a directory processes may
  run in (inside `ctx.workdir_roots`: a project a client connected from, or
  `allowed_roots`), else the daemon's own working directory.
- stdin is empty; what it prints goes to its stderr, whose last 16 KB the
  daemon keeps for error messages and otherwise discards.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import subprocess
import sys
import tempfile
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream, Process

from sidequest.config import AgentConfig
from sidequest.executors.base import (
    ExecutionResult,
    PermanentError,
    ReportedUsage,
    RetryableError,
    TaskContext,
)
from sidequest.executors.python_child import FrameDecoder, encode_frame
from sidequest.executors.sandbox import (
    STOP_GRACE,
    child_env,
    describe_exit,
    is_inside,
    read_to_end,
    stop_process_group,
    task_env,
)

log = logging.getLogger(__name__)

CHILD_MODULE = "sidequest.executors.python_child"
OUTPUT_KEEP = 16 * 1024
"""Bytes of the child's stdout/stderr kept for a crash report."""
ERROR_TAIL_CHARS = 2000
"""How much of that tail goes into a failure message."""
EXIT_WAIT = 2.0
"""After its answer, how long the child may take to exit before its group is stopped."""
PIPE_GRACE = 1.0
"""After the child is gone, how long to wait for the rest of its output (a grandchild may hold it)."""
READ_CHUNK = 1 << 20


class AgentError(Exception):
    """An exception the callable raised in its process, re-raised under a class of the same name.

    `remote_traceback` holds the child's formatted traceback.
    """

    remote_traceback: str = ""


@functools.lru_cache(maxsize=256)
def _error_class(module: str, qualname: str) -> type[AgentError]:
    """A stand-in class named like the child's, so the task's error reads `ValueError: …` as inline."""
    name = qualname.rpartition(".")[2] or "Exception"
    return type(name, (AgentError,), {"__module__": module, "__qualname__": qualname})


class ProcessPythonExecutor:
    """Runs a `package.module:function` callable in a fresh child process per attempt."""

    name = "python"
    isolation = "process"

    def __init__(self, agent_name: str, config: AgentConfig) -> None:
        if not config.callable:
            raise ValueError(f"agent {agent_name!r}: executor 'python' needs callable")
        self.agent_name = agent_name
        self.spec = config.callable
        self.env_allow = list(config.env_allow)
        self.env = dict(config.env)

    async def run(self, prompt: str, ctx: TaskContext) -> ExecutionResult:
        start = {"type": "start", "callable": self.spec, "prompt": prompt, "context": _context_fields(ctx)}
        with contextlib.ExitStack() as stack:
            cwd = working_directory(ctx.scope, ctx.workdir_roots)
            if cwd is None:  # not a trusted folder: a private empty one, gone after the attempt
                cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix="sidequest-attempt-"))
            return await self._run_in(cwd, start, ctx)

    async def _run_in(self, cwd: str, start: dict[str, Any], ctx: TaskContext) -> ExecutionResult:
        process = await self._spawn(cwd, self.environment(ctx))
        tail = _Tail()
        answer: dict[str, Any] | None = None
        try:
            async with anyio.create_task_group() as tg:
                assert process.stdout is not None and process.stderr is not None
                output_done = anyio.Event()
                tg.start_soon(read_to_end, process.stderr, tail.feed, output_done, READ_CHUNK)
                tg.start_soon(_send_start, process, encode_frame(start))
                answer = await _serve(process.stdout, ctx)
                if answer is None:  # no answer: the child died; its last words are on stderr
                    await process.wait()
                    with anyio.move_on_after(PIPE_GRACE):
                        await output_done.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if answer is not None and process.returncode is None:
                    with anyio.move_on_after(EXIT_WAIT):
                        await process.wait()
                await stop_process_group(process, STOP_GRACE)
                await process.aclose()
        if answer is None:
            assert process.returncode is not None
            exit = describe_exit(process.returncode, "the agent's process")
            raise RetryableError(f"{exit} before returning a result{tail.describe()}")
        return _result_or_raise(answer)

    def environment(self, ctx: TaskContext) -> dict[str, str]:
        """The allowlist and fixed values, the daemon's sys.path, then our own ids (which always win)."""
        env = child_env(self.env_allow, self.env)
        env["PYTHONPATH"] = os.pathsep.join([*filter(None, [env.get("PYTHONPATH")]), *child_sys_path()])
        env.update(task_env(ctx))
        return env

    async def _spawn(self, cwd: str, env: dict[str, str]) -> Process:
        if not sys.executable:
            raise PermanentError("cannot start a python process: the daemon does not know its interpreter")
        try:
            return await anyio.open_process(
                [sys.executable, "-P", "-m", CHILD_MODULE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError) as exc:
            raise PermanentError(f"cannot start {sys.executable}: {exc.strerror}") from exc
        except ValueError as exc:  # a NUL byte in a fixed env value
            raise PermanentError(f"cannot start the agent's process: {exc}") from exc


def working_directory(scope: str, roots: list[str]) -> str | None:
    """The task's scope if processes may run there (inside `roots`), else None: the attempt gets a
    private temporary folder (never the daemon's own directory, which is the data dir holding the
    store and the token)."""
    if scope and os.path.isabs(scope):
        real = os.path.realpath(scope)
        if os.path.isdir(real) and any(is_inside(real, os.path.realpath(root)) for root in roots):
            return real
    return None


def child_sys_path() -> list[str]:
    """The daemon's sys.path with relative entries made absolute (the child runs elsewhere)."""
    return [os.path.abspath(entry) for entry in dict.fromkeys(sys.path) if isinstance(entry, str)]


def _context_fields(ctx: TaskContext) -> dict[str, Any]:
    return {
        "task_id": ctx.task_id,
        "workflow_id": ctx.workflow_id,
        "agent": ctx.agent,
        "attempt": ctx.attempt,
        "scope": ctx.scope,
        "metadata": ctx.metadata,
        "options": ctx.options,
        "session_id": ctx.session_id,
        "batch_id": ctx.batch_id,
        "resume_session_id": ctx.resume_session_id,
        "workdir_roots": ctx.workdir_roots,
    }


async def _send_start(process: Process, frame: bytes) -> None:
    """Write the start frame and keep stdin open: its end tells the child the daemon has gone."""
    assert process.stdin is not None
    # A child that died before reading it sends no answer, and that is what gets reported.
    with contextlib.suppress(
        anyio.BrokenResourceError, anyio.ClosedResourceError, BrokenPipeError, ConnectionResetError
    ):
        await process.stdin.send(frame)


async def _serve(stream: ByteReceiveStream, ctx: TaskContext) -> dict[str, Any] | None:
    """Apply the child's reports to the context until it answers; None if its output ends first."""
    decoder = FrameDecoder()
    while True:
        try:
            data = await stream.receive(READ_CHUNK)
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return None
        try:
            for message in decoder.feed(data):
                if message.get("type") in ("result", "error"):
                    return message
                _apply(message, ctx)
        except Exception as exc:  # a garbled frame or a bad field: the attempt cannot trust the rest
            return {"type": "broken", "message": f"{type(exc).__name__}: {exc}"}


def _apply(message: dict[str, Any], ctx: TaskContext) -> None:
    kind = message.get("type")
    if kind == "progress":
        ctx.report_progress(_number(message.get("percent")), _text(message.get("message")))
    elif kind == "usage":
        ctx.record_usage(_usage(message, ctx))
    elif kind == "state":
        ctx.save_state(_text(message.get("session_id")), _text(message.get("batch_id")))
    elif kind == "log":
        data = message.get("data")
        ctx.log(_text(message.get("kind")) or "log", _text(message.get("message")) or "", data)
    else:
        raise ValueError(f"unknown message type {kind!r}")


def _usage(message: dict[str, Any], ctx: TaskContext) -> ReportedUsage:
    """Filed under this task and attempt whatever the child says: it cannot write to another task."""
    return ReportedUsage(
        model=_text(message.get("model")),
        input_tokens=int(message["input_tokens"]),
        output_tokens=int(message["output_tokens"]),
        cache_creation_input_tokens=int(message["cache_creation_input_tokens"]),
        cache_read_input_tokens=int(message["cache_read_input_tokens"]),
        cost_usd=_number(message.get("cost_usd")),
    )


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"expected text, got {type(value).__name__}")


def _result_or_raise(answer: dict[str, Any]) -> ExecutionResult:
    kind = answer.get("type")
    if kind == "result":
        content, content_type = answer.get("content"), answer.get("content_type")
        if isinstance(content, str) and content_type in ("text", "json"):
            return ExecutionResult(content, content_type)
        raise RetryableError("the agent's process sent a malformed result")
    if kind == "broken":
        raise RetryableError(f"the agent's process broke the protocol: {answer['message']}")
    message = str(answer.get("message", ""))
    match answer.get("kind"):
        case "permanent":
            raise PermanentError(message)
        case "retryable":
            raise RetryableError(message, _retry_after(answer.get("retry_after")))
        case "exit":
            raise SystemExit(answer.get("code"))
    error = _error_class(str(answer.get("module", "builtins")), str(answer.get("name", "Exception")))(message)
    error.remote_traceback = str(answer.get("traceback", ""))
    log.debug("agent process raised:\n%s", error.remote_traceback)
    raise error


def _retry_after(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


class _Tail:
    """The last OUTPUT_KEEP bytes of the child's output."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > 2 * OUTPUT_KEEP:  # trim in batches, not on every chunk
            del self.data[: len(self.data) - OUTPUT_KEEP]

    def describe(self) -> str:
        text = bytes(self.data[-OUTPUT_KEEP:]).decode("utf-8", errors="replace").strip()
        return f"; its output ends:\n{text[-ERROR_TAIL_CHARS:]}" if text else " (it wrote no output)"
