"""Policy lists in the pure planner: which rules count, whom they ban in the Space, what lifts those bans, and how
server rules reach the server ACL mirroring."""

from __future__ import annotations

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from spacesync.core.planner import plan
from spacesync.core.policylists import matches, read_list
from spacesync.matrix.state import parse_room_state
from spacesync.model import ActionKind, PlacedBan, Policy, PolicyRule, RoomState, RuleKind, SpacePolicy

from .helpers import BAN, BOT, JOIN, apply_plan, codes, kinds, rid, room, snapshot, space, uid

MOD = "mod"


def rule(
    entity: str, *, kind: RuleKind = RuleKind.USER, rec: str = "m.ban", sender: str = MOD, key: str = ""
) -> PolicyRule:
    return PolicyRule(kind, f"m.policy.rule.{kind.value}", key or entity, entity, rec, uid(sender), "spam")


def policy_list(*rules: PolicyRule, name: str = "list", levels: dict | None = None) -> RoomState:
    """A list room where `mod` (level 50, enough for state events) sends rules; others are at 0."""
    return attrs.evolve(room(name, levels={MOD: 50, **(levels or {})}), policy_rules=tuple(rules))


def community(*rules: PolicyRule, members: dict | None = None, lists: tuple[str, ...] = ("list",), **kw) -> tuple:
    members = {"spammer": JOIN, "spam2": JOIN, "alice": JOIN} if members is None else members
    snap = snapshot(
        space("root", children=["x"], members=members),
        room("x", join_rule="restricted", allow=["root"], members=members),
        policy_list(*rules),
        **kw,
    )
    pol = Policy(bot=BOT, spaces=(SpacePolicy(rid("root"), policy_lists=tuple(rid(n) for n in lists)),))
    return snap, pol


def bans(p) -> set[tuple[str, str]]:
    return {(a.room_id, a.user_id) for a in p.actions if a.kind is ActionKind.BAN}


def test_a_literal_rule_bans_in_the_space_and_so_in_its_rooms_even_a_never_member():
    snap, pol = community(rule("@spammer:hs.test"), rule("@stranger:elsewhere.test"))
    p = plan(snap, pol)
    assert bans(p) == {
        (rid("root"), uid("spammer")),
        (rid("x"), uid("spammer")),
        (rid("root"), "@stranger:elsewhere.test"),
        (rid("x"), "@stranger:elsewhere.test"),
    }
    space_ban = next(a for a in p.actions if a.room_id == rid("root") and a.user_id == uid("spammer"))
    assert space_ban.cause == "policy_list" and space_ban.reason == "spam"
    after = apply_plan(snap, p)
    assert plan(after, pol).actions == ()


def test_an_entity_that_is_no_user_id_bans_nobody():
    snap, pol = community(rule("spammer"), rule("@spam mer:hs.test"), rule("@:hs.test"))
    assert bans(plan(snap, pol)) == set()


def test_a_glob_bans_only_users_seen_in_the_spaces_rooms():
    snap, pol = community(rule("@spam*:hs.test"), rule("@*:evil.test"))
    assert bans(plan(snap, pol)) == {(r, uid(u)) for r in (rid("root"), rid("x")) for u in ("spammer", "spam2")}


def test_only_rules_from_senders_with_the_power_count():
    snap, pol = community(rule("@spammer:hs.test", sender="nobody"))
    p = plan(snap, pol)
    assert bans(p) == set()
    assert (rid("list"), "policy_rules_ignored") in codes(p)
    assert read_list(snap.rooms[rid("list")]).unpowered == 1


def test_room_rules_and_unknown_recommendations_are_ignored_and_reported():
    snap, pol = community(rule("!r:hs.test", kind=RuleKind.ROOM), rule("@spammer:hs.test", rec="m.mute"))
    p = plan(snap, pol)
    assert bans(p) == set()
    finding = next(f for f in p.findings if f.code == "policy_rules_ignored")
    assert "1 room rule(s)" in finding.message and "other than m.ban" in finding.message


def test_removing_the_rule_lifts_only_the_bans_placed_for_it():
    snap, pol = community(rule("@spammer:hs.test"))
    banned = apply_plan(snap, plan(snap, pol))
    # A moderator's own Space ban of alice stays whatever the list says.
    space_room = banned.rooms[rid("root")]
    members = {**space_room.members, uid("alice"): attrs.evolve(space_room.members[uid("alice")], membership=BAN)}
    banned = attrs.evolve(banned, rooms={**banned.rooms, rid("root"): attrs.evolve(space_room, members=members)})
    emptied = attrs.evolve(banned, rooms={**banned.rooms, rid("list"): policy_list()})
    p = plan(emptied, pol)
    assert {(a.room_id, a.user_id) for a in p.actions if a.kind is ActionKind.UNBAN} == {
        (rid("root"), uid("spammer")),
        (rid("x"), uid("spammer")),
    }


def test_an_unreadable_list_neither_bans_nor_lifts():
    snap, pol = community(rule("@spammer:hs.test"))
    banned = apply_plan(snap, plan(snap, pol))
    hidden = attrs.evolve(banned, unreachable={rid("list"): "502"}, rooms={**banned.rooms, rid("list"): policy_list()})
    assert [a for a in plan(hidden, pol).actions if a.kind is ActionKind.UNBAN] == []
    fresh, _ = community(rule("@spammer:hs.test"))
    assert bans(plan(attrs.evolve(fresh, unreachable={rid("list"): "502"}), pol)) == set()


def test_protected_users_are_never_banned_by_a_list():
    snap, pol = community(rule("@*:hs.test"))
    pol = attrs.evolve(pol, admins=frozenset({uid("alice")}))
    banned_users = {u for _, u in bans(plan(snap, pol))}
    assert uid("alice") not in banned_users and BOT not in banned_users and uid("spammer") in banned_users


def test_server_rules_reach_the_acl_only_with_server_acl_sync_and_its_safety_rules():
    rules = (
        rule("evil.test", kind=RuleKind.SERVER),
        rule("hs.test", kind=RuleKind.SERVER),
        rule("*", kind=RuleKind.SERVER),
    )
    snap, pol = community(*rules)
    assert [a for a in plan(snap, pol).actions if a.kind is ActionKind.SET_SERVER_ACL] == []
    pol = Policy(bot=BOT, spaces=(attrs.evolve(pol.spaces[0], server_acl=True),))
    p = plan(snap, pol)
    (acl,) = [a for a in p.actions if a.kind is ActionKind.SET_SERVER_ACL]
    assert acl.room_id == rid("x") and acl.content["deny"] == ["evil.test"]  # never the bot's server, nor all
    assert {f.code for f in p.findings if f.room_id == rid("x")} >= {"acl_refused"}


def test_rules_are_read_from_state_under_every_name_and_removed_rules_are_gone():
    state = {
        ("m.room.create", ""): {"type": "m.room.create", "sender": "@c:x", "content": {"room_version": "10"}},
        ("m.policy.rule.user", "a"): {"sender": "@c:x", "content": {"entity": "@a:x", "recommendation": "m.ban"}},
        ("m.room.rule.server", "b"): {"sender": "@c:x", "content": {"entity": "b.x", "recommendation": "m.ban"}},
        ("org.matrix.mjolnir.rule.user", "c"): {
            "sender": "@c:x",
            "content": {"entity": "@c:y", "recommendation": "m.ban"},
        },
        ("m.policy.rule.user", "gone"): {"sender": "@c:x", "content": {}},
        ("m.policy.rule.user", "bad"): {"sender": "@c:x", "content": {"entity": 5, "recommendation": "m.ban"}},
    }
    room_state = parse_room_state(rid("list"), state)
    assert sorted((r.kind.value, r.entity) for r in room_state.policy_rules) == [
        ("server", "b.x"),
        ("user", "@a:x"),
        ("user", "@c:y"),
    ]


@settings(max_examples=60, deadline=None)
@given(
    entity=st.text(alphabet="@*?abx:.[]", min_size=1, max_size=10),
    users=st.lists(st.sampled_from(["@a:x", "@b:x", "@ab:x", "@a:y", "@[a]:x"]), max_size=4, unique=True),
)
def test_a_list_never_bans_anyone_unseen_by_pattern_or_protected(entity, users):
    members = {u: JOIN for u in users}
    snap, pol = community(rule(entity), members=members)
    pol = attrs.evolve(pol, admins=frozenset({uid("admin")}))
    banned = {u for _, u in bans(plan(snap, pol))}
    literal = "*" not in entity and "?" not in entity
    for user in banned:
        assert user == entity if literal else (user in members and matches(entity, user))
    assert BOT not in banned and uid("admin") not in banned


def test_without_lists_configured_nothing_changes():
    snap, _ = community(rule("@spammer:hs.test"))
    assert kinds(plan(snap, Policy(bot=BOT, spaces=(SpacePolicy(rid("root")),)))) == []


def test_a_space_that_stops_following_its_list_lifts_the_lists_bans():
    snap, pol = community(rule("@spammer:hs.test"))
    banned = apply_plan(snap, plan(snap, pol))
    assert PlacedBan(rid("root"), uid("spammer"), "policy_list") in banned.placed_bans
    p = plan(banned, Policy(bot=BOT, spaces=(SpacePolicy(rid("root")),)))
    assert (ActionKind.UNBAN.value, rid("root"), uid("spammer")) in kinds(p)


def test_one_unreadable_list_keeps_every_ban_but_the_others_still_ban():
    snap, pol = community(rule("@spammer:hs.test"), lists=("list", "other"))
    snap = attrs.evolve(snap, unreachable={rid("other"): "not joined"})
    assert (rid("root"), uid("spammer")) in bans(plan(snap, pol))
    banned = apply_plan(snap, plan(snap, pol))
    emptied = attrs.evolve(banned, rooms={**banned.rooms, rid("list"): policy_list()})
    assert [a for a in plan(emptied, pol).actions if a.kind is ActionKind.UNBAN] == []


def test_an_unreadable_list_drops_none_of_its_servers_from_the_acls():
    snap, pol = community(rule("evil.test", kind=RuleKind.SERVER))
    pol = Policy(bot=BOT, spaces=(attrs.evolve(pol.spaces[0], server_acl=True),))
    room = snap.rooms[rid("x")]
    after = attrs.evolve(  # as the ACL write from the list left it
        snap,
        rooms={**snap.rooms, rid("x"): attrs.evolve(room, server_acl={"allow": ["*"], "deny": ["evil.test"]})},
        owned_acl={rid("x"): frozenset({"evil.test"})},
    )
    assert [a for a in plan(after, pol).actions if a.kind is ActionKind.SET_SERVER_ACL] == []
    hidden = attrs.evolve(after, unreachable={rid("list"): "502"})
    assert [a for a in plan(hidden, pol).actions if a.kind is ActionKind.SET_SERVER_ACL] == []
    emptied = attrs.evolve(after, rooms={**after.rooms, rid("list"): policy_list()})
    (removal,) = [a for a in plan(emptied, pol).actions if a.kind is ActionKind.SET_SERVER_ACL]
    assert removal.content["deny"] == []
