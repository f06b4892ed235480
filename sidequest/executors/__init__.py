"""Executors turn a prompt into a result; see base.py for the protocol.

The names below are imported on first use, so `python -m
sidequest.executors.python_child` (an isolated python agent's process) starts
without loading what the daemon needs.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is one of the imports the child does without
if TYPE_CHECKING:
    from sidequest.executors.base import ExecutionResult, Executor, PermanentError, TaskContext

__all__ = ["ExecutionResult", "Executor", "PermanentError", "TaskContext"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from sidequest.executors import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
