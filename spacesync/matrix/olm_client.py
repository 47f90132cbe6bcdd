"""What mautrix's OlmMachine needs around it in spacesync: a client whose requests go through the adapter (its
timeouts and 429 handling; user-interactive auth for cross-signing uploads), and a state store fed from /sync."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, cast

import structlog
from mautrix.client import ClientAPI
from mautrix.client.state_store.memory import MemoryStateStore
from mautrix.crypto import OlmMachine
from mautrix.errors import MatrixStandardRequestError
from mautrix.types import EncryptionKeyAlgorithm, Membership, RoomID, UserID
from mautrix.util.logging import TraceLogger

from .cross_signing import upload_with_auth

if TYPE_CHECKING:
    from .adapter import MatrixAdapter


log = structlog.get_logger("spacesync.crypto")

OTK_UPLOAD_TRIES = 3
"""Uploads of one batch of one-time keys when the homeserver already holds other keys under their ids."""


def otk_collision(error: Exception) -> bool:
    """The homeserver refused a key upload because a one-time key id it holds has another key (Synapse: 400
    M_UNKNOWN "One time key signed_curve25519:AAAAAQ already exists. Old key: …; new key: …")."""
    if not isinstance(error, MatrixStandardRequestError) or error.http_status != 400:
        return False
    message = str(error.message or "").lower()
    return "already exists" in message and "key" in message


class KeyMachine(OlmMachine):
    """mautrix's OlmMachine with one-time key uploads that survive a crash and a homeserver holding other
    keys under the same ids.

    mautrix generates one-time keys, uploads them, then saves the Olm account. A bot stopped between the
    upload and the save (killed, or its store closed first) comes back with the account from before: it
    generates its keys again under the same ids but with other keys, and the homeserver refuses them for
    good. Here the account is saved with its new keys before they are uploaded, so an interrupted upload is
    sent again unchanged (the homeserver accepts the same key twice). Keys the homeserver still holds from
    another Olm account on the same device (a new crypto store on an existing device, or a store restored
    from an older backup) collide all the same: that batch is dropped, the key counter moves on past the
    ids the homeserver may hold, and a new batch is uploaded, a bounded number of times."""

    async def _share_keys(self, current_otk_count: int | None) -> None:
        account = self.account
        assert account is not None, "load() first"
        if current_otk_count is None or (self._last_key_share + 60 > time.monotonic() and current_otk_count < 10):
            # As mautrix: the count from the homeserver when not given, or when a recent upload makes it suspect.
            current_otk_count = (await self.client.upload_keys()).get(EncryptionKeyAlgorithm.SIGNED_CURVE25519, 0)
        for attempt in range(1, OTK_UPLOAD_TRIES + 1):
            device_keys = (
                account.get_device_keys(self.client.mxid, self.client.device_id) if not account.shared else None
            )
            one_time_keys = account.get_one_time_keys(self.client.mxid, self.client.device_id, current_otk_count)
            if not device_keys and not one_time_keys:
                return
            if one_time_keys:
                # Saved before they leave: an upload cut short is sent again with the same keys.
                await self.crypto_store.put_account(account)
            try:
                await self.client.upload_keys(one_time_keys=one_time_keys, device_keys=device_keys)
            except Exception as e:
                if not one_time_keys or not otk_collision(e) or attempt == OTK_UPLOAD_TRIES:
                    raise
                skipped = self._skip_one_time_keys(account)
                await self.crypto_store.put_account(account)
                log.warning(
                    "the homeserver holds other one-time keys under the ids of the bot's new ones (a crypto "
                    "store restored from before its last upload, or another store for the same device): "
                    "dropped them and uploading new ones under later ids",
                    attempt=attempt,
                    dropped=len(one_time_keys),
                    ids_skipped=skipped,
                    error=str(e)[:200],
                )
                continue
            account.shared = True
            account.mark_keys_as_published()
            self._last_key_share = time.monotonic()
            await self.crypto_store.put_account(account)
            return

    @staticmethod
    def _skip_one_time_keys(account: Any) -> int:
        """Drop the keys not yet uploaded, and move the key counter past the ids the homeserver may hold under
        other keys: a lost batch is at most half the account's keys (mautrix keeps that many uploaded).
        Dropped keys never reached the homeserver, so nobody can use them."""
        account.mark_keys_as_published()
        skip = account.max_one_time_keys // 2
        account.generate_one_time_keys(skip)
        account.mark_keys_as_published()
        return int(skip)


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
