"""Incremental plans (`plan(..., users=...)`) against the full plan, on the random worlds of test_properties.

The quick plan after a /sync answer looks only at the users whose membership changed. That is right when what
one user should have depends on their own memberships and the rooms' other state alone: then the full plan of
the changed world holds nothing new for anyone else, and for the changed users the incremental plan is the full
plan's.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st

from spacesync.core.planner import PER_USER, graph_of, plan
from spacesync.model import Membership, MemberState, Plan, Snapshot

from .test_properties import SETTINGS, USERS, worlds

KINDS = [None, "join", "leave", "leave_kicked", "ban", "invite", "knock"]


def _split(p: Plan, users: frozenset[str] | None = None) -> tuple[list[str], list[str]]:
    """The plan's actions about one user (only these users', when given) and its other actions, comparable."""
    per_user = sorted(repr(a) for a in p.actions if a.kind in PER_USER and (users is None or a.user_id in users))
    others = sorted(repr(a) for a in p.actions if a.kind not in PER_USER)
    return per_user, others


def _member(kind: str, draw: Any, ts: int) -> MemberState:
    if kind == "leave_kicked":
        return MemberState(
            Membership.LEAVE, sender=USERS[0], seen_ms=ts, was_joined=draw(st.sampled_from([True, None]))
        )
    was_joined = draw(st.sampled_from([True, False, None])) if kind in ("leave", "knock", "invite") else None
    return MemberState(Membership(kind), sender=USERS[1], seen_ms=ts, was_joined=was_joined)


@st.composite
def changes(draw: Any, snapshot: Snapshot) -> tuple[Snapshot, frozenset[str]]:
    """The same world with some users' memberships changed in some rooms, and those users."""
    rooms = dict(snapshot.rooms)
    changed: set[str] = set()
    for _ in range(draw(st.integers(1, 4))):
        room_id = draw(st.sampled_from(sorted(rooms)))
        user = draw(st.sampled_from(USERS))
        kind = draw(st.sampled_from(KINDS))
        members = dict(rooms[room_id].members)
        if kind is None:
            members.pop(user, None)
        else:
            members[user] = _member(kind, draw, snapshot.now_ms - draw(st.integers(0, 120_000)))
        rooms[room_id] = attrs.evolve(rooms[room_id], members=members)
        changed.add(user)
    return attrs.evolve(snapshot, rooms=rooms), frozenset(changed)


@SETTINGS
@given(worlds(), st.data())
def test_an_incremental_plan_is_the_full_plan_for_its_users(world, data):
    snapshot, policy = world
    users = frozenset(data.draw(st.lists(st.sampled_from(USERS), max_size=3)))
    full, incremental = plan(snapshot, policy), plan(snapshot, policy, users)
    assert _split(incremental) == _split(full, users)
    assert incremental.managed == full.managed


@SETTINGS
@given(worlds(), st.data())
def test_after_membership_changes_the_incremental_plan_misses_nothing_the_full_plan_adds(world, data):
    before, policy = world
    after, changed = data.draw(changes(before))
    old, new, incremental = plan(before, policy), plan(after, policy), plan(after, policy, changed)
    got = set(_split(incremental)[0]) | set(_split(incremental)[1])
    wanted_now = set(_split(new)[0]) | set(_split(new)[1])
    wanted_before = set(_split(old)[0]) | set(_split(old)[1])
    assert got <= wanted_now, sorted(got - wanted_now)
    assert wanted_now - wanted_before <= got, sorted(wanted_now - wanted_before - got)


@SETTINGS
@given(worlds(), st.data())
def test_after_membership_changes_the_previous_graph_gives_the_same_plan(world, data):
    """The graph reads no membership: a quick plan may reuse the last plan's (`PlanScope.graph`)."""
    before, policy = world
    after, changed = data.draw(changes(before))
    assert plan(after, policy, changed, graph_of(before, policy)) == plan(after, policy, changed)
