"""A room joined over federation is not read by the walk (nor acted in) until its first /state read answers:
Synapse holds such a room in partial state (faster joins) and blocks /state reads of it until its full state
has arrived, while a lazy-loading /sync already shows it. The signal is the homeserver's, so this is tested
against a stand-in that answers as Synapse does during that window, which a real server cannot be made to
hold open on demand."""

from __future__ import annotations

import asyncio
from typing import Any

from spacesync.engine.observer import PARTIAL_STATE, Observer
from spacesync.engine.sync import SyncLoop
from spacesync.matrix.state import StateCache
from spacesync.model import RoomID

from .stubs import sync_loop

FULL = RoomID("!full:a.example")
PARTIAL = RoomID("!partial:b.example")


class Homeserver:
    """Answers /state at once, except for a room in partial state, whose read is held until `resync()`."""

    user_id = "@bot:a.example"

    def __init__(self) -> None:
        self.partial = {PARTIAL}
        self.resynced = asyncio.Event()
        self.reads: list[RoomID] = []
        self.fail = False

    def resync(self) -> None:
        self.partial.clear()
        self.resynced.set()

    async def room_state(self, room_id: RoomID, timeout: float = 60) -> list[dict[str, Any]]:
        if room_id in self.partial:
            await asyncio.wait_for(self.resynced.wait(), timeout)
        if self.fail:
            raise TimeoutError()
        self.reads.append(room_id)
        return [{"type": "m.room.create", "state_key": "", "content": {}, "sender": "@x:b.example"}]


def setup() -> tuple[Homeserver, Observer, SyncLoop, list[bool]]:
    homeserver = Homeserver()
    observer = Observer(homeserver, StateCache(), store=None)  # type: ignore[arg-type]
    requested: list[bool] = []
    observer.on_full_state = lambda: requested.append(True)
    loop = sync_loop(homeserver, observer, requested)
    return homeserver, observer, loop, requested


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_freshly_joined_room_is_waited_for_while_others_are_read() -> None:
    homeserver, observer, loop, requested = setup()
    observer.joined = {FULL}
    observer.joined_now(PARTIAL)
    # a lazy-loading /sync shows the room while its state is partial: that is no sign of full state
    await loop.handle({"rooms": {"join": {PARTIAL: {}}}})
    await settle()

    unreachable: dict[RoomID, str] = {}
    await observer._load(FULL, True, unreachable)
    await observer._load(PARTIAL, True, unreachable)
    assert homeserver.reads == [FULL]
    assert unreachable == {PARTIAL: PARTIAL_STATE}
    assert observer.cache.get(PARTIAL) is None  # nothing known, so nothing planned there
    assert not requested

    # The resync ends: the held read answers, fills the cache and asks for a full reconcile.
    homeserver.resync()
    await settle()
    assert homeserver.reads == [FULL, PARTIAL]
    assert observer.cache.get(PARTIAL) is not None and not observer.is_partial(PARTIAL)
    assert requested == [True]


async def test_a_room_left_while_waited_for_is_dropped() -> None:
    homeserver, observer, loop, requested = setup()
    observer.joined_now(PARTIAL)
    await settle()
    await loop.handle({"rooms": {"leave": {PARTIAL: {}}}})
    homeserver.resync()
    await settle()
    assert not observer.is_partial(PARTIAL) and PARTIAL not in observer.joined
    assert observer.cache.get(PARTIAL) is None and not requested


async def test_a_first_read_that_fails_leaves_the_room_stale_for_the_next_walk() -> None:
    homeserver, observer, _, requested = setup()
    homeserver.fail = True
    homeserver.resync()
    observer.joined_now(PARTIAL)
    await settle()
    assert PARTIAL in observer.stale and not observer.is_partial(PARTIAL)
    assert requested == [True]
