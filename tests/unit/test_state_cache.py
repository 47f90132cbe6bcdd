"""The state cache: /state answers read into RoomState, /sync deltas applied, generations counted."""

from __future__ import annotations

from spacesync.matrix.state import StateCache, parse_room_state
from spacesync.model import Membership, RoomID

ROOM = RoomID("!r:hs")


def event(type_: str, key: str, content: dict, sender: str = "@a:hs") -> dict:
    return {
        "type": type_,
        "state_key": key,
        "content": content,
        "sender": sender,
        "event_id": "$e",
        "origin_server_ts": 5,
    }


def test_parse_reads_what_the_planner_needs_and_tolerates_junk():
    state = {
        ("m.room.create", ""): event(
            "m.room.create",
            "",
            {
                "room_version": "12",
                "type": "m.space",
                "additional_creators": ["@b:hs", 7],
                "predecessor": {"room_id": "!old:hs"},
            },
        ),
        ("m.room.join_rules", ""): event(
            "m.room.join_rules",
            "",
            {
                "join_rule": "restricted",
                "allow": [{"type": "m.room_membership", "room_id": "!s:hs"}, {"type": "other"}, "junk"],
            },
        ),
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


def test_updates_apply_to_cached_rooms_and_wait_for_a_first_read():
    cache = StateCache()
    assert cache.update(ROOM, [event("m.room.member", "@u:hs", {"membership": "join"})]) is False
    assert ROOM not in cache, "a delta alone is no state: the room still needs its /state read"
    cache.begin_read(ROOM)
    cache.update(ROOM, [{**event("m.room.member", "@v:hs", {"membership": "ban"}), "event_id": "$ban"}])
    cache.replace(
        ROOM,
        [event("m.room.create", "", {"room_version": "10"}), event("m.room.member", "@v:hs", {"membership": "join"})],
    )
    assert cache.get(ROOM).membership("@v:hs") is Membership.BAN, "the delta seen during the read wins"
    assert cache.update(ROOM, [event("m.room.member", "@u:hs", {"membership": "join"})]) is True
    assert cache.get(ROOM).membership("@u:hs") is Membership.JOIN
    cache.update(ROOM, [event("m.room.member", "@u:hs", {"membership": "leave"})])
    assert cache.get(ROOM).membership("@u:hs") is Membership.LEAVE
    cache.forget(ROOM)
    assert cache.get(ROOM) is None and ROOM not in cache


def test_membership_history_read_from_unsigned_and_malformed_events_skipped():
    leave = event("m.room.member", "@l:hs", {"membership": "leave"})
    leave["unsigned"] = {"prev_content": {"membership": "join"}, "replaces_state": "$prev"}
    declined = event("m.room.member", "@d:hs", {"membership": "leave"})
    declined["unsigned"] = {"prev_content": {"membership": "invite"}}
    unknown = event("m.room.member", "@q:hs", {"membership": "leave"})
    unknown["unsigned"] = {"replaces_state": "$x"}
    bad_ts = event("m.room.member", "@t:hs", {"membership": "join"})
    bad_ts["origin_server_ts"] = "yesterday"
    state = {
        ("m.room.member", "@l:hs"): leave,
        ("m.room.member", "@d:hs"): declined,
        ("m.room.member", "@q:hs"): unknown,
        ("m.room.member", "@t:hs"): bad_ts,
        ("m.room.member", "@list:hs"): {**event("m.room.member", "@list:hs", {}), "content": ["join"]},
        ("m.room.member", "@sender:hs"): {
            **event("m.room.member", "@sender:hs", {"membership": "join"}),
            "sender": ["@a:hs"],
        },
        ("m.space.child", "!c:hs"): {**event("m.space.child", "!c:hs", {}), "content": ["via"]},
        ("m.space.child", "!ok:hs"): event("m.space.child", "!ok:hs", {"via": ["hs"]}),
    }
    room = parse_room_state(ROOM, state)
    assert room.members["@l:hs"].was_joined is True and room.members["@l:hs"].replaces == "$prev"
    assert room.members["@d:hs"].was_joined is False
    assert room.members["@q:hs"].was_joined is None and room.members["@q:hs"].replaces == "$x"
    assert room.members["@t:hs"].membership is Membership.JOIN and room.members["@t:hs"].ts == 0
    assert "@list:hs" not in room.members and "@sender:hs" not in room.members
    assert room.malformed == 2, "the event with a sender list and the child with list content"
    assert dict(room.children) == {"!ok:hs": ("hs",)}
