"""The executor protocol: how the engine runs one attempt of one task.

The engine owns retries, timeouts, cancellation and leases; an executor only
turns a prompt into a result. It sees a TaskContext, never the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from sidequest.storage.base import UsageRecord


class PermanentError(Exception):
    """Raise from an executor for a failure that retrying cannot fix (bad input, 4xx)."""


@dataclass(slots=True)
class ExecutionResult:
    """What an attempt produced: text, or JSON-able data stored as JSON."""

    content: str
    content_type: str = "text"  # text | json


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
    _on_usage: Callable[[UsageRecord], None]
    cancelled: anyio.Event = field(default_factory=anyio.Event)
    _cancel_flag: bool = False

    def report_progress(self, percent: float | None = None, message: str | None = None) -> None:
        """Safe from async code and from a worker thread."""
        if percent is not None:
            percent = max(0.0, min(100.0, float(percent)))
        self._on_progress(percent, message)

    def record_usage(self, usage: UsageRecord) -> None:
        self._on_usage(usage)

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
