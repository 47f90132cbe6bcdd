"""The homeserver side: the only package that imports mautrix's client."""

from .adapter import ConnectError, MatrixAdapter
from .http import retry_after_ms
from .state import StateCache, parse_room_state

__all__ = ["ConnectError", "MatrixAdapter", "StateCache", "parse_room_state", "retry_after_ms"]
