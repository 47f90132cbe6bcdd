"""The compact state cache: what it hands out reads as `parse_room_state` over the same events, decisions and all.

Members are kept compact outside Spaces and roots (a join keeps its membership and a hash of its event id; a
leave, ban, invite or knock the fields decisions read there, shared), so the comparison is member by member:
compact joins by membership, other compact entries by every field a decision reads, entries of Spaces and
roots in full. The planner must make the same plan from either, and a RoomState handed out never changes
under its holder.
"""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spacesync.core.planner import plan
from spacesync.engine.executor import fingerprint
from spacesync.matrix import state
from spacesync.matrix.replay import newer_than_answer
from spacesync.matrix.state import StateCache, StateKey, parse_room_state
from spacesync.metrics import REGISTRY
from spacesync.model import (
    Action,
    ActionKind,
    Membership,
    MemberState,
    OnLeave,
    PlacedBan,
    Policy,
    RoomID,
    RoomState,
    Snapshot,
    SpacePolicy,
    UserID,
    canonical_tag,
)

from .test_properties import SETTINGS

BOT = UserID("@bot:hs")
SPACE = RoomID("!space:hs")
ROOMS = [SPACE, RoomID("!a:hs"), RoomID("!b:hs"), RoomID("!c:hs")]
USERS = [BOT, *(UserID(f"@u{i}:hs") for i in range(5))]
MEMBER_KEYS = [*USERS, "not-a-user", ""]


class RawStateCache:
    """The state cache as it was: every raw event kept, each room read by `parse_room_state`."""

    def __init__(self) -> None:
        self.state: dict[RoomID, dict[StateKey, dict[str, Any]]] = {}
        self.during: dict[RoomID, list[Mapping[str, Any]]] = {}

    def begin_read(self, room_id: RoomID) -> None:
        self.during[room_id] = []

    def end_read(self, room_id: RoomID) -> None:
        self.during.pop(room_id, None)

    def replace(self, room_id: RoomID, events: Iterable[Mapping[str, Any]]) -> None:
        during = self.during.pop(room_id, [])
        events = list(events)
        self.state[room_id] = {}
        self._apply(room_id, [*events, *newer_than_answer(events, during)[0]])

    def update(self, room_id: RoomID, events: Iterable[Mapping[str, Any]]) -> bool:
        events = [e for e in events if isinstance(e, Mapping)]
        if room_id in self.during:
            self.during[room_id].extend(events)
        if room_id not in self.state:
            return False
        self._apply(room_id, events)
        return True

    def _apply(self, room_id: RoomID, events: Iterable[Mapping[str, Any]]) -> None:
        for event in events:
            key = event.get("state_key")
            if isinstance(key, str) and isinstance(event.get("type"), str):
                self.state[room_id][(event["type"], key)] = dict(event)

    def get(self, room_id: RoomID) -> RoomState | None:
        return parse_room_state(room_id, self.state[room_id]) if room_id in self.state else None


# --- events ----------------------------------------------------------------------------------------------

_ids = st.integers(0, 40)


def _event_id(n: int) -> str:
    return f"$ev{n}"


JUNK = st.sampled_from([None, [], ["join"], "join", 7, True, {"x": 1}])


@st.composite
def member_event(draw: Any) -> dict[str, Any]:
    key = draw(st.sampled_from(MEMBER_KEYS))
    membership = draw(st.sampled_from(["join"] * 5 + ["leave", "leave", "ban", "invite", "knock", "weird", 3]))
    content: Any = {"membership": membership}
    if draw(st.integers(0, 3)) == 0:
        content["reason"] = draw(st.sampled_from(["spam", "", 5]))
    if membership == "ban" and draw(st.booleans()):
        content[draw(st.sampled_from(["redact_events", "org.matrix.msc4293.redact_events"]))] = draw(
            st.sampled_from([True, True, False, "true"])
        )
    if draw(st.integers(0, 15)) == 0:
        content = draw(JUNK)  # no content, or a list, a string, a number where the object belongs
    event: dict[str, Any] = {"type": "m.room.member", "state_key": key, "content": content}
    sender = draw(st.sampled_from(["self", "self", BOT, "@u0:hs", None, "missing", ["@a:hs"]]))
    if sender == "self":
        event["sender"] = key
    elif sender != "missing":
        event["sender"] = sender
    event_id = draw(st.one_of(_ids.map(_event_id), st.sampled_from([None, "missing", "", 12, "$\ud800"])))
    if event_id != "missing":
        event["event_id"] = event_id
    event["origin_server_ts"] = draw(st.sampled_from([1700000000000, 5, "yesterday", None, True]))
    if draw(st.booleans()):
        unsigned: dict[str, Any] = {}
        if draw(st.booleans()):
            unsigned["prev_content"] = draw(
                st.one_of(st.sampled_from([{"membership": "join"}] * 3 + [{"membership": "invite"}, {}]), JUNK)
            )
        if draw(st.booleans()):
            unsigned["replaces_state"] = draw(st.one_of(_ids.map(_event_id), st.sampled_from(["", 4])))
        event["unsigned"] = draw(st.one_of(st.just(unsigned), JUNK)) if draw(st.integers(0, 7)) == 0 else unsigned
    return event


def _levels(draw: Any) -> dict[str, Any]:
    as_level = draw(st.sampled_from([int, str]))  # legacy string levels
    users = {u: as_level(draw(st.sampled_from([0, 50, 100]))) for u in draw(st.lists(st.sampled_from(USERS)))}
    if draw(st.integers(0, 3)):
        users[BOT] = as_level(100)
    return {"users": users, "kick": as_level(50), "ban": draw(st.sampled_from([50, "50", "x", None]))}


@st.composite
def other_event(draw: Any, room_id: RoomID) -> dict[str, Any]:
    """A state event besides memberships: ones the planner reads, junk versions of them, and others."""
    kind = draw(
        st.sampled_from(
            ["power_levels", "join_rules", "child", "parent", "tombstone", "name", "acl", "policy", "topic", "junk"]
        )
    )
    key = ""
    if kind == "power_levels":
        event_type, content = "m.room.power_levels", _levels(draw)
    elif kind == "join_rules":
        event_type = "m.room.join_rules"
        content = draw(
            st.sampled_from(
                [
                    {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": SPACE}]},
                    {"join_rule": "restricted", "allow": "junk"},
                    {"join_rule": "invite"},
                    {"join_rule": 5},
                ]
            )
        )
    elif kind in ("child", "parent"):
        event_type = f"m.space.{kind}"
        key = draw(st.sampled_from([*ROOMS, "not-a-room"]))
        content = draw(st.one_of(st.sampled_from([{"via": ["hs"]}, {"via": []}, {}, {"via": "hs"}]), JUNK))
    elif kind == "tombstone":
        event_type, content = "m.room.tombstone", {"replacement_room": draw(st.sampled_from(["!new:hs", 3]))}
    elif kind == "name":
        event_type, content = "m.room.name", {"name": draw(st.sampled_from(["Lobby", None, 4]))}
    elif kind == "acl":
        event_type, content = "m.room.server_acl", {"deny": ["evil.example"], "allow": ["*"]}
    elif kind == "policy":
        event_type = draw(st.sampled_from(["m.room.policy", "org.matrix.msc4284.policy"]))
        content = {"via": "policy.example"}
    elif kind == "topic":
        event_type, content = "m.room.topic", {"topic": "unread by spacesync"}
    else:
        event_type, content = draw(st.sampled_from(["m.room.join_rules", "m.room.power_levels"])), draw(JUNK)
    event: dict[str, Any] = {"type": event_type, "state_key": key, "content": content, "sender": BOT}
    if draw(st.integers(0, 15)) == 0:  # no type, or a state key that is no string: not state at all
        event[draw(st.sampled_from(["type", "state_key"]))] = draw(st.sampled_from([None, 7]))
    return event


@st.composite
def full_state(draw: Any, room_id: RoomID) -> list[dict[str, Any]]:
    """A /state answer: create (Space or not, v12 with additional creators), the Space's skeleton, members."""
    space = room_id == SPACE or draw(st.integers(0, 5)) == 0
    create: dict[str, Any] = {"room_version": draw(st.sampled_from(["10", "10", "12", "1", 11, True]))}
    if space:
        create["type"] = "m.space"
    if draw(st.booleans()):
        create["additional_creators"] = draw(st.sampled_from([["@u1:hs"], ["@u2:hs", 7], "junk"]))
    if draw(st.integers(0, 7)) == 0:
        create = draw(JUNK)
    events = [{"type": "m.room.create", "state_key": "", "content": create, "sender": "@u3:hs"}]
    if draw(st.integers(0, 5)):
        events.append({"type": "m.room.power_levels", "state_key": "", "content": _levels(draw), "sender": BOT})
    if room_id == SPACE:
        events += [
            {"type": "m.space.child", "state_key": r, "content": {"via": ["hs"]}, "sender": BOT} for r in ROOMS[1:]
        ]
    elif draw(st.integers(0, 3)):
        allow = [{"type": "m.room_membership", "room_id": SPACE}]
        events.append(
            {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "restricted", "allow": allow}}
        )
    events += draw(st.lists(other_event(room_id), max_size=3))
    if draw(st.integers(0, 7)):
        events.append({**_member(BOT, "join", "$bot"), "origin_server_ts": 1})
    if room_id != SPACE and draw(st.booleans()):  # everyone joined: those who left the Space are to go
        events += [_member(u, "join", f"$join-{u}") for u in USERS[1:]]
    for user in draw(st.lists(st.sampled_from(USERS[1:]), unique=True, max_size=3)) if room_id == SPACE else []:
        left = _member(user, "leave", f"$left-{user}", unsigned={"prev_content": {"membership": "join"}})
        events.append(draw(st.sampled_from([left, {**left, "content": {"membership": "ban"}, "sender": BOT}])))
    events += draw(st.lists(member_event(), max_size=14))
    draw(st.randoms()).shuffle(events)  # /state answers come in any order: members before the create event too
    return events


@st.composite
def histories(draw: Any) -> tuple[list[RoomID], list[tuple[Any, ...]]]:
    """Rooms kept in detail (the configured roots), and a run of reads, deltas and looks at the cache."""
    detailed = draw(st.lists(st.sampled_from(ROOMS), max_size=2, unique=True))
    ops: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 14))):
        room_id = draw(st.sampled_from(ROOMS))
        op = draw(st.sampled_from(["replace", "replace", "begin", "update", "update", "update", "get", "end"]))
        if op == "replace":
            ops.append((op, room_id, draw(full_state(room_id))))
        elif op == "update":
            events = draw(st.lists(st.one_of(member_event(), other_event(room_id)), min_size=1, max_size=4))
            ops.append((op, room_id, events))
        else:
            ops.append((op, room_id))
    read = {op[1] for op in ops if op[0] == "replace"}
    ops += [("replace", r, draw(full_state(r))) for r in ROOMS if r not in read]  # every room read at least once
    return detailed, ops


# --- comparison -----------------------------------------------------------------------------------------


def decided_by(state: MemberState) -> tuple[Any, ...]:
    """Every field of a membership a decision reads outside Spaces and roots: `was_joined` (entitlement, allow-list
    rooms), `sender` (whose ban or kick it was), a ban's `reason` and `redact_events` (upgrades, carried bans),
    `seen_ms` (grace periods)."""
    ban = state.membership is Membership.BAN
    return (
        state.membership,
        state.sender,
        state.was_joined,
        state.seen_ms,
        state.reason if ban else None,
        state.redact_events,
    )


def assert_same_room(got: RoomState, want: RoomState, detailed: bool) -> None:
    """`got` reads as `want` for every decision: all but the members equal, each member equal in full except
    outside Spaces and detailed rooms: joins keep their membership and a hash of their event id, other entries
    every field a decision reads (`decided_by`) and nothing else, and are named by those fields."""
    assert attrs.evolve(got, members={}) == attrs.evolve(want, members={})
    assert set(got.members) == set(want.members) and len(got.members) == len(want.members)
    assert dict(got.members.items()).keys() == want.members.keys()
    for user_id, expected in want.members.items():
        mine = got.members[user_id]
        assert got.members.get(user_id) is mine and got.membership(user_id) is expected.membership
        if expected.membership is Membership.JOIN and not (detailed or want.is_space):
            assert mine == MemberState(Membership.JOIN)
            crc = zlib.crc32(expected.event_id.encode("utf-8", "surrogatepass")) if expected.event_id else None
            assert got.member_tag(user_id) == (f"crc32:{crc:08x}" if crc is not None else None)
        elif not (detailed or want.is_space):
            assert decided_by(mine) == decided_by(expected), user_id
            ban = expected.membership is Membership.BAN
            kept = MemberState(
                expected.membership,
                sender=expected.sender,
                was_joined=expected.was_joined,
                seen_ms=expected.seen_ms,
                reason=expected.reason if ban else None,
                redact_events=expected.redact_events,
            )
            assert mine == kept, "nothing else is kept"
            assert got.member_tag(user_id) == canonical_tag(mine)
        else:
            assert mine == expected, user_id
            assert got.member_tag(user_id) == want.member_tag(user_id) == expected.event_id
    assert got.joined() == want.joined()
    assert got.membership(UserID("@nobody:hs")) is Membership.LEAVE and got.members.get(UserID("@nobody:hs")) is None


def assert_equal_entries_shared(cache: StateCache, detailed: list[RoomID]) -> None:
    """Equal non-join entries of compact rooms are one object, whichever room holds them."""
    seen: dict[MemberState, MemberState] = {}
    for room_id in cache.rooms():
        room = cache.get(room_id)
        if room_id in detailed or room.is_space:
            continue
        for entry in room.members.values():
            if entry.membership is not Membership.JOIN:
                assert seen.setdefault(entry, entry) is entry


def frozen_view(room: RoomState) -> tuple[Any, ...]:
    """What a holder of `room` can see of its members, copied out."""
    return (dict(room.members.items()), room.joined(), room.malformed, {u: room.member_tag(u) for u in room.members})


POLICY = Policy(
    bot=BOT,
    spaces=(SpacePolicy(room_id=SPACE, on_leave=OnLeave.BAN, invite_members=True),),
)


def assert_same_plan(cache: StateCache, reference: RawStateCache, placed: frozenset[PlacedBan]) -> None:
    compact = {r: s for r in ROOMS if (s := cache.get(r)) is not None}
    full = {r: s for r in ROOMS if (s := reference.get(r)) is not None}
    for policy in (POLICY, attrs.evolve(POLICY, spaces=(attrs.evolve(POLICY.spaces[0], on_leave=OnLeave.KICK),))):
        assert plan(Snapshot(rooms=compact, placed_bans=placed), policy) == plan(
            Snapshot(rooms=full, placed_bans=placed), policy
        )


@SETTINGS
@given(histories(), st.data())
def test_the_compact_cache_reads_as_the_full_parse_and_plans_the_same(history, data):
    detailed, ops = history
    cache, reference = StateCache(), RawStateCache()
    cache.keep_detail(detailed)
    held: list[tuple[RoomState, tuple[Any, ...]]] = []
    for op in ops:
        kind, room_id = op[0], op[1]
        if kind == "replace":
            cache.replace(room_id, op[2])
            reference.replace(room_id, op[2])
        elif kind == "update":
            assert cache.update(room_id, op[2]) is reference.update(room_id, op[2])
        elif kind == "begin":
            cache.begin_read(room_id)
            reference.begin_read(room_id)
        elif kind == "end":
            cache.end_read(room_id)
            reference.end_read(room_id)
        assert (room_id in cache) is (room_id in reference.state)
        view = cache.get(room_id)
        if view is not None:
            held.append((view, frozen_view(view)))
    assert sorted(cache.rooms()) == sorted(reference.state)
    for room_id in cache.rooms():
        assert_same_room(cache.get(room_id), reference.get(room_id), room_id in detailed)
    assert_equal_entries_shared(cache, detailed)
    assert cache.member_entries == sum(len(reference.get(r).members) for r in reference.state)
    bans = [(r, u) for r in cache.rooms() for u in USERS if cache.get(r).membership(u) is Membership.BAN]
    picked = data.draw(st.lists(st.sampled_from(bans), max_size=3)) if bans else []
    placed = frozenset(PlacedBan(r, u, data.draw(st.sampled_from(["space_ban", "on_leave"]))) for r, u in picked)
    assert_same_plan(cache, reference, placed)
    for view, seen in held:  # copy-on-write: nothing handed out changed since
        assert frozen_view(view) == seen


# --- examples --------------------------------------------------------------------------------------------


def _member(user: str, membership: str, event_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "state_key": user,
        "sender": user,
        "event_id": event_id,
        "content": {"membership": membership},
        **extra,
    }


ROOM = RoomID("!room:hs")
CREATE = {"type": "m.room.create", "state_key": "", "sender": "@c:hs", "content": {"room_version": "10"}}


def test_a_room_handed_out_never_changes_under_its_holder():
    cache = StateCache()
    cache.replace(ROOM, [CREATE, _member("@a:hs", "join", "$1"), _member("@b:hs", "join", "$2")])
    before = cache.get(ROOM)
    assert cache.get(ROOM) is before, "unchanged: the same RoomState"
    cache.update(ROOM, [_member("@a:hs", "leave", "$3"), _member("@c:hs", "join", "$4")])
    cache.update(ROOM, [{"type": "m.room.name", "state_key": "", "content": {"name": "New"}}])
    assert before.membership(UserID("@a:hs")) is Membership.JOIN and "@c:hs" not in before.members
    assert before.joined() == {"@a:hs", "@b:hs"} and len(before.members) == 2 and before.name is None
    after = cache.get(ROOM)
    assert after.membership(UserID("@a:hs")) is Membership.LEAVE and after.joined() == {"@b:hs", "@c:hs"}
    assert after.name == "New"
    held = cache.get(ROOM)
    cache.replace(ROOM, [CREATE])
    assert held.joined() == {"@b:hs", "@c:hs"}, "a new read leaves the old RoomState alone too"


def test_joins_are_compact_outside_spaces_and_full_in_spaces_and_roots():
    space = {**CREATE, "content": {"room_version": "10", "type": "m.space"}}
    root, other = RoomID("!root:hs"), RoomID("!other:hs")
    cache = StateCache()
    cache.replace(ROOM, [_member("@a:hs", "join", "$1"), space])  # members before the create event
    cache.replace(other, [CREATE, _member("@a:hs", "join", "$1")])
    cache.replace(root, [CREATE, _member("@a:hs", "join", "$1")])
    assert cache.get(ROOM).members["@a:hs"].event_id == "$1", "a Space keeps every member in full"
    assert cache.get(other).members["@a:hs"] == MemberState(Membership.JOIN)
    assert cache.get(other).member_tag(UserID("@a:hs")) == f"crc32:{zlib.crc32(b'$1'):08x}"
    cache.keep_detail([root])
    assert root not in cache and other in cache, "a root held compact is dropped, to be read again in full"
    cache.replace(root, [CREATE, _member("@a:hs", "join", "$1")])
    assert cache.get(root).members["@a:hs"].event_id == "$1"
    cache.keep_detail([root])
    assert root in cache


def test_other_memberships_keep_what_decisions_read_outside_spaces_and_roots_one_object_each():
    space = {**CREATE, "content": {"room_version": "10", "type": "m.space"}}
    other = RoomID("!other:hs")
    joined = {"prev_content": {"membership": "join"}, "replaces_state": "$0"}
    kick = {**_member("@a:hs", "leave", "$1", unsigned=joined), "sender": "@mod:hs", "origin_server_ts": 5}
    kick["content"] = {"membership": "leave", "reason": "bye"}
    ban = {**_member("@b:hs", "ban", "$2"), "sender": "@mod:hs", "content": {"membership": "ban", "reason": "spam"}}
    ban["content"]["redact_events"] = True
    events = [kick, ban, _member("@c:hs", "leave", "$3", unsigned=joined), _member("@d:hs", "invite", "$4")]
    cache = StateCache()
    cache.replace(ROOM, [CREATE, *events])
    cache.replace(other, [CREATE, *({**e, "event_id": f"{e['event_id']}-other"} for e in events)])
    cache.replace(RoomID("!space:hs"), [space, *events])
    here, there, full = cache.get(ROOM), cache.get(other), cache.get(RoomID("!space:hs"))
    assert here.members["@a:hs"] == MemberState(Membership.LEAVE, sender=UserID("@mod:hs"), was_joined=True)
    assert here.members["@b:hs"] == MemberState(
        Membership.BAN, sender=UserID("@mod:hs"), reason="spam", redact_events=True
    ), "a ban keeps its reason and redact_events: an upgrade's copy and a carried ban read them"
    assert here.members["@d:hs"] == MemberState(Membership.INVITE, sender=UserID("@d:hs"))
    for user_id in ("@a:hs", "@b:hs", "@c:hs", "@d:hs"):
        assert here.members[user_id] is there.members[user_id], "one object for equal entries, in every room"
        assert (
            here.member_tag(UserID(user_id))
            == there.member_tag(UserID(user_id))
            == canonical_tag(here.members[user_id])
        )
    assert full.members["@a:hs"].event_id == "$1" and full.members["@a:hs"].replaces == "$0", "a Space keeps all"
    assert full.members["@a:hs"].ts == 5 and full.member_tag(UserID("@a:hs")) == "$1"


def test_a_parked_action_fingerprint_follows_what_decisions_read_of_other_memberships():
    ban = Action(ActionKind.BAN, ROOM, UserID("@a:hs"))

    def fp(event_id: str, sender: str = "@a:hs", prev: str = "join") -> str:
        cache = StateCache()
        leave = {**_member("@a:hs", "leave", event_id, unsigned={"prev_content": {"membership": prev}})}
        cache.replace(ROOM, [CREATE, {**leave, "sender": sender}])
        return fingerprint(ban, cache.get(ROOM))

    assert fp("$1") != fp("$2", sender="@mod:hs"), "left or kicked: a new fingerprint"
    assert fp("$1") != fp("$3", prev="invite"), "a departure or a declined invite: a new fingerprint"
    assert fp("$1") == fp("$4"), "a leave alike to the last (after a rejoin) reads the same: no new plan"


def test_a_ban_carried_over_an_upgrade_plans_the_same_from_compact_rooms():
    """The homeserver's copy of the bot's ban is told by its sender and reason, read from compact rooms."""
    old, new = RoomID("!old:hs"), RoomID("!new:hs")
    space = [
        {**CREATE, "content": {"room_version": "10", "type": "m.space"}},
        {"type": "m.space.child", "state_key": old, "sender": BOT, "content": {"via": ["hs"]}},
        {**_member("@u:hs", "ban", "$s"), "sender": BOT},
    ]
    bot_ban = {**_member("@u:hs", "ban", "$b"), "sender": BOT, "content": {"membership": "ban", "reason": "spam"}}
    levels = {"type": "m.room.power_levels", "state_key": "", "sender": BOT, "content": {"users": {BOT: 100}}}
    parent = {"type": "m.space.parent", "state_key": SPACE, "sender": BOT, "content": {"via": ["hs"]}}
    old_room = [CREATE, levels, parent, _member(BOT, "join", "$j"), bot_ban]
    old_room.append({"type": "m.room.tombstone", "state_key": "", "sender": BOT, "content": {"replacement_room": new}})
    create = {**CREATE, "sender": "@owner:hs", "content": {"room_version": "10", "predecessor": {"room_id": old}}}
    placed = frozenset({PlacedBan(old, UserID("@u:hs"), "space_ban")})
    carried = []
    for reason in ("spam", "another"):
        copy = {**bot_ban, "event_id": "$c", "sender": "@owner:hs", "content": {"membership": "ban", "reason": reason}}
        cache, reference = StateCache(), RawStateCache()
        for room_id, events in (
            (SPACE, space),
            (old, old_room),
            (new, [create, levels, _member(BOT, "join", "$k"), copy]),
        ):
            cache.replace(room_id, events)
            reference.replace(room_id, events)
        rooms = {r: cache.get(r) for r in (SPACE, old, new)}
        got = plan(Snapshot(rooms=rooms, placed_bans=placed), POLICY)
        assert got == plan(Snapshot(rooms={r: reference.get(r) for r in rooms}, placed_bans=placed), POLICY)
        carried.append([(a.room_id, a.user_id) for a in got.actions if a.kind is ActionKind.BAN])
    assert carried == [[(new, "@u:hs")], []], "the copy (same reason) is banned over, a moderator's ban is not"


def test_one_string_per_user_and_users_no_room_holds_are_dropped(monkeypatch):
    monkeypatch.setattr(state, "PRUNE_USERS_AT", 10)
    cache = StateCache()
    leave = {**_member("@a:hs", "leave", "$2"), "state_key": "".join(["@a", ":hs"])}
    cache.replace(ROOM, [CREATE, _member("@a:hs", "join", "$1")])
    cache.replace(RoomID("!r2:hs"), [CREATE, leave])
    here, there = cache.get(ROOM), cache.get(RoomID("!r2:hs"))
    key = next(iter(there.members))
    assert next(iter(here.members)) is key and there.members[key].sender is key, "one copy of the user id"
    for batch in range(5):  # 150 users come and go, never more than 31 at once
        cache.replace(ROOM, [CREATE, *(_member(f"@u{batch}-{i}:hs", "join", f"$u{i}") for i in range(30))])
    assert len(cache._users) <= 2 * 31, "those gone from every room are dropped once the table doubled"
    assert next(iter(cache.get(RoomID("!r2:hs")).members)) is key
    cache.replace(ROOM, [CREATE, _member("@a:hs", "join", "$1")])
    assert next(iter(cache.get(ROOM).members)) is key, "a user still held keeps their one copy"


def test_memberships_no_room_holds_are_dropped(monkeypatch):
    monkeypatch.setattr(state, "PRUNE_USERS_AT", 10)
    cache = StateCache()
    kept = {**_member("@a:hs", "leave", "$1"), "sender": "@mod:hs"}
    cache.replace(RoomID("!r2:hs"), [CREATE, kept])
    held = cache.get(RoomID("!r2:hs")).members["@a:hs"]
    for batch in range(5):  # 150 distinct leaves come and go, never more than 31 at once
        cache.replace(ROOM, [CREATE, *(_member(f"@u{batch}-{i}:hs", "leave", f"$u{i}") for i in range(30))])
    assert len(cache._states) <= 2 * 31, "those gone from every room are dropped once the table doubled"
    cache.replace(ROOM, [CREATE, {**kept, "event_id": "$2"}])
    assert cache.get(ROOM).members["@a:hs"] is held, "one still held stays the one copy"


def test_a_parked_action_fingerprint_follows_a_compact_join_event():
    kick = Action(ActionKind.KICK, ROOM, UserID("@a:hs"))

    def fp(event_id: str) -> str:
        cache = StateCache()
        cache.replace(ROOM, [CREATE, _member("@a:hs", "join", event_id)])
        return fingerprint(kick, cache.get(ROOM))

    assert fp("$1") == fp("$1") and fp("$1") != fp("$2"), "a new join event (a name change too) re-plans"
    assert fp("$1") != fingerprint(kick, parse_room_state(ROOM, {})), "the member is part of it"
    # the same in every process (no randomized hash()): stored fingerprints stay valid across restarts
    script = (
        "from spacesync.engine.executor import fingerprint\n"
        "from spacesync.matrix.state import StateCache\n"
        "from spacesync.model import Action, ActionKind\n"
        "cache = StateCache()\n"
        f"cache.replace({ROOM!r}, {[CREATE, _member('@a:hs', 'join', '$1')]!r})\n"
        f"print(fingerprint(Action(ActionKind.KICK, {ROOM!r}, '@a:hs'), cache.get({ROOM!r})))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == fp("$1")


def test_gauges_count_rooms_and_member_entries():
    def sample(name: str) -> float | None:
        return REGISTRY.get_sample_value(name)

    cache = StateCache()
    cache.replace(ROOM, [CREATE, _member("@a:hs", "join", "$1"), _member("@b:hs", "ban", "$2")])
    cache.replace(RoomID("!r2:hs"), [CREATE, _member("@a:hs", "join", "$3")])
    assert (sample("spacesync_state_rooms"), sample("spacesync_state_member_entries")) == (2, 3)
    cache.update(ROOM, [_member("@c:hs", "invite", "$4"), _member("@a:hs", "weird", "$5")])
    assert sample("spacesync_state_member_entries") == 3, "one more invite, one membership no longer readable"
    cache.forget(ROOM)
    assert (sample("spacesync_state_rooms"), sample("spacesync_state_member_entries")) == (1, 1)


MODERATORS = ["@mod1:hs", "@mod2:hs", "@c:hs"]


def _departed(user: str, n: int, rnd: random.Random) -> dict[str, Any]:
    """A past member: most left, some were kicked or banned (by a moderator, with a reason), a few invited."""
    event_id, kind = f"${rnd.getrandbits(172):043x}", rnd.random()
    unsigned = {"prev_content": {"membership": "join"}, "replaces_state": f"${rnd.getrandbits(172):043x}"}
    if kind < 0.8:
        return _member(user, "leave", event_id, unsigned=unsigned)
    event = _member(user, "leave" if kind < 0.88 else "ban" if kind < 0.94 else "invite", event_id)
    event["sender"] = rnd.choice(MODERATORS)
    if kind < 0.94:
        event["content"]["reason"] = rnd.choice(["spam", "abuse", "banned in the Space"])
        event["unsigned"] = unsigned
    return event


def _community(
    rooms: int, members: int, users: int, departed: float = 0.0
) -> Iterable[tuple[RoomID, list[dict[str, Any]]]]:
    rnd = random.Random(7)
    for i in range(rooms):
        events = [
            {**CREATE, "event_id": f"$create{i}", "origin_server_ts": 1},
            {"type": "m.room.power_levels", "state_key": "", "sender": "@c:hs", "content": {"users": {"@c:hs": 100}}},
        ]
        for n in rnd.sample(range(users), members):
            user = f"@user{n}:server{n % 37}.example.org"
            if rnd.random() < departed:
                event = _departed(user, n, rnd)
            else:
                event = _member(user, "join", f"${rnd.getrandbits(172):043x}")
                event["content"]["displayname"] = f"User {n}"
            event["origin_server_ts"] = 1700000000000 + n
            event["room_id"] = f"!r{i}:hs"
            events.append(event)
        yield RoomID(f"!r{i}:hs"), events


@pytest.mark.parametrize("departed", [0.0, 0.5])
def test_bytes_per_member_entry_stay_small(departed):
    """50 rooms of 400 members among 2,000 users, all joined or half of them past members (left, kicked, banned,
    invited): the cache holds each membership in well under 150 bytes (keeping every raw event took about
    1,100)."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        cache = StateCache()
        for room_id, events in _community(50, 400, 2000, departed):
            cache.replace(room_id, events)
        del events
        views = [cache.get(r) for r in cache.rooms()]
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert len(views) == 50 and cache.member_entries == 50 * 400
    past = sum(1 for view in views for s in view.members.values() if s.membership is not Membership.JOIN)
    assert abs(past - departed * 50 * 400) < 1000
    per_entry = used / cache.member_entries
    assert per_entry < 150, f"{per_entry:.0f} bytes per member entry"
