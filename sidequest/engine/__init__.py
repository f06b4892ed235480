"""The engine: the one place where behaviour lives."""

from sidequest.engine.engine import Engine
from sidequest.engine.errors import EngineError, InvalidRequest, NotFound

__all__ = ["Engine", "EngineError", "InvalidRequest", "NotFound"]
