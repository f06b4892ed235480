"""The executor protocol: how the engine runs one attempt of one task.

The engine owns retries, timeouts, cancellation and leases; an executor only
turns a prompt into a result. It sees a TaskContext, never the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import anyio


class PermanentError(Exception):
    """Raise from an executor for a failure that retrying cannot fix (bad input, 4xx)."""


class RetryableError(Exception):
    """A failure worth retrying, with the earliest sensible time to try again.

    `retry_after` (seconds) comes from the far side (an HTTP retry-after header);
    the engine waits at least that long, or its own backoff if longer. The
    executor caps it: a server asking for an hour should not park a task for one.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(slots=True)
class ReportedUsage:
    """Tokens (and an estimated cost) one model call used, as an executor reports it. The engine
    files it under the running task and attempt, and clamps what a store could not hold: agent
    code may report anything."""

    model: str | None
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float | None = None


@dataclass(slots=True)
class ExecutionResult:
    """What an attempt produced: text, or JSON-able data stored as JSON."""

    content: str
    content_type: str = "text"  # text | json
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Web pages the result cites, `{"n", "title", "url"}` in the order of their `[n]` markers
    (anthropic executor). Stored with the result and returned beside its text, where the same list
    is also written out (a reader of the text alone still gets the URLs)."""


@dataclass
class TaskContext:
    """What an executor may see and do: report progress, notice cancellation, record usage."""

    task_id: str
    workflow_id: str
    agent: str
    attempt: int
    scope: str
    metadata: dict[str, Any]
    _on_progress: Callable[[float | None, str | None], None]
    _on_usage: Callable[[ReportedUsage], None]
    options: dict[str, Any] = field(default_factory=dict)
    """The task's options as submitted (executors read `cwd`, `batch`, `max_budget_usd`)."""
    session_id: str | None = None
    """A session this task saved in an earlier attempt (claude-code), to continue rather than restart."""
    batch_id: str | None = None
    """A message batch an earlier attempt created, to poll rather than pay for again."""
    resume_session_id: str | None = None
    """The session of the task named by `options.resume_task_id`, looked up by the engine."""
    _on_state: Callable[[str | None, str | None], None] | None = None
    _on_log: Callable[[str, str, dict[str, Any] | None], None] | None = None
    _workdir_roots: Callable[[], list[str]] = list

    @property
    def workdir_roots(self) -> list[str]:
        """Real paths a process may run in: `allowed_roots`, plus the task's scope when it is a project
        a client connected from. A scope the model typed is not trusted: otherwise `scope="/"` would let
        a command or Claude Code session run anywhere.

        Computed on demand (realpath and stat calls): most attempts start no process, and this is
        built for every attempt on the dispatch path."""
        return self._workdir_roots()

    cancelled: anyio.Event = field(default_factory=anyio.Event)
    _cancel_flag: bool = False

    def report_progress(self, percent: float | None = None, message: str | None = None) -> None:
        """Safe from async code and from a worker thread."""
        if percent is not None:
            percent = max(0.0, min(100.0, float(percent)))
        self._on_progress(percent, message)

    def log(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Add an entry to the task's run log (a turn, a tool call, a stderr line). Safe from a
        worker thread; capped and cut to size by the engine, so report freely but not in a loop."""
        if self._on_log is not None:
            self._on_log(kind, message, data)

    def record_usage(self, usage: ReportedUsage) -> None:
        self._on_usage(usage)

    def save_state(self, session_id: str | None = None, batch_id: str | None = None) -> None:
        """Store a session or batch id with the task at once, so a later attempt can pick it up."""
        if session_id is not None:
            self.session_id = session_id
        if batch_id is not None:
            self.batch_id = batch_id
        if self._on_state is not None:
            self._on_state(session_id, batch_id)

    @property
    def is_cancelled(self) -> bool:
        """For sync callables running in a thread: poll this and stop early."""
        return self._cancel_flag

    def _cancel(self) -> None:
        self._cancel_flag = True
        self.cancelled.set()


class Executor(Protocol):
    """One kind of agent runner. `run` is one attempt; raising means the attempt failed."""

    name: str

    async def run(self, prompt: str, ctx: TaskContext) -> ExecutionResult: ...


@runtime_checkable
class Preflight(Protocol):
    """An executor that can tell at submit what would fail (a missing key, a cwd outside the
    roots): errors it raises refuse the task, warnings it returns go back with the task id."""

    def preflight(self, options: Any, scope: str, workdir_roots: list[str]) -> list[str]: ...


@runtime_checkable
class BuildWarnings(Protocol):
    """An executor whose configuration works but may surprise (shown with the agent's info)."""

    warnings: list[str]
