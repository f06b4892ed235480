"""Python callables named in config: `package.module:function`, sync or async.

Two ways to run one, chosen per agent with `isolation`:

- `inline` (this module): async callables run on the daemon's event loop,
  sync ones in a worker thread. Cheapest, but the callable shares the
  daemon's fate: `os._exit` or a crash ends every running task, a blocking
  call in async code stalls the loop, and a cancelled sync callable is
  abandoned in its thread (it can notice through `ctx.is_cancelled`).
- `process` (`python_process.py`): a fresh child interpreter per attempt;
  the daemon never imports the agent's module.

Unset, it is `inline` for an `async def` and `process` for anything else,
decided without importing the agent (`default_isolation`); the reasons are in
docs/configuration.md.
"""

from __future__ import annotations

import ast
import inspect
import sys
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from sidequest.config import ENV_ALLOW_DEFAULT, ConfigError
from sidequest.executors.base import ExecutionResult, PermanentError, TaskContext
from sidequest.executors.python_child import LoadError, encode_result, load_callable, not_encodable_message

if TYPE_CHECKING:
    from sidequest.config import AgentConfig
    from sidequest.executors.base import Executor

Isolation = Literal["process", "inline"]
PROCESS_ONLY_KEYS = ("env", "env_allow")
"""Agent keys that shape the child process; an inline agent has none, so setting them is an error."""
_DEFAULTS = {"env": {}, "env_allow": list(ENV_ALLOW_DEFAULT)}


def build_python_executor(agent_name: str, config: AgentConfig) -> Executor:
    """The executor for a `python` config agent, in its configured (or default) isolation."""
    assert config.callable is not None
    if (config.isolation or default_isolation(config.callable)) == "process":
        from sidequest.executors.python_process import ProcessPythonExecutor

        return ProcessPythonExecutor(agent_name, config)
    # Compared with the defaults, not model_fields_set: settings are sometimes rebuilt from a dump.
    process_only = [key for key in PROCESS_ONLY_KEYS if getattr(config, key) != _DEFAULTS[key]]
    if process_only:
        why = "isolation = 'inline'" if config.isolation else "an async def runs inline unless told otherwise"
        raise ConfigError(
            f"agents.{agent_name}: {', '.join(process_only)} only apply to isolation = 'process', and this "
            f"agent runs in the daemon ({why}); set isolation = 'process' or remove them"
        )
    return PythonExecutor(config.callable)


def default_isolation(spec: str) -> Isolation:
    """`inline` for an `async def`, `process` for a plain `def` and whatever cannot be told apart."""
    return "inline" if defined_async(spec) else "process"


def defined_async(spec: str) -> bool | None:
    """Whether `spec` names an `async def`, found without running the agent's code.

    A module already imported is asked directly. Otherwise its source file is
    located as `import` would find it, but without executing any package
    `__init__`, and the last top-level binding of the name decides. None when
    the source cannot tell: a callable object, a name assigned from an
    expression or bound conditionally, an extension module, a missing module.
    """
    module_name, _, attr_path = spec.partition(":")
    parts = attr_path.split(".")
    module = sys.modules.get(module_name)
    if module is not None:
        target: Any = module
        for part in parts:
            target = getattr(target, part, None)
        return inspect.iscoroutinefunction(target) if target is not None else None
    source = _module_source(module_name)
    if source is None:
        return None
    try:
        body = ast.parse(source).body
    except (SyntaxError, ValueError):
        return None
    for depth, part in enumerate(parts, start=1):
        node = _last_binding(body, part)
        if depth < len(parts):
            if not isinstance(node, ast.ClassDef):
                return None
            body = node.body
        elif isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            return isinstance(node, ast.AsyncFunctionDef)
    return None


def _module_source(name: str) -> bytes | None:
    """The source of module `name`, found through sys.meta_path; parent packages are not imported."""
    path: Any = None
    spec: ModuleSpec | None = None
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        loaded = sys.modules.get(prefix)
        if loaded is not None and depth < len(parts):
            path = getattr(loaded, "__path__", None)
        else:
            spec = _find_spec(prefix, path)
            path = spec.submodule_search_locations if spec is not None else None
        if depth < len(parts) and path is None:
            return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        return Path(spec.origin).read_bytes()
    except OSError:
        return None


def _find_spec(name: str, path: Any) -> ModuleSpec | None:
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            spec = find_spec(name, path)
        except Exception:  # a third-party finder failing on a name it does not know is not our concern
            continue
        if spec is not None:
            return spec
    return None


_DEFINES = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
_UNKNOWN = ast.Pass()
"""Stands for a binding whose value the source cannot tell (an assignment, an import, an `if`)."""


def _last_binding(body: list[ast.stmt], name: str) -> ast.stmt | None:
    found: ast.stmt | None = None
    for node in body:
        if isinstance(node, _DEFINES):
            if node.name == name:
                found = node
        elif name in _names_bound(node):
            found = _UNKNOWN
    return found


def _names_bound(node: ast.stmt) -> set[str]:
    """Every name a top-level statement may bind, looking inside `if`, `try`, `with` and loops."""
    names: set[str] = set()
    for child in ast.walk(node):
        if isinstance(child, _DEFINES):
            names.add(child.name)
        elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
            names.add(child.id)
        elif isinstance(child, ast.alias):
            names.add(child.asname or child.name.partition(".")[0])
    return names


def resolve_callable(spec: str) -> Callable[..., Any]:
    try:
        return load_callable(spec)
    except LoadError as exc:
        raise PermanentError(str(exc)) from exc.__cause__


def to_result(value: Any) -> ExecutionResult:
    """Text stays text; anything else must be JSON-able and is stored as JSON."""
    if isinstance(value, ExecutionResult):
        return value
    try:
        return ExecutionResult(*encode_result(value))
    except TypeError as exc:
        raise PermanentError(not_encodable_message(value)) from exc


class PythonExecutor:
    """Runs the callable in the daemon: async on the loop, sync in a worker thread."""

    name = "python"
    isolation: Isolation = "inline"

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
