"""Which rooms a full reconcile reads again: all of them after a start or an outage, else only the stale ones
(gappy /sync timelines, failed reads) and a rolling slice that reads every room once per reread_interval."""

from __future__ import annotations

import pytest

from spacesync.engine import observer as observer_module
from spacesync.engine.observer import Observer
from spacesync.matrix.state import StateCache
from spacesync.model import Policy, RoomID, SpacePolicy

from .stubs import EmptyStore, sync_loop

ROOT = RoomID("!root:hs")
CHILDREN = [RoomID(f"!c{i}:hs") for i in range(10)]


def event(type_: str, key: str, content: dict) -> dict:
    return {"type": type_, "state_key": key, "content": content, "sender": "@a:hs", "event_id": f"${type_}{key}"}


class World:
    user_id = "@bot:hs"

    def __init__(self) -> None:
        self.reads: list[RoomID] = []

    async def joined_rooms(self) -> set[RoomID]:
        return {ROOT, *CHILDREN}

    async def room_state(self, room_id: RoomID, timeout: float = 60) -> list[dict]:
        self.reads.append(room_id)
        state = [event("m.room.create", "", {"room_version": "10", "type": "m.space" if room_id == ROOT else None})]
        if room_id == ROOT:
            state += [event("m.space.child", c, {"via": ["hs"]}) for c in CHILDREN]
        return state


POLICY = Policy(bot="@bot:hs", spaces=(SpacePolicy(ROOT),))  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(observer_module.time, "monotonic", clock)
    return clock


async def walk(observer: Observer, world: World, *, everything: bool = False) -> list[RoomID]:
    world.reads.clear()
    await observer.observe(POLICY, refresh=True, everything=everything)
    return list(world.reads)


async def test_the_first_walk_reads_every_room_then_only_a_rolling_slice(clock: Clock) -> None:
    world = World()
    observer = Observer(world, StateCache(), EmptyStore(), reread_interval=100.0)  # type: ignore[arg-type]
    assert len(await walk(observer, world)) == 11

    clock.now += 20  # a fifth of reread_interval: a fifth of the rooms, the longest unread first
    first = await walk(observer, world)
    assert len(first) == 2
    clock.now += 20
    second = await walk(observer, world)
    assert len(second) == 2 and not set(first) & set(second)

    # over one reread_interval every room is read again at least once
    read: set[RoomID] = set(first) | set(second)
    for _ in range(3):
        clock.now += 20
        read |= set(await walk(observer, world))
    assert read == {ROOT, *CHILDREN}


async def test_stale_rooms_an_outage_and_a_moderator_refresh(clock: Clock) -> None:
    world = World()
    observer = Observer(world, StateCache(), EmptyStore(), reread_interval=1e9)  # type: ignore[arg-type]
    await walk(observer, world)
    assert await walk(observer, world) == []  # nothing due, nothing stale: no /state read at all

    observer.mark_stale(CHILDREN[3])
    assert await walk(observer, world) == [CHILDREN[3]]
    assert await walk(observer, world) == []

    observer.reread_all()  # the homeserver is back after an outage, or a restart
    assert len(await walk(observer, world)) == 11
    assert await walk(observer, world) == []

    assert len(await walk(observer, world, everything=True)) == 11  # `plan`, `reconcile`: a fresh view


async def test_a_gappy_timeline_marks_only_its_room_stale(clock: Clock) -> None:
    world = World()
    observer = Observer(world, StateCache(), EmptyStore(), reread_interval=1e9)  # type: ignore[arg-type]
    await walk(observer, world)
    requested: list[bool] = []
    loop = sync_loop(world, observer, requested)
    gappy = {"timeline": {"limited": True, "events": []}}
    quiet = {"timeline": {"limited": False, "events": [event("m.room.name", "", {"name": "x"})]}}
    await loop.handle({"rooms": {"join": {CHILDREN[1]: gappy, CHILDREN[2]: quiet}}})
    assert set(observer.stale) == {CHILDREN[1]} and requested == [True]
    assert await walk(observer, world) == [CHILDREN[1]]


async def test_a_gap_found_while_the_room_is_read_keeps_it_stale(clock: Clock) -> None:
    world = World()
    observer = Observer(world, StateCache(), EmptyStore(), reread_interval=1e9)  # type: ignore[arg-type]
    await walk(observer, world)
    read = world.room_state

    async def racing(room_id: RoomID, timeout: float = 60) -> list[dict]:
        answer = await read(room_id, timeout)
        if room_id == CHILDREN[0]:
            clock.now += 1  # /sync reports a gap in the room after the homeserver made this answer
            observer.mark_stale(room_id)
        return answer

    world.room_state = racing  # type: ignore[method-assign]
    observer.mark_stale(CHILDREN[0])
    clock.now += 1
    assert await walk(observer, world) == [CHILDREN[0]]
    assert await walk(observer, world) == [CHILDREN[0]], "the gap found during the read was forgotten"
