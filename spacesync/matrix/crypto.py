"""End-to-end encryption for the admin room, with mautrix's OlmMachine fed by spacesync's own /sync loop.

The crypto store (the Olm account, sessions, device lists) lives in the bot's own database through mautrix's
PgCryptoStore, which works over SQLite and PostgreSQL alike: a restart or a standby taking over keeps the
same device and keys. The device is cross-signed by the bot's own identity (`cross_signing.py`), so that
clients excluding insecure devices (Element) share room keys with it; room keys go only to devices their
owner cross-signed, under the master key the bot pinned (`trust.py`), unless `admin.share_keys_with: all`.
Nothing is sent in clear into a room whose encryption is unknown (`room_encryption.py`).
Only messages are encrypted; state events (all spacesync writes in managed rooms) never are, so managed rooms
need none of this."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

import structlog
from mautrix.crypto import OlmMachine
from mautrix.crypto.store.asyncpg import PgCryptoStore
from mautrix.errors import EncryptionError, SessionNotFound
from mautrix.types import (
    DeviceID,
    DeviceLists,
    DeviceOTKCount,
    EncryptedEvent,
    EventType,
    Member,
    Membership,
    RoomEncryptionStateEventContent,
    RoomID,
    StateEvent,
    ToDeviceEvent,
    UserID,
)
from mautrix.util.async_db import Database

from ..config import ShareKeysWith
from .cross_signing import CrossSigning, IdentityError, Vault
from .errors import REQUEST_ERRORS
from .olm_client import CryptoClient, KeyMachine, PacedAPI, RoomStateStore, crypto_logger
from .room_encryption import Encryption, RoomEncryption
from .trust import IDENTITY_CHANGED, TRUSTED, min_trust, repin

if TYPE_CHECKING:
    from .adapter import MatrixAdapter

log = structlog.get_logger("spacesync.crypto")

DECRYPTED_KEY = "io.spacesync.decrypted"
"""Top-level key spacesync puts on an event it decrypted: the sender's device, whether it is trusted
(`verified`: cross-signed by its owner under the pinned master key) and whether the owner's master key changed."""
IDENTITY_RETRY_S = (1.0, 3.0)
"""Waits between the attempts to check or set up the cross-signing identity at start (then it is reported)."""
KEY_UPLOAD_WAIT_S = 10.0
"""How long a stop waits for a key upload under way to finish and be saved before the database closes."""
UNDECRYPTABLE_AFTER_S = 60.0
"""How long an encrypted command waits for its room key (sent to-device, maybe in a later /sync answer)."""


def _forget(tasks: set[asyncio.Task[None]]) -> Any:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: whoever awaited it (unless cancelled meanwhile) saw it raised

    return done


class CryptoError(Exception):
    """Encryption cannot work with this configuration or store: one line for the operator."""


class CryptoState(str, Enum):
    OFF = "off"
    """No pickle key configured: plaintext rooms only."""
    READY = "ready"
    BROKEN = "broken"


class Crypto:
    """The bot's one Olm device: decrypts the admin room's commands and encrypts what it posts there."""

    def __init__(
        self,
        matrix: MatrixAdapter,
        db: Database,
        pickle_key: str | None,
        *,
        recovery_key: str | None = None,
        password: str | None = None,
        share_keys_with: ShareKeysWith = ShareKeysWith.CROSS_SIGNED,
    ) -> None:
        self.matrix = matrix
        self.db = db
        self.pickle_key = pickle_key
        self.recovery_key = recovery_key
        self.password = password
        self.share_keys_with = share_keys_with
        self.identity: CrossSigning | None = None
        """The bot's cross-signing identity, once the Olm account is loaded."""
        self.identity_problem: str | None = None
        """Why the bot's device is not cross-signed (the operator's matter), or None."""
        self.state = CryptoState.OFF if pickle_key is None else CryptoState.BROKEN
        self.problem: str | None = None
        """Why encryption does not work, for /ready and the logs; None when it works (or is off)."""
        self.machine: OlmMachine | None = None
        self.store: PgCryptoStore | None = None
        self.state_store = RoomStateStore()
        self.rooms = RoomEncryption(db, self._read_room)
        """Which rooms are encrypted: nothing is sent in clear into a room whose encryption is unknown."""
        self._pending: dict[str, tuple[float, dict[str, Any]]] = {}
        """Encrypted admin-room events whose room key has not arrived yet: event id -> (first seen, event)."""
        self._reported: set[str] = set()
        self.key_wait_s = UNDECRYPTABLE_AFTER_S
        self._uploads: set[asyncio.Task[None]] = set()
        """Key uploads under way: a stop lets them finish, and the account be saved, before the store closes."""

    @property
    def ready(self) -> bool:
        return self.state == CryptoState.READY

    async def saved_device_id(self) -> DeviceID | None:
        """The device the crypto store belongs to, reused at a password login."""
        if self.pickle_key is None:
            return None
        await PgCryptoStore.upgrade_table.upgrade(self.db)
        store = PgCryptoStore(self.matrix.user_id, self.pickle_key, self.db)
        return await store.get_device_id()

    async def start(self) -> None:
        """Load (or create) the Olm account after login; raises CryptoError with one line when it cannot."""
        if self.pickle_key is None:
            return
        client = self.matrix.client
        assert client is not None, "connect() first"
        device_id = client.device_id
        if not device_id:
            self._fail("the homeserver did not say which device the bot's login is; log in again")
        await PgCryptoStore.upgrade_table.upgrade(self.db)
        store = PgCryptoStore(self.matrix.user_id, self.pickle_key, self.db)
        saved = await store.get_device_id()
        if saved and saved != device_id:
            self._fail(
                f"the crypto store holds device {saved} but the bot is logged in as device {device_id}; "
                f"log in with device {saved} (bot.device_id) or see docs/deployment.md to start a new device"
            )
        crypto_client = CryptoClient(client.mxid, device_id, api=cast(Any, PacedAPI(self.matrix)))
        crypto_client.matrix, crypto_client.password = self.matrix, self.password
        machine = KeyMachine(cast(Any, crypto_client), store, cast(Any, self.state_store), log=crypto_logger())
        machine.send_keys_min_trust = min_trust(self.share_keys_with)
        try:
            await machine.load()
        except Exception as e:  # olm raises its own error for a wrong pickle key
            if "BAD_ACCOUNT_KEY" in str(e) or type(e).__name__.startswith("Olm"):
                self._fail("bot.pickle_key does not open the crypto store (wrong key); set the key it was made with")
            raise
        if not saved:
            await store.put_device_id(device_id)
        self.store, self.machine = store, machine
        await self._upload(machine.share_keys())
        self.state, self.problem = CryptoState.READY, None
        identity_key = machine.account.identity_key if machine.account else None
        self.identity = CrossSigning(
            self.matrix, machine, Vault(self.db, self.matrix.user_id, self.pickle_key), recovery_key=self.recovery_key
        )
        self.identity_problem = await self._ensure_identity(self.identity)
        if self.identity_problem:
            # Encryption works for clients that share keys with any device; the operator has to act for the rest.
            self.problem = self.identity_problem
            log.error(self.problem)
        log.info(
            "end-to-end encryption ready",
            device_id=device_id,
            identity_key=identity_key,
            master_key=self.identity.master_key,
        )

    async def _ensure_identity(self, identity: CrossSigning) -> str | None:
        """The cross-signing identity in place; why not (one line) when it cannot be."""
        for attempt, delay in enumerate((*IDENTITY_RETRY_S, None)):
            try:
                await identity.ensure()
                return None
            except IdentityError as e:
                return f"encryption: {e}"
            except REQUEST_ERRORS as e:
                if delay is None:
                    return f"encryption: could not set up the bot's cross-signing identity ({type(e).__name__}: {e})"
                log.warning("could not check the bot's cross-signing identity; trying again", attempt=attempt + 1)
                await asyncio.sleep(delay)
        return None  # not reached

    async def _upload(self, upload: Coroutine[Any, Any, None]) -> None:
        """A key upload and the account's save, carried to their end even when the caller is cancelled (a stop
        cancels the /sync loop): close() waits for it before the database goes."""
        task = asyncio.ensure_future(upload)
        self._uploads.add(task)
        task.add_done_callback(_forget(self._uploads))
        await asyncio.shield(task)

    async def close(self) -> None:
        """Before the database closes: let a key upload under way finish and its account be saved (bounded)."""
        uploads = list(self._uploads)
        if not uploads:
            return
        _, pending = await asyncio.wait(uploads, timeout=KEY_UPLOAD_WAIT_S)
        if pending:
            log.warning("stopping with a key upload under way: the next start sends the same keys again")
            for task in pending:
                task.cancel()
        await asyncio.gather(*uploads, return_exceptions=True)

    async def reload(self) -> None:
        """Read the Olm account again: another instance may have led (and uploaded keys) meanwhile."""
        # An upload of this instance's own, still under way from before it stood down, is saved first.
        await asyncio.gather(*list(self._uploads), return_exceptions=True)
        if self.machine is not None:
            await self.machine.load()

    def _fail(self, message: str) -> None:
        self.state, self.problem = CryptoState.BROKEN, f"encryption: {message}"
        raise CryptoError(self.problem)

    # region state of the admin room
    async def load_room(self, room_id: RoomID, state: list[dict[str, Any]]) -> None:
        """A room's current state, read whole: whether it is encrypted (now known, and remembered), and who
        is in it (to share keys with)."""
        members: list[dict[str, Any]] = []
        encrypted = False
        for event in state:
            if event.get("type") == "m.room.encryption":
                content = RoomEncryptionStateEventContent.deserialize(cast(Any, event.get("content") or {}))
                await self.state_store.set_encryption_info(room_id, content)
                encrypted = True
            elif event.get("type") == "m.room.member":
                members.append(event)
        await self.rooms.learnt(room_id, encrypted)
        if members:
            await self.state_store.set_members(
                room_id,
                {
                    UserID(e["state_key"]): Member(
                        membership=Membership.deserialize((e.get("content") or {}).get("membership", "leave"))
                    )
                    for e in members
                    if isinstance(e.get("state_key"), str)
                },
            )

    async def _read_room(self, room_id: RoomID) -> None:
        await self.load_room(room_id, await self.matrix.room_state(room_id))

    async def encryption(self, room_id: RoomID) -> Encryption:
        """Whether the room is encrypted: known, remembered, or read now (retried a bounded number of times);
        UNKNOWN when every read failed."""
        if await self.state_store.is_encrypted(room_id):
            return Encryption.ENCRYPTED
        return await self.rooms.get(room_id)

    async def encrypted(self, room_id: RoomID) -> bool:
        return await self.encryption(room_id) is Encryption.ENCRYPTED

    # endregion

    # region feeding from /sync
    async def on_sync(self, data: dict[str, Any], admin_room: RoomID | None) -> None:
        """Everything one /sync answer brings the crypto machine, then the admin room's encrypted events
        replaced in place by what they decrypt to (so the command queue sees ordinary messages)."""
        if admin_room is not None:
            await self._admin_room_state(data, admin_room)
        machine = self.machine
        if machine is None:
            if admin_room is not None:
                self._strip(data, admin_room)
            return
        for raw in (data.get("to_device") or {}).get("events") or []:
            if not isinstance(raw, dict):
                continue
            try:
                evt = ToDeviceEvent.deserialize(cast(Any, raw))
                if evt.type == EventType.TO_DEVICE_ENCRYPTED:
                    await machine.handle_to_device_event(evt)
                elif evt.type == EventType.ROOM_KEY_REQUEST:
                    await machine.handle_room_key_request(evt)
            except Exception as e:
                log.warning(
                    "could not handle an encrypted to-device event",
                    sender=raw.get("sender"),
                    type=raw.get("type"),
                    error=f"{type(e).__name__}: {e}",
                )
        lists = data.get("device_lists") or {}
        if lists.get("changed") or lists.get("left"):
            try:
                await machine.handle_device_lists(
                    DeviceLists(
                        changed=[UserID(u) for u in lists.get("changed") or []],
                        left=[UserID(u) for u in lists.get("left") or []],
                    )
                )
            except Exception as e:
                log.warning("could not fetch changed device lists", error=f"{type(e).__name__}: {e}")
        counts = data.get("device_one_time_keys_count")
        if isinstance(counts, dict):
            try:
                await self._upload(machine.handle_otk_count(DeviceOTKCount.deserialize(cast(Any, counts))))
            except Exception as e:
                log.warning("could not upload one-time keys", error=f"{type(e).__name__}: {e}")
        if admin_room is not None:
            await self._decrypt_admin_room(data, admin_room)

    async def _admin_room_state(self, data: dict[str, Any], admin_room: RoomID) -> None:
        room = ((data.get("rooms") or {}).get("join") or {}).get(admin_room)
        if not isinstance(room, dict):
            return
        events = list((room.get("state") or {}).get("events") or []) + list(
            (room.get("timeline") or {}).get("events") or []
        )
        for raw in events:
            if not isinstance(raw, dict) or "state_key" not in raw:
                continue
            if raw.get("type") not in ("m.room.member", "m.room.encryption"):
                continue
            try:
                evt = StateEvent.deserialize(cast(Any, {**raw, "room_id": admin_room}))
            except Exception:
                continue
            if evt.type == EventType.ROOM_ENCRYPTION:
                await self.rooms.learnt(admin_room, True)
            if evt.type == EventType.ROOM_MEMBER and self.store is not None:
                before = await self.state_store.get_membership(admin_room, UserID(evt.state_key))
                if before != cast(Any, evt.content).membership:
                    # Someone joined or left: the next message goes out in a new session they can (not) read.
                    await self.store.remove_outbound_group_session(admin_room)
            await self.state_store.update_state(evt)

    def _strip(self, data: dict[str, Any], admin_room: RoomID) -> list[dict[str, Any]]:
        """The admin room's timeline, with any DECRYPTED_KEY a sender tried to smuggle in removed."""
        room = ((data.get("rooms") or {}).get("join") or {}).get(admin_room)
        if not isinstance(room, dict):
            return []
        events = (room.get("timeline") or {}).get("events")
        if not isinstance(events, list):
            return []
        for e in events:
            if isinstance(e, dict):
                e.pop(DECRYPTED_KEY, None)
        return events

    async def _decrypt_admin_room(self, data: dict[str, Any], admin_room: RoomID) -> None:
        events = self._strip(data, admin_room)
        for i, raw in enumerate(events):
            if isinstance(raw, dict) and raw.get("type") == "m.room.encrypted" and "state_key" not in raw:
                decrypted = await self._decrypt(raw, admin_room)
                if decrypted is not None:
                    events[i] = decrypted
        # Those whose keys arrived with this answer join its timeline, after its own events.
        now = time.monotonic()
        for event_id, (seen, raw) in list(self._pending.items()):
            decrypted = await self._decrypt(raw, admin_room, retry=True)
            if decrypted is not None:
                del self._pending[event_id]
                if not events and isinstance(data.get("rooms"), dict):
                    room = data["rooms"].setdefault("join", {}).setdefault(admin_room, {})
                    events = room.setdefault("timeline", {}).setdefault("events", [])
                events.append(decrypted)
            elif now - seen >= self.key_wait_s:
                del self._pending[event_id]
                await self.undecryptable(admin_room, raw, "its room key never arrived")

    async def _decrypt(self, raw: dict[str, Any], room_id: RoomID, retry: bool = False) -> dict[str, Any] | None:
        assert self.machine is not None
        event_id = str(raw.get("event_id"))
        try:
            evt = EncryptedEvent.deserialize(cast(Any, {**raw, "room_id": room_id}))
            result = await self.machine.decrypt_megolm_event(evt)
        except SessionNotFound as e:
            if not retry and raw.get("sender") != self.matrix.user_id:
                self._pending[event_id] = (time.monotonic(), raw)
                log.info("room key not here yet: waiting for it", event_id=event_id, session_id=e.session_id)
            return None
        except Exception as e:  # DecryptionError, a malformed event, a failed device key query
            if raw.get("sender") != self.matrix.user_id:
                await self.undecryptable(room_id, raw, f"{type(e).__name__}: {e}")
            return None
        trust = result["mautrix"].get("trust_state") if "mautrix" in result else None
        serialised = result.serialize()
        serialised.pop("mautrix", None)
        serialised.pop("room_id", None)
        serialised[DECRYPTED_KEY] = {
            "device_id": str(evt.content.device_id or ""),
            "verified": trust in TRUSTED,
            "identity_changed": trust == IDENTITY_CHANGED,
        }
        return cast(dict[str, Any], serialised)

    async def undecryptable(self, room_id: RoomID, raw: dict[str, Any], why: str) -> None:
        """One log line and one notice per undecryptable message: never silent."""
        event_id = str(raw.get("event_id"))
        if event_id in self._reported:
            return
        self._reported.add(event_id)
        sender = raw.get("sender")
        log.warning(
            "cannot decrypt a message in the admin room: ask the sender to send it again",
            admin_room=str(room_id),
            sender=sender,
            event_id=event_id,
            reason=why,
        )
        try:
            await self.matrix.send_notice(
                room_id,
                f"⚠ I could not decrypt a message from {sender} ({why}). "
                "Send it again; if this keeps happening, check that your client shares keys with my device.",
                reply_to=event_id,
            )
        except Exception as e:
            log.warning("could not post to the admin room", error=f"{type(e).__name__}: {e}")

    # endregion

    # region sending
    async def encrypt(self, room_id: RoomID, event_type: str, content: dict[str, Any]) -> dict[str, Any]:
        """The content encrypted for the room's members' devices (the room key shared first when needed)."""
        machine = self.machine
        if machine is None:
            raise CryptoError(self.problem or "encryption: not configured (bot.pickle_key)")
        etype = EventType.find(event_type)
        try:
            try:
                encrypted = await machine.encrypt_megolm_event(room_id, etype, content)
            except EncryptionError:
                members = await self.state_store.get_members(room_id)
                await machine.share_group_session(room_id, members)
                encrypted = await machine.encrypt_megolm_event(room_id, etype, content)
        except REQUEST_ERRORS:
            raise
        except Exception as e:  # olm or the store: nothing is sent rather than plaintext
            raise CryptoError(f"encryption: could not encrypt for {room_id}: {type(e).__name__}: {e}") from e
        return cast(dict[str, Any], encrypted.serialize())

    # endregion

    # region trust
    async def trust(self, user_id: UserID) -> str:
        """Pin `user_id`'s current master key (read fresh from the homeserver); the key pinned."""
        machine = self.machine
        if machine is None:
            raise CryptoError(self.problem or "encryption is off (bot.pickle_key)")
        await machine._fetch_keys([user_id], include_untracked=True)
        key = await repin(self.db, user_id)
        if key is None:
            raise CryptoError(f"{user_id} has no cross-signing identity the homeserver knows of")
        if self.store is not None:
            # The next message starts a new room key session, shared with their devices now trusted.
            for room_id in list(self.state_store.members):
                await self.store.remove_outbound_group_session(room_id)
        log.warning("pinned a user's master key", user=str(user_id), master_key=key)
        return key

    # endregion
