"""One-time key uploads against a homeserver that keeps what it was sent, as Synapse does: a key id it holds
with another key is refused ("One time key signed_curve25519:AAAAAQ already exists"), the same key again is
accepted. The Olm account lives in mautrix's crypto store over SQLite, as in the bot."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

import pytest
from mautrix.crypto import OlmMachine
from mautrix.crypto.store.asyncpg import PgCryptoStore
from mautrix.errors import MUnknown
from mautrix.types import DeviceID, EncryptionKeyAlgorithm, UserID
from structlog.testing import capture_logs

from spacesync.matrix.olm_client import OTK_UPLOAD_TRIES, KeyMachine, RoomStateStore
from spacesync.store import Store

USER = UserID("@bot:example.org")
DEVICE = DeviceID("BOTDEVICE")
PICKLE_KEY = "a-test-pickle-key"


class Homeserver:
    """/keys/upload as Synapse answers it, for one device."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, Any]] = {}
        self.uploads: list[list[str]] = []
        self.lose_answer = False
        """The upload is stored but its caller never learns it (the bot stopped mid-request)."""

    def plant(self, *numbers: int) -> None:
        """Keys under these ids from another Olm account of the device."""
        for n in numbers:
            self.keys[f"signed_curve25519:{key_id(n)}"] = {"key": f"someone-else-{n}"}

    def claim(self, count: int) -> None:
        for name in list(self.keys)[:count]:
            del self.keys[name]


class Client:
    def __init__(self, server: Homeserver) -> None:
        self.server = server
        self.mxid, self.device_id = USER, DEVICE

    def add_event_handler(self, *_: Any, **__: Any) -> None:
        pass

    async def upload_keys(
        self, one_time_keys: dict[str, Any] | None = None, device_keys: Any = None
    ) -> dict[EncryptionKeyAlgorithm, int]:
        keys = one_time_keys or {}
        if keys:
            self.server.uploads.append(list(keys))
        for name, key in keys.items():
            held = self.server.keys.get(name)
            if held is not None and held.get("key") != key["key"]:
                raise MUnknown(400, f"One time key {name} already exists. Old key: {held}; new key: {key}")
        for name, key in keys.items():
            self.server.keys[name] = {"key": key["key"]}
        if self.server.lose_answer and keys:
            raise asyncio.CancelledError()
        return {EncryptionKeyAlgorithm.SIGNED_CURVE25519: len(self.server.keys)}


def key_id(n: int) -> str:
    """libolm's one-time key ids: its counter, 4 bytes big-endian, unpadded base64 (1 is AAAAAQ)."""
    import base64

    return base64.b64encode(n.to_bytes(4, "big")).decode().rstrip("=")


def number(name: str) -> int:
    import base64

    return int.from_bytes(base64.b64decode(name.split(":")[1] + "=="), "big")


async def machine(store: Store, server: Homeserver, kind: type[OlmMachine] = KeyMachine) -> OlmMachine:
    await PgCryptoStore.upgrade_table.upgrade(store.db)
    crypto_store = PgCryptoStore(USER, PICKLE_KEY, store.db)
    await crypto_store.put_device_id(DEVICE)
    made = kind(cast(Any, Client(server)), crypto_store, cast(Any, RoomStateStore()), log=logging.getLogger("olm"))
    await made.load()
    return made


@pytest.fixture
async def store(tmp_path: Path):
    store = Store(f"sqlite:{tmp_path}/crypto.db")
    await store.start()
    yield store
    await store.stop()


async def test_a_bot_stopped_between_the_upload_and_the_save_sends_the_same_keys_again(store: Store) -> None:
    server = Homeserver()
    first = await machine(store, server)
    await first.share_keys()
    server.claim(10)
    server.lose_answer = True
    with pytest.raises(asyncio.CancelledError):
        await first.share_keys(40)
    assert len(server.keys) == 50

    server.lose_answer = False
    server.claim(5)
    again = await machine(store, server)  # the account as the crypto store has it
    await again.share_keys()
    assert len(server.keys) == 50
    # The interrupted batch went again with the same keys (taken), with 5 new ones for the 5 claimed.
    assert set(server.uploads[-2]) < set(server.uploads[-1]) and len(server.uploads[-1]) == 15


async def test_without_a_save_before_the_upload_the_next_start_is_refused(store: Store) -> None:
    """What mautrix's own machine does: the reason for KeyMachine."""
    server = Homeserver()
    first = await machine(store, server, OlmMachine)
    await first.share_keys()
    server.claim(10)
    server.lose_answer = True
    with pytest.raises(asyncio.CancelledError):
        await first.share_keys(40)
    server.lose_answer = False
    server.claim(5)
    again = await machine(store, server, OlmMachine)
    with pytest.raises(MUnknown, match="already exists"):
        await again.share_keys()


async def test_keys_another_account_left_under_the_same_ids_are_stepped_over_once(store: Store) -> None:
    server = Homeserver()
    server.plant(*range(1, 11))
    made = await machine(store, server)
    with capture_logs() as logs:
        await made.share_keys()
    assert len(server.uploads) == 2
    assert min(number(n) for n in server.uploads[-1]) > 40 + 50  # past the refused batch and 50 ids more
    assert len(server.keys) == 50
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and "one-time keys" in warnings[0]["event"]

    # Saved: the next start has nothing left to upload, and the key counter kept its place.
    again = await machine(store, server)
    server.claim(1)
    await again.share_keys()
    assert len(server.uploads) == 3 and number(server.uploads[-1][0]) > number(server.uploads[-2][-1])


async def test_a_homeserver_refusing_every_batch_is_tried_a_bounded_number_of_times(store: Store) -> None:
    server = Homeserver()
    server.plant(*range(1, 1000))  # far more than the bot steps over
    del server.keys[f"signed_curve25519:{key_id(1)}"]
    made = await machine(store, server)
    server_keys = dict(server.keys)
    with pytest.raises(MUnknown, match="already exists"):
        await made.share_keys(0)
    assert len(server.uploads) == OTK_UPLOAD_TRIES
    assert server.keys == server_keys


async def test_a_stop_lets_an_upload_under_way_finish_before_the_database_closes() -> None:
    from spacesync.matrix.crypto import Crypto

    crypto = Crypto(cast(Any, None), cast(Any, None), None)
    saved = asyncio.Event()

    async def upload() -> None:
        await asyncio.sleep(0.05)
        saved.set()

    sync = asyncio.create_task(crypto._upload(upload()))
    await asyncio.sleep(0)
    sync.cancel()  # the /sync loop is cancelled at a stop
    with pytest.raises(asyncio.CancelledError):
        await sync
    assert not saved.is_set()
    await crypto.close()
    assert saved.is_set()
