"""The state cache: /state answers read into RoomState, /sync deltas applied, generations counted."""

from __future__ import annotations

from spacesync.matrix.state import StateCache, parse_room_state
from spacesync.model import Membership, RoomID

ROOM = RoomID("!r:hs")


def event(type_: str, key: str, content: dict, sender: str = "@a:hs") -> dict:
    return {"type": type_, "state_key": key, "content": content, "sender": sender, "event_id": "$e",
            "origin_server_ts": 5}


def test_parse_reads_what_the_planner_needs_and_tolerates_junk():
    state = {
        ("m.room.create", ""): event("m.room.create", "", {"room_version": "12", "type": "m.space",
                                                           "additional_creators": ["@b:hs", 7],
                                                           "predecessor": {"room_id": "!old:hs"}}),
        ("m.room.join_rules", ""): event("m.room.join_rules", "", {
            "join_rule": "restricted",
            "allow": [{"type": "m.room_membership", "room_id": "!s:hs"}, {"type": "other"}, "junk"]}),
        ("m.space.child", "!c:hs"): event("m.space.child", "!c:hs", {"via": ["hs"]}),
        ("m.space.child", "!gone:hs"): event("m.space.child", "!gone:hs", {}),
        ("m.room.member", "@u:hs"): event("m.room.member", "@u:hs", {"membership": "ban"}, sender="@mod:hs"),
        ("m.room.member", "@x:hs"): event("m.room.member", "@x:hs", {"membership": "weird"}),
        ("m.room.power_levels", ""): event("m.room.power_levels", "", {"users": {"@u:hs": "50"}, "kick": "x"}),
    }
    room = parse_room_state(ROOM, state)
    assert room.room_version == "12" and room.is_space
    assert room.creators == {"@a:hs", "@b:hs"}
    assert room.allow == ("!s:hs",) and room.join_rule == "restricted"
    assert dict(room.children) == {"!c:hs": ("hs",)}
    assert room.members["@u:hs"].membership is Membership.BAN and room.members["@u:hs"].sender == "@mod:hs"
    assert "@x:hs" not in room.members
    assert room.power_levels.users == {"@u:hs": 50} and room.power_levels.kick == 50
    assert room.predecessor == "!old:hs"


def test_updates_apply_to_cached_rooms_and_count_generations():
    cache = StateCache()
    assert cache.update(ROOM, [event("m.room.member", "@u:hs", {"membership": "join"})]) is False
    assert cache.generation(ROOM) == 1, "a delta for a room still being read for the first time must count"
    cache.replace(ROOM, [event("m.room.create", "", {"room_version": "10"})])
    before = cache.generation(ROOM)
    assert cache.update(ROOM, [event("m.room.member", "@u:hs", {"membership": "join"})]) is True
    assert cache.generation(ROOM) == before + 1
    assert cache.get(ROOM).membership("@u:hs") is Membership.JOIN
    cache.update(ROOM, [event("m.room.member", "@u:hs", {"membership": "leave"})])
    assert cache.get(ROOM).membership("@u:hs") is Membership.LEAVE
    cache.forget(ROOM)
    assert cache.get(ROOM) is None and ROOM not in cache
