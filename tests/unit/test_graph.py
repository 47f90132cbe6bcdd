"""The Space walk: reachability, caps, cycles and the opt-in rules (confused deputy)."""

from __future__ import annotations

from spacesync.core.graph import build_graph, exempt_in, policies_for
from spacesync.model import Policy, SpacePolicy

from .helpers import BOT, codes, rid, room, snapshot, space, uid


def policy(*roots: str, **kw) -> Policy:
    spaces = tuple(r if isinstance(r, SpacePolicy) else SpacePolicy(rid(r)) for r in roots)
    return Policy(bot=BOT, spaces=spaces, **kw)


def test_restricted_child_and_sub_space_are_managed():
    snap = snapshot(
        space("root", children=["sub", "a"]),
        room("a", join_rule="restricted", allow=["root"]),
        space("sub", children=["b"], parents=["root"]),
        room("b", join_rule="knock_restricted", allow=["sub"]),
    )
    g = build_graph(snap, policy("root"))
    assert g.managed == {rid("root"), rid("sub"), rid("a"), rid("b")}
    assert g.depth == {rid("root"): 0, rid("sub"): 1, rid("a"): 1, rid("b"): 2}
    assert g.opt_in[rid("sub")].startswith("m.space.parent")
    assert g.opt_in[rid("b")].startswith("knock_restricted")
    assert g.ancestors(rid("b")) == {rid("root"), rid("sub")}
    assert g.managed_parents(rid("b")) == {rid("sub")}
    assert g.governed_by(rid("root")) == {rid("sub"), rid("a"), rid("b")}
    assert g.governed_by(rid("sub")) == {rid("b")}
    assert g.authority[rid("b")] == {rid("sub"), rid("root")}
    assert g.findings == ()


def test_child_listed_without_opting_in_is_not_managed():
    snap = snapshot(
        space("root", children=["plain", "public", "other_allow", "stray_parent"]),
        space("other", children=[]),
        room("plain"),  # invite-only, no parent event
        room("public", join_rule="public"),
        room("other_allow", join_rule="restricted", allow=["other"]),  # names a Space that is not an ancestor
        room("stray_parent", parents=["other"]),  # parent names a Space that does not list it
    )
    g = build_graph(snap, policy("root", "other"))
    for name in ("plain", "public", "other_allow", "stray_parent"):
        assert rid(name) not in g.managed
        assert (rid(name), "not_opted_in") in codes(g.findings)


def test_parent_event_needs_the_matching_child_event():
    # `child` names root as its parent, but root does not list it: it is reached through `sub`
    # (which does not opt in) so the parent claim has no matching m.space.child.
    snap = snapshot(
        space("root", children=["sub"]),
        space("sub", children=["child"]),
        room("child", parents=["root"]),
    )
    g = build_graph(snap, policy("root"))
    assert rid("sub") not in g.managed
    assert rid("child") not in g.managed
    # but a restricted allow list naming the managed ancestor is an opt-in even through an unmanaged Space
    snap2 = snapshot(
        space("root", children=["sub"]),
        space("sub", children=["child"]),
        room("child", join_rule="restricted", allow=["root"]),
    )
    assert rid("child") in build_graph(snap2, policy("root")).managed


def test_allow_list_naming_an_unmanaged_ancestor_is_no_opt_in():
    snap = snapshot(
        space("root", children=["sub"]),
        space("sub", children=["child"]),  # sub does not opt in
        room("child", join_rule="restricted", allow=["sub"]),
    )
    g = build_graph(snap, policy("root"))
    assert g.managed == {rid("root")}


def test_extra_rooms_are_children_of_their_root_and_managed():
    snap = snapshot(space("root"), room("x"))
    g = build_graph(snap, policy(SpacePolicy(rid("root"), extra_rooms=frozenset({rid("x")}))))
    assert rid("x") in g.managed
    assert g.parents[rid("x")] == {rid("root")}
    assert g.opt_in[rid("x")].startswith("added explicitly")


def test_unreadable_rooms_are_findings_and_never_managed():
    snap = snapshot(
        space("root", children=["ghost", "gone"]),
        unreachable={"gone": "forbidden"},
    )
    g = build_graph(snap, policy("root", "missing_root"))
    assert {(rid("ghost"), "unreachable"), (rid("gone"), "unreachable"), (rid("missing_root"), "unreachable")} <= codes(
        g.findings
    )
    assert any("forbidden" in f.message for f in g.findings if f.room_id == rid("gone"))
    assert g.managed == {rid("root")}


def test_cycles_terminate_with_a_finding():
    snap = snapshot(
        space("root", children=["s1"]),
        space("s1", children=["s2"], parents=["root"]),
        space("s2", children=["s1", "root"], parents=["s1"]),
    )
    g = build_graph(snap, policy("root"))
    assert {f.code for f in g.findings} == {"cycle"}
    assert g.managed == {rid("root"), rid("s1"), rid("s2")}
    assert g.depth[rid("s2")] == 2


def test_a_space_listing_itself_is_a_cycle():
    snap = snapshot(space("root", children=["root", "s"]), space("s", children=["s"], parents=["root"]))
    g = build_graph(snap, policy("root"))
    assert (rid("root"), "cycle") in codes(g.findings)
    assert (rid("s"), "cycle") in codes(g.findings)
    assert rid("root") not in g.descendants(rid("root"))


def test_depth_cap():
    snap = snapshot(
        space("root", children=["s1"]),
        space("s1", children=["s2"], parents=["root"]),
        space("s2", children=["s3"], parents=["s1"]),
        space("s3", parents=["s2"]),
    )
    g = build_graph(snap, policy("root", max_depth=2))
    assert set(g.depth) == {rid("root"), rid("s1"), rid("s2")}
    assert (rid("s2"), "cap_depth") in codes(g.findings)


def test_room_cap_bounds_the_walk():
    names = [f"c{i}" for i in range(6)]
    snap = snapshot(
        space("root", children=names),
        *(room(n, join_rule="restricted", allow=["root"]) for n in names),
    )
    g = build_graph(snap, policy("root", max_rooms=3))
    assert len(g.rooms()) <= 3
    assert (rid("root"), "cap_rooms") in codes(g.findings)
    assert g.managed <= g.rooms()


def test_room_in_two_root_spaces_is_governed_by_both():
    snap = snapshot(
        space("r1", children=["x"]),
        space("r2", children=["x"]),
        room("x", join_rule="restricted", allow=["r1", "r2"]),
    )
    p = policy(
        SpacePolicy(rid("r1"), exempt=frozenset({uid("e1")})), SpacePolicy(rid("r2"), exempt=frozenset({uid("e2")}))
    )
    g = build_graph(snap, p)
    assert g.governing[rid("x")] == {rid("r1"), rid("r2")}
    assert [s.room_id for s in policies_for(g, p, rid("x"))] == [rid("r1"), rid("r2")]
    assert exempt_in(g, p, rid("x")) == {uid("e1"), uid("e2")}
    assert exempt_in(g, p, rid("r1")) == {uid("e1")}
