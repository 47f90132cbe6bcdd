"""Policy server mirroring (MSC4284): the Space's m.room.policy in managed rooms that have none of their own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..model import Action, ActionKind, Cause, Finding, Policy, RoomID, Snapshot
from .entitlement import user_level
from .graph import SpaceGraph, policies_for

POLICY_TYPES = ("m.room.policy", "org.matrix.msc4284.policy")
"""MSC4284's policy server state, under its stable and unstable names (the same list as matrix/state.py)."""


def plan_policy_server(snapshot: Snapshot, policy: Policy, graph: SpaceGraph) -> tuple[list[Action], list[Finding]]:
    """Per managed room and policy event type: write the Space's state where the room has none, follow the
    Space's changes where the room still holds what spacesync wrote, and remove it (empty content) only where
    spacesync set it and the Space dropped it. A room's own policy server is never touched."""
    actions: list[Action] = []
    findings: list[Finding] = []
    for room_id in sorted(graph.managed):
        room = snapshot.rooms.get(room_id)
        if room is None or room.tombstone or not snapshot.known(room_id):
            continue
        governing = [p for p in policies_for(graph, policy, room_id) if p.policy_server and p.room_id != room_id]
        if not governing or not all(snapshot.known(p.room_id) for p in governing):
            continue
        for event_type in POLICY_TYPES:
            wanted = _space_policy(snapshot, [p.room_id for p in governing], event_type)
            current = dict(room.policy_servers.get(event_type) or {})
            owned = snapshot.owned_policy.get((room_id, event_type))
            if current and (owned is None or dict(owned) != current):
                continue  # the room's own (or changed by hand): left alone
            target = dict(wanted or {})
            if target == current:
                continue
            needed = room.power_levels.event_level(event_type)
            if user_level(room, policy.bot) < needed:
                findings.append(
                    Finding(room_id, "no_power", f"the bot lacks the power to set {event_type} (needs {needed})")
                )
                continue
            via = target.get("via") or current.get("via") or "?"
            actions.append(
                Action(
                    ActionKind.SET_POLICY_SERVER,
                    room_id,
                    state_key=event_type,
                    reason=f"policy server from the Space: {via}" if target else f"policy server {via} dropped",
                    space_id=governing[0].room_id,
                    cause=Cause.POLICY_SERVER.value,
                    content=target,
                    changes={"policy": (current, target)},
                )
            )
    return actions, findings


def _space_policy(snapshot: Snapshot, spaces: list[RoomID], event_type: str) -> Mapping[str, Any] | None:
    """The first governing Space's policy server state of this type (a Space's own write, not one spacesync
    mirrored into it from above, counts the same: it is what the Space holds)."""
    for space_id in spaces:
        content = snapshot.rooms[space_id].policy_servers.get(event_type)
        if content:
            return content
    return None
