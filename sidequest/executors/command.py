"""The `command` executor: run a program the user configured, once per attempt.

This is the only way a model can cause a process to start, so everything the
model controls is kept to data, never to code or to where the code runs:

- argv is a list and there is no shell. Each `{prompt}` in an element is
  replaced by the prompt, so the prompt is always (part of) exactly one
  argument; nothing else is interpreted (`{x}`, `$(...)`, `;` pass through
  literally). A program that parses options may still read a prompt starting
  with `-` as one: put `--` before `{prompt}` in argv if that matters.
  With `stdin_prompt = true` the prompt is also written to stdin; otherwise
  stdin is /dev/null, so a program waiting for input ends instead of hanging.
- The working directory is the agent's `cwd` (relative to the task's scope),
  else the task option `cwd`, else the scope itself. Its real path (symlinks
  resolved) must lie inside the scope directory or one of `allowed_roots`.
- The environment holds only the names in `env_allow` (copied from the
  server's environment when set), the agent's fixed `env`, and
  SIDEQUEST_TASK_ID, SIDEQUEST_WORKFLOW_ID, SIDEQUEST_ATTEMPT, SIDEQUEST_SCOPE.
  API keys reach the program only if the user lists them.
- The program runs (POSIX only) in its own session and process group. When the attempt is
  cancelled or times out, and when the program exits leaving children
  behind, the whole group gets SIGTERM, then SIGKILL after a short grace.
  (A descendant that moves itself to another session escapes this; POSIX
  offers no cheap way to follow it.)

Output: stdout is the result, decoded as UTF-8 (bad bytes replaced), the first
`output_limit` bytes kept and the rest read and thrown away so the program
never blocks on a full pipe; a cut result ends with a line
`[output truncated: kept N of M bytes]`. Only the last 64 KB of stderr is kept.
Exit status 0 is success; any other status or a signal is an ordinary failure
(the engine retries it) whose message carries the end of stderr. A program
that cannot be started (missing, not executable) is a permanent failure.

Progress protocol: a program reports progress by writing lines to stderr of
the form

    sidequest-progress: 40 copying files
    sidequest-progress: 75.5% almost there
    sidequest-progress: waiting for the build

that is, the marker, an optional percentage (0-100, `%` optional), and an
optional message. Each such line updates the task's progress; reports closer
together than a tenth of a second are coalesced (the latest one wins). These
lines stay in the stderr tail like any other line.
"""

from __future__ import annotations

import codecs
import errno
import math
import re
import subprocess
import time
from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteReceiveStream, Process

from sidequest.config import AgentConfig, Settings
from sidequest.executors.base import ExecutionResult, PermanentError, TaskContext
from sidequest.executors.sandbox import (
    child_env,
    describe_exit,
    read_to_end,
    resolve_workdir,
    stop_process_group,
    task_env,
)

PROMPT_FIELD = "{prompt}"
STDERR_KEEP = 64 * 1024
"""Bytes of stderr kept: enough for a traceback, bounded however much a program writes."""
ERROR_TAIL_CHARS = 2000
"""How much of the stderr tail goes into a failure message (error fields should stay readable)."""
KILL_GRACE = 2.0
"""Seconds between SIGTERM and SIGKILL: time to clean up, short enough that cancel feels immediate."""
PIPE_GRACE = 2.0
"""After the process group is gone, how long to wait for the pipes to close before giving up on them."""
PROGRESS_INTERVAL = 0.1
"""Minimum seconds between progress reports; each one is a database write."""
PROGRESS_LINE_MAX = 4096
"""A longer stderr line cannot be a progress line, so it is not buffered whole."""
READ_CHUNK = 65536
STDERR_LOG_LINES = 500
"""stderr lines an attempt writes to the task's run log (the end of stderr is also in the error)."""

_PROGRESS_RE = re.compile(
    r"sidequest-progress:[ \t]*(?:(?P<percent>\d+(?:\.\d+)?)%?(?:[ \t]+|$))?(?P<message>.*)",
    re.DOTALL,
)


def parse_progress(line: str) -> tuple[float | None, str | None] | None:
    """Turn one stderr line into (percent, message), or None if it is not a progress line."""
    match = _PROGRESS_RE.fullmatch(line.strip())
    if match is None:
        return None
    percent = float(match["percent"]) if match["percent"] is not None else None
    if percent is not None and not math.isfinite(percent):
        percent = None
    message = match["message"].strip() or None
    if percent is None and message is None:
        return None
    return percent, message


@dataclass
class _StdoutCapture:
    """The first `limit` bytes of stdout, plus a count of everything the program wrote."""

    limit: int
    kept: bytearray = field(default_factory=bytearray)
    total: int = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    def text(self) -> str:
        truncated = self.total > len(self.kept)
        # A cut can land inside a multi-byte character: drop that fragment rather than show U+FFFD.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = decoder.decode(bytes(self.kept), final=not truncated)
        if not truncated:
            return text
        newline = "" if text.endswith("\n") or not text else "\n"
        return f"{text}{newline}[output truncated: kept {len(self.kept)} of {self.total} bytes]"


@dataclass
class _StderrWatch:
    """Keeps the end of stderr and turns progress lines into ctx.report_progress calls."""

    ctx: TaskContext
    tail: bytearray = field(default_factory=bytearray)
    line: bytearray = field(default_factory=bytearray)
    skipping_long_line: bool = False
    pending: tuple[float | None, str | None] | None = None
    last_report: float = -math.inf
    logged_lines: int = 0

    def feed(self, data: bytes) -> None:
        self.tail += data
        if len(self.tail) > 2 * STDERR_KEEP:  # trim in batches, not on every chunk
            del self.tail[: len(self.tail) - STDERR_KEEP]
        *complete, rest = data.split(b"\n")
        for piece in complete:
            if not self.skipping_long_line:
                self._line(bytes(self.line + piece))
            self.line.clear()
            self.skipping_long_line = False
        if not self.skipping_long_line:
            self.line += rest
            if len(self.line) > PROGRESS_LINE_MAX:
                self.line.clear()
                self.skipping_long_line = True

    def finish(self) -> None:
        """End of stream: a last line without a newline still counts, and nothing pending is lost."""
        if self.line and not self.skipping_long_line:
            self._line(bytes(self.line))
        self.line.clear()
        self.flush(force=True)

    def _line(self, raw: bytes) -> None:
        if b"sidequest-progress:" not in raw:
            self._log(raw)
            return
        parsed = parse_progress(raw.decode("utf-8", errors="replace"))
        if parsed is not None:
            self.pending = parsed
            self.flush()

    def _log(self, raw: bytes) -> None:
        """Each stderr line goes to the task's run log, up to STDERR_LOG_LINES per attempt (a program
        printing in a loop would otherwise use up the whole log's cap on one attempt)."""
        if self.logged_lines > STDERR_LOG_LINES:
            return
        self.logged_lines += 1
        if self.logged_lines > STDERR_LOG_LINES:
            self.ctx.log("stderr", f"[more stderr lines are not logged: {STDERR_LOG_LINES} per attempt]")
            return
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if line.strip():
            self.ctx.log("stderr", line)

    def flush(self, force: bool = False) -> None:
        if self.pending is None:
            return
        now = time.monotonic()
        if force or now - self.last_report >= PROGRESS_INTERVAL:
            percent, message = self.pending
            self.pending = None
            self.last_report = now
            self.ctx.report_progress(percent, message)

    def wait_hint(self) -> float | None:
        """How long a read may block before a coalesced report is due (None: no report waiting)."""
        if self.pending is None:
            return None
        return max(0.0, self.last_report + PROGRESS_INTERVAL - time.monotonic())

    def text(self) -> str:
        tail = bytes(self.tail[-STDERR_KEEP:]).decode("utf-8", errors="replace")
        return tail[-ERROR_TAIL_CHARS:].strip()


class CommandExecutor:
    """Runs `config.argv` for each attempt; see the module docstring for the safety rules."""

    name = "command"

    def __init__(self, agent_name: str, config: AgentConfig, settings: Settings) -> None:
        if not config.argv:
            raise ValueError(f"agent {agent_name!r}: executor 'command' needs argv")
        self.agent_name = agent_name
        self.config = config
        self.settings = settings

    async def run(self, prompt: str, ctx: TaskContext) -> ExecutionResult:
        prompt = _encodable(prompt)
        argv = self.build_argv(prompt)
        cwd = self.working_directory(ctx.scope, ctx.options.get("cwd"), ctx.workdir_roots)
        env = self.environment(ctx)
        process = await self._spawn(argv, cwd, env)
        stdout = _StdoutCapture(self.config.output_limit)
        stderr = _StderrWatch(ctx)
        stopped = False
        try:
            async with anyio.create_task_group() as tg:
                if process.stdin is not None:
                    tg.start_soon(_feed_stdin, process, prompt.encode("utf-8"))
                out_done, err_done = anyio.Event(), anyio.Event()
                assert process.stdout is not None and process.stderr is not None
                tg.start_soon(read_to_end, process.stdout, stdout.feed, out_done, READ_CHUNK)
                tg.start_soon(_read_stderr, process.stderr, stderr, err_done)
                returncode = await process.wait()
                # The program is done; anything it left running in its group is not wanted.
                with anyio.CancelScope(shield=True):
                    await stop_process_group(process, KILL_GRACE)
                stopped = True
                with anyio.move_on_after(PIPE_GRACE):
                    await out_done.wait()
                    await err_done.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if not stopped:
                    await stop_process_group(process, KILL_GRACE)
                await process.aclose()
        stderr.finish()
        if returncode != 0:
            tail = stderr.text()
            detail = f"; stderr ends:\n{tail}" if tail else " (no stderr output)"
            raise Exception(f"{describe_exit(returncode, 'command')}{detail}")
        return ExecutionResult(stdout.text())

    # ---- the parts a model's input touches ----------------------------------

    def build_argv(self, prompt: str) -> list[str]:
        """Substitute `{prompt}` literally: str.replace reads no other fields and never recurses."""
        assert self.config.argv is not None
        if "\0" in prompt and any(PROMPT_FIELD in arg for arg in self.config.argv):
            raise PermanentError("the prompt contains a NUL character, which no program argument can hold")
        return [arg.replace(PROMPT_FIELD, prompt) for arg in self.config.argv]

    def working_directory(self, scope: str, option_cwd: object, roots: list[str]) -> str:
        """The agent's configured cwd wins over the task option; both must stay inside the roots."""
        if self.config.cwd is not None:
            source = f"agent {self.agent_name!r} cwd"
            return str(resolve_workdir(self.config.cwd, scope, roots, source=source))
        if option_cwd is not None and not isinstance(option_cwd, str):
            raise PermanentError(f"task option cwd must be a path string, got {type(option_cwd).__name__}")
        return str(resolve_workdir(option_cwd or None, scope, roots, source="task option cwd"))

    def preflight(self, options: object, scope: str, workdir_roots: list[str]) -> list[str]:
        """At submit time: warn now about a working directory the attempt would refuse."""
        try:
            self.working_directory(scope, getattr(options, "cwd", None), workdir_roots)
        except PermanentError as exc:
            return [f"this task will fail: {exc}"]
        return []

    def environment(self, ctx: TaskContext) -> dict[str, str]:
        """Only what the user allowed: the allowlist, fixed values, then our own ids (which always win)."""
        env = child_env(self.config.env_allow, self.config.env)
        env.update(task_env(ctx))
        return env

    async def _spawn(self, argv: list[str], cwd: str, env: dict[str, str]) -> Process:
        program = argv[0]
        try:
            return await anyio.open_process(
                argv,
                stdin=subprocess.PIPE if self.config.stdin_prompt else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            if exc.filename == cwd != program:  # cwd vanished or became unreadable since it was checked
                raise PermanentError(f"cannot start {program!r} in {cwd}: {exc.strerror}") from exc
            if isinstance(exc, FileNotFoundError):
                path = env.get("PATH", "(PATH not set: add it to env_allow)")
                raise PermanentError(
                    f"cannot start {program!r}: no such program, or its #! interpreter is missing "
                    f"(cwd {cwd}, PATH {path})"
                ) from exc
            if isinstance(exc, PermissionError):
                raise PermanentError(f"cannot start {program!r}: not executable ({exc.strerror})") from exc
            if exc.errno == errno.E2BIG:
                raise PermanentError(
                    f"cannot start {program!r}: the arguments are too long for the system; "
                    "set stdin_prompt = true and leave {prompt} out of argv for long prompts"
                ) from exc
            if exc.errno in (errno.ENOEXEC, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG):
                raise PermanentError(f"cannot start {program!r}: {exc.strerror}") from exc
            raise
        except ValueError as exc:  # a NUL byte in argv or env, or an unusable environment name
            raise PermanentError(f"cannot start {program!r}: {exc}") from exc


def _encodable(prompt: str) -> str:
    """Lone surrogates (legal in JSON, not in UTF-8) cannot go into argv or a pipe: replace them."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        return prompt.encode("utf-8", errors="replace").decode("utf-8")
    return prompt


async def _feed_stdin(process: Process, data: bytes) -> None:
    """Write the prompt and close stdin; a program that exits without reading it is not an error."""
    assert process.stdin is not None
    try:
        if data:
            await process.stdin.send(data)
        await process.stdin.aclose()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, BrokenPipeError, ConnectionResetError):
        pass


async def _read_stderr(stream: ByteReceiveStream, watch: _StderrWatch, done: anyio.Event) -> None:
    """Like stdout, but a coalesced progress report must not wait for the next write to be delivered."""
    try:
        while True:
            data = b""
            with anyio.move_on_after(watch.wait_hint()):
                data = await stream.receive(READ_CHUNK)
            if data:
                watch.feed(data)
            watch.flush()
    except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass
    finally:
        done.set()
