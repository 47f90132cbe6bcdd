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


def _event(user: str, membership: str, event_id: str, replaces: str | None = None) -> dict:
    event = {**member(user, membership), "event_id": event_id}
    if replaces is not None:
        event["unsigned"] = {"replaces_state": replaces}
    return event


def test_a_delta_older_than_the_answer_is_not_replayed_over_it():
    """A leave seen in /sync during the read, while the read's answer already holds the rejoin that replaced it:
    replaying the leave would roll the cache back (and the plan would kick a member)."""
    cache = StateCache()
    cache.replace(ROOM, [_event("@u:hs", "join", "$join1")])
    cache.begin_read(ROOM)
    cache.update(ROOM, [_event("@u:hs", "leave", "$leave", replaces="$join1")])
    cache.replace(ROOM, [_event("@u:hs", "join", "$join2", replaces="$leave")])
    assert cache.get(ROOM).membership("@u:hs") is Membership.JOIN
    assert ROOM not in cache.uncertain


def test_a_delta_the_answer_holds_or_that_came_before_a_later_delta_is_dropped():
    cache = StateCache()
    cache.begin_read(ROOM)
    cache.update(ROOM, [_event("@u:hs", "leave", "$leave"), _event("@u:hs", "join", "$join")])
    cache.replace(ROOM, [_event("@u:hs", "join", "$join")])
    assert cache.get(ROOM).membership("@u:hs") is Membership.JOIN, "the answer holds the later delta"
    cache.begin_read(ROOM)
    cache.update(ROOM, [_event("@u:hs", "ban", "$ban", replaces="$join")])
    cache.replace(ROOM, [_event("@u:hs", "join", "$join")])
    assert cache.get(ROOM).membership("@u:hs") is Membership.BAN, "a delta newer than the answer is replayed"
    assert ROOM not in cache.uncertain


async def test_a_delta_that_cannot_be_ordered_against_the_answer_has_the_room_read_again():
    cache = StateCache()
    cache.keep_detail([ROOM])  # the root Space of the policy below
    cache.replace(ROOM, [_event("@u:hs", "join", "$join")])
    cache.begin_read(ROOM)
    cache.update(ROOM, [_event("@u:hs", "leave", "$leave")])
    cache.replace(ROOM, [_event("@u:hs", "join", "$other")])
    assert ROOM in cache.uncertain
    asked: list[RoomID] = []
    observer = Observer(None, cache, store=None, on_full_state=asked.append)  # type: ignore[arg-type]
    observer._read_done(ROOM, [_event("@u:hs", "join", "$other")], 0.0)
    assert ROOM not in cache.uncertain, "a read without a doubt clears it"
    cache.begin_read(ROOM)
    cache.update(ROOM, [_event("@u:hs", "leave", "$leave2")])
    observer._read_done(ROOM, [_event("@u:hs", "join", "$third")], 0.0)
    assert ROOM in observer.stale and asked == [ROOM], "read again at the next full reconcile, asked for now"

    from spacesync.model import Policy, SpacePolicy

    class Joined:
        async def joined_rooms(self) -> set[RoomID]:
            return {ROOM}

    observer.matrix, observer.store = Joined(), EmptyStore()  # type: ignore[assignment]
    observer.history.store = observer.store  # type: ignore[assignment]
    policy = Policy(bot="@bot:hs", spaces=(SpacePolicy(ROOM),))  # type: ignore[arg-type]
    snapshot = await observer.observe(policy, refresh=False)
    assert snapshot.stale(ROOM), "until read again without doubt, nothing is done on the room's account"


def test_a_chain_of_deltas_each_replacing_the_last_is_replayed_without_doubt():
    cache = StateCache()
    cache.replace(ROOM, [_event("@u:hs", "join", "$j0")])
    cache.begin_read(ROOM)
    cache.update(ROOM, [_event("@u:hs", "leave", "$l1", replaces="$j0")])
    cache.update(ROOM, [_event("@u:hs", "join", "$j2", replaces="$l1")])
    cache.update(ROOM, [_event("@u:hs", "ban", "$b3", replaces="$j2")])
    cache.replace(ROOM, [_event("@u:hs", "join", "$j0")])
    assert cache.get(ROOM).membership("@u:hs") is Membership.BAN
    assert ROOM not in cache.uncertain
