"""Power-level mirroring: raise room entries to the Space's levels, and undo only what spacesync wrote."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from ..model import (
    Action,
    ActionKind,
    Finding,
    FindingCode,
    OwnedLevel,
    Policy,
    PowerLevels,
    RoomID,
    RoomState,
    Snapshot,
    UserID,
    parse_level,
)
from .entitlement import user_level, valid_user_id
from .graph import SpaceGraph, policies_for
from .versions import features


def space_levels(space: RoomState, snapshot: Snapshot, creator_level: int) -> tuple[dict[UserID, int], list[Finding]]:
    """The levels a Space itself grants: its `users` map and v12 creators.

    Where an entry is spacesync's own write, the Space grants what stood there before (if anything),
    not the mirrored value: otherwise a level would outlive the Space above that asked for it, and
    the sub-Space's own grant would vanish from its descendants once it was raised.
    """
    findings: list[Finding] = []
    levels: dict[UserID, int] = {}
    for user_id, level in space.power_levels.users.items():
        if not valid_user_id(user_id):
            findings.append(
                Finding(space.room_id, "invalid_user", f"ignoring malformed user id {user_id!r} in power levels")
            )
            continue
        owned = snapshot.owned_levels.get((space.room_id, user_id))
        if owned is not None and not owned.released and owned.written == level:
            if owned.previous is None:
                continue
            level = owned.previous
        levels[user_id] = level
    feats = features(space.room_version)
    if feats is not None and feats.creators_privileged:
        for creator in space.creators:
            levels[creator] = max(levels.get(creator, creator_level), creator_level)
    return levels, findings


def desired_levels(
    snapshot: Snapshot, policy: Policy, graph: SpaceGraph, room_id: RoomID
) -> tuple[dict[UserID, tuple[int, RoomID]], list[Finding]]:
    """For one managed room: user -> (level the Spaces above it ask for, the Space asking), before the bot's cap."""
    findings: list[Finding] = []
    desired: dict[UserID, tuple[int, RoomID]] = {}
    for space_id in sorted(graph.authority.get(room_id, frozenset())):
        space = snapshot.rooms.get(space_id)
        if space is None or not (space.is_space or space_id in graph.roots):
            continue
        for space_policy in policies_for(graph, policy, space_id):
            if not space_policy.power_levels:
                continue
            levels, bad = space_levels(space, snapshot, space_policy.creator_level)
            findings.extend(bad)
            for user_id, level in levels.items():
                mapped = space_policy.power_level_map.get(level, level)
                if space_policy.max_power_level is not None:
                    mapped = min(mapped, space_policy.max_power_level)
                if mapped > desired.get(user_id, (-math.inf, space_id))[0]:
                    desired[user_id] = (mapped, space_id)
    return desired, findings


def plan_power_levels(
    snapshot: Snapshot, policy: Policy, graph: SpaceGraph
) -> tuple[list[Action], list[tuple[RoomID, UserID]], list[OwnedLevel], list[Finding]]:
    actions: list[Action] = []
    stale: list[tuple[RoomID, UserID]] = []
    released: list[OwnedLevel] = []
    findings: list[Finding] = []
    owned_by_room: dict[RoomID, dict[UserID, OwnedLevel]] = {}
    for (room_id, user_id), record in snapshot.owned_levels.items():
        owned_by_room.setdefault(room_id, {})[user_id] = record
    for room_id in sorted(graph.managed):
        room = snapshot.rooms.get(room_id)
        if room is None or room.tombstone:
            continue
        if not any(p.power_levels for p in policies_for(graph, policy, room_id)):
            continue
        desired, bad = desired_levels(snapshot, policy, graph, room_id)
        findings.extend(bad)
        owned = owned_by_room.get(room_id, {})
        if not desired and not owned:
            continue
        result = diff_room(room, policy.bot, desired, owned)
        findings.extend(result.findings)
        stale.extend((room_id, u) for u in result.stale)
        released.extend(result.released)
        if result.changes:
            governing = policies_for(graph, policy, room_id)
            actions.append(
                Action(
                    kind=ActionKind.SET_POWER_LEVELS,
                    room_id=room_id,
                    reason=result.reason(),
                    cause="power_levels",
                    space_id=governing[0].room_id if governing else None,
                    content=result.content,
                    changes=result.changes,
                    ownership=result.ownership,
                )
            )
    return actions, stale, released, findings


class RoomDiff:
    """The outcome of diffing one room's users map against what the Spaces ask for."""

    def __init__(self) -> None:
        self.changes: dict[UserID, tuple[int | None, int | None]] = {}
        self.ownership: dict[UserID, OwnedLevel | None] = {}
        self.stale: list[UserID] = []
        self.released: list[OwnedLevel] = []
        self.findings: list[Finding] = []
        self.content: dict[str, Any] | None = None
        self.sources: dict[UserID, RoomID] = {}

    def reason(self) -> str:
        parts = []
        for user_id, (before, after) in sorted(self.changes.items()):
            parts.append(f"{user_id} {'-' if before is None else before}->{'-' if after is None else after}")
        return "mirror Space power levels: " + ", ".join(parts)


def diff_room(
    room: RoomState,
    bot: UserID,
    desired: Mapping[UserID, tuple[int, RoomID]],
    owned: Mapping[UserID, OwnedLevel],
) -> RoomDiff:
    """Which `users` entries of one room to change, keeping every entry spacesync does not own."""
    diff = RoomDiff()
    feats = features(room.room_version)
    if feats is None:
        diff.findings.append(
            Finding(
                room.room_id,
                "unknown_version",
                f"unknown room version {room.room_version!r}: power levels not written",
            )
        )
        return diff
    pl = room.power_levels
    bot_level = user_level(room, bot)
    if bot_level < pl.event_level("m.room.power_levels"):
        if (
            any(
                user_id != bot
                and not (feats.creators_privileged and user_id in room.creators)
                and level > pl.users.get(user_id, pl.users_default)
                and not held_down(pl, user_id, owned.get(user_id))
                for user_id, (level, _) in desired.items()
            )
            or owned
        ):
            diff.findings.append(
                Finding(
                    room.room_id,
                    "no_power",
                    f"the bot lacks the power to change power levels (needs {pl.event_level('m.room.power_levels')})",
                )
            )
        return diff
    ceiling = bot_level - 1
    for user_id in sorted(set(desired) | set(owned)):
        if user_id == bot:
            continue
        if feats.creators_privileged and user_id in room.creators:
            continue
        entry = pl.users.get(user_id)
        current = pl.users_default if entry is None else entry
        mine = owned.get(user_id)
        asked = desired[user_id][0] if user_id in desired else None
        if mine is not None and (mine.released or entry != mine.written):
            # Changed by someone else since spacesync's own write: the room's, not spacesync's, until the room's
            # moderators hand it back (set it to spacesync's write or to what the Space asks now) or a moderator
            # runs '!spacesync powerlevels release'. Whatever the Space asks meanwhile, it is not overwritten.
            if asked is None:  # the Space asks nothing any more: nothing left to hand back
                if not mine.released:
                    diff.findings.append(_changed_by_hand(room.room_id, user_id, mine, entry, ": left alone"))
                diff.stale.append(user_id)
                continue
            if entry is not None and entry in (mine.written, min(asked, ceiling)):
                mine = OwnedLevel(room.room_id, user_id, int(entry), mine.previous)
                diff.released.append(mine)  # handed back: spacesync's own again, mirrored from here
            else:
                if not mine.released:
                    diff.released.append(attrs.evolve(mine, released=True))
                until = (
                    f": left alone until the room's moderators set it back to {mine.written} or "
                    "'!spacesync powerlevels release' hands it back"
                )
                diff.findings.append(_changed_by_hand(room.room_id, user_id, mine, entry, until))
                continue
        if current >= bot_level:
            if user_id in desired and desired[user_id][0] > current:
                diff.findings.append(Finding(room.room_id, "above_bot", f"{user_id} is at or above the bot's level"))
            continue
        wanted = min(desired[user_id][0], ceiling) if user_id in desired else None
        if mine is not None:
            floor = pl.users_default if mine.previous is None else mine.previous
            if wanted is not None and wanted > floor:
                target: int | None = int(wanted)
                record: OwnedLevel | None = OwnedLevel(room.room_id, user_id, int(wanted), mine.previous)
            else:
                target, record = mine.previous, None
            if target != entry:
                diff.changes[user_id] = (entry, target)
                diff.ownership[user_id] = record
        elif wanted is not None and wanted > current:
            if held_down(pl, user_id, None):
                diff.findings.append(
                    Finding(
                        room.room_id,
                        "restricted_locally",
                        f"{user_id} is held at {entry} in this room, below its default level {pl.users_default} "
                        f"(muted or demoted here): the Space's level {int(wanted)} is not applied",
                    )
                )
            else:
                diff.changes[user_id] = (entry, int(wanted))
                diff.ownership[user_id] = OwnedLevel(room.room_id, user_id, int(wanted), entry)
        if user_id in desired:
            diff.sources[user_id] = desired[user_id][1]
    if diff.changes:
        diff.content = apply_user_changes(pl.raw, diff.changes)
    return diff


def _changed_by_hand(room_id: RoomID, user_id: UserID, mine: OwnedLevel, entry: int | None, then: str) -> Finding:
    now = "-" if entry is None else entry
    return Finding(
        room_id,
        FindingCode.CHANGED_BY_HAND.value,
        f"{user_id}'s level was changed by hand ({mine.written} -> {now}){then}",
    )


def held_down(pl: PowerLevels, user_id: UserID, mine: OwnedLevel | None) -> bool:
    """Whether the room itself set the user below its `users_default` (a mute, a local demotion).

    A room-local restriction wins over the Space: mirroring never raises such a user. An entry spacesync
    wrote (`mine`, still as written) is its own, not the room's decision.
    """
    entry = pl.users.get(user_id)
    if entry is None or entry >= pl.users_default:
        return False
    return mine is None or mine.released or mine.written != entry


def record_before(
    room_id: RoomID, user_id: UserID, change: tuple[int | None, int | None], record_after: OwnedLevel | None
) -> OwnedLevel | None:
    """The ownership record as it stood before one mirroring write, from the write's change and the record
    it stored: what undoing the write must restore so that the records match the room again.

    `diff_room` writes three kinds of change: a raise of an entry spacesync did not own (the new record's
    `previous` is the entry before), a raise of its own entry (`written` moves, `previous` stays: the record
    before held the old value), and a restore to `previous` (the record is dropped; it held the old value
    over what the entry returns to). A record's `written` always differs from its `previous`.
    """
    before, after = change
    if record_after is None:
        return OwnedLevel(room_id, user_id, before, after) if before is not None else None
    if record_after.previous == before:
        return None
    return None if before is None else OwnedLevel(room_id, user_id, before, record_after.previous)


def apply_user_changes(
    content: Mapping[str, Any], changes: Mapping[UserID, tuple[int | None, int | None]]
) -> dict[str, Any]:
    """The power-levels content with only the given `users` entries changed; every other key kept.

    Levels read from legacy strings are written back as the same integers ("read both, write integers").
    """
    new = {k: int_level(v) if k in _LEVEL_KEYS else v for k, v in content.items()}
    users = {k: int_level(v) for k, v in (new.get("users") or {}).items()}
    for user_id, (_, after) in changes.items():
        if after is None:
            users.pop(user_id, None)
        else:
            users[user_id] = int(after)
    new["users"] = users
    for key in ("events", "notifications"):
        if isinstance(new.get(key), dict):
            new[key] = {k: int_level(v) for k, v in new[key].items()}
    return new


_LEVEL_KEYS = frozenset(
    {
        "ban",
        "kick",
        "invite",
        "redact",
        "events_default",
        "state_default",
        "users_default",
    }
)


def int_level(value: Any) -> Any:
    """Legacy string levels ("50", allowed before room version 10) written back as integers; anything else kept."""
    if isinstance(value, str):
        level = parse_level(value)
        return value if level is None else level
    return value
