"""Join-rule audit and repair, room upgrades and invite sync."""

from __future__ import annotations

import attrs

from spacesync.core.lockdown import narrows
from spacesync.core.planner import plan
from spacesync.model import ActionKind, Lockdown, Policy, SpacePolicy

from .helpers import (
    BAN,
    BOT,
    INVITE,
    JOIN,
    LEAVE,
    actions_of,
    apply_plan,
    codes,
    kinds,
    pl_content,
    rid,
    room,
    snapshot,
    space,
    uid,
)


def policy(*roots, **kw) -> Policy:
    spaces = tuple(r if isinstance(r, SpacePolicy) else SpacePolicy(rid(r)) for r in roots)
    return Policy(bot=BOT, spaces=spaces, **kw)


ENFORCE = SpacePolicy(rid("root"), enforce_join_rules=True)
ENFORCE_INVITE = SpacePolicy(rid("root"), enforce_join_rules=True, restrict_invite_rooms=True)


def managed_child(name, *, join_rule="invite", **kw):
    """A child that opted in through its m.space.parent (root lists it back)."""
    return room(name, join_rule=join_rule, parents=["root"], **kw)


def jr(p):
    return {a.room_id: a for a in actions_of(p, ActionKind.SET_JOIN_RULES)}


def test_audit_only_without_enforce():
    snap = snapshot(
        space("root", children=["a", "b", "c"]),
        managed_child("a"),
        managed_child("b", join_rule="public"),
        managed_child("c", join_rule="knock"),
    )
    p = plan(snap, policy("root"))
    assert p.actions == ()
    assert {(rid(n), "not_restricted") for n in "abc"} <= codes(p)


def test_enforce_restricts_to_the_parent_spaces():
    snap = snapshot(
        space("root", children=["a", "b", "c", "sub"]),
        space("sub", children=["b"], parents=["root"]),
        managed_child("a"),
        managed_child("b", join_rule="public"),
        managed_child("c", join_rule="knock"),
    )
    p = plan(snap, policy(ENFORCE_INVITE))
    actions = jr(p)
    assert actions[rid("a")].content == {
        "join_rule": "restricted",
        "allow": [{"type": "m.room_membership", "room_id": rid("root")}],
    }
    assert actions[rid("b")].content["join_rule"] == "restricted"
    # b opted into root only: sub lists it, but gains no say over who may join (confused deputy).
    assert [e["room_id"] for e in actions[rid("b")].content["allow"]] == [rid("root")]
    assert actions[rid("c")].content["join_rule"] == "knock_restricted"
    assert all(a.space_id == rid("root") and a.cause == "join_rules" for a in actions.values())
    assert rid("sub") in actions  # the sub-Space itself is restricted to its parent
    again = plan(apply_plan(snap, p), policy(ENFORCE_INVITE))
    assert again.actions == ()


def test_enforce_alone_never_opens_an_invite_room():
    snap = snapshot(
        space("root", children=["a", "b", "c"]),
        managed_child("a"),
        managed_child("b", join_rule="public"),
        managed_child("c", join_rule="knock"),
    )
    p = plan(snap, policy(ENFORCE))
    actions = jr(p)
    assert rid("a") not in actions
    assert actions[rid("b")].content["join_rule"] == "restricted"
    assert actions[rid("c")].content["join_rule"] == "knock_restricted"
    kept = [f for f in p.findings if f.room_id == rid("a")]
    assert [f.code for f in kept] == ["invite_kept"]
    assert "restrict_invite_rooms: true" in kept[0].message
    # Without enforce the setting changes nothing: invite rooms are reported as before.
    audit = plan(snap, policy(SpacePolicy(rid("root"), restrict_invite_rooms=True)))
    assert audit.actions == () and (rid("a"), "not_restricted") in codes(audit)


def test_invite_room_opened_only_when_every_enforcing_space_asks():
    snap = snapshot(
        space("r1", children=["x"]),
        space("r2", children=["x"]),
        room("x", join_rule="invite", parents=["r1", "r2"]),
    )
    both = policy(
        SpacePolicy(rid("r1"), enforce_join_rules=True, restrict_invite_rooms=True),
        SpacePolicy(rid("r2"), enforce_join_rules=True, restrict_invite_rooms=True),
    )
    assert jr(plan(snap, both))[rid("x")].content["join_rule"] == "restricted"
    one = policy(
        SpacePolicy(rid("r1"), enforce_join_rules=True, restrict_invite_rooms=True),
        SpacePolicy(rid("r2"), enforce_join_rules=True),
    )
    p = plan(snap, one)
    assert not jr(p) and (rid("x"), "invite_kept") in codes(p)


def test_missing_parent_is_added_and_existing_entries_kept():
    snap = snapshot(
        space("root", children=["x", "other"]),
        space("other", children=["x"], parents=["root"]),
        room("x", join_rule="restricted", allow=["lobby"], parents=["root"]),
        room("lobby"),
    )
    p = plan(snap, policy(ENFORCE))
    x = jr(p)[rid("x")]
    # x chose root (m.space.parent); "other" merely lists it and is not added.
    assert [e["room_id"] for e in x.content["allow"]] == [rid("lobby"), rid("root")]
    assert x.content["join_rule"] == "restricted"
    assert (rid("x"), "allow_missing") in codes(p)
    # nothing missing: nothing to do
    done = snapshot(space("root", children=["x"]), room("x", join_rule="restricted", allow=["root", "lobby"]))
    assert plan(done, policy(ENFORCE)).actions == ()


def test_old_room_versions_get_upgrade_advice_and_no_action():
    snap = snapshot(
        space("root", children=["v7", "v9knock", "v8"]),
        managed_child("v7", version="7"),
        managed_child("v9knock", version="9", join_rule="knock"),
        room("v8", version="8", join_rule="restricted", allow=["root"]),
    )
    p = plan(snap, policy(ENFORCE))
    assert not jr(p)
    assert {(rid("v7"), "version"), (rid("v9knock"), "version"), (rid("v8"), "version")} <= codes(p)
    messages = {f.room_id: f.message for f in p.findings if f.code == "version"}
    assert "upgrade to 10" in messages[rid("v7")]


def test_version_9_restricts_invite_rooms():
    snap = snapshot(space("root", children=["x"]), managed_child("x", version="9"))
    assert jr(plan(snap, policy(ENFORCE_INVITE)))[rid("x")].content["join_rule"] == "restricted"


def test_unknown_version_is_left_alone():
    snap = snapshot(space("root", children=["x"]), managed_child("x", version="com.example.x"))
    p = plan(snap, policy(ENFORCE))
    assert p.actions == ()
    assert (rid("x"), "unknown_version") in codes(p)


def test_no_power_to_change_join_rules():
    snap = snapshot(space("root", children=["x"]), managed_child("x", pl=pl_content(bot_level=40)))
    p = plan(snap, policy(ENFORCE_INVITE))
    assert not jr(p)
    assert (rid("x"), "no_power") in codes(p)


def test_not_opted_in_room_is_not_restricted():
    snap = snapshot(space("root", children=["x"]), room("x", join_rule="public"))
    assert plan(snap, policy(ENFORCE)).actions == ()


def test_tombstoned_room_is_re_pointed_in_its_parent_spaces():
    snap = snapshot(
        space("root", children=["old", "sub"]),
        space("sub", children=["old", "new"], parents=["root"]),
        room("old", join_rule="restricted", allow=["root"], tombstone="new", members={"u": JOIN}),
        room("new", join_rule="restricted", allow=["root"], predecessor="old"),
    )
    p = plan(snap, policy("root"))
    # Re-pointed where the room answers to (root); sub merely listed it and is left alone.
    assert sorted((a.room_id, a.state_key, bool(a.content)) for a in p.actions) == [
        (rid("root"), rid("new"), True),
        (rid("root"), rid("old"), False),
    ]
    assert p.upgrades == ((rid("old"), rid("new")),)
    assert all(a.kind is ActionKind.SET_SPACE_CHILD for a in p.actions)
    assert (rid("old"), "upgraded") in codes(p)
    add = next(a for a in p.actions if a.content)
    assert add.content == {"via": ["hs.test"]}
    after = apply_plan(snap, p)
    assert plan(after, policy("root")).actions == ()


def test_tombstoned_extra_room_is_not_removed_again_and_again():
    snap = snapshot(space("root"), room("old", tombstone="!new"), room("!new", predecessor="old"))
    pol = policy(SpacePolicy(rid("root"), extra_rooms=frozenset({rid("old")})))
    p = plan(snap, pol)
    # the extra room has no m.space.child to remove; the replacement is added once (v12 id: bot's server)
    assert [(a.room_id, a.state_key, a.content) for a in p.actions] == [(rid("root"), "!new", {"via": ["hs.test"]})]
    assert plan(apply_plan(snap, p), pol).actions == ()


def test_a_tombstone_is_followed_only_when_the_replacement_names_the_room():
    """A room admin may send a tombstone naming any room: unverified, the Space is not re-pointed."""
    for replacement in (None, room("new", predecessor="elsewhere")):
        rooms = [space("root", children=["old"]), room("old", join_rule="restricted", allow=["root"], tombstone="new")]
        snap = snapshot(*rooms, *([replacement] if replacement else []))
        p = plan(snap, policy("root"))
        assert p.actions == () and p.upgrades == ()
        assert (rid("old"), "upgrade_unverified") in codes(p)


def test_invite_members_to_invite_only_rooms():
    pol = policy(SpacePolicy(rid("root"), invite_members=True), admins=frozenset({uid("adm")}))
    snap = snapshot(
        space(
            "root",
            children=["x", "pub"],
            members={"a": JOIN, "b": JOIN, "c": JOIN, "d": JOIN, "e": LEAVE, "adm": JOIN, "mod": JOIN},
        ),
        managed_child("x", members={"b": JOIN, "c": INVITE, "d": BAN}, levels={"mod": 100}),
        managed_child("pub", join_rule="public"),
    )
    p = plan(snap, pol)
    assert kinds(p) == [("invite", rid("x"), uid("a"))]
    assert p.actions[0].cause == "invite_members"
    assert plan(apply_plan(snap, p), pol).actions == ()


def test_repair_adds_only_managed_parents_never_other_roots():
    # x opted in to r1 only (restricted to it); r2's walk reaches x through a Space that did not opt in.
    # Adding r2 to x's allow list would widen who may join x on r2's say-so, and would entitle again
    # the user this very plan evicts.
    snap = snapshot(
        space("r1", children=["s"], members={"u": LEAVE}),
        space("r2", children=["t"], members={"u": JOIN}),
        space("s", children=["x"]),
        space("t", children=["x"]),
        room("x", join_rule="restricted", allow=["r1"], members={"u": JOIN}),
    )
    pol = policy(SpacePolicy(rid("r1"), enforce_join_rules=True), SpacePolicy(rid("r2"), enforce_join_rules=True))
    p = plan(snap, pol)
    assert kinds(p) == [("kick", rid("x"), uid("u"))]
    assert plan(apply_plan(snap, p), pol).actions == ()


def test_a_locked_down_room_keeps_its_lockdown_and_its_space():
    previous = {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": rid("root")}]}
    locked = room("a", join_rule="invite", members={"u": JOIN})
    base = snapshot(space("root", children=["a"], members={"u": LEAVE}), locked)
    snap = attrs.evolve(base, lockdowns={rid("a"): Lockdown(rid("a"), rid("root"), previous, "invite")})
    p = plan(snap, policy(ENFORCE_INVITE))
    assert jr(p) == {}, "enforce undid the lockdown"
    assert rid("a") in p.managed and kinds(p) == [("kick", rid("a"), uid("u"))]
    assert (rid("a"), "locked_down") in codes(p)
    # Changed by hand since (no longer the rule the lockdown wrote): planned as any other room.
    opened = attrs.evolve(snap, rooms={**snap.rooms, rid("a"): attrs.evolve(locked, join_rule="public")})
    assert (rid("a"), "locked_down") not in codes(plan(opened, policy(ENFORCE_INVITE)))


def test_a_lockdown_only_narrows():
    assert narrows("public", "knock") and narrows("restricted", "invite") and narrows("knock", "invite")
    assert narrows("knock_restricted", "knock") and narrows(None, "invite")
    assert not narrows("invite", "knock"), "knock would open an invite-only room to knock requests"
    assert not narrows("private", "knock") and not narrows("knock", "knock") and not narrows("invite", "invite")
