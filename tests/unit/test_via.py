"""Routable children: m.space.child entries whose via servers have no member left in the child."""

from __future__ import annotations

import attrs

from spacesync.core.planner import plan
from spacesync.core.via import current_via
from spacesync.model import ActionKind, Policy, SpacePolicy

from .helpers import BOT, JOIN, actions_of, codes, rid, room, snapshot, space


def test_via_findings_and_refresh_keep_order_and_suggested():
    root = space("root", children=["a"])
    root = attrs.evolve(
        root,
        children={rid("a"): ("gone.example",)},
        child_content={rid("a"): {"via": ["gone.example"], "order": "x", "suggested": True}},
    )
    child = room("a", join_rule="restricted", allow=["root"], members={"@m:far.example": JOIN, "@n:far.example": JOIN})
    snap = snapshot(root, child)
    assert current_via(child) == ["far.example", "hs.test"]
    p = plan(snap, Policy(bot=BOT, spaces=(SpacePolicy(rid("root")),)))
    assert (rid("root"), "unroutable_child") in codes(p) and p.actions == ()
    p = plan(snap, Policy(bot=BOT, spaces=(SpacePolicy(rid("root"), refresh_via=True),)))
    (action,) = actions_of(p, ActionKind.SET_SPACE_CHILD)
    assert action.state_key == rid("a")
    assert action.content == {"via": ["far.example", "hs.test"], "order": "x", "suggested": True}


def test_refresh_via_keeps_a_servers_port():
    """`remote.example:8448` is the server; `remote.example` alone would route elsewhere, or nowhere."""
    root = attrs.evolve(
        space("root", children=["a"]),
        children={rid("a"): ("gone.example",)},
        child_content={rid("a"): {"via": ["gone.example"]}},
    )
    members = {"@m:remote.example:8448": JOIN, "@n:remote.example:8448": JOIN, "@o:[::1]:8008": JOIN}
    child = room("a", join_rule="restricted", allow=["root"], members=members)
    assert current_via(child) == ["remote.example:8448", "[::1]:8008", "hs.test"]
    p = plan(snapshot(root, child), Policy(bot=BOT, spaces=(SpacePolicy(rid("root"), refresh_via=True),)))
    (action,) = actions_of(p, ActionKind.SET_SPACE_CHILD)
    assert action.content == {"via": ["remote.example:8448", "[::1]:8008", "hs.test"]}
    # An entry naming the server with its port is routable: no finding, nothing written.
    routable = attrs.evolve(root, children={rid("a"): ("remote.example:8448",)})
    p = plan(snapshot(routable, child), Policy(bot=BOT, spaces=(SpacePolicy(rid("root"), refresh_via=True),)))
    assert p.actions == () and (rid("root"), "unroutable_child") not in codes(p)
