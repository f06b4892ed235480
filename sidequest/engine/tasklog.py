"""Each task's run log: what its attempts did, in order, for a person (or a model) asking why.

Entries ride the store's group commit (never a commit of their own) and are capped per task, so an
agent looping on tool calls or a program flooding stderr costs a bounded number of rows. The few
entries that say how an attempt went (started, finished, retry) are always kept: they are what a
reader of a cut log needs most, and there are at most three per attempt.

Entries come from agent code and from models, so every one is made safe to store here: text cut to
`max_event_chars`, invalid UTF-8 replaced, data made plain JSON or replaced by a note. A bad entry
costs itself, never the commit it rides (a failed commit stops the store).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sidequest.config import TaskLogConfig
from sidequest.models import utcnow
from sidequest.storage.base import Store, TaskEventRecord, TaskRecord

ALWAYS_KEPT = frozenset({"attempt_started", "attempt_finished", "retry_scheduled", "cancelled"})
"""Kinds written past the cap: a few per attempt, and the ones a reader of a cut log needs."""
CUT = "log_cut"
_KIND_CHARS = 40
MAX_DEPTH = 32
"""Nesting kept as JSON. Deeper data is stored as its text: readers (pydantic, other JSON parsers)
refuse a few hundred levels, and one such entry would make the whole log unreadable."""


@dataclass(slots=True)
class _Position:
    next_seq: int
    cut: bool = False
    dropped: int = 0
    last_progress: tuple[float | None, str | None] | None = None


def _clean(text: str) -> str:
    """Valid UTF-8 without NUL: what a VARCHAR column takes whatever an agent sent."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("\x00", "\ufffd")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _depth(value: Any, bound: int) -> int:
    """How deeply `value` nests, counting no further than `bound`."""
    if bound <= 0 or not isinstance(value, dict | list):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, bound - 1) for child in children), default=0)


def _plain(value: Any, limit: int) -> tuple[dict[str, Any] | None, str | None]:
    """JSON the store's JSON column accepts (no NaN, no lone surrogates), at most `limit` characters:
    the value as readers get it, and the text the store writes."""
    if value is None:
        return None, None
    if not isinstance(value, dict):
        value = {"value": value}
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=str)
    except (ValueError, TypeError, RecursionError):
        return _as_text({"unreadable": _cut(_clean(repr(value)), limit)})
    text = _clean(text)
    if len(text) > limit or _depth(value, MAX_DEPTH + 1) > MAX_DEPTH:
        return _as_text({"cut": True, "json": text[:limit]})
    loaded = json.loads(text)  # what default=str and the cleaning made of it, as readers will see it
    return (loaded, text) if isinstance(loaded, dict) else _as_text({"value": loaded})


def _as_text(value: dict[str, Any]) -> tuple[dict[str, Any], str]:
    return value, json.dumps(value, ensure_ascii=False)


class TaskLog:
    """Positions of the logs of running tasks, and the one way entries are written.

    A task's next seq is kept while the task is live; a task not seen yet in this process (loaded
    at start, or retried after it finished) has its position read from the store before anything is
    logged for it (`resume`). Tasks created in this process (`created`) start at 0 without a read:
    which ones they are is remembered, not guessed from clocks.
    """

    def __init__(self, store: Store, config: TaskLogConfig) -> None:
        self._store = store
        self._config = config
        self._positions: dict[str, _Position] = {}
        self._new: set[str] = set()
        self._lost: dict[str, list[tuple[int, datetime]]] = {}

    def reconfigure(self, config: TaskLogConfig) -> None:
        """A reloaded [task_log]: applies to entries written from now on."""
        self._config = config

    def created(self, task_id: str) -> None:
        """A task inserted by this process: its log is empty, so it starts at 0."""
        self._new.add(task_id)

    def lost(self, task_id: str, attempt: int, at: datetime) -> None:
        """An attempt found running at start (the process died): logged when the task is next resumed,
        since where its log continues is not known before the store is read."""
        self._lost.setdefault(task_id, []).append((attempt, at))

    async def resume(self, task: TaskRecord) -> None:
        """Know where this task's log continues, before anything is logged for it."""
        if task.id in self._positions:
            return
        if task.id in self._new:
            self._new.discard(task.id)
            self._positions[task.id] = _Position(0)
            return
        await self._store.flush()
        _, total = await self._store.get_task_events(task.id, 0, 1)
        if task.id in self._positions:  # resumed by another caller while this one read
            return
        self._positions[task.id] = _Position(total, cut=total >= self._config.max_events)
        for attempt, at in self._lost.pop(task.id, ()):
            message = f"attempt {attempt} lost: the process running it died"
            self.add(task, "attempt_finished", message, {"status": "lost"}, at, attempt)

    def forget(self, task_id: str) -> None:
        """The task finished: later entries for it (an abandoned thread still reporting) are dropped."""
        self._positions.pop(task_id, None)
        self._new.discard(task_id)
        self._lost.pop(task_id, None)

    def add(
        self,
        task: TaskRecord,
        kind: str,
        message: str,
        data: Any = None,
        now: datetime | None = None,
        attempt: int | None = None,
    ) -> None:
        """Enqueue one entry; dropped past the cap (the first one dropped leaves a marker)."""
        position = self._positions.get(task.id)
        if position is None:
            return
        kind = _cut(_clean(str(kind)), _KIND_CHARS) or "log"
        if kind == "attempt_started":
            position.last_progress = None
        limit = self._config.max_event_chars
        at = now or utcnow()
        if kind not in ALWAYS_KEPT:
            if position.cut:
                position.dropped += 1
                return
            if position.next_seq >= self._config.max_events - 1:
                position.cut = True
                position.dropped += 1
                kind, data = CUT, {"max_events": self._config.max_events}
                message = (
                    f"log cut here: it reached {self._config.max_events} entries ([task_log] max_events); "
                    "later entries are dropped, except attempt starts, finishes and retries"
                )
        text = _cut(_clean(message if isinstance(message, str) else str(message)), limit)
        plain, plain_json = _plain(data, limit)
        event = TaskEventRecord(
            task.id, position.next_seq, at, attempt or task.attempts, kind, text, plain, plain_json
        )
        position.next_seq += 1
        self._store.add_task_event(event)

    def add_reported(self, task: TaskRecord, kind: str, message: str, data: Any = None) -> None:
        """An entry an executor (agent code, a model's output) reported: the engine's own kinds are
        not its to use, or an agent logging "attempt_finished" in a loop would pass the cap."""
        if not isinstance(kind, str) or kind in ALWAYS_KEPT or kind == CUT:
            kind = "log"
        self.add(task, kind, message, data)

    def add_progress(self, task: TaskRecord, percent: float | None, message: str | None) -> None:
        """A progress report, unless it repeats the attempt's previous one: an agent saying "working"
        in a loop would otherwise fill the cap with one line."""
        position = self._positions.get(task.id)
        if position is None or position.last_progress == (percent, message):
            return
        position.last_progress = (percent, message)
        shown = " ".join(p for p in (f"{percent:g}%" if percent is not None else "", message or "") if p)
        self.add(task, "progress", shown or "progress", {"percent": percent})

    def dropped(self, task_id: str) -> int:
        """Entries dropped past the cap in this process (0 for a task not held)."""
        position = self._positions.get(task_id)
        return position.dropped if position else 0
