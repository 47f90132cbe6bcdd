"""Acting on the present: the checks an action passes the moment it is sent, not only when it was planned.

A journaled action may wait long (other entries, rate limits, a restart) while the world moves on. Just before
the executor sends one, membership actions are planned again from the state cache (for their users only, so it
stays cheap at scale), and the state writes compare what the plan assumed with that state read fresh from the
homeserver (compare-and-set). An action the world no longer calls for ends `superseded`: never sent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, TypeVar

import attrs
from mautrix.api import Method, Path
from mautrix.errors import MatrixRequestError

from ..matrix import MatrixAdapter, StateCache
from ..model import Action, ActionKind, Membership, RoomID, RoomState, UserID
from ..store import Store

T = TypeVar("T")
Call = Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]

MEMBERSHIP_KINDS = frozenset({ActionKind.KICK, ActionKind.BAN, ActionKind.UNBAN, ActionKind.INVITE})
"""Actions about one user's membership: re-planned from the state cache, for their users only, before each send."""


class Superseded(Exception):
    """The world no longer calls for the action: it ends `superseded`, with `why` in its batch's notice."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def only_users(rooms: Mapping[RoomID, RoomState], users: Collection[UserID]) -> dict[RoomID, RoomState]:
    """The rooms with their members narrowed to `users`: what a plan for just those users reads. Whom a plan
    evicts, bans, unbans or invites depends only on that user's own memberships (and on rooms' other state), so
    planning the narrowed rooms gives the same membership actions for them as planning everyone, at the cost of
    the rooms, not of their members."""
    out: dict[RoomID, RoomState] = {}
    for room_id, room in rooms.items():
        members = room.members
        kept = {u: state for u in users if (state := members.get(u)) is not None}
        out[room_id] = attrs.evolve(room, members=kept)
    return out


def why_unwanted(action: Action, cache: StateCache) -> str:
    """A short reason a re-plan no longer makes a membership action, for the batch notice."""
    user = UserID(action.user_id or "")
    space = cache.get(action.space_id) if action.space_id else None
    joined = space is not None and bool(user) and space.membership(user) is Membership.JOIN
    if action.kind in (ActionKind.KICK, ActionKind.BAN) and joined:
        return f"{user} rejoined the Space"
    if action.kind is ActionKind.INVITE and space is not None and user and not joined:
        return f"{user} is no longer in the Space"
    return "no longer planned"


class SendChecks:
    """Compare-and-set checks against state read fresh from the homeserver just before a write."""

    def __init__(self, matrix: MatrixAdapter, store: Store, call: Call[Any]) -> None:
        self.matrix = matrix
        self.store = store
        self.call = call
        """The executor's request wrapper: 5xx and timeouts are transient there."""

    async def member_event(self, room_id: RoomID, user_id: UserID) -> dict[str, Any] | None:
        """The user's current membership event in the room (`format=event`), None when there is none."""
        path = Path.v3.rooms[room_id].state["m.room.member"][user_id]
        try:
            event = await self.call(
                lambda: self.matrix.request(Method.GET, path, query={"format": "event"}, timeout=30)
            )
        except MatrixRequestError as e:
            if e.http_status == 404:
                return None
            raise
        return event if isinstance(event, dict) else None

    async def unban(self, action: Action) -> bool:
        """Whether the user is still banned by a ban spacesync placed: the current ban event's sender is the bot
        and the ban is recorded. False when the user is no longer banned (already done); raises Superseded when
        the ban is someone else's (a moderator's ban is never lifted by spacesync)."""
        room, user = action.room_id, UserID(action.user_id or "")
        event = await self.member_event(room, user)
        content = (event or {}).get("content") or {}
        if content.get("membership") != Membership.BAN.value:
            return False
        sender = (event or {}).get("sender")
        if sender != self.matrix.user_id:
            raise Superseded(f"{user} is banned by {sender} now: their ban stays")
        if not any(b.room_id == room and b.user_id == user for b in await self.store.placed_bans()):
            raise Superseded(f"the ban of {user} is not recorded as spacesync's: it stays")
        return True

    async def join_rules(self, action: Action) -> bool:
        """For a join-rule repair (`enforce`): whether the room still holds the rule and allow list the plan saw.
        False when it already holds the planned content; raises Superseded when a lockdown holds the room (a
        lockdown outranks enforce) or the rules changed since the plan."""
        room = action.room_id
        if room in await self.store.lockdowns():
            raise Superseded("the room is locked down: the lockdown's join rule stays")
        current = await self.call(lambda: self.matrix.state_event(room, "m.room.join_rules")) or {}
        planned = dict(action.content or {})
        if current.get("join_rule") == planned.get("join_rule") and _allowed(current) == _allowed(planned):
            return False
        rule_before, _ = action.changes.get("join_rule", (None, None))
        allow_before, _ = action.changes.get("allow", ([], []))
        if current.get("join_rule") != rule_before or _allowed(current) != sorted(allow_before or []):
            raise Superseded(f"the join rule changed since it was planned (now {current.get('join_rule')})")
        return True


def _allowed(content: Mapping[str, Any]) -> list[str]:
    """The rooms a join-rule content allows, as the state cache reads them (`RoomState.allow`), sorted."""
    allow = content.get("allow")
    return sorted(
        a["room_id"]
        for a in (allow if isinstance(allow, list) else [])
        if isinstance(a, dict) and a.get("type") == "m.room_membership" and isinstance(a.get("room_id"), str)
    )
