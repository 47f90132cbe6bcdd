"""The homeserver side: the only package that imports mautrix's client."""

from .adapter import ConnectError, LostLeadership, MatrixAdapter
from .http import retry_after_ms
from .state import StateCache, parse_room_state

__all__ = ["ConnectError", "LostLeadership", "MatrixAdapter", "StateCache", "parse_room_state", "retry_after_ms"]
