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
