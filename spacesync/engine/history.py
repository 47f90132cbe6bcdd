"""Membership histories: which `leave` in a managed Space was a real departure, and since when spacesync knows.

/state carries only the current membership event, and a `leave` alone cannot tell a user who left
(join -> leave) from one who declined an invite, withdrew a knock or was never joined. spacesync
learns the previous membership from, in order:

1. `unsigned.prev_content` of the event, when it came through a /sync timeline;
2. its own record of the last membership event it saw for that user (the record's event is the one
   the leave replaced, or spacesync saw the user joined and the homeserver does not say what the
   leave replaced);
3. the event the leave names in `unsigned.replaces_state`, fetched once with
   `GET /rooms/{roomId}/event/{eventId}` (only for users still joined somewhere, so only where it matters),
   and the events before it the same way (each with its `prev_content`), up to MAX_HOPS, when it was no join:
   for a membership spacesync never saw, a knock or invite may stand between the leave and the join.

A departure is sticky: a user spacesync saw joined in the Space (or whose history shows a join) who is now
anything but joined has departed until a new join. A knock, an invite, and their rejection or withdrawal after a
departure keep it (`was_joined` True on that knock, invite or leave; the record keeps the time of the departure,
so a grace period runs on from it). Someone never seen joined stays no departure.

When none of these can tell, `was_joined` stays None and the planner evicts nobody on that leave: it
reports it instead. Each membership also gets the time spacesync first saw it (`seen_ms`, its own clock):
grace periods run from that, never from the sender's `origin_server_ts`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

import attrs
import structlog

from ..matrix import MatrixAdapter
from ..matrix.errors import REQUEST_ERRORS
from ..model import EventID, Membership, MemberState, RoomID, RoomState, UserID
from ..store import SeenMembership, Store

log = structlog.get_logger("spacesync.history")

LOOKUP_ERRORS: tuple[type[BaseException], ...] = (*REQUEST_ERRORS, ValueError)
MAX_HOPS = 4
"""Membership events read back per look-up (a knock's rejection, the knock, the leave, the join before it)."""
RETRY_FAILED_LOOKUP_S = 300.0
"""A look-up that failed (event gone, server down) is tried again after this long, not on every plan."""


class MemberHistory:
    """Annotates the members of managed Spaces with `was_joined` and `seen_ms`, and remembers them."""

    def __init__(
        self, matrix: MatrixAdapter | None, store: Store, *, max_lookups: int = 100, concurrency: int = 4
    ) -> None:
        self.matrix = matrix
        self.store = store
        self.max_lookups = max_lookups
        self._sem = asyncio.Semaphore(concurrency)
        self._records: dict[tuple[RoomID, UserID], SeenMembership] | None = None
        self._failed: dict[str, float] = {}
        self._unresolved: set[tuple[RoomID, UserID, EventID | None]] = set()
        """Memberships whose history a look-up has not answered yet (failed or deferred): looked up again."""
        self.lookups = 0

    async def annotate(
        self, rooms: Mapping[RoomID, RoomState], spaces: Iterable[RoomID], now_ms: int | None = None
    ) -> dict[RoomID, RoomState]:
        """`rooms` with the members of each of `spaces` annotated; other rooms are returned as they are."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if self._records is None:
            self._records = await self.store.member_history()
        records = self._records
        out = dict(rooms)
        changed: dict[tuple[RoomID, UserID], SeenMembership] = {}
        lookups: list[tuple[RoomID, UserID, MemberState]] = []
        joined_somewhere: set[UserID] | None = None
        for space_id in sorted(set(spaces)):
            room = rooms.get(space_id)
            if room is None:
                continue
            for user_id, state in room.members.items():
                key = (space_id, user_id)
                record = records.get(key)
                was_joined = state.was_joined if state.membership is not Membership.JOIN else None
                if record is not None and record.event_id == state.event_id:
                    was_joined = _either(record.was_joined, was_joined)
                    seen_at = record.seen_at
                else:
                    seen_at = now
                    if state.membership is not Membership.JOIN and record is not None:
                        if record.membership == Membership.JOIN.value or record.was_joined is True:
                            # Sticky: seen joined and not joined since, so departed whatever came between
                            # (a knock, an invite, their rejection). The grace runs from the departure.
                            was_joined = True
                            if record.membership != Membership.JOIN.value:
                                seen_at = record.seen_at
                        elif (
                            state.membership is Membership.LEAVE
                            and was_joined is None
                            and state.replaces is not None
                            and state.replaces == record.event_id
                        ):
                            was_joined = False  # replaced a membership of someone not known to have joined
                unknown = state.membership is Membership.LEAVE and was_joined is None
                # Never seen: what the homeserver says came before may itself follow a departure (leave, then a
                # knock, then its rejection): the history is read back to a join or to the first membership.
                unseen = record is None and was_joined is not True and state.membership in _NOT_JOINED
                retry = (space_id, user_id, state.event_id) in self._unresolved
                if (unknown or unseen or retry) and state.replaces is not None:
                    if joined_somewhere is None:
                        joined_somewhere = _joined_anywhere(rooms)
                    if user_id in joined_somewhere:  # only where it could lead to an eviction
                        lookups.append((space_id, user_id, state))
                new = SeenMembership(str(state.event_id or ""), state.membership.value, was_joined, seen_at)
                if record != new:
                    records[key] = changed[key] = new
        if lookups:
            answered = await self._look_up(lookups)
            for space_id, user_id, state in lookups:  # not answered (failed, deferred): asked again later
                if (space_id, user_id) in answered:
                    self._unresolved.discard((space_id, user_id, state.event_id))
                else:
                    self._unresolved.add((space_id, user_id, state.event_id))
            for (space_id, user_id), was_joined in answered.items():
                record = records[(space_id, user_id)]
                records[(space_id, user_id)] = changed[(space_id, user_id)] = attrs.evolve(
                    record, was_joined=was_joined
                )
        for space_id in set(spaces):
            room = rooms.get(space_id)
            if room is None:
                continue
            members = {}
            for user_id, state in room.members.items():
                record = records[(space_id, user_id)]
                members[user_id] = attrs.evolve(
                    state,
                    seen_ms=record.seen_at,
                    was_joined=None if state.membership is Membership.JOIN else record.was_joined,
                )
            out[space_id] = attrs.evolve(room, members=members)
        if changed:
            try:
                await self.store.save_member_history(changed)
            except Exception as e:  # kept in memory: written again with the next change
                log.warning("could not save membership histories", error=f"{type(e).__name__}: {e}")
        return out

    async def _look_up(self, todo: list[tuple[RoomID, UserID, MemberState]]) -> dict[tuple[RoomID, UserID], bool]:
        """The membership each leave replaced, read from the homeserver; failures stay unknown."""
        if self.matrix is None:
            return {}
        now = time.monotonic()
        todo = [
            t
            for t in todo
            if now - self._failed.get(str(t[2].replaces), -RETRY_FAILED_LOOKUP_S) >= RETRY_FAILED_LOOKUP_S
        ][: self.max_lookups]
        found: dict[tuple[RoomID, UserID], bool] = {}

        async def one(space_id: RoomID, user_id: UserID, state: MemberState) -> None:
            assert self.matrix is not None and state.replaces is not None
            event_id = state.replaces
            async with self._sem:
                for _ in range(MAX_HOPS):
                    try:
                        event = await self.matrix.event(space_id, event_id)
                        self.lookups += 1
                    except LOOKUP_ERRORS as e:
                        self._failed[str(state.replaces)] = time.monotonic()
                        log.info(
                            "previous membership unreadable",
                            room=space_id,
                            user=user_id,
                            event=event_id,
                            error=f"{type(e).__name__}: {e}",
                        )
                        return
                    content = event.get("content")
                    membership = content.get("membership") if isinstance(content, dict) else None
                    if event.get("state_key") != user_id or not isinstance(membership, str):
                        self._failed[str(state.replaces)] = time.monotonic()
                        log.warning("previous membership malformed", room=space_id, user=user_id, event=event_id)
                        return
                    unsigned = event.get("unsigned")
                    unsigned = unsigned if isinstance(unsigned, dict) else {}
                    prev = unsigned.get("prev_content")
                    if membership == Membership.JOIN.value or (
                        isinstance(prev, dict) and prev.get("membership") == Membership.JOIN.value
                    ):
                        found[(space_id, user_id)] = True
                        return
                    earlier = unsigned.get("replaces_state")
                    if not isinstance(earlier, str):
                        found[(space_id, user_id)] = False  # back to the first membership: never joined
                        return
                    event_id = EventID(earlier)
            # deeper than MAX_HOPS: still unknown

        await asyncio.gather(*(one(*t) for t in todo))
        return found


_NOT_JOINED = (Membership.LEAVE, Membership.KNOCK, Membership.INVITE)


def _either(recorded: bool | None, now: bool | None) -> bool | None:
    """What two sources of one membership's history say together: a join either saw wins."""
    if recorded is True or now is True:
        return True
    return recorded if recorded is not None else now


def _joined_anywhere(rooms: Mapping[RoomID, RoomState]) -> set[UserID]:
    """Users joined to any room read: a leaver not among them has nothing to be evicted from."""
    out: set[UserID] = set()
    for room in rooms.values():
        out.update(u for u, m in room.members.items() if m.membership is Membership.JOIN)
    return out
