"""The mass-action guard counts distinct users evicted from a Space over a window, not per pass."""

from __future__ import annotations

from spacesync.engine.executor import fingerprint
from spacesync.engine.guard import guard
from spacesync.model import Action, ActionKind, Membership, MemberState, PowerLevels, RoomState

from .helpers import rid, uid

SPACE = rid("space")
OTHER = rid("other")


def kick(user: str, room: str = "r1", space=SPACE) -> Action:
    return Action(ActionKind.KICK, rid(room), uid(user), reason="left", space_id=space)


def test_one_pass_over_the_limit_holds_every_eviction_of_that_space():
    actions = [kick(f"u{i}") for i in range(4)]
    out = guard(actions, {SPACE: 3}, 25)
    assert out.release == ()
    assert list(out.hold[SPACE]) == actions


def test_within_the_limit_counting_the_window_releases():
    out = guard([kick("u3")], {SPACE: 3}, 25, {SPACE: {uid("u1"), uid("u2")}})
    assert out.release == (kick("u3"),) and not out.hold


def test_a_slow_drip_is_held_once_the_window_is_full():
    """One leaver per pass: the fourth within the window is held though its pass has one user."""
    recent = {SPACE: {uid("u1"), uid("u2"), uid("u3")}}
    out = guard([kick("u4")], {SPACE: 3}, 25, recent)
    assert out.release == ()
    assert out.hold[SPACE] == (kick("u4"),)


def test_a_user_already_evicted_in_the_window_does_not_count_twice():
    recent = {SPACE: {uid("u1"), uid("u2"), uid("u3")}}
    out = guard([kick("u1", "r2")], {SPACE: 3}, 25, recent)
    assert out.release == (kick("u1", "r2"),) and not out.hold


def test_windows_are_per_space_and_other_actions_pass():
    recent = {SPACE: {uid("u1"), uid("u2"), uid("u3")}}
    levels = Action(ActionKind.SET_POWER_LEVELS, rid("r1"), space_id=SPACE, changes={uid("u9"): (None, 50)})
    out = guard([kick("u4"), kick("u5", space=OTHER), levels], {SPACE: 3, OTHER: 3}, 25, recent)
    assert list(out.release) == [kick("u5", space=OTHER), levels]
    assert out.hold == {SPACE: (kick("u4"),)}


def test_the_default_limit_applies_to_unlisted_spaces():
    out = guard([kick("u1", space=OTHER), kick("u2", space=OTHER)], {}, 1, {})
    assert OTHER in out.hold and out.release == ()


def _room(levels: dict, member: MemberState | None = None) -> RoomState:
    members = {uid("u1"): member} if member else {}
    return RoomState(
        rid("r1"),
        room_version="10",
        power_levels=PowerLevels.from_content(levels),
        members=members,
        join_rules_content={"join_rule": "restricted"},
    )


def test_fingerprint_follows_the_state_that_decides_success():
    joined = MemberState(Membership.JOIN, event_id="$a")
    base = fingerprint(kick("u1"), _room({"kick": 50}, joined))
    assert fingerprint(kick("u1"), _room({"kick": 50}, joined)) == base
    assert fingerprint(kick("u1"), _room({"kick": 100}, joined)) != base, "power levels changed"
    assert fingerprint(kick("u1"), _room({"kick": 50}, MemberState(Membership.JOIN, event_id="$b"))) != base, (
        "the target rejoined"
    )
    assert fingerprint(kick("u1"), None) == "unknown"


def test_held_users_count_so_a_second_full_batch_is_held_too():
    """30 users held (over a limit of 25): 25 more leavers are held as well, not run without confirmation."""
    held = {SPACE: {uid(f"h{i}") for i in range(30)}}
    second = [kick(f"n{i}") for i in range(25)]
    out = guard(second, {SPACE: 25}, 25, {SPACE: set()}, held)
    assert out.release == () and list(out.hold[SPACE]) == second
    few_held = {SPACE: {uid("h1"), uid("h2")}}
    assert guard([kick("n1")], {SPACE: 25}, 25, {}, few_held).release == (kick("n1"),), "within the limit: runs"
