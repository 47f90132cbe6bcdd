"""Lockdown: managed rooms switched to invite (or knock) during a raid, and back to exactly what they were."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ..model import Finding, FindingCode, RoomID, RoomState, Snapshot

LOCK_RULES = ("invite", "knock")

_STRICTNESS = {"invite": 2, "private": 2, "knock": 1}
"""How closed a join rule is: invite (and the old `private`) admit nobody by themselves, knock admits on request,
every other rule (public, restricted, knock_restricted, unknown ones) lets people in by themselves."""


def narrows(now: str | None, rule: str) -> bool:
    """Whether a lockdown writing `rule` over `now` closes the room further: a lockdown only ever narrows, so
    knock never opens an invite-only room, and a rule already as closed is left as it is."""
    return _STRICTNESS.get(rule, 0) > _STRICTNESS.get(now or "", 0)


def _allow(content: Mapping[str, Any]) -> tuple[RoomID, ...]:
    raw = content.get("allow")
    return tuple(
        RoomID(entry["room_id"])
        for entry in (raw if isinstance(raw, list) else [])
        if isinstance(entry, dict)
        and entry.get("type") == "m.room_membership"
        and isinstance(entry.get("room_id"), str)
    )


def locked_rooms(snapshot: Snapshot) -> frozenset[RoomID]:
    """Rooms spacesync locked down that still hold the rule it wrote (changed by hand since: no longer locked)."""
    return frozenset(
        room_id
        for room_id, lock in snapshot.lockdowns.items()
        if (room := snapshot.rooms.get(room_id)) is not None and room.join_rule == lock.written
    )


def as_before_lockdown(snapshot: Snapshot) -> Snapshot:
    """The snapshot with each locked room's join rules as they were before the lockdown.

    A lockdown is temporary: the room keeps opting into its Space (its allow list), its members stay entitled
    as before, and the join-rule audit judges the rules the room returns to, not the lockdown's.
    """
    locked = locked_rooms(snapshot)
    if not locked:
        return snapshot
    rooms = dict(snapshot.rooms)
    for room_id in locked:
        previous = snapshot.lockdowns[room_id].previous
        rule = previous.get("join_rule")
        rooms[room_id] = attrs.evolve(
            rooms[room_id],
            join_rule=rule if isinstance(rule, str) else None,
            allow=_allow(previous),
            join_rules_content=dict(previous),
        )
    return attrs.evolve(snapshot, rooms=rooms)


def lockdown_findings(snapshot: Snapshot, locked: frozenset[RoomID]) -> list[Finding]:
    return [
        Finding(
            room_id,
            FindingCode.LOCKED_DOWN.value,
            f"locked down ({snapshot.lockdowns[room_id].written}): join rules left alone until "
            "'!spacesync unlock' restores them",
        )
        for room_id in sorted(locked)
    ]


def lock_content(room: RoomState, rule: str) -> dict[str, Any]:
    """The join rules a lockdown writes: only the rule (an allow list means nothing to invite or knock)."""
    return {"join_rule": rule}
