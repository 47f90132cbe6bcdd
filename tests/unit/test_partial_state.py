"""A room joined over federation is not read (nor acted in) until /sync shows it: Synapse holds such a
room in partial state (faster joins), keeps it out of an eager /sync and blocks /state reads of it until
its full state has arrived. The signal is the homeserver's, so this is tested against a stand-in that
answers as Synapse does during that window, which a real server cannot be made to hold open on demand."""

from __future__ import annotations

from typing import Any

from spacesync.engine import observer as observer_module
from spacesync.engine.observer import PARTIAL_STATE, Observer
from spacesync.engine.sync import SyncLoop
from spacesync.matrix.state import StateCache
from spacesync.model import RoomID

FULL = RoomID("!full:a.example")
PARTIAL = RoomID("!partial:b.example")


class Homeserver:
    """Answers /state at once, except for a room in partial state, whose read would block (fails the test)."""

    user_id = "@bot:a.example"

    def __init__(self) -> None:
        self.partial = {PARTIAL}
        self.reads: list[RoomID] = []

    async def room_state(self, room_id: RoomID) -> list[dict[str, Any]]:
        assert room_id not in self.partial, "a /state read of a partial-state room blocks until the resync ends"
        self.reads.append(room_id)
        return [{"type": "m.room.create", "state_key": "", "content": {}, "sender": "@x:b.example"}]


def setup() -> tuple[Homeserver, Observer, SyncLoop, list[bool]]:
    homeserver = Homeserver()
    observer = Observer(homeserver, StateCache(), store=None)  # type: ignore[arg-type]
    requested: list[bool] = []
    loop = SyncLoop(
        homeserver,  # type: ignore[arg-type]
        observer.cache,
        None,  # type: ignore[arg-type]
        observer,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        admin_room=lambda: None,
        request_reconcile=lambda full=False: requested.append(full),
    )
    return homeserver, observer, loop, requested


async def test_a_freshly_joined_room_absent_from_sync_is_waited_for_while_others_are_read() -> None:
    homeserver, observer, loop, requested = setup()
    await loop.handle({"rooms": {"join": {FULL: {}}}})
    observer.joined = {FULL}
    observer.joined_now(PARTIAL)
    observer.joined_now(FULL)  # already shown by /sync: its state is complete

    unreachable: dict[RoomID, str] = {}
    await observer._load(FULL, True, unreachable)
    await observer._load(PARTIAL, True, unreachable)
    assert homeserver.reads == [FULL]
    assert unreachable == {PARTIAL: PARTIAL_STATE}
    assert observer.cache.get(PARTIAL) is None  # nothing known, so nothing planned there

    # The resync ends: Synapse shows the room in /sync, which asks for a full reconcile that reads it.
    homeserver.partial.clear()
    await loop.handle({"rooms": {"join": {PARTIAL: {}}}})
    assert requested == [True]
    unreachable = {}
    await observer._load(PARTIAL, True, unreachable)
    assert homeserver.reads == [FULL, PARTIAL] and not unreachable


async def test_a_room_left_and_joined_again_waits_for_sync_again() -> None:
    _, observer, loop, _ = setup()
    await loop.handle({"rooms": {"join": {PARTIAL: {}}}})
    await loop.handle({"rooms": {"leave": {PARTIAL: {}}}})
    observer.joined_now(PARTIAL)
    assert observer.is_partial(PARTIAL)


async def test_a_room_never_shown_is_read_after_the_wait(monkeypatch) -> None:
    homeserver, observer, _, _ = setup()
    homeserver.partial.clear()
    observer.joined_now(PARTIAL)
    monkeypatch.setattr(observer_module, "PARTIAL_STATE_WAIT", 0.0)
    unreachable: dict[RoomID, str] = {}
    await observer._load(PARTIAL, True, unreachable)
    assert homeserver.reads == [PARTIAL] and not unreachable
