"""A room joined over federation is neither read nor acted in until its full state is in: Synapse holds such a
room in partial state (faster joins) and holds every /state read of it until its resync ends, whatever the
/sync filter (an eager /sync leaves the room out, a lazy-loading one shows it at once). The stand-in below
holds the read as Synapse does; tests/integration/test_partial_state.py shows the same on two real
federating Synapses."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mautrix.errors import MatrixRequestError, MForbidden

from spacesync.engine import observer as observer_module
from spacesync.engine.observer import PARTIAL_STATE, Observer
from spacesync.engine.sync import SyncLoop
from spacesync.matrix.state import StateCache
from spacesync.model import RoomID

from .stubs import sync_loop

FULL = RoomID("!full:a.example")
PARTIAL = RoomID("!partial:b.example")
LEAVE = {"type": "m.room.member", "state_key": "@gone:b.example", "sender": "@gone:b.example"}


def state(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    create = {"type": "m.room.create", "state_key": "", "content": {}, "sender": "@x:b.example"}
    return [create, *extra]


class Homeserver:
    """Answers /state at once, except for a room in partial state: that read is held until `resync_ends`."""

    user_id = "@bot:a.example"

    def __init__(self) -> None:
        self.partial = {PARTIAL}
        self.resynced = asyncio.Event()
        self.reads: list[RoomID] = []
        self.answered: list[RoomID] = []
        self.error: MatrixRequestError | None = None

    def resync_ends(self) -> None:
        self.partial.clear()
        self.resynced.set()

    async def room_state(self, room_id: RoomID) -> list[dict[str, Any]]:
        self.reads.append(room_id)
        if room_id in self.partial:
            await self.resynced.wait()
        if self.error is not None:
            raise self.error
        self.answered.append(room_id)
        member = {"type": "m.room.member", "state_key": "@gone:b.example", "content": {"membership": "join"}}
        return state({**member, "sender": "@gone:b.example"})


def setup() -> tuple[Homeserver, Observer, SyncLoop, list[RoomID], list[bool]]:
    homeserver = Homeserver()
    completed: list[RoomID] = []
    observer = Observer(homeserver, StateCache(), store=None, on_full_state=completed.append)  # type: ignore[arg-type]
    requested: list[bool] = []
    return homeserver, observer, sync_loop(homeserver, observer, requested), completed, requested


@pytest.fixture(autouse=True)
def short_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observer_module, "PARTIAL_STATE_PROBE", 0.05)


async def load(observer: Observer, room_id: RoomID, refresh: bool = True) -> dict[RoomID, str]:
    """One walk's read of the room; a read held by the homeserver fails the test instead of hanging it."""
    unreachable: dict[RoomID, str] = {}
    await asyncio.wait_for(observer._load(room_id, refresh, unreachable), 1)
    return unreachable


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("lazy_sync", [False, True], ids=["eager-sync", "lazy-loading-sync"])
async def test_a_freshly_joined_room_in_partial_state_is_waited_for_while_others_are_read(lazy_sync: bool) -> None:
    homeserver, observer, loop, completed, requested = setup()
    observer.joined = {FULL}
    observer.joined_now(PARTIAL)
    if lazy_sync:  # a lazy-loading /sync shows the room (and some of its state) while it is still partial
        await loop.handle({"rooms": {"join": {PARTIAL: {"state": {"events": state(LEAVE)}}}}})

    assert await load(observer, FULL) == {}
    assert await load(observer, PARTIAL) == {PARTIAL: PARTIAL_STATE}
    assert homeserver.answered == [FULL]
    assert observer.cache.get(PARTIAL) is None  # nothing known, so nothing planned there
    assert not completed and not requested

    # Later walks do not wait again, nor pile up reads: the one held read is the wait.
    assert await asyncio.wait_for(load(observer, PARTIAL, refresh=False), 0.02) == {PARTIAL: PARTIAL_STATE}
    assert homeserver.reads.count(PARTIAL) == 1

    # The resync ends: the held read answers, fills the cache and asks for a new reconcile.
    homeserver.resync_ends()
    await settle()
    assert completed == [PARTIAL] and PARTIAL not in observer.awaiting_full_state
    room = observer.cache.get(PARTIAL)
    assert room is not None and "@gone:b.example" in room.members
    assert await load(observer, PARTIAL) == {}
    assert homeserver.answered == [FULL, PARTIAL, PARTIAL]


async def test_a_freshly_joined_room_with_full_state_is_read_within_the_probe() -> None:
    homeserver, observer, _, completed, _ = setup()
    homeserver.resync_ends()
    observer.joined_now(PARTIAL)
    assert await load(observer, PARTIAL) == {}
    assert homeserver.reads == [PARTIAL]
    assert observer.cache.get(PARTIAL) is not None and PARTIAL not in observer.awaiting_full_state
    assert not completed  # the walk that read it plans with it: no second reconcile


async def test_a_room_left_and_joined_again_is_waited_for_again() -> None:
    homeserver, observer, loop, _, _ = setup()
    observer.joined_now(PARTIAL)
    assert await load(observer, PARTIAL) == {PARTIAL: PARTIAL_STATE}
    await loop.handle({"rooms": {"leave": {PARTIAL: {}}}})
    await load(observer, PARTIAL)  # not joined: the held read is dropped
    assert not observer._full_state_reads and PARTIAL not in observer.awaiting_full_state

    observer.joined_now(PARTIAL)
    assert await load(observer, PARTIAL) == {PARTIAL: PARTIAL_STATE}
    assert homeserver.reads.count(PARTIAL) == 2
    await observer.close()
    assert not observer._full_state_reads


async def test_a_resync_that_does_not_end_becomes_a_moderators_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    _, observer, _, _, _ = setup()
    observer.joined_now(PARTIAL)
    assert await load(observer, PARTIAL) == {PARTIAL: PARTIAL_STATE}
    monkeypatch.setattr(observer_module, "PARTIAL_STATE_WAIT", 0.0)
    reason = (await load(observer, PARTIAL))[PARTIAL]
    assert reason.startswith("state still partial") and "resync" in reason
    assert observer.cache.get(PARTIAL) is None
    await observer.close()


async def test_a_final_error_ends_the_wait_and_the_ordinary_read_reports_it() -> None:
    homeserver, observer, _, completed, _ = setup()
    observer.joined_now(PARTIAL)
    assert await load(observer, PARTIAL) == {PARTIAL: PARTIAL_STATE}
    homeserver.error = MForbidden(403, "not in the room")
    homeserver.resync_ends()
    await settle()
    assert completed == [PARTIAL] and PARTIAL not in observer.awaiting_full_state
    assert (await load(observer, PARTIAL))[PARTIAL].startswith("state unreadable")


async def test_a_room_the_bot_left_while_waiting_drops_its_read() -> None:
    homeserver, observer, loop, completed, _ = setup()
    observer.joined_now(PARTIAL)
    assert await load(observer, PARTIAL) == {PARTIAL: PARTIAL_STATE}
    await loop.handle({"rooms": {"leave": {PARTIAL: {}}}})
    homeserver.resync_ends()
    await settle()
    assert not observer.is_partial(PARTIAL) and PARTIAL not in observer.joined
    assert observer.cache.get(PARTIAL) is None and not completed and not observer._full_state_reads
