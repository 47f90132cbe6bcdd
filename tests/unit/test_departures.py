"""Sticky departures: a user seen joined in a Space who is now anything but joined has departed until a new join.

The membership history (`engine/history.py`) is driven over random membership sequences, each step seen by
spacesync or not, through a /sync timeline (with `prev_content`) or a /state read (without); the planner then
evicts on what it says.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from spacesync.core.planner import plan
from spacesync.engine.history import MemberHistory
from spacesync.model import EventID, Membership, MemberState, OnLeave, Policy, SpacePolicy
from spacesync.store import SeenMembership

from .helpers import BOT, JOIN, KNOCK, rid, room, snapshot, space, uid
from .test_properties import SETTINGS

ALICE = uid("alice")
SPACE = rid("space")


class MemoryStore:
    """The member_history table, in memory."""

    def __init__(self) -> None:
        self.rows: dict[Any, SeenMembership] = {}

    async def member_history(self) -> dict[Any, SeenMembership]:
        return dict(self.rows)

    async def save_member_history(self, rows: dict[Any, SeenMembership]) -> None:
        self.rows.update(rows)


def _annotate(history: MemberHistory, state: MemberState, now_ms: int) -> MemberState:
    rooms = {SPACE: space("space", members={ALICE: state})}
    return asyncio.run(history.annotate(rooms, [SPACE], now_ms=now_ms))[SPACE].members[ALICE]


STEPS = st.lists(
    st.tuples(
        st.sampled_from([Membership.JOIN, Membership.LEAVE, Membership.KNOCK, Membership.INVITE, Membership.BAN]),
        st.booleans(),  # spacesync saw this membership (a plan ran while it held)
        st.booleans(),  # it came through /sync (prev_content known), else a /state read
        st.booleans(),  # the homeserver named the event it replaced (replaces_state)
    ),
    min_size=1,
    max_size=12,
)


@SETTINGS
@given(STEPS)
def test_a_departure_is_sticky_until_a_new_join_and_never_members_never_depart(steps):
    history = MemberHistory(None, MemoryStore())  # type: ignore[arg-type]
    previous: Membership | None = None
    previous_id: str | None = None
    seen_joined = False  # spacesync knows of a join: it saw one, or a /sync leave said it replaced one
    departed_at: int | None = None
    for n, (membership, seen, via_sync, names_previous) in enumerate(steps):
        event_id = EventID(f"$e{n}")
        was_joined = None
        if membership is Membership.LEAVE and via_sync:
            was_joined = previous is Membership.JOIN
        state = MemberState(
            membership,
            event_id=event_id,
            sender=ALICE,
            was_joined=was_joined,
            replaces=EventID(previous_id) if names_previous and previous_id else None,
        )
        if seen:
            now = 1000 * (n + 1)
            got = _annotate(history, state, now)
            if membership is Membership.JOIN:
                seen_joined, departed_at = True, None
                assert got.was_joined is None
            else:
                seen_joined = seen_joined or was_joined is True
                if seen_joined and departed_at is None:
                    departed_at = now
                # departed exactly when spacesync knows of an earlier join; a never-member never departs
                assert (got.was_joined is True) == seen_joined, (steps[: n + 1], got)
                if seen_joined:
                    assert got.seen_ms == departed_at  # the grace runs from the departure, not the last change
        previous, previous_id = membership, event_id


def _evictions(space_member: MemberState) -> list[Any]:
    snap = snapshot(
        space("space", children=["x"], members={ALICE: space_member}),
        room("x", join_rule="restricted", allow=["space"], members={ALICE: JOIN}),
    )
    pol = Policy(bot=BOT, spaces=(SpacePolicy(SPACE, on_leave=OnLeave.KICK),))
    return [(a.kind.value, a.user_id) for a in plan(snap, pol).actions]


def test_a_knock_invite_or_refusal_after_a_departure_evicts_and_a_never_members_does_not():
    for membership in (Membership.LEAVE, Membership.KNOCK, Membership.INVITE):
        assert _evictions(MemberState(membership, sender=BOT, was_joined=True)) == [("kick", ALICE)], membership
        assert _evictions(MemberState(membership, sender=BOT, was_joined=False)) == [], membership
        assert _evictions(MemberState(membership, sender=BOT, was_joined=None)) == [], membership
    assert _evictions(MemberState(KNOCK, sender=ALICE, was_joined=True)) == [("kick", ALICE)]
