"""Routable children: m.space.child entries whose `via` servers can still route a join into the child."""

from __future__ import annotations

from collections import Counter

from ..model import Action, ActionKind, Cause, Finding, FindingCode, Policy, RoomState, Snapshot
from ..refs import server_name
from .entitlement import user_level
from .graph import SpaceGraph, policies_for

MAX_VIA = 3
"""Servers written into a rewritten `via`: the ones with the most joined members in the child."""


def current_via(child: RoomState) -> list[str]:
    """The servers of the child's joined members, most members first (ties by name): full server names, a port
    kept (`remote.example:8448` is another server than `remote.example`, and only it routes)."""
    counts = Counter(server for u in child.joined() if (server := server_name(u)))
    return [s for s, _ in sorted(counts.items(), key=lambda c: (-c[1], c[0]))][:MAX_VIA]


def plan_via(snapshot: Snapshot, policy: Policy, graph: SpaceGraph) -> tuple[list[Action], list[Finding]]:
    """A finding for each child entry of a managed Space whose `via` servers have no joined member in the child;
    with refresh_via, the entry rewritten from the child's members (order and suggested kept)."""
    actions: list[Action] = []
    findings: list[Finding] = []
    for space_id in sorted(graph.managed):
        space = snapshot.rooms.get(space_id)
        if space is None or not (space.is_space or space_id in graph.roots) or not snapshot.known(space_id):
            continue
        refresh = any(p.refresh_via for p in policies_for(graph, policy, space_id))
        for child_id, via in sorted(space.children.items()):
            child = snapshot.rooms.get(child_id)
            if child is None or not snapshot.known(child_id) or child.tombstone:
                continue  # members unknown: no verdict
            servers = {server for u in child.joined() if (server := server_name(u))}
            if any(v in servers for v in via):
                continue
            new_via = current_via(child)
            findings.append(
                Finding(
                    space_id,
                    FindingCode.UNROUTABLE_CHILD.value,
                    f"the m.space.child entry for {child_id} names via {', '.join(via)}, where no member of it is "
                    f"joined any more: joins through the Space may fail"
                    + (f"; its members are on {', '.join(new_via)}" if new_via else ""),
                )
            )
            if not refresh or not new_via:
                continue
            needed = space.power_levels.event_level("m.space.child")
            if user_level(space, policy.bot) < needed:
                findings.append(
                    Finding(space_id, "no_power", f"the bot lacks the power to rewrite child entries (needs {needed})")
                )
                continue
            content = {**space.child_content.get(child_id, {}), "via": new_via}
            actions.append(
                Action(
                    ActionKind.SET_SPACE_CHILD,
                    space_id,
                    state_key=child_id,
                    reason=f"via for {child_id}: {', '.join(via)} -> {', '.join(new_via)}",
                    space_id=space_id,
                    cause=Cause.REFRESH_VIA.value,
                    content=content,
                    changes={"via": (list(via), new_via)},
                )
            )
    return actions, findings
