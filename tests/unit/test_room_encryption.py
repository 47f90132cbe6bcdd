"""A room's encryption is known, remembered or unknown; reads are retried a bounded number of times."""

from __future__ import annotations

from pathlib import Path

from mautrix.errors import MatrixConnectionError

from spacesync.matrix.room_encryption import Encryption, RoomEncryption
from spacesync.model import RoomID
from spacesync.store import Store

ROOM = RoomID("!admin:example.org")


class Reads:
    """A room-state read failing `failures` times, then learning `encrypted`."""

    def __init__(self, failures: int, encrypted: bool = True) -> None:
        self.failures = failures
        self.encrypted = encrypted
        self.count = 0
        self.rooms: RoomEncryption | None = None

    async def __call__(self, room_id: RoomID) -> None:
        self.count += 1
        if self.count <= self.failures:
            raise MatrixConnectionError("502")
        assert self.rooms is not None
        await self.rooms.learnt(room_id, self.encrypted)


async def rooms_over(store: Store, reads: Reads) -> RoomEncryption:
    rooms = RoomEncryption(store.db, reads)
    rooms.delays = (0.0, 0.0, 0.0, 0.0)
    reads.rooms = rooms
    return rooms


async def test_a_failed_read_is_retried_and_the_answer_remembered(tmp_path: Path) -> None:
    store = Store(f"sqlite:{tmp_path}/bot.db")
    await store.start()
    try:
        reads = Reads(failures=2)
        rooms = await rooms_over(store, reads)
        assert rooms.known(ROOM) is Encryption.UNKNOWN
        assert await rooms.get(ROOM) is Encryption.ENCRYPTED
        assert reads.count == 3
        # A new start reads nothing: the database remembers, even when every read would fail.
        never = Reads(failures=99)
        assert await (await rooms_over(store, never)).get(ROOM) is Encryption.ENCRYPTED
        assert never.count == 0
    finally:
        await store.stop()


async def test_reads_end_unknown_after_a_bounded_round(tmp_path: Path) -> None:
    store = Store(f"sqlite:{tmp_path}/bot.db")
    await store.start()
    try:
        reads = Reads(failures=99)
        rooms = await rooms_over(store, reads)
        assert await rooms.get(ROOM) is Encryption.UNKNOWN
        assert reads.count == len(rooms.delays) + 1
    finally:
        await store.stop()


async def test_an_encrypted_room_never_becomes_plain(tmp_path: Path) -> None:
    store = Store(f"sqlite:{tmp_path}/bot.db")
    await store.start()
    try:
        rooms = await rooms_over(store, Reads(failures=0))
        await rooms.learnt(ROOM, True)
        await rooms.learnt(ROOM, False)
        assert rooms.known(ROOM) is Encryption.ENCRYPTED
        plain = RoomID("!plain:example.org")
        await rooms.learnt(plain, False)
        assert await rooms.get(plain) is Encryption.PLAIN
        await rooms.learnt(plain, True)  # encryption turned on later, seen in /sync
        assert await rooms.get(plain) is Encryption.ENCRYPTED
    finally:
        await store.stop()
