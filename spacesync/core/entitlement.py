"""Who may stay in which room and why, and whom the bot must never act on."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from ..model import Membership, Policy, RoomID, RoomState, Snapshot, UserID
from .graph import SpaceGraph, exempt_in
from .versions import features

_NOT_JOINED = (Membership.LEAVE, Membership.KNOCK, Membership.INVITE)
"""Memberships that are a departure when they follow a join (`MemberState.was_joined`)."""

USER_ID_RE = re.compile(r"^@[^:\s]+:[A-Za-z0-9.\-\[\]:]+$")


def valid_user_id(user_id: str) -> bool:
    return isinstance(user_id, str) and len(user_id) <= 255 and bool(USER_ID_RE.match(user_id))


def user_level(room: RoomState, user_id: UserID) -> float:
    """A user's power level in a room; room version 12 creators count as infinite."""
    feats = features(room.room_version)
    if feats is not None and feats.creators_privileged and user_id in room.creators:
        return math.inf
    return room.power_levels.users.get(user_id, room.power_levels.users_default)


def protection(room: RoomState, user_id: UserID, policy: Policy, graph: SpaceGraph) -> str | None:
    """Why the bot must not act on this user in this room, or None when it may."""
    if user_id == policy.bot:
        return "the bot itself"
    if user_id in policy.admins:
        return "a spacesync admin"
    if user_id in exempt_in(graph, policy, room.room_id):
        return "exempt"
    if user_id in room.creators:
        return "a creator of the room"
    if user_level(room, user_id) >= user_level(room, policy.bot):
        return "at or above the bot's power level"
    return None


def entitlers(room: RoomState, graph: SpaceGraph) -> frozenset[RoomID]:
    """Rooms whose members may stay in `room`: its allow list and its managed parent Spaces.

    A sub-Space that lists its own ancestor back (a cycle) is no parent of it: leaving the
    sub-Space must not cost the user the Space above it.
    """
    allow = frozenset(room.allow) if room.join_rule in ("restricted", "knock_restricted") else frozenset()
    return allow | graph.entitling_parents(room.room_id)


class Memberships:
    """Memberships as they will be once planned actions run: the state the cascade reasons over."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._planned: dict[tuple[RoomID, UserID], Membership] = {}
        self._planned_in: dict[RoomID, set[UserID]] = {}
        self._lifted: set[tuple[RoomID, UserID]] = set()

    def get(self, room_id: RoomID, user_id: UserID) -> Membership | None:
        """The membership, or None when the user has no membership event there (never was in it)."""
        planned = self._planned.get((room_id, user_id))
        if planned is not None:
            return planned
        room = self._snapshot.rooms.get(room_id)
        if room is None:
            return None
        state = room.members.get(user_id)
        return state.membership if state else None

    def is_planned(self, room_id: RoomID, user_id: UserID) -> bool:
        return (room_id, user_id) in self._planned

    def plan(self, room_id: RoomID, user_id: UserID, membership: Membership, *, lift: bool = False) -> None:
        """Record a planned change; `lift` marks a leave that lifts a ban (an unban is no departure)."""
        self._planned[(room_id, user_id)] = membership
        self._planned_in.setdefault(room_id, set()).add(user_id)
        if lift:
            self._lifted.add((room_id, user_id))
        else:
            self._lifted.discard((room_id, user_id))

    def _users(self, room_id: RoomID) -> set[UserID]:
        """Users with a membership in the room, current or planned (a ban needs no prior membership)."""
        room = self._snapshot.rooms.get(room_id)
        users = set(room.members) if room is not None else set()
        users.update(self._planned_in.get(room_id, ()))
        return users

    def departed_from(self, room_id: RoomID, user_id: UserID) -> bool:
        """A real departure: banned, removed by this plan, or anything but joined after a join (sticky: a knock,
        an invite or their rejection after a departure keeps it).

        A declined or withdrawn invite, a rejected knock or an unban of someone never seen joined, or a leave
        nobody can tell the history of is no departure: unknown is not absent.
        """
        membership = self.get(room_id, user_id)
        if membership is Membership.BAN:
            return True
        if membership not in _NOT_JOINED:
            return False
        if self.is_planned(room_id, user_id):
            return (room_id, user_id) not in self._lifted
        state = self._snapshot.rooms[room_id].members.get(user_id)
        return state is not None and state.was_joined is True

    def history_unknown(self, room_id: RoomID, user_id: UserID) -> bool:
        """A leave whose previous membership nobody could tell (it evicts nobody, and is reported)."""
        if self.get(room_id, user_id) is not Membership.LEAVE or self.is_planned(room_id, user_id):
            return False
        state = self._snapshot.rooms[room_id].members.get(user_id)
        return state is not None and state.was_joined is None

    def departed(self, room_ids: Iterable[RoomID]) -> set[UserID]:
        """Users with a membership but join in any of these rooms, now or once planned actions ran: the only
        ones who can be evicted (`departed_from` tells which of them really departed)."""
        out: set[UserID] = set()
        for room_id in room_ids:
            out.update(u for u in self._users(room_id) if self.get(room_id, u) in (*_NOT_JOINED, Membership.BAN))
        return out

    def joined(self, room_id: RoomID) -> list[UserID]:
        if room_id not in self._snapshot.rooms:
            return []
        return sorted(u for u in self._users(room_id) if self.get(room_id, u) is Membership.JOIN)

    def banned(self, room_id: RoomID) -> list[UserID]:
        if room_id not in self._snapshot.rooms:
            return []
        return sorted(u for u in self._users(room_id) if self.get(room_id, u) is Membership.BAN)


def entitled_by(user_id: UserID, rooms: Iterable[RoomID], memberships: Memberships) -> RoomID | None:
    """The first room in `rooms` (in their order; pass them sorted) the user is joined to, or None."""
    for room_id in rooms:
        if memberships.get(room_id, user_id) is Membership.JOIN:
            return room_id
    return None
