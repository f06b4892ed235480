"""Errors the engine raises for bad requests; every surface shows the message as is."""

from sidequest.storage.base import StoreError, StoreUnavailable

__all__ = [
    "EngineError",
    "InvalidRequest",
    "NotFinished",
    "NotFound",
    "QueueFull",
    "StoreError",
    "StoreUnavailable",
    "Unavailable",
]


class EngineError(Exception):
    """A request the engine refuses; the message says what was wrong and what is accepted."""

    code = "invalid_request"


class NotFound(EngineError):
    code = "not_found"


class InvalidRequest(EngineError):
    code = "invalid_request"


class NotFinished(EngineError):
    """A task's result was asked for before the task finished: the message says where it stands."""

    code = "not_finished"


class QueueFull(EngineError):
    """Too many unfinished tasks (max_queued_tasks): come back when some have finished."""

    code = "queue_full"


class Unavailable(EngineError):
    code = "unavailable"
