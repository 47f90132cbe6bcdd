"""A /sync delta that lands while a room's /state is being read must survive the read."""

from __future__ import annotations

from spacesync.engine.observer import Observer
from spacesync.matrix.state import StateCache
from spacesync.model import Membership, RoomID

from .stubs import EmptyStore

ROOM = RoomID("!r:hs")


def member(user: str, membership: str) -> dict:
    return {"type": "m.room.member", "state_key": user, "content": {"membership": membership}, "sender": user}


class RacingHomeserver:
    """Answers /state with what it held when asked, while a ban reaches /sync before the answer lands."""

    def __init__(self, cache: StateCache) -> None:
        self.cache = cache
        self.state = [member("@u:hs", "join")]
        self.reads = 0

    async def room_state(self, room_id: RoomID) -> list[dict]:
        answer = list(self.state)
        self.reads += 1
        if self.reads == 1:
            self.state = [member("@u:hs", "ban")]
            self.cache.update(room_id, [member("@u:hs", "ban")])
        return answer


async def _read(cache: StateCache) -> RacingHomeserver:
    homeserver = RacingHomeserver(cache)
    observer = Observer(homeserver, cache, store=None)  # type: ignore[arg-type]
    observer.joined = {ROOM}
    await observer._load(ROOM, True, {})
    return homeserver


async def test_a_delta_during_a_state_read_is_not_overwritten():
    cache = StateCache()
    cache.replace(ROOM, [member("@u:hs", "join")])
    homeserver = await _read(cache)
    assert homeserver.reads == 1, "the delta is applied over the answer: no second read is needed"
    assert cache.get(ROOM).membership("@u:hs") is Membership.BAN


async def test_a_delta_during_the_first_read_of_a_room_is_not_lost():
    cache = StateCache()
    await _read(cache)
    assert cache.get(ROOM).membership("@u:hs") is Membership.BAN


async def test_a_failed_read_keeps_the_last_known_state_and_stops_buffering():
    cache = StateCache()
    cache.replace(ROOM, [member("@u:hs", "join")])

    class Down:
        async def room_state(self, room_id: RoomID) -> list[dict]:
            raise OSError("connection refused")

    observer = Observer(Down(), cache, store=None)  # type: ignore[arg-type]
    observer.joined = {ROOM}
    unreachable: dict[RoomID, str] = {}
    import spacesync.engine.observer as module

    module_attempts, module.READ_ATTEMPTS = module.READ_ATTEMPTS, 1
    try:
        await observer._load(ROOM, True, unreachable)
    finally:
        module.READ_ATTEMPTS = module_attempts
    assert "OSError" in unreachable[ROOM]
    assert cache.get(ROOM).membership("@u:hs") is Membership.JOIN, "unknown is not absent: the last state stays"
    cache.update(ROOM, [member("@u:hs", "leave")])
    assert cache.get(ROOM).membership("@u:hs") is Membership.LEAVE


async def test_rooms_beyond_the_room_cap_are_unknown_not_absent():
    from spacesync.model import Policy, SpacePolicy

    root = RoomID("!root:hs")
    children = [RoomID(f"!c{i}:hs") for i in range(3)]

    def event(type_: str, key: str, content: dict) -> dict:
        return {"type": type_, "state_key": key, "content": content, "sender": "@a:hs", "event_id": f"${type_}{key}"}

    class World:
        async def joined_rooms(self) -> set[RoomID]:
            return {root, *children}

        async def room_state(self, room_id: RoomID) -> list[dict]:
            state = [event("m.room.create", "", {"room_version": "10", "type": "m.space"})]
            if room_id == root:
                state += [event("m.space.child", c, {"via": ["hs"]}) for c in children]
            return state

    observer = Observer(World(), StateCache(), EmptyStore())  # type: ignore[arg-type]
    policy = Policy(bot="@bot:hs", spaces=(SpacePolicy(root),), max_rooms=3)  # type: ignore[arg-type]
    snapshot = await observer.observe(policy, refresh=True)
    assert set(snapshot.rooms) == {root, children[0], children[1]}
    assert "room cap 3" in snapshot.unreachable[children[2]], "a room the walk did not read is unknown"
