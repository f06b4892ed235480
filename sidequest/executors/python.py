"""Python callables named in config: `package.module:function`, sync or async.

Sync callables run in a worker thread; on cancellation the engine stops
waiting at once and the callable can notice through `ctx.is_cancelled`.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from typing import Any

import anyio

from sidequest.executors.base import ExecutionResult, PermanentError, TaskContext


def resolve_callable(spec: str) -> Callable[..., Any]:
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PermanentError(f"cannot import module {module_name!r} for callable {spec!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise PermanentError(
                f"{module_name!r} has no attribute {attr_path!r} (callable {spec!r})"
            ) from exc
    if not callable(target):
        raise PermanentError(f"{spec!r} is not callable")
    return target


def to_result(value: Any) -> ExecutionResult:
    """Text stays text; anything else must be JSON-able and is stored as JSON."""
    if isinstance(value, ExecutionResult):
        return value
    if value is None:
        return ExecutionResult("")
    if isinstance(value, str):
        return ExecutionResult(value)
    try:
        return ExecutionResult(json.dumps(value, ensure_ascii=False, default=_pydantic_default), "json")
    except TypeError as exc:
        raise PermanentError(
            f"the agent returned {type(value).__name__}, which is not text or JSON-able"
        ) from exc


def _pydantic_default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class PythonExecutor:
    name = "python"

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._fn: Callable[..., Any] | None = None

    def _target(self) -> Callable[..., Any]:
        if self._fn is None:
            self._fn = resolve_callable(self.spec)
        return self._fn

    async def run(self, prompt: str, ctx: TaskContext) -> ExecutionResult:
        fn = self._target()
        if inspect.iscoroutinefunction(fn):
            value = await fn(prompt, ctx)
        else:
            value = await anyio.to_thread.run_sync(fn, prompt, ctx, abandon_on_cancel=True)
            if inspect.isawaitable(value):
                value = await value
        return to_result(value)
