"""Notification rows and push fan-out.

Rows are the durable record (a client that was away reads them by cursor);
listeners are told only after the commit that made a change durable, so a
pushed "updated" is never ahead of what a read returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sidequest.models import NotificationKind, utcnow
from sidequest.storage.base import Committed, NotificationRecord, Store

log = logging.getLogger(__name__)

Listener = Callable[[Committed], None]


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
