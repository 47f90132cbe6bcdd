"""Which users a quick plan looks at (`engine/scope.py`): those whose membership changed, and only while nothing
else changed that decides what anyone should have."""

from __future__ import annotations

from typing import Any

import attrs

from spacesync.engine.history import MemberHistory
from spacesync.engine.scope import PlanScope
from spacesync.matrix.state import StateCache
from spacesync.model import PlacedBan, Policy, Snapshot, SpacePolicy

from .helpers import BOT, rid, uid

ROOM = rid("room")
POLICY = Policy(bot=BOT, spaces=(SpacePolicy(room_id=rid("space")),))
ALICE, BOB = uid("alice"), uid("bob")


def _member(user: str, membership: str) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "state_key": user,
        "sender": user,
        "event_id": f"${user}{membership}",
        "content": {"membership": membership},
    }


def _levels() -> dict[str, Any]:
    return {"type": "m.room.power_levels", "state_key": "", "sender": BOT, "event_id": "$pl", "content": {"users": {}}}


def _setup() -> tuple[StateCache, MemberHistory, PlanScope]:
    cache = StateCache()
    cache.replace(ROOM, [_member(ALICE, "join"), _member(BOB, "join")])
    history = MemberHistory(None, None)  # type: ignore[arg-type]  # only its changed users are read here
    scope = PlanScope(cache, history)
    # A full reconcile first: it takes the room read and plans for everyone.
    scope.begin(incremental=False)
    assert scope.users(POLICY, Snapshot()) is None
    scope.finished(complete=True)
    return cache, history, scope


def test_a_quick_plan_after_a_membership_change_looks_at_that_user_alone():
    cache, _, scope = _setup()
    cache.update(ROOM, [_member(ALICE, "leave")])
    scope.begin(incremental=True)
    assert scope.users(POLICY, Snapshot()) == {ALICE}
    scope.finished(complete=True)
    # Nothing changed since: nobody.
    scope.begin(incremental=True)
    assert scope.users(POLICY, Snapshot()) == frozenset()


def test_users_whose_history_changed_without_an_event_are_added():
    cache, history, scope = _setup()
    cache.update(ROOM, [_member(ALICE, "leave")])
    history.changed_users.add(BOB)  # a look-up answered: what is known of Bob's leave changed
    scope.begin(incremental=True)
    assert scope.users(POLICY, Snapshot()) == {ALICE, BOB}
    assert not history.changed_users


def test_a_room_read_again_names_the_users_whose_membership_it_changed():
    cache, _, scope = _setup()
    cache.replace(ROOM, [_member(ALICE, "leave"), _member(BOB, "join")])
    scope.begin(incremental=True)
    assert scope.users(POLICY, Snapshot()) == {ALICE}


def test_any_other_change_means_everyone():
    # Other state (power levels) by /sync or by a read, a room read for the first time, a dropped room.
    for change in (
        lambda c: c.update(ROOM, [_member(ALICE, "leave"), _levels()]),
        lambda c: c.replace(ROOM, [_member(ALICE, "join"), _member(BOB, "join"), _levels()]),
        lambda c: c.replace(rid("other"), [_member(ALICE, "join")]),
        lambda c: c.forget(ROOM),
    ):
        cache, _, scope = _setup()
        change(cache)
        scope.begin(incremental=True)
        assert scope.users(POLICY, Snapshot()) is None


def test_a_changed_policy_or_record_means_everyone():
    for policy, snapshot in (
        (attrs.evolve(POLICY, exempt=frozenset({BOB})), Snapshot()),
        (POLICY, Snapshot(placed_bans=frozenset({PlacedBan(ROOM, BOB, "on_leave")}))),
        (POLICY, Snapshot(unreachable={ROOM: "502"})),
    ):
        cache, _, scope = _setup()
        cache.update(ROOM, [_member(ALICE, "leave")])
        scope.begin(incremental=True)
        assert scope.users(policy, snapshot) is None


def test_after_a_reconcile_that_did_not_journal_everything_the_next_one_looks_at_everyone():
    cache, _, scope = _setup()
    scope.begin(incremental=True)
    scope.users(POLICY, Snapshot())
    scope.finished(complete=False)  # paused, a dry run, or actions to look at again
    cache.update(ROOM, [_member(ALICE, "leave")])
    scope.begin(incremental=True)
    assert scope.users(POLICY, Snapshot()) is None
    # A full reconcile takes the changes too, and plans for everyone.
    scope.finished(complete=True)
    cache.update(ROOM, [_member(BOB, "leave")])
    scope.begin(incremental=False)
    assert scope.users(POLICY, Snapshot()) is None


def test_the_graph_is_kept_only_while_nothing_but_memberships_changed():
    _, _, scope = _setup()
    snapshot = Snapshot()
    first = scope.graph(snapshot, POLICY, None)
    assert scope.graph(snapshot, POLICY, frozenset({ALICE})) is first
    assert scope.graph(snapshot, POLICY, None) is not first
