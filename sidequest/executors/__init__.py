"""Executors turn a prompt into a result; see base.py for the protocol."""

from sidequest.executors.base import ExecutionResult, Executor, PermanentError, TaskContext

__all__ = ["ExecutionResult", "Executor", "PermanentError", "TaskContext"]
