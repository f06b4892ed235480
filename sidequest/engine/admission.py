"""Admission: what a submit must pass before a task exists, and what admitted tasks may hold.

Request checks (valid UTF-8, sizes, timeouts), scopes and trust (`admit_scope`, where a task's
processes may run), the queue limit, idempotency keys, and the memory budget for queued
prompts. Kept apart from the engine so the rules a request meets can be read in one place;
the engine applies them in its submit, retry and scheduled runs.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sidequest.config import Settings
from sidequest.engine.errors import InvalidRequest, QueueFull
from sidequest.executors.sandbox import is_inside
from sidequest.models import TaskOptions, utcnow
from sidequest.storage.base import TaskRecord

HELD_PAYLOAD_BUDGET = 64 << 20
"""Bytes of queued prompts and options kept in memory; the rest wait on disk (read per attempt)."""


def new_id(prefix: str) -> str:
    """Unguessable: an id is a capability to read and cancel a task."""
    return f"{prefix}_{secrets.token_urlsafe(16)}"


def default_scope() -> str:
    return os.environ.get("CLAUDE_PROJECT_DIR") or os.getcwd()


def _require_utf8(field: str, value: str | None, nul: bool = True) -> None:
    """`nul=False`: a NUL character is refused too (PostgreSQL text and JSONB cannot hold one)."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{field} is not valid UTF-8 text (position {exc.start})") from exc
    if not nul and "\x00" in value:
        raise InvalidRequest(
            f"{field} holds a NUL character (position {value.index(chr(0))}), which the PostgreSQL "
            "store cannot keep"
        )


def _holds_nul(value: Any) -> bool:
    """Whether a JSON value has a NUL in any string, keys included."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_nul(v) for v in value)
    return False


def payload_size(prompt: str, options: dict[str, Any]) -> int:
    return len(prompt.encode("utf-8")) + len(json.dumps(options, ensure_ascii=False).encode("utf-8"))


def _absolute(path: str, what: str) -> str:
    """Scopes are absolute, normalised paths (`..` and `//` removed), so one folder has one name."""
    if "\x00" in path or not os.path.isabs(path):
        raise InvalidRequest(f"{what} must be an absolute path, got {path!r}")
    return os.path.normpath(path)


def admit_scope(
    requested: str | None, project: str | None, allowed_roots: Iterable[str]
) -> tuple[str, str | None]:
    """(the task's scope, the caller's trusted project) for one request.

    Trust is per request, never remembered: `project` is the caller's own project (the
    front's header, the embedded server's directory), and it and `allowed_roots` are the only
    places the task's processes may run and its agent files are read. A model-typed scope may
    narrow inside them; it cannot widen: outside them, `/`, or the home directory is refused.
    Without a project, a scope is only a label for listing (it makes nothing trusted)."""
    if project is not None:
        project = _absolute(project, "the caller's project")
    if requested is None:
        return project or default_scope(), project
    if project is None:
        return requested, None
    scope = _absolute(requested, "options.scope")
    real = os.path.realpath(scope)
    home = os.path.realpath(os.path.expanduser("~"))
    roots = [os.path.realpath(project), *(os.path.realpath(r) for r in allowed_roots)]
    if real in ("/", home) and real not in roots:
        raise InvalidRequest(
            f"options.scope {requested!r} is {'the root folder' if real == '/' else 'the home folder'}; "
            f"a scope may only narrow to a folder inside your project {project!r}"
        )
    if not any(is_inside(real, root) for root in roots):
        raise InvalidRequest(
            f"options.scope {requested!r} is outside your project {project!r}"
            + (f" and allowed_roots ({', '.join(roots[1:])})" if roots[1:] else "")
            + "; a scope may only narrow to a folder inside them (omit it to use your project)"
        )
    return scope, project


def workdir_roots(scope: str, project: str | None, allowed_roots: Iterable[str]) -> list[str]:
    """Where a task's processes may run: its scope (inside its caller's project, checked at
    admission) when the caller named a project, and `allowed_roots`."""
    roots = [os.path.realpath(root) for root in allowed_roots]
    if project is not None and os.path.isabs(scope) and os.path.isdir(scope):
        # Checked again now, not only at admission: a symlink in the scope may since point
        # elsewhere (`ln -s / project/later`), and a schedule fires for months.
        real = os.path.realpath(scope)
        if any(is_inside(real, root) for root in [os.path.realpath(project), *roots]):
            roots.insert(0, real)
    return roots


def validate_submit(
    settings: Settings, agent: str, prompt: str, options: TaskOptions, *, nul: bool = True
) -> int:
    """Refuse what cannot be stored or run; returns the payload's size (prompt and options),
    which submit reuses for the memory budget instead of serialising the options again.
    `nul=False` (a shared store) refuses NUL characters as well."""
    if not agent.strip():
        raise InvalidRequest("agent_definition is empty; call list_agents for the names you may use")
    _require_utf8("agent_definition", agent, nul)
    if not prompt.strip():
        raise InvalidRequest("prompt is empty; say what the agent should do")
    _require_utf8("prompt", prompt, nul)
    for field in ("workflow_id", "workflow_name", "idempotency_key", "scope", "cwd", "resume_task_id"):
        _require_utf8(f"options.{field}", getattr(options, field), nul)
    for tag in options.tags:
        _require_utf8("options.tags", tag, nul)
    metadata = json.dumps(options.metadata, ensure_ascii=False)
    _require_utf8("options.metadata", metadata)
    if not nul and _holds_nul(options.metadata):
        raise InvalidRequest("options.metadata holds a NUL character, which the PostgreSQL store cannot keep")
    size = len(prompt.encode("utf-8"))
    if size > settings.max_prompt_bytes:
        raise InvalidRequest(
            f"prompt is {size} bytes, over the {settings.max_prompt_bytes}-byte limit "
            "(max_prompt_bytes in the config); pass a file path or a summary instead"
        )
    payload = payload_size(prompt, options.model_dump(mode="json", exclude_defaults=True))
    total = payload + len(agent)
    if total > settings.max_request_bytes:
        meta, tags = len(metadata.encode()), len(json.dumps(options.tags, ensure_ascii=False).encode())
        raise InvalidRequest(
            f"the request is {total} bytes (prompt {size}, metadata {meta}, tags {tags}, the rest of "
            f"the options {max(0, total - size - meta - tags - len(agent))}), over the "
            f"{settings.max_request_bytes}-byte limit for a whole submit (max_request_bytes in "
            "the config); put large inputs in a file and pass its path"
        )
    if options.timeout is not None and options.timeout > settings.max_timeout:
        raise InvalidRequest(
            f"timeout {options.timeout:g}s is over the {settings.max_timeout:g}s maximum "
            "(max_timeout in the config)"
        )
    return payload


def check_queue(unfinished: int, max_queued_tasks: int) -> None:
    """`unfinished` counts live tasks and submits in flight."""
    if unfinished >= max_queued_tasks:
        raise QueueFull(
            f"queue full: {unfinished} tasks are unfinished, the limit is "
            f"{max_queued_tasks} (max_queued_tasks in the config); wait for some to "
            "finish or cancel some, then submit again"
        )


Key = tuple[str, str]
"""(scope, idempotency key)"""
Entry = tuple[str, datetime | None]
"""(task id, when it finished)"""


class IdempotencyKeys:
    """(scope, key) -> (task id, when it finished): live tasks' keys and those still inside
    `idempotency_window`, so a submit never reads the store to find its key."""

    def __init__(self) -> None:
        self._keys: dict[Key, Entry] = {}

    def load(self, rows: Iterable[tuple[str, str, str, datetime | None]], horizon: datetime) -> None:
        for scope, key, task_id, finished in rows:
            if finished is None or finished > horizon:
                self._keys[(scope, key)] = (task_id, finished)

    def get(self, key: Key) -> Entry | None:
        return self._keys.get(key)

    def known(self, key: Key, window: float) -> str | None:
        """The task this key made, while it still deduplicates: unfinished, or finished inside
        `idempotency_window` (the same key then returns that task whatever its state)."""
        found = self._keys.get(key)
        if found is None:
            return None
        task_id, finished = found
        if finished is not None and utcnow() - finished > timedelta(seconds=window):
            return None
        return task_id

    def claim(self, key: Key, task_id: str) -> Entry | None:
        """The key now names this unfinished task; returns what it named before (for `undo`)."""
        earlier = self._keys.get(key)
        self._keys[key] = (task_id, None)
        return earlier

    def undo(self, key: Key, earlier: Entry | None) -> None:
        """A claimed key whose task was not inserted names what it named before."""
        if earlier is not None:
            self._keys[key] = earlier
        else:
            self._keys.pop(key, None)

    def forget(self, key: Key, task_id: str) -> None:
        """Drop the key if it still names this task (which is gone)."""
        if self._keys.get(key, (None,))[0] == task_id:
            del self._keys[key]

    def finished(self, key: Key, task_id: str, now: datetime) -> None:
        """The task finished: its key still deduplicates for the window."""
        found = self._keys.get(key)
        if found is not None and found[0] == task_id:
            self._keys[key] = (task_id, now)

    def requeued(self, key: Key, task_id: str) -> None:
        """A retried task holds its key again, unless another task took it meanwhile."""
        if self._keys.get(key, (task_id,))[0] == task_id:
            self._keys[key] = (task_id, None)

    def expire(self, horizon: datetime) -> None:
        expired = [k for k, (_, done) in self._keys.items() if done is not None and done <= horizon]
        for key in expired:
            del self._keys[key]


class PayloadBudget:
    """Bytes of prompt and options held in memory per live task (see HELD_PAYLOAD_BUDGET)."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._total = 0

    def hold(self, task: TaskRecord, size: int) -> None:
        """Keep a task's prompt and options in memory while the budget allows; beyond it they stay
        on disk and are read when its attempt starts (a queue of large prompts stays small)."""
        if self._total + size <= HELD_PAYLOAD_BUDGET:
            self._held[task.id] = size
            self._total += size
        else:
            task.prompt, task.options = None, None

    def release(self, task_id: str) -> None:
        self._total -= self._held.pop(task_id, 0)
