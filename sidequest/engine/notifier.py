"""Notification rows, their readers, and push fan-out.

Rows are the durable record (a client that was away reads them by cursor);
listeners are told only after the commit that made a change durable, so a
pushed "updated" is never ahead of what a read returns.

Delivery belongs to a reader, not to the row: the terminal reading a notification
must not hide it from the Claude Code session of the same project. A reader is
the surface read through plus the caller's project (`reader_key`); the surface
decides the name, so a model's arguments can choose what it reads but never whose
deliveries it spends.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from sidequest.engine.errors import InvalidRequest
from sidequest.models import NotificationKind, utcnow
from sidequest.storage.base import Committed, NotificationRecord, Store

log = logging.getLogger(__name__)

Listener = Callable[[Committed], None]

DEFAULT_READER = "rest"
"""The reader of a REST client that names none."""
MCP_READER = "mcp"
"""Every MCP session of a project (stdio front, --embedded, the daemon's /mcp) reads as one."""
CLI_READER = "cli"
_READER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def reader_key(name: str, project: str) -> str:
    """The reader whose deliveries a read spends: `name` (the surface, or a REST client's own
    name) in the caller's project, so two projects' sessions never share deliveries either."""
    if not _READER_NAME.fullmatch(name):
        raise InvalidRequest(f"reader must be 1-64 letters, digits, '.', '_' or '-', got {name[:80]!r}")
    return f"{name}:{project}"


class Notifier:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._cursor = 0
        self._listeners: list[Listener] = []

    def start_at(self, cursor: int) -> None:
        self._cursor = cursor

    @property
    def last_cursor(self) -> int:
        return self._cursor

    def emit(
        self, kind: NotificationKind, workflow_id: str, scope: str, message: str, task_id: str | None = None
    ) -> NotificationRecord:
        self._cursor += 1
        record = NotificationRecord(
            cursor=self._cursor,
            kind=kind.value,
            task_id=task_id,
            workflow_id=workflow_id,
            scope=scope,
            message=message,
            created_at=utcnow(),
        )
        self._store.add_notification(record)
        return record

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def committed(self, committed: Committed) -> None:
        for listener in list(self._listeners):
            try:
                listener(committed)
            except Exception:
                log.exception("notification listener failed")
