"""A /sync delta that lands while a room's /state is being read must survive the read."""

from __future__ import annotations

from spacesync.engine.observer import Observer
from spacesync.matrix.state import StateCache
from spacesync.model import Membership, RoomID

ROOM = RoomID("!r:hs")


def member(user: str, membership: str) -> dict:
    return {"type": "m.room.member", "state_key": user, "content": {"membership": membership}, "sender": user}


class RacingHomeserver:
    """Answers /state with what it held when asked, while a ban reaches /sync during the first read."""

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


async def test_a_delta_during_a_state_read_is_not_overwritten():
    cache = StateCache()
    cache.replace(ROOM, [member("@u:hs", "join")])
    homeserver = RacingHomeserver(cache)
    observer = Observer(homeserver, cache, store=None)  # type: ignore[arg-type]
    observer.joined = {ROOM}
    await observer._load(ROOM, True, {})
    assert homeserver.reads == 2
    assert cache.get(ROOM).membership("@u:hs") is Membership.BAN
