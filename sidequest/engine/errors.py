"""Errors the engine raises for bad requests; every surface shows the message as is."""


class EngineError(Exception):
    """A request the engine refuses; the message says what was wrong and what is accepted."""

    code = "invalid_request"


class NotFound(EngineError):
    code = "not_found"


class InvalidRequest(EngineError):
    code = "invalid_request"


class Unavailable(EngineError):
    code = "unavailable"
