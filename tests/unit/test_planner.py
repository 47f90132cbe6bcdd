"""Membership planning: evictions, their cascade, Space bans carried down, unbans, grace and protections."""

from __future__ import annotations

import attrs

from spacesync.core.graph import build_graph
from spacesync.core.planner import plan
from spacesync.model import ActionKind, OnLeave, PlacedBan, Policy, SpacePolicy

from .helpers import (
    BAN,
    BOT,
    JOIN,
    LEAVE,
    actions_of,
    apply_plan,
    codes,
    kinds,
    member,
    rid,
    room,
    snapshot,
    space,
    uid,
)


def policy(*roots, **kw) -> Policy:
    spaces = tuple(r if isinstance(r, SpacePolicy) else SpacePolicy(rid(r)) for r in roots)
    return Policy(bot=BOT, spaces=spaces, **kw)


def child(name: str, parent: str = "root", **kw):
    kw.setdefault("join_rule", "restricted")
    kw.setdefault("allow", [parent])
    return room(name, **kw)


def assert_idempotent(snap, pol, first=None):
    first = first or plan(snap, pol)
    again = plan(apply_plan(snap, first), pol)
    assert again.actions == (), kinds(again)


# --- on_leave -------------------------------------------------------------------------------


def test_user_who_left_the_space_is_kicked():
    snap = snapshot(
        space("root", children=["x"], members={"gone": LEAVE, "stay": JOIN, "kicked": member(LEAVE, sender="mod")}),
        child("x", members={"gone": JOIN, "stay": JOIN, "kicked": JOIN, "never": JOIN}),
    )
    p = plan(snap, policy("root"))
    assert kinds(p) == [("kick", rid("x"), uid("gone")), ("kick", rid("x"), uid("kicked"))]
    gone, kicked = p.actions
    assert gone.cause == "on_leave" and gone.space_id == rid("root")
    assert "left Space" in gone.reason
    assert "kicked from Space" in kicked.reason
    assert_idempotent(snap, policy("root"), p)


def test_reasons_name_the_space_by_its_name_through_the_template():
    named = attrs.evolve(space("root", children=["x"], members={"gone": LEAVE}), name="Demo Community")
    snap = snapshot(named, child("x", members={"gone": JOIN}))
    assert plan(snap, policy("root")).actions[0].reason == "left Demo Community"
    custom = Policy(bot=BOT, spaces=(SpacePolicy(rid("root")),), reason_template="{event} {space} [{space_id}]")
    assert plan(snap, custom).actions[0].reason == f"left Demo Community [{rid('root')}]"
    banned = attrs.evolve(named, members={"gone": member(BAN, sender="mod")})
    assert plan(snapshot(banned, child("x", members={"gone": JOIN})), policy("root")).actions[0].reason == (
        "banned in Demo Community"
    )


def test_user_who_never_was_in_the_space_is_left_alone():
    snap = snapshot(space("root", children=["x"]), child("x", members={"never": JOIN, "invited": JOIN}))
    assert plan(snap, policy("root")).actions == ()


def test_on_leave_ban_and_none():
    snap = snapshot(space("root", children=["x"], members={"gone": LEAVE}), child("x", members={"gone": JOIN}))
    banned = plan(snap, policy(SpacePolicy(rid("root"), on_leave=OnLeave.BAN)))
    assert kinds(banned) == [("ban", rid("x"), uid("gone"))]
    assert banned.actions[0].cause == "on_leave"
    assert plan(snap, policy(SpacePolicy(rid("root"), on_leave=OnLeave.NONE))).actions == ()


def test_sub_space_eviction_cascades_in_one_plan():
    snap = snapshot(
        space("root", children=["sub"], members={"u": LEAVE}),
        space("sub", children=["x"], parents=["root"], members={"u": JOIN}),
        child("x", parent="sub", members={"u": JOIN}),
        child("y", parent="sub", members={"u": JOIN}),  # not listed by sub: not reached
    )
    p = plan(snap, policy("root"))
    assert kinds(p) == [("kick", rid("sub"), uid("u")), ("kick", rid("x"), uid("u"))]
    assert "removed from Space" in p.actions[1].reason
    assert_idempotent(snap, policy("root"), p)


def test_room_in_two_spaces_is_kept_while_one_entitles():
    def snap(r2_membership):
        return snapshot(
            space("r1", children=["x"], members={"u": LEAVE}),
            space("r2", children=["x"], members={"u": r2_membership}),
            room("x", join_rule="restricted", allow=["r1", "r2"], members={"u": JOIN}),
        )

    both = policy("r1", "r2")
    assert plan(snap(JOIN), both).actions == ()
    assert kinds(plan(snap(LEAVE), both)) == [("kick", rid("x"), uid("u"))]


def test_room_in_two_roots_takes_the_mildest_on_leave():
    snap = snapshot(
        space("r1", children=["x"], members={"u": LEAVE}),
        space("r2", children=["x"], members={"u": LEAVE}),
        room("x", join_rule="restricted", allow=["r1", "r2"], members={"u": JOIN}),
    )
    ban, kick, none = (
        SpacePolicy(rid(r), on_leave=o) for r, o in (("r1", OnLeave.BAN), ("r2", OnLeave.KICK), ("r2", OnLeave.NONE))
    )
    assert kinds(plan(snap, policy(ban, kick))) == [("kick", rid("x"), uid("u"))]
    assert plan(snap, policy(ban, none)).actions == ()


def test_allow_list_room_entitles():
    snap = snapshot(
        space("root", children=["x"], members={"u": LEAVE}),
        room("lobby", members={"u": JOIN}),
        room("x", join_rule="restricted", allow=["root", "lobby"], members={"u": JOIN}),
    )
    assert plan(snap, policy("root")).actions == ()


def test_allow_list_is_ignored_once_the_room_is_no_longer_restricted():
    snap = snapshot(
        space("root", children=["x"], members={"u": LEAVE}),
        room("lobby", members={"u": JOIN}),
        room("x", join_rule="invite", allow=["lobby"], parents=["root"], members={"u": JOIN}),
    )
    assert kinds(plan(snap, policy("root"))) == [("kick", rid("x"), uid("u"))]


def test_unreadable_entitler_means_entitled_with_a_finding():
    snap = snapshot(
        space("root", children=["x"], members={"u": LEAVE}),
        room("x", join_rule="restricted", allow=["root", "elsewhere"], members={"u": JOIN}),
    )
    p = plan(snap, policy("root"))
    assert p.actions == ()
    finding = next(f for f in p.findings if f.code == "unchecked_entitlement")
    assert finding.room_id == rid("x") and rid("elsewhere") in finding.message


def test_not_opted_in_child_is_never_touched():
    snap = snapshot(
        space("root", children=["x"], members={"u": LEAVE, "b": BAN}, levels={"mod": 50}),
        room("x", join_rule="invite", members={"u": JOIN}),
    )
    p = plan(snap, policy(SpacePolicy(rid("root"), enforce_join_rules=True, invite_members=True)))
    assert p.actions == ()
    assert (rid("x"), "not_opted_in") in codes(p)
    assert rid("x") not in p.managed


# --- Space bans -----------------------------------------------------------------------------


def test_space_ban_cascades_to_every_managed_descendant():
    snap = snapshot(
        space("root", children=["sub", "a", "stray"], members={"bad": BAN}),
        space("sub", children=["b"], parents=["root"]),
        child("a", members={"bad": JOIN}),
        child("b", parent="sub", members={"bad": BAN}),  # already banned
        child("c", parent="sub"),  # not listed: not reached
        room("stray", members={"bad": JOIN}),  # not opted in
    )
    p = plan(snap, policy("root"))
    assert kinds(p) == [("ban", rid("a"), uid("bad")), ("ban", rid("sub"), uid("bad"))]
    assert {a.cause for a in p.actions} == {"space_ban"}
    assert_idempotent(snap, policy("root"), p)


def test_without_propagate_bans_a_space_ban_still_counts_as_leaving():
    snap = snapshot(
        space("root", children=["a", "b"], members={"bad": BAN}),
        child("a", members={"bad": JOIN}),
        child("b"),
    )
    p = plan(snap, policy(SpacePolicy(rid("root"), propagate_bans=False)))
    assert kinds(p) == [("kick", rid("a"), uid("bad"))]
    assert "banned in Space" in p.actions[0].reason


def test_on_leave_ban_in_a_sub_space_is_carried_down_in_the_same_plan():
    snap = snapshot(
        space("root", children=["sub"], members={"u": LEAVE}),
        space("sub", children=["x"], parents=["root"], members={"u": JOIN}),
        child("x", parent="sub"),  # u was never here
    )
    pol = policy(SpacePolicy(rid("root"), on_leave=OnLeave.BAN))
    p = plan(snap, pol)
    assert ("ban", rid("sub"), uid("u")) in kinds(p)
    assert ("ban", rid("x"), uid("u")) in kinds(p)
    assert_idempotent(snap, pol, p)


# --- unbans ---------------------------------------------------------------------------------


def test_unban_lifts_only_the_bots_own_bans():
    snap = snapshot(
        space("root", children=["a", "b"], members={"u": LEAVE}),
        child("a", members={"u": BAN}),
        child("b", members={"u": BAN}),
        placed_bans=[PlacedBan(rid("a"), uid("u"), "space_ban")],
    )
    p = plan(snap, policy("root"))
    assert kinds(p) == [("unban", rid("a"), uid("u"))]
    assert p.actions[0].cause == "unban"
    assert plan(snap, policy(SpacePolicy(rid("root"), propagate_unbans=False))).actions == ()


def test_space_ban_is_kept_while_an_ancestor_still_bans():
    snap = snapshot(
        space("root", children=["sub"], members={"u": BAN}),
        space("sub", children=["x"], parents=["root"], members={"u": LEAVE}),
        child("x", parent="sub", members={"u": BAN}),
        placed_bans=[PlacedBan(rid("x"), uid("u"), "space_ban")],
    )
    p = plan(snap, policy("root"))
    assert ("unban", rid("x"), uid("u")) not in kinds(p)


def test_unban_cascades_through_sub_spaces_in_one_plan():
    # "!a-sub" sorts before "!z-x"... and the child before its Space: order must not matter.
    snap = snapshot(
        space("root", children=["z-sub"], members={"u": LEAVE}),
        space("z-sub", children=["a-x"], parents=["root"], members={"u": BAN}),
        child("a-x", parent="z-sub", members={"u": BAN}),
        placed_bans=[PlacedBan(rid("z-sub"), uid("u"), "space_ban"), PlacedBan(rid("a-x"), uid("u"), "space_ban")],
    )
    p = plan(snap, policy("root"))
    assert sorted(kinds(p)) == [("unban", rid("a-x"), uid("u")), ("unban", rid("z-sub"), uid("u"))]
    assert_idempotent(snap, policy("root"), p)


def test_on_leave_ban_is_lifted_when_entitled_again():
    snap = snapshot(
        space("root", children=["x"], members={"u": JOIN, "v": LEAVE}),
        child("x", members={"u": BAN, "v": BAN}),
        placed_bans=[PlacedBan(rid("x"), uid("u"), "on_leave"), PlacedBan(rid("x"), uid("v"), "on_leave")],
    )
    pol = policy(SpacePolicy(rid("root"), on_leave=OnLeave.BAN))
    p = plan(snap, pol)
    assert kinds(p) == [("unban", rid("x"), uid("u"))]
    assert p.actions[0].reason == "back in the Space"


def test_on_leave_ban_is_kept_while_a_space_ban_would_place_it_again():
    snap = snapshot(
        space("root", children=["x"], members={"u": BAN}),
        room("lobby", members={"u": JOIN}),
        room("x", join_rule="restricted", allow=["root", "lobby"], members={"u": BAN}),
        placed_bans=[PlacedBan(rid("x"), uid("u"), "on_leave")],
    )
    pol = policy(SpacePolicy(rid("root"), on_leave=OnLeave.BAN))
    p = plan(snap, pol)
    assert p.actions == ()
    assert_idempotent(snap, pol, p)


def test_a_ban_lifted_in_a_sub_space_is_not_carried_down_in_the_same_plan():
    # u is back in root: the bot's on_leave ban in sub lifts, so sub's ban must not reach x.
    snap = snapshot(
        space("root", children=["sub"], members={"u": JOIN}),
        space("sub", children=["x"], parents=["root"], members={"u": BAN}),
        child("x", parent="sub"),
        placed_bans=[PlacedBan(rid("sub"), uid("u"), "on_leave")],
    )
    pol = policy(SpacePolicy(rid("root"), on_leave=OnLeave.BAN))
    p = plan(snap, pol)
    assert kinds(p) == [("unban", rid("sub"), uid("u"))]
    assert_idempotent(snap, pol, p)


def test_a_lift_that_an_eviction_undoes_does_not_happen():
    # u's on_leave ban in x would lift (u is in lobby, on x's allow list) were it not for the
    # eviction from lobby this plan makes (lobby is a managed sub-Space u's Space membership entitles).
    snap = snapshot(
        space("root", children=["lobby", "x"], members={"u": LEAVE}),
        space("lobby", parents=["root"], members={"u": JOIN}),
        room("x", join_rule="restricted", allow=["root", "lobby"], members={"u": BAN}),
        placed_bans=[PlacedBan(rid("x"), uid("u"), "on_leave")],
    )
    pol = policy(SpacePolicy(rid("root"), on_leave=OnLeave.BAN))
    p = plan(snap, pol)
    assert kinds(p) == [("ban", rid("lobby"), uid("u"))]
    assert_idempotent(snap, pol, p)


def test_placed_ban_lifted_by_hand_is_stale():
    snap = snapshot(
        space("root", children=["x"], members={"u": BAN}),
        child("x", members={"u": LEAVE}),
        placed_bans=[PlacedBan(rid("x"), uid("u"), "space_ban")],
    )
    p = plan(snap, policy("root"))
    assert p.stale_bans == (PlacedBan(rid("x"), uid("u"), "space_ban"),)
    # the Space still bans: the ban is placed again, as a new ban of the bot's
    assert kinds(p) == [("ban", rid("x"), uid("u"))]


def test_unban_needs_the_power_and_respects_protection():
    snap = snapshot(
        space("root", children=["x"], members={"u": LEAVE, "adm": LEAVE}),
        child("x", members={"u": BAN, "adm": BAN}, pl={"users": {BOT: 50}, "ban": 50, "kick": 60}),
        placed_bans=[PlacedBan(rid("x"), uid("u"), "space_ban"), PlacedBan(rid("x"), uid("adm"), "space_ban")],
    )
    p = plan(snap, policy("root", admins=frozenset({uid("adm")})))
    assert p.actions == ()  # unbanning needs the kick level too (auth rules)
    assert (rid("x"), "no_power") in codes(p)
    # With the power, its own bans are lifted even for an admin: an exemption never keeps a ban in place.
    powerful = snapshot(
        space("root", children=["x"], members={"u": LEAVE, "adm": LEAVE}),
        child("x", members={"u": BAN, "adm": BAN}),
        placed_bans=[PlacedBan(rid("x"), uid("u"), "space_ban"), PlacedBan(rid("x"), uid("adm"), "space_ban")],
    )
    lifted = plan(powerful, policy("root", admins=frozenset({uid("adm")})))
    assert sorted(kinds(lifted)) == [("unban", rid("x"), uid("adm")), ("unban", rid("x"), uid("u"))]


# --- grace ----------------------------------------------------------------------------------


def test_grace_period_delays_eviction_and_schedules_a_recheck():
    snap = snapshot(
        space(
            "root",
            children=["x"],
            members={
                "recent": member(LEAVE, sender="recent", ts=95_000),
                "old": member(LEAVE, sender="old", ts=10_000),
            },
        ),
        child("x", members={"recent": JOIN, "old": JOIN}),
        now_ms=100_000,
    )
    p = plan(snap, policy(SpacePolicy(rid("root"), grace_period_s=30)))
    assert kinds(p) == [("kick", rid("x"), uid("old"))]
    assert p.recheck_at_ms == 125_000
    later = plan(attrs.evolve(snap, now_ms=125_000), policy(SpacePolicy(rid("root"), grace_period_s=30)))
    assert ("kick", rid("x"), uid("recent")) in kinds(later)
    assert later.recheck_at_ms is None


def test_grace_does_not_delay_the_cascade_of_an_eviction():
    snap = snapshot(
        space("root", children=["sub"], members={"u": member(LEAVE, ts=0)}),
        space("sub", children=["x"], parents=["root"], members={"u": JOIN}),
        child("x", parent="sub", members={"u": JOIN}),
        now_ms=60_000,
    )
    p = plan(snap, policy(SpacePolicy(rid("root"), grace_period_s=30)))
    assert kinds(p) == [("kick", rid("sub"), uid("u")), ("kick", rid("x"), uid("u"))]


# --- protections ----------------------------------------------------------------------------


def test_protected_users_are_never_evicted_or_banned():
    gone = {u: LEAVE for u in ("adm", "ex", "sex", "creator", "extra", "mod", "strmod", "bot")}
    gone["bot"] = LEAVE
    joined = {u: JOIN for u in gone if u != "strmod"}
    snap = snapshot(
        space("root", children=["x", "y"], members=gone | {"banned_adm": BAN}),
        child("x", members=joined, creator="creator", additional_creators=["extra"], version="10", levels={"mod": 100}),
        child(
            "y",
            version="9",
            members={"strmod": JOIN, "banned_adm": JOIN},
            pl={"users": {BOT: "50", uid("strmod"): "50"}, "kick": "50", "ban": "50"},
        ),
    )
    snap = attrs.evolve(
        snap,
        rooms={
            **snap.rooms,
            rid("root"): attrs.evolve(
                snap.rooms[rid("root")], members={**snap.rooms[rid("root")].members, BOT: member(JOIN)}
            ),
        },
    )
    pol = policy(
        SpacePolicy(rid("root"), exempt=frozenset({uid("sex")})),
        admins=frozenset({uid("adm"), uid("banned_adm")}),
        exempt=frozenset({uid("ex")}),
    )
    p = plan(snap, pol)
    assert p.actions == ()
    protected = [f.message for f in p.findings if f.code == "protected"]
    for who in ("adm", "ex", "sex", "creator", "extra", "mod", "strmod", "banned_adm"):
        assert any(m.startswith(uid(who)) for m in protected), who


def test_v12_creators_have_infinite_power():
    snap = snapshot(
        space("root", children=["x"], members={"c": LEAVE, "u": LEAVE}),
        child("x", version="12", creator="c", members={"c": JOIN, "u": JOIN}),
    )
    p = plan(snap, policy("root"))
    assert kinds(p) == [("kick", rid("x"), uid("u"))]
    # the bot as a v12 creator outranks everyone who is not a creator
    snap2 = snapshot(
        space("root", children=["x"], members={"u": LEAVE}),
        child("x", version="12", creator="bot", members={"u": JOIN}, pl={"users": {uid("u"): 100}}),
    )
    assert kinds(plan(snap2, policy("root"))) == [("kick", rid("x"), uid("u"))]


def test_bot_without_kick_power_reports_once():
    snap = snapshot(
        space("root", children=["x"], members={"u": LEAVE, "v": LEAVE}),
        child("x", members={"u": JOIN, "v": JOIN}, bot_level=10),
    )
    p = plan(snap, policy("root"))
    assert p.actions == ()
    assert [f.message for f in p.findings if f.room_id == rid("x") and "kick" in f.message] == [
        "the bot lacks the power to kick (needs 50)"
    ]


def test_string_levels_are_read_as_integers():
    snap = snapshot(
        space("root", children=["x"], members={"u": LEAVE, "mod": LEAVE}),
        child(
            "x",
            version="9",
            members={"u": JOIN, "mod": JOIN},
            pl={"users": {BOT: "60", uid("mod"): "60", uid("u"): "59"}, "kick": "60"},
        ),
    )
    p = plan(snap, policy("root"))
    assert kinds(p) == [("kick", rid("x"), uid("u"))]


def test_planning_is_pure():
    snap = snapshot(
        space("root", children=["x"], members={"u": LEAVE, "b": BAN}),
        child("x", members={"u": JOIN}),
    )
    before = attrs.asdict(snap, recurse=True)
    first = plan(snap, policy("root"))
    assert attrs.asdict(snap, recurse=True) == before
    assert plan(snap, policy("root")) == first
    assert actions_of(first, ActionKind.BAN) and actions_of(first, ActionKind.KICK)
    assert {a.kind for a in first.actions} <= {ActionKind.BAN, ActionKind.KICK}


# --- cycles ---------------------------------------------------------------------------------


def test_leaving_a_sub_space_that_lists_the_root_keeps_the_root():
    # root lists sub, sub lists root back: sub is not a parent that entitles root
    snap = snapshot(
        space("root", children=["sub"], members={"u": JOIN, "b": JOIN}),
        space("sub", children=["root", "x"], join_rule="restricted", allow=["root"], members={"u": LEAVE, "b": BAN}),
        child("x", parent="sub", members={"u": JOIN, "b": JOIN}),
    )
    p = plan(snap, policy("root"))
    assert ("kick", rid("root"), uid("u")) not in kinds(p)
    assert ("ban", rid("root"), uid("b")) not in kinds(p), "a sub-Space's ban never reaches up to the root"
    assert sorted(kinds(p)) == [("ban", rid("x"), uid("b")), ("kick", rid("x"), uid("u"))]
    assert_idempotent(snap, policy("root"), p)


def test_a_cycle_between_sub_spaces_does_not_keep_leavers_in():
    # s1 and s2 list each other below root: a user who left root must not stay in both forever
    snap = snapshot(
        space("root", children=["s1"], members={"u": LEAVE}),
        space("s1", children=["s2"], parents=["root", "s2"], members={"u": JOIN}),
        space("s2", children=["s1"], parents=["s1"], members={"u": JOIN}),
    )
    p = plan(snap, policy("root"))
    assert sorted(kinds(p)) == [("kick", rid("s1"), uid("u")), ("kick", rid("s2"), uid("u"))]
    # and leaving s2 alone costs nothing in s1, which s2 only reaches through s1 itself
    snap2 = snapshot(
        space("root", children=["s1"], members={"u": JOIN}),
        space("s1", children=["s2"], parents=["root", "s2"], members={"u": JOIN}),
        space("s2", children=["s1"], parents=["s1"], members={"u": LEAVE}),
    )
    assert plan(snap2, policy("root")).actions == ()


def test_a_space_that_merely_lists_a_room_gains_no_authority_over_it():
    """A sub-Space admin lists a room that chose only the root: the sub-Space's bans, levels and
    memberships must not reach it (the confused deputy)."""
    snap = snapshot(
        space("root", children=["sub", "r"], members={"victim": JOIN, "stayer": JOIN}),
        space(
            "sub",
            children=["r"],
            join_rule="restricted",
            allow=["root"],
            members={"victim": BAN, "stayer": LEAVE},
            levels={"eve": 100},
        ),
        room("r", join_rule="restricted", allow=["root"], members={"victim": JOIN, "stayer": JOIN}),
    )
    result = plan(snap, Policy(bot=BOT, spaces=(SpacePolicy(rid("root")),)))
    assert rid("r") in result.managed
    touching_r = [a for a in result.actions if a.room_id == rid("r")]
    assert touching_r == [], touching_r
    graph = build_graph(snap, Policy(bot=BOT, spaces=(SpacePolicy(rid("root")),)))
    assert graph.authority[rid("r")] == {rid("root")}
    assert rid("r") not in graph.governed_by(rid("sub"))


def test_a_ban_a_moderator_placed_over_the_bots_is_not_lifted():
    mod_ban = member(BAN, sender="mod")
    snap = snapshot(
        space("root", children=["a"], members={"u": LEAVE}),
        child("a", members={"u": mod_ban}),
    )
    snap = attrs.evolve(snap, placed_bans=frozenset({PlacedBan(rid("a"), uid("u"), "space_ban")}))
    p = plan(snap, policy("root"))
    assert p.actions == ()
    assert p.stale_bans == (PlacedBan(rid("a"), uid("u"), "space_ban"),)


# --- unknown is not absent ------------------------------------------------------------------


def test_only_a_leave_that_replaced_a_join_is_a_departure():
    snap = snapshot(
        space(
            "root",
            children=["x"],
            members={
                "left": member(LEAVE, sender="left"),
                "declined": member(LEAVE, sender="declined", was_joined=False),
                "unknown": member(LEAVE, sender="unknown", was_joined=None),
                "banned": member(BAN, sender="mod"),
            },
        ),
        child("x", members={"left": JOIN, "declined": JOIN, "unknown": JOIN, "banned": JOIN}),
    )
    p = plan(snap, policy("root"))
    assert {(a.kind.value, a.user_id) for a in p.actions} == {("kick", uid("left")), ("ban", uid("banned"))}
    unknown = [f for f in p.findings if f.code == "history_unknown"]
    assert [f.room_id for f in unknown] == [rid("x")] and uid("unknown") in unknown[0].message
    assert not any(uid("declined") in f.message for f in p.findings), "a declined invite is nothing to report"


def test_a_parent_space_that_cannot_be_read_keeps_its_members_in():
    # x answers to Spaces a and b (m.space.parent, with matching children); u left a but is in b.
    rooms = (
        space("a", children=["x"], members={"u": LEAVE}),
        space("b", children=["x"], members={"u": JOIN}),
        child("x", join_rule="invite", allow=[], parents=["a", "b"], members={"u": JOIN}),
    )
    pol = policy("a", "b")
    assert plan(snapshot(*rooms), pol).actions == (), "entitled through b while b reads"
    # b answers 502 this time: its last known state is kept (stale), and u stays.
    stale = plan(snapshot(*rooms, unreachable={"b": "state unreadable: 502"}), pol)
    assert stale.actions == ()
    assert (rid("b"), "unreachable") in codes(stale)
    # b never read at all: x names it as a parent, so it may entitle, and u stays.
    never_read = plan(snapshot(rooms[0], rooms[2], unreachable={"b": "state unreadable: 502"}), pol)
    assert never_read.actions == ()
    assert (rid("x"), "unchecked_entitlement") in codes(never_read)
    # and once b reads again showing u gone, u is evicted
    gone = attrs.evolve(rooms[1], members={**rooms[1].members, uid("u"): member(LEAVE, sender="u")})
    assert kinds(plan(snapshot(rooms[0], gone, rooms[2]), pol)) == [("kick", rid("x"), uid("u"))]


def test_nothing_is_done_in_a_stale_room_nor_from_a_stale_space():
    snap = snapshot(
        space("root", children=["x", "y"], members={"gone": LEAVE, "banned": member(BAN, sender="mod")}),
        child("x", members={"gone": JOIN, "banned": JOIN}, levels={"p": 10}),
        child("y", members={"gone": JOIN, "banned": JOIN}),
        unreachable={"x": "state unreadable: TimeoutError"},
    )
    p = plan(snap, policy("root"))
    assert {a.room_id for a in p.actions} == {rid("y")}
    stale_root = plan(attrs.evolve(snap, unreachable={rid("root"): "state unreadable: 429"}), policy("root"))
    assert stale_root.actions == (), "a Space read before but not now neither evicts nor bans"


def test_a_root_that_added_the_room_explicitly_may_entitle_while_unreadable():
    rooms = (
        space("a", children=["x"], members={"u": LEAVE}),
        space("b", members={"u": JOIN}),
        child("x", parent="a", members={"u": JOIN}),
    )
    pol = policy("a", SpacePolicy(rid("b"), extra_rooms=frozenset({rid("x")})))
    assert plan(snapshot(*rooms), pol).actions == ()
    assert plan(snapshot(rooms[0], rooms[2], unreachable={"b": "state unreadable: 502"}), pol).actions == ()


def test_grace_runs_on_spacesyncs_clock_not_the_senders():
    # The leaver's server claims the leave is old (origin_server_ts 0); spacesync saw it at 95 s.
    gone = attrs.evolve(member(LEAVE, sender="gone", ts=0), seen_ms=95_000)
    snap = snapshot(
        space("root", children=["x"], members={"gone": gone}), child("x", members={"gone": JOIN}), now_ms=100_000
    )
    p = plan(snap, policy(SpacePolicy(rid("root"), grace_period_s=30)))
    assert p.actions == () and p.recheck_at_ms == 125_000


def test_malformed_state_is_reported_and_the_rest_planned():
    bad = attrs.evolve(space("root", children=["x"], members={"gone": LEAVE}), malformed=2)
    p = plan(snapshot(bad, child("x", members={"gone": JOIN})), policy("root"))
    assert kinds(p) == [("kick", rid("x"), uid("gone"))]
    assert (rid("root"), "malformed") in codes(p)


# Bans follow upgrades


def _upgraded(old_members, new_members, root_members, **new_kw):
    """root lists `old`, which was upgraded to `new` (not yet re-pointed: new is no child yet)."""
    return snapshot(
        space("root", children=["old"], members=root_members),
        child("old", tombstone="new", members=old_members),
        child("new", predecessor="old", creator="owner", members=new_members, **new_kw),
        placed_bans=[PlacedBan(rid("old"), uid("u"), "space_ban")],
    )


def test_a_space_ban_is_carried_into_the_replacement_room():
    from spacesync.model import Membership, MemberState

    mine = MemberState(Membership.BAN, sender=BOT, reason="banned in Space !root:hs.test")
    snap = _upgraded({"u": mine}, {"u": JOIN}, {"u": member(BAN, sender="owner")})
    p = plan(snap, policy("root"))
    bans = actions_of(p, ActionKind.BAN)
    assert [(a.room_id, a.user_id, a.cause) for a in bans] == [(rid("new"), uid("u"), "space_ban")]
    assert "carried over from" in bans[0].reason and bans[0].space_id == rid("root")
    after = apply_plan(snap, p)
    assert PlacedBan(rid("new"), uid("u"), "space_ban") in after.placed_bans
    assert not actions_of(plan(after, policy("root")), ActionKind.BAN)


def test_the_homeservers_copy_of_the_bots_ban_is_banned_over_a_moderators_ban_is_not():
    from spacesync.model import Membership, MemberState

    reason = "banned in Space !root:hs.test"
    mine = MemberState(Membership.BAN, sender=BOT, reason=reason)
    copy = MemberState(Membership.BAN, sender=uid("owner"), reason=reason)
    snap = _upgraded({"u": mine}, {"u": copy}, {"u": member(BAN, sender="owner")})
    assert [(a.room_id, a.user_id) for a in actions_of(plan(snap, policy("root")), ActionKind.BAN)] == [
        (rid("new"), uid("u"))
    ]
    # A ban with another reason, or by someone other than the replacement's creator, is a moderator's own.
    for theirs in (
        MemberState(Membership.BAN, sender=uid("owner"), reason="spam"),
        MemberState(Membership.BAN, sender=uid("mod"), reason=reason),
    ):
        other = _upgraded({"u": mine}, {"u": theirs}, {"u": member(BAN, sender="owner")})
        assert not actions_of(plan(other, policy("root")), ActionKind.BAN)


def test_a_ban_the_space_lifted_is_not_carried():
    from spacesync.model import Membership, MemberState

    mine = MemberState(Membership.BAN, sender=BOT)
    snap = _upgraded({"u": mine}, {"u": LEAVE}, {"u": member(LEAVE, sender="owner")})
    assert not actions_of(plan(snap, policy("root")), ActionKind.BAN)


def test_an_on_leave_ban_is_carried_while_the_user_stays_out():
    from spacesync.model import Membership, MemberState

    mine = MemberState(Membership.BAN, sender=BOT)
    snap = attrs.evolve(
        _upgraded({"u": mine}, {}, {"u": member(LEAVE)}),
        placed_bans=frozenset({PlacedBan(rid("old"), uid("u"), "on_leave")}),
    )
    p = plan(snap, policy(SpacePolicy(rid("root"), on_leave=OnLeave.BAN)))
    assert [(a.room_id, a.cause) for a in actions_of(p, ActionKind.BAN)] == [(rid("new"), "on_leave")]
    back = attrs.evolve(snap, rooms={**snap.rooms, rid("root"): space("root", children=["old"], members={"u": JOIN})})
    assert not actions_of(plan(back, policy(SpacePolicy(rid("root"), on_leave=OnLeave.BAN))), ActionKind.BAN)


# Nobody left behind silently


def test_evictions_that_cannot_happen_are_left_behind_one_per_room_and_user():
    from spacesync.model import LeftBehind

    snap = snapshot(
        space("root", children=["ok", "weak", "guarded"], members={"u": BAN, "v": LEAVE}),
        child("ok", members={"u": JOIN, "v": JOIN}),
        child("weak", members={"u": JOIN, "v": JOIN}, bot_level=40),
        child("guarded", members={"u": JOIN}, levels={"u": 100}),
    )
    p = plan(snap, policy("root"))
    assert sorted(kinds(p)) == [("ban", rid("ok"), uid("u")), ("kick", rid("ok"), uid("v"))]
    left = {(lb.room_id, lb.user_id): lb for lb in p.left_behind}
    assert len(left) == len(p.left_behind) == 3  # u in weak: its ban and its kick, told once
    assert left[(rid("weak"), uid("u"))] == LeftBehind(
        rid("weak"), uid("u"), ActionKind.BAN, "the bot lacks the power to ban there (needs 50)"
    )
    assert left[(rid("weak"), uid("v"))].why == "the bot lacks the power to kick there (needs 50)"
    assert left[(rid("guarded"), uid("u"))].why == "at or above the bot's power level"
    assert LeftBehind.from_json(left[(rid("weak"), uid("v"))].to_json()) == left[(rid("weak"), uid("v"))]


def test_the_batch_notice_names_the_rooms_where_an_eviction_could_not_happen():
    from spacesync.commands.notices import batch_summary
    from spacesync.model import Action, LeftBehind
    from spacesync.store import Status
    from spacesync.store.journal import Entry

    kick = Action(ActionKind.KICK, rid("ok"), uid("u"), reason="left Space")
    entries = [Entry(1, "abc123", kick, Status.DONE, 1, None, 0)]
    left = [LeftBehind(rid("weak"), uid("u"), ActionKind.KICK, 'the bot lacks the power to kick there (needs "50")')]
    names = {rid("ok"): "OK room", rid("weak"): "<b>weak</b>"}
    reply = batch_summary("abc123", "sync", entries, names.__getitem__, left)
    assert f"kicked {uid('u')} in 1 room: OK room" in reply.text
    assert f'not kicked: {uid("u")} in <b>weak</b>: the bot lacks the power to kick there (needs "50")' in reply.text
    assert "1 left in place" in reply.text.splitlines()[0]
    assert "&lt;b&gt;weak&lt;/b&gt;" in reply.html and "<b>weak" not in reply.html
    assert "(needs &quot;50&quot;)" in reply.html


def test_findings_say_which_part_of_the_planner_they_come_from():
    from spacesync.model import FindingArea

    snap = snapshot(
        space("root", children=["x"], members={"gone": LEAVE}, levels={"mod": 50}),
        child("x", join_rule="invite", allow=[], parents=["root"], members={"gone": JOIN}, bot_level=0),
    )
    p = plan(snap, policy(SpacePolicy(rid("root"), enforce_join_rules=True)))
    areas = {(f.code, f.area) for f in p.findings if f.room_id == rid("x")}
    assert ("protected", FindingArea.MEMBERSHIP) in areas, areas  # the leaver is at the bot's level
    assert ("no_power", FindingArea.POWER_LEVELS) in areas, areas  # cannot raise mod
    assert ("invite_kept", FindingArea.JOIN_RULES) in areas, areas  # the invite room is only reported


def test_a_ban_command_is_never_lifted_by_the_plan():
    """A moderator's `ban` stands in a room where the user is entitled, and in a Space nothing bans them any
    more: only `unban` or `undo` lifts it."""
    snap = snapshot(
        space("root", children=["x"], members={"u": JOIN, "v": BAN}),
        child("x", members={"u": BAN, "v": BAN}),
        placed_bans=[PlacedBan(rid("x"), uid("u"), "command_ban"), PlacedBan(rid("root"), uid("v"), "command_ban")],
    )
    p = plan(snap, policy("root"))
    assert [a for a in p.actions if a.kind is ActionKind.UNBAN] == []
    assert_idempotent(snap, policy("root"), p)
