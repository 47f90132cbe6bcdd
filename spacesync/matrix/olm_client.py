"""What mautrix's OlmMachine needs around it in spacesync: a client whose requests go through the adapter (its
timeouts and 429 handling; user-interactive auth for cross-signing uploads), and a state store fed from /sync."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from mautrix.client import ClientAPI
from mautrix.client.state_store.memory import MemoryStateStore
from mautrix.types import Membership, RoomID, UserID
from mautrix.util.logging import TraceLogger

from .cross_signing import upload_with_auth

if TYPE_CHECKING:
    from .adapter import MatrixAdapter


class CryptoClient(ClientAPI):
    """What OlmMachine calls on its client: the raw key and to-device endpoints of ClientAPI, and event
    handler registration, which spacesync replaces by feeding the machine from its own /sync loop."""

    matrix: MatrixAdapter
    password: str | None = None

    def add_event_handler(self, *args: Any, **kwargs: Any) -> None:
        pass

    def dispatch_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def upload_cross_signing_keys(self, keys: Any, auth: Any = None) -> None:
        content = {f"{usage}_key": key.serialize() for usage, key in keys.items()}
        await upload_with_auth(self.matrix, str(self.mxid), self.password, content)


class RoomStateStore(MemoryStateStore):
    """The admin room's encryption and members, kept from /sync; what OlmMachine asks of a state store."""

    async def find_shared_rooms(self, user_id: UserID) -> list[RoomID]:
        return [
            room_id
            for room_id, members in self.members.items()
            if self.encryption.get(room_id) is not None
            and user_id in members
            and members[user_id].membership in (Membership.JOIN, Membership.INVITE)
        ]


class PacedAPI:
    """The HTTP API as OlmMachine's client sees it: every request goes through the adapter, so key uploads,
    queries, claims and to-device messages get spacesync's timeouts and 429 handling."""

    def __init__(self, matrix: MatrixAdapter) -> None:
        self._matrix = matrix

    async def request(self, method: Any, path: Any, content: Any = None, query_params: Any = None, **_: Any) -> Any:
        return await self._matrix.request(method, path, content, dict(query_params or {}))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._matrix.api, name)


def crypto_logger() -> TraceLogger:
    previous = logging.getLoggerClass()
    logging.setLoggerClass(TraceLogger)
    try:
        return cast(TraceLogger, logging.getLogger("spacesync.olm"))
    finally:
        logging.setLoggerClass(previous)
