"""Whether a room the bot posts in is encrypted, or unknown: never plaintext by accident.

Known from a whole `/state` read (encrypted or not) or from an `m.room.encryption` event in `/sync`, and
remembered in the database (a room once encrypted stays encrypted; a saved `/sync` position never delivers
that event again). Unknown until then: the read is retried a bounded number of times, and whoever wants to
post waits for it; when it still fails, nothing is posted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import Enum

import structlog
from mautrix.types import RoomID
from mautrix.util.async_db import Database

from .errors import REQUEST_ERRORS

log = structlog.get_logger("spacesync.crypto")

READ_ERRORS: tuple[type[BaseException], ...] = (*REQUEST_ERRORS, ValueError)
"""A failed read of a room's state: no answer, an error answer, or one that does not parse."""
READ_DELAYS_S = (1.0, 2.0, 4.0, 8.0)
"""Waits between the reads of one round: a round is at most five reads (then the caller gets UNKNOWN)."""


class Encryption(str, Enum):
    ENCRYPTED = "encrypted"
    PLAIN = "plain"
    UNKNOWN = "unknown"
    """The room's state could not be read: nothing may be sent in clear."""


def _key(room_id: str) -> str:
    return f"crypto:room_encrypted:{room_id}"


class RoomEncryption:
    """Each room's encryption as last learnt, in memory and in the database's `kv` table."""

    def __init__(self, db: Database, read: Callable[[RoomID], Awaitable[None]]) -> None:
        self.db = db
        self._read = read
        """Reads the room's whole state and calls `learnt` (raises a request error when it cannot)."""
        self._known: dict[RoomID, bool] = {}
        self._locks: dict[RoomID, asyncio.Lock] = {}
        self.delays = READ_DELAYS_S

    async def learnt(self, room_id: RoomID, encrypted: bool) -> None:
        if self._known.get(room_id) == encrypted:
            return
        if not encrypted and self._known.get(room_id):
            return  # encryption cannot be turned off: a read without the event is an incomplete one
        self._known[room_id] = encrypted
        await self.db.execute(
            "INSERT INTO kv (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
            _key(room_id),
            "1" if encrypted else "0",
        )

    def known(self, room_id: RoomID) -> Encryption:
        """What is known in memory, without reading anything."""
        if room_id not in self._known:
            return Encryption.UNKNOWN
        return Encryption.ENCRYPTED if self._known[room_id] else Encryption.PLAIN

    async def get(self, room_id: RoomID) -> Encryption:
        """Known, remembered, or read now (a bounded round of retries); UNKNOWN when every read failed."""
        if room_id in self._known:
            return self.known(room_id)
        remembered = await self.db.fetchval("SELECT value FROM kv WHERE key=$1", _key(room_id))
        if remembered is not None:
            self._known.setdefault(room_id, remembered == "1")
            return self.known(room_id)
        return await self.learn(room_id)

    async def learn(self, room_id: RoomID) -> Encryption:
        """Read the room's state until it answers, at most len(delays)+1 times; one round at a time per room."""
        lock = self._locks.setdefault(room_id, asyncio.Lock())
        async with lock:
            for attempt in range(len(self.delays) + 1):
                if room_id in self._known:
                    break
                try:
                    await self._read(room_id)
                except READ_ERRORS as e:
                    last = attempt == len(self.delays)
                    log.warning(
                        "could not read the room's state: whether it is encrypted is unknown, nothing is posted "
                        + ("there for now" if last else "there until it is known"),
                        room=str(room_id),
                        attempt=attempt + 1,
                        error=f"{type(e).__name__}: {e}",
                    )
                    if not last:
                        await asyncio.sleep(self.delays[attempt])
        return self.known(room_id)
