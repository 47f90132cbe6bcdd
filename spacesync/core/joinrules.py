"""Join-rule audit and repair, room-upgrade following and invite sync for managed rooms."""

from __future__ import annotations

from typing import Any

from ..model import Action, ActionKind, Finding, Membership, Policy, RoomID, RoomState, Snapshot
from ..refs import server_name
from .entitlement import Memberships, protection, user_level
from .graph import RESTRICTED_RULES, SpaceGraph, policies_for
from .routing import member_servers, via_servers
from .versions import RECOMMENDED_VERSION, features

_RESTRICTED_FOR = {"invite": "restricted", "public": "restricted", "knock": "knock_restricted"}


def _allow_entry(room_id: RoomID) -> dict[str, Any]:
    return {"type": "m.room_membership", "room_id": room_id}


def plan_join_rules(
    snapshot: Snapshot, policy: Policy, graph: SpaceGraph, memberships: Memberships
) -> tuple[list[Action], list[Finding]]:
    actions: list[Action] = []
    findings: list[Finding] = []
    for room_id in sorted(graph.managed - set(graph.roots)):
        room = snapshot.rooms.get(room_id)
        if room is None:
            continue
        policies = policies_for(graph, policy, room_id)
        root_id = policies[0].room_id if policies else None
        if room.tombstone:
            actions.extend(_follow_upgrade(snapshot, policy, graph, room, root_id, findings))
            continue
        # Only the managed parent Spaces: they entitle membership whatever the join rule says, so
        # naming them in the allow list changes no one's entitlement. A root that reaches the room
        # only through Spaces that did not opt in is not the room's to name (confused deputy).
        parents = sorted(graph.entitling_parents(room_id))
        enforcing = [p for p in policies if p.enforce_join_rules]
        # Restricting an invite-only room opens it to every member of its Spaces: only when every Space
        # that enforces also asked for exactly that.
        widen = bool(enforcing) and all(p.restrict_invite_rooms for p in enforcing)
        action = _join_rule_repair(room, parents, policy, findings, bool(enforcing), widen)
        if action is not None:
            actions.append(Action(**{**action, "space_id": root_id}))
        if any(p.invite_members for p in policies) and room.join_rule == "invite":
            actions.extend(_invites(room, parents, policy, graph, memberships, root_id, findings))
    return actions, findings


def _join_rule_repair(
    room: RoomState,
    parents: list[RoomID],
    policy: Policy,
    findings: list[Finding],
    enforce: bool,
    widen: bool = False,
) -> dict[str, Any] | None:
    """Audit one room's join rule; with `enforce`, the repair that makes it restricted to its parents.

    `public -> restricted` and `knock -> knock_restricted` only narrow who may join. `invite -> restricted`
    lets every member of the Space in: it needs `widen` (restrict_invite_rooms), else it is reported.
    """
    rule = room.join_rule or "invite"
    feats = features(room.room_version)
    if feats is None:
        findings.append(
            Finding(
                room.room_id, "unknown_version", f"unknown room version {room.room_version!r}: join rules not checked"
            )
        )
        return None
    if rule in RESTRICTED_RULES:
        missing = [p for p in parents if p not in room.allow]
        if not missing:
            if room.room_version == "8":
                findings.append(Finding(room.room_id, "version", "room version 8: upgrade to 10 or later recommended"))
            return None
        findings.append(Finding(room.room_id, "allow_missing", f"allow list lacks its Space {', '.join(missing)}"))
        new_rule = rule
    elif rule in _RESTRICTED_FOR:
        new_rule = _RESTRICTED_FOR[rule]
        supported = feats.knock_restricted if new_rule == "knock_restricted" else feats.restricted
        if not supported:
            findings.append(
                Finding(
                    room.room_id,
                    "version",
                    f"join rule {rule} on room version {room.room_version or '1'}: upgrade to "
                    f"{RECOMMENDED_VERSION} or later to restrict it to its Space",
                )
            )
            return None
        if enforce and rule == "invite" and not widen:
            findings.append(
                Finding(
                    room.room_id,
                    "invite_kept",
                    "join rule is invite: left as it is, since restricting it would let every member of its Space "
                    "join; set restrict_invite_rooms: true for its Space to restrict it",
                )
            )
            return None
        findings.append(Finding(room.room_id, "not_restricted", f"join rule is {rule}, not restricted to its Space"))
        missing = parents
    else:
        findings.append(Finding(room.room_id, "join_rule", f"join rule {rule!r} left as it is"))
        return None
    if not enforce or not parents:
        return None
    needed = room.power_levels.event_level("m.room.join_rules")
    if user_level(room, policy.bot) < needed:
        findings.append(
            Finding(room.room_id, "no_power", f"the bot lacks the power to change join rules (needs {needed})")
        )
        return None
    content = dict(room.join_rules_content)
    allow = list(content.get("allow") or []) if rule in RESTRICTED_RULES else []
    allow.extend(_allow_entry(p) for p in missing)
    content.update({"join_rule": new_rule, "allow": allow})
    return {
        "kind": ActionKind.SET_JOIN_RULES,
        "room_id": room.room_id,
        "reason": f"restrict to its Space: {rule} -> {new_rule}, allow + {', '.join(missing)}",
        "cause": "join_rules",
        "content": content,
        "changes": {
            "join_rule": (rule, new_rule),
            "allow": (list(room.allow), list(room.allow if rule in RESTRICTED_RULES else ()) + missing),
        },
    }


def _follow_upgrade(
    snapshot: Snapshot,
    policy: Policy,
    graph: SpaceGraph,
    room: RoomState,
    root_id: RoomID | None,
    findings: list[Finding],
) -> list[Action]:
    """Point the parent Spaces at the replacement of an upgraded room."""
    new_id = room.tombstone
    assert new_id is not None
    if not verified_upgrade(snapshot, room):
        findings.append(
            Finding(
                room.room_id,
                "upgrade_unverified",
                f"tombstone names {new_id}, which the bot cannot read or which does not name this room as its "
                "predecessor: not followed",
            )
        )
        return []
    findings.append(Finding(room.room_id, "upgraded", f"upgraded to {new_id}: no longer managed here"))
    actions = []
    for parent_id in sorted(graph.entitling_parents(room.room_id)):
        parent = snapshot.rooms.get(parent_id)
        if parent is None:
            continue
        needed = parent.power_levels.event_level("m.space.child")
        if user_level(parent, policy.bot) < needed:
            findings.append(
                Finding(parent_id, "no_power", f"cannot re-point m.space.child to {new_id} (needs {needed})")
            )
            continue
        # v12 room ids carry no server name: route by the old entry's via and where the members are.
        via = via_servers(
            new_id,
            parent.children.get(room.room_id) or (),
            member_servers(snapshot.rooms.get(new_id)),
            member_servers(room),
            fallback=[server_name(policy.bot) or policy.bot],
        )
        if new_id not in parent.children:
            actions.append(
                Action(
                    kind=ActionKind.SET_SPACE_CHILD,
                    room_id=parent_id,
                    state_key=new_id,
                    cause="upgrade",
                    space_id=root_id,
                    reason=f"add {new_id}, the upgrade of {room.room_id}",
                    content={"via": via},
                    changes={"child": (None, new_id)},
                )
            )
        if room.room_id in parent.children:
            # (a root's extra room has no m.space.child to remove: the configuration names it)
            actions.append(
                Action(
                    kind=ActionKind.SET_SPACE_CHILD,
                    room_id=parent_id,
                    state_key=room.room_id,
                    cause="upgrade",
                    space_id=root_id,
                    reason=f"remove {room.room_id}, replaced by {new_id}",
                    content={},
                    changes={"child": (room.room_id, None)},
                )
            )
    return actions


def verified_upgrade(snapshot: Snapshot, room: RoomState) -> bool:
    """A tombstone is followed only when the replacement's create event names this room as predecessor.

    Anyone with power in a child room can send a tombstone naming any room; the Space's child entry
    must not be re-pointed on that say-so alone.
    """
    new = snapshot.rooms.get(room.tombstone) if room.tombstone else None
    return new is not None and new.predecessor == room.room_id


def _invites(
    room: RoomState,
    parents: list[RoomID],
    policy: Policy,
    graph: SpaceGraph,
    memberships: Memberships,
    root_id: RoomID | None,
    findings: list[Finding],
) -> list[Action]:
    """Invites for members of the parent Spaces who are not in an invite-only managed room."""
    if user_level(room, policy.bot) < room.power_levels.invite:
        return []
    wanted = set()
    for parent_id in parents:
        wanted.update(memberships.joined(parent_id))
    actions = []
    for user_id in sorted(wanted):
        membership = memberships.get(room.room_id, user_id)
        if membership in (Membership.JOIN, Membership.INVITE, Membership.BAN):
            continue
        if user_id == policy.bot:
            continue
        if membership is Membership.LEAVE and not memberships.is_planned(room.room_id, user_id):
            # Who made them leave: themselves (left, declined an invite) or a moderator (kicked) is
            # final; only spacesync's own kick (an eviction, since lifted) is followed by a new invite.
            # Otherwise a declined invite would come back at every reconcile.
            state = room.members.get(user_id)
            if state is None or state.sender != policy.bot:
                continue
        why = protection(room, user_id, policy, graph)
        if why:
            findings.append(Finding(room.room_id, "protected", f"{user_id} not invited: {why}"))
            continue
        actions.append(
            Action(
                kind=ActionKind.INVITE,
                room_id=room.room_id,
                user_id=user_id,
                cause="invite_members",
                reason=f"member of Space {', '.join(parents)}",
                space_id=root_id,
            )
        )
    return actions
