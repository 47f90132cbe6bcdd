"""Snapshot + policy -> plan: the evictions, bans, unbans and other changes that should happen now."""

from __future__ import annotations

import attrs

from ..model import (
    ActionKind,
    Finding,
    FindingArea,
    LeftBehind,
    Plan,
    Policy,
    RoomID,
    Snapshot,
    UserID,
)
from .graph import SpaceGraph, build_graph
from .joinrules import plan_join_rules
from .lockdown import as_before_lockdown, lockdown_findings, locked_rooms
from .membership import MembershipPlanner, verified_upgrades
from .membership import upgrade_copy as upgrade_copy
from .policylists import list_findings, with_list_servers
from .policyserver import plan_policy_server
from .powerlevels import plan_power_levels
from .serveracl import plan_server_acl
from .via import plan_via

PER_USER = frozenset({ActionKind.KICK, ActionKind.BAN, ActionKind.UNBAN, ActionKind.INVITE})
"""Action kinds about one user, decided from that user's memberships alone (and the rooms' other state)."""


def graph_of(snapshot: Snapshot, policy: Policy) -> SpaceGraph:
    """The Space graph `plan` works on. It reads no membership: a plan after membership changes alone may be
    given the previous plan's graph."""
    return build_graph(as_before_lockdown(snapshot), policy)


def plan(
    snapshot: Snapshot,
    policy: Policy,
    users: frozenset[UserID] | None = None,
    graph: SpaceGraph | None = None,
) -> Plan:
    """Everything that should change now, from the state alone.

    `users` narrows the plan to the memberships of these users (an incremental plan): bans, evictions, unbans
    and invites of anyone else are left out, every other action is planned as in the full plan. What one user
    should have depends only on their own memberships and on the rooms' other state, never on another user's
    membership, so for these users the incremental plan is the full plan's (property-tested:
    tests/unit/test_incremental.py). `graph`: `graph_of` this snapshot's rooms, when the caller has it."""
    # A room spacesync locked down is planned as it was before (its allow list keeps it opted in); its join
    # rules are left alone until it is unlocked, whatever join_rules: enforce would say.
    locked = locked_rooms(snapshot)
    snapshot = as_before_lockdown(snapshot)
    graph = graph if graph is not None else build_graph(snapshot, policy)
    membership = MembershipPlanner(snapshot, policy, graph, users)
    membership.run()
    pl_actions, stale_levels, released_levels, pl_findings = plan_power_levels(snapshot, policy, graph)
    jr_actions, jr_findings = plan_join_rules(snapshot, policy, graph, membership.memberships)
    jr_actions = [a for a in jr_actions if a.room_id not in locked or a.kind is not ActionKind.SET_JOIN_RULES]
    jr_findings = [f for f in jr_findings if f.room_id not in locked] + lockdown_findings(
        snapshot, locked & graph.managed
    )
    acl_actions, acl_findings = plan_server_acl(with_list_servers(snapshot, policy.spaces), policy, graph)
    via_actions, via_findings = plan_via(snapshot, policy, graph)
    ps_actions, ps_findings = plan_policy_server(snapshot, policy, graph)
    jr_actions += acl_actions + via_actions + ps_actions
    jr_findings += acl_findings + via_findings + ps_findings
    # A room that could not be read, or that answers to a Space that could not be read, gets no state
    # writes: its levels, join rules and children are known only as they were (unknown is not absent).
    waits = unsure_rooms(snapshot, graph)
    findings = (
        list(graph.findings)
        + membership.findings
        + [attrs.evolve(f, area=FindingArea.POWER_LEVELS) for f in pl_findings]
        + [attrs.evolve(f, area=FindingArea.JOIN_RULES) for f in jr_findings]
        + malformed_findings(snapshot)
        + list_findings(snapshot, policy.spaces)
    )
    others = [a for a in jr_actions + pl_actions if a.room_id not in waits]
    if users is not None:
        others = [a for a in others if a.kind not in PER_USER or a.user_id in users]
    return Plan(
        actions=tuple(membership.actions + others),
        findings=tuple(dict.fromkeys(findings)),
        managed=tuple(sorted(graph.managed)),
        recheck_at_ms=membership.recheck_at_ms,
        stale_bans=tuple(membership.stale_bans),
        stale_levels=tuple(k for k in stale_levels if k[0] not in waits),
        released_levels=tuple(r for r in released_levels if r.room_id not in waits),
        upgrades=tuple(u for u in verified_upgrades(snapshot, graph) if u[0] not in waits),
        left_behind=_one_per_room_and_user(membership.left_behind),
        users=users,
    )


def _one_per_room_and_user(items: list[LeftBehind]) -> tuple[LeftBehind, ...]:
    first: dict[tuple[RoomID, UserID], LeftBehind] = {}
    for item in items:
        first.setdefault((item.room_id, item.user_id), item)
    return tuple(first.values())


def unsure_rooms(snapshot: Snapshot, graph: SpaceGraph) -> frozenset[RoomID]:
    """Managed rooms not read this time, or answering to a Space not read this time."""
    return frozenset(
        r
        for r in graph.managed
        if not snapshot.known(r) or not all(snapshot.known(s) for s in graph.authority.get(r, ()))
    )


def malformed_findings(snapshot: Snapshot) -> list[Finding]:
    return [
        Finding(
            room_id,
            "malformed",
            f"{room.malformed} state event(s) with malformed content skipped; the rest of the room is planned as usual",
        )
        for room_id, room in sorted(snapshot.rooms.items())
        if room.malformed
    ]
