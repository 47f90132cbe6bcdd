"""Power-level mirroring: raise, cap, own, restore, leave hand-changed entries alone, v12 creators."""

from __future__ import annotations

from spacesync.core.planner import plan
from spacesync.core.powerlevels import apply_user_changes, record_before
from spacesync.model import ActionKind, OwnedLevel, Policy, PowerLevels, SpacePolicy

from .helpers import BOT, JOIN, actions_of, apply_plan, codes, pl_content, rid, room, snapshot, space, uid


def policy(*roots, **kw) -> Policy:
    spaces = tuple(r if isinstance(r, SpacePolicy) else SpacePolicy(rid(r)) for r in roots)
    return Policy(bot=BOT, spaces=spaces, **kw)


def child(name="x", parent="root", **kw):
    kw.setdefault("join_rule", "restricted")
    kw.setdefault("allow", [parent])
    return room(name, **kw)


def pl_actions(p):
    return {a.room_id: a for a in actions_of(p, ActionKind.SET_POWER_LEVELS)}


def assert_idempotent(snap, pol, first):
    again = plan(apply_plan(snap, first), pol)
    assert again.actions == (), again.actions
    assert again.stale_levels == ()


def test_raise_records_ownership_and_changes_only_users_entries():
    snap = snapshot(space("root", children=["x"], levels={"alice": 50, "bob": 10}), child(levels={"carol": 20}))
    p = plan(snap, policy("root"))
    action = pl_actions(p)[rid("x")]
    assert action.changes == {uid("alice"): (None, 50), uid("bob"): (None, 10)}
    assert action.ownership == {
        uid("alice"): OwnedLevel(rid("x"), uid("alice"), 50, None),
        uid("bob"): OwnedLevel(rid("x"), uid("bob"), 10, None),
    }
    before = dict(snap.rooms[rid("x")].power_levels.raw)
    after = dict(action.content)
    assert after.pop("users") == {**before.pop("users"), uid("alice"): 50, uid("bob"): 10}
    assert after == before
    assert_idempotent(snap, policy("root"), p)


def test_never_lowers_an_entry_it_does_not_own():
    snap = snapshot(space("root", children=["x"], levels={"alice": 50}), child(levels={"alice": 75}))
    assert not pl_actions(plan(snap, policy("root")))


def test_capped_below_the_bot_and_by_policy():
    snap = snapshot(
        space("root", children=["x"], levels={"alice": 100, "bob": 90, "carol": 50}),
        child(bot_level=80, pl=pl_content(bot_level=80, events={"m.room.power_levels": 80})),
    )
    p = plan(snap, policy("root"))
    assert pl_actions(p)[rid("x")].changes == {
        uid("alice"): (None, 79),
        uid("bob"): (None, 79),
        uid("carol"): (None, 50),
    }
    capped = policy(SpacePolicy(rid("root"), max_power_level=60, power_level_map={50: 30}))
    assert pl_actions(plan(snap, capped))[rid("x")].changes == {
        uid("alice"): (None, 60),
        uid("bob"): (None, 60),
        uid("carol"): (None, 30),
    }


def test_restore_previous_or_remove_when_the_space_no_longer_asks():
    snap = snapshot(
        space("root", children=["x"]),
        child(levels={"alice": 50, "bob": 50}),
        owned=[OwnedLevel(rid("x"), uid("alice"), 50, 10), OwnedLevel(rid("x"), uid("bob"), 50, None)],
    )
    p = plan(snap, policy("root"))
    action = pl_actions(p)[rid("x")]
    assert action.changes == {uid("alice"): (50, 10), uid("bob"): (50, None)}
    assert action.ownership == {uid("alice"): None, uid("bob"): None}
    assert uid("bob") not in action.content["users"]
    assert_idempotent(snap, policy("root"), p)


def test_lowered_space_level_lowers_the_owned_entry_but_not_below_previous():
    snap = snapshot(
        space("root", children=["x"], levels={"alice": 30, "bob": 5}),
        child(levels={"alice": 50, "bob": 50}),
        owned=[OwnedLevel(rid("x"), uid("alice"), 50, 10), OwnedLevel(rid("x"), uid("bob"), 50, 10)],
    )
    action = pl_actions(plan(snap, policy("root")))[rid("x")]
    assert action.changes == {uid("alice"): (50, 30), uid("bob"): (50, 10)}
    assert action.ownership == {uid("alice"): OwnedLevel(rid("x"), uid("alice"), 30, 10), uid("bob"): None}


def test_hand_changed_entry_is_reported_and_forgotten():
    snap = snapshot(
        space("root", children=["x"]),
        child(levels={"alice": 60, "bob": 0}),
        owned=[OwnedLevel(rid("x"), uid("alice"), 50, None)],
    )
    p = plan(snap, policy("root"))
    assert not pl_actions(p)
    assert p.stale_levels == ((rid("x"), uid("alice")),)
    assert (rid("x"), "changed_by_hand") in codes(p)
    assert_idempotent(snap, policy("root"), p)


def test_hand_lowered_entry_is_left_alone_while_the_space_asks_the_same():
    # The bot wrote 50; a room moderator lowered alice to 20 while the Space still says 50.
    snap = snapshot(
        space("root", children=["x"], levels={"alice": 50}),
        child(levels={"alice": 20}),
        owned=[OwnedLevel(rid("x"), uid("alice"), 50, None)],
    )
    first = plan(snap, policy("root"))
    assert not pl_actions(first)
    assert first.released_levels == (OwnedLevel(rid("x"), uid("alice"), 50, None, released=True),)
    assert (rid("x"), "changed_by_hand") in codes(first)
    settled = apply_plan(snap, first)
    again = plan(settled, policy("root"))
    assert not pl_actions(again) and again.stale_levels == () and again.released_levels == ()

    # The Space later asks more: the room's own change still stands (reported, not overwritten).
    promoted = snapshot(
        space("root", children=["x"], levels={"alice": 75}),
        child(levels={"alice": 20}),
        owned=list(settled.owned_levels.values()),
    )
    kept = plan(promoted, policy("root"))
    assert not pl_actions(kept) and kept.stale_levels == () and kept.released_levels == ()
    assert (rid("x"), "changed_by_hand") in codes(kept)

    # The room's moderators hand it back by setting spacesync's value again: mirrored from there.
    handed_back = snapshot(
        space("root", children=["x"], levels={"alice": 75}),
        child(levels={"alice": 50}),
        owned=list(settled.owned_levels.values()),
    )
    raised = plan(handed_back, policy("root"))
    assert pl_actions(raised)[rid("x")].changes == {uid("alice"): (50, 75)}
    assert pl_actions(raised)[rid("x")].ownership == {uid("alice"): OwnedLevel(rid("x"), uid("alice"), 75, None)}
    assert (rid("x"), "changed_by_hand") not in codes(raised)

    demoted = snapshot(
        space("root", children=["x"]),
        child(levels={"alice": 20}),
        owned=list(settled.owned_levels.values()),
    )
    dropped = plan(demoted, policy("root"))
    assert not pl_actions(dropped) and dropped.stale_levels == ((rid("x"), uid("alice")),)


def test_levels_the_bot_wrote_into_a_sub_space_are_not_mirrored_from_it():
    # sub's alice entry is the bot's own write (root asked for it once); root no longer asks.
    snap = snapshot(
        space("root", children=["sub"]),
        space("sub", children=["x"], parents=["root"], levels={"alice": 50}),
        child(parent="sub", levels={"alice": 50}),
        owned=[OwnedLevel(rid("sub"), uid("alice"), 50, None), OwnedLevel(rid("x"), uid("alice"), 50, None)],
    )
    p = plan(snap, policy("root"))
    assert {r: a.changes for r, a in pl_actions(p).items()} == {
        rid("sub"): {uid("alice"): (50, None)},
        rid("x"): {uid("alice"): (50, None)},
    }
    assert_idempotent(snap, policy("root"), p)


def test_sub_space_keeps_granting_what_it_granted_before_the_bot_wrote():
    # sub granted alice 20 itself; the bot raised her there to 40 (root's 10, mapped).
    # Its own grant still counts below it.
    snap = snapshot(
        space("root", children=["sub"], levels={"alice": 10}),
        space("sub", children=["x"], parents=["root"], levels={"alice": 40}),
        child(parent="sub"),
        owned=[OwnedLevel(rid("sub"), uid("alice"), 40, 20)],
    )
    pol = policy(SpacePolicy(rid("root"), power_level_map={10: 40, 20: 50}))
    p = plan(snap, pol)
    assert pl_actions(p)[rid("x")].changes == {uid("alice"): (None, 50)}
    assert_idempotent(snap, pol, p)


def test_cascade_through_sub_space_is_idempotent_with_a_level_map():
    snap = snapshot(
        space("root", children=["sub"], levels={"alice": 10}),
        space("sub", children=["x"], parents=["root"], levels={"alice": 20}),
        child(parent="sub"),
    )
    pol = policy(SpacePolicy(rid("root"), power_level_map={10: 40, 20: 50}))
    p = plan(snap, pol)
    assert {r: a.changes for r, a in pl_actions(p).items()} == {
        rid("sub"): {uid("alice"): (20, 40)},
        rid("x"): {uid("alice"): (None, 50)},
    }
    assert_idempotent(snap, pol, p)


def test_users_at_or_above_the_bot_are_never_touched():
    snap = snapshot(
        space("root", children=["x"], levels={"peer": 100}),
        child(levels={"peer": 100, "high": 100}),
        owned=[OwnedLevel(rid("x"), uid("high"), 100, 0)],
    )
    p = plan(snap, policy("root"))
    assert not pl_actions(p)


def test_v12_creators():
    snap = snapshot(
        space("root", version="12", creator="founder", children=["x", "y"], levels={"alice": 50}),
        child("x", version="10"),
        child("y", version="12", creator="alice"),
    )
    p = plan(snap, policy(SpacePolicy(rid("root"), creator_level=100)))
    actions = pl_actions(p)
    # the Space's creator is mirrored at creator_level, capped below the bot
    assert actions[rid("x")].changes == {uid("alice"): (None, 50), uid("founder"): (None, 99)}
    # a v12 creator of the room itself is never written
    assert actions[rid("y")].changes == {uid("founder"): (None, 99)}
    assert uid("alice") not in actions[rid("y")].content["users"]
    assert_idempotent(snap, policy("root"), p)


def test_bot_as_v12_creator_writes_up_to_the_asked_level():
    snap = snapshot(
        space("root", children=["x"], levels={"alice": 100}),
        child(version="12", creator="bot", pl=pl_content({}, bot_level=None)),
    )
    action = pl_actions(plan(snap, policy("root")))[rid("x")]
    assert action.changes == {uid("alice"): (None, 100)}
    assert BOT not in action.content["users"]


def test_unknown_room_version_is_never_written():
    snap = snapshot(space("root", children=["x"], levels={"alice": 50}), child(version="org.example.v99"))
    p = plan(snap, policy("root"))
    assert not pl_actions(p)
    assert (rid("x"), "unknown_version") in codes(p)


def test_string_levels_are_read_and_integers_written():
    snap = snapshot(
        space("root", version="9", children=["x"], pl={"users": {BOT: "100", uid("alice"): "50"}}),
        child(
            version="9",
            pl={
                "users": {BOT: "100", uid("old"): "25"},
                "kick": "50",
                "users_default": "0",
                "events": {"m.room.power_levels": "100"},
            },
        ),
    )
    p = plan(snap, policy("root"))
    action = pl_actions(p)[rid("x")]
    assert action.changes == {uid("alice"): (None, 50)}
    content = action.content
    assert content["users"] == {BOT: 100, uid("old"): 25, uid("alice"): 50}
    assert content["kick"] == 50 and content["users_default"] == 0 and content["events"] == {"m.room.power_levels": 100}
    assert PowerLevels.from_content(content).users == {**snap.rooms[rid("x")].power_levels.users, uid("alice"): 50}


def test_apply_user_changes_keeps_every_other_key():
    content = {"users": {"@a:x": 10, "@b:x": 20}, "ban": 50, "notifications": {"room": 50}, "custom": [1]}
    new = apply_user_changes(content, {uid("@a:x"): (10, None), uid("@c:x"): (None, 5)})
    assert new == {"users": {"@b:x": 20, "@c:x": 5}, "ban": 50, "notifications": {"room": 50}, "custom": [1]}
    assert content["users"] == {"@a:x": 10, "@b:x": 20}


def test_power_levels_off_and_not_opted_in_rooms_are_left_alone():
    snap = snapshot(
        space("root", children=["x", "stray"], levels={"alice": 50}),
        child(),
        room("stray", members={"alice": JOIN}),
    )
    assert not pl_actions(plan(snap, policy(SpacePolicy(rid("root"), power_levels=False))))
    assert set(pl_actions(plan(snap, policy("root")))) == {rid("x")}


def test_bot_without_power_level_power():
    snap = snapshot(
        space("root", children=["x"], levels={"alice": 50}),
        child(pl=pl_content(bot_level=90)),  # m.room.power_levels needs 100
    )
    p = plan(snap, policy("root"))
    assert not pl_actions(p)
    assert (rid("x"), "no_power") in codes(p)


def test_a_sub_space_listing_the_root_does_not_grant_levels_in_it():
    snap = snapshot(
        space("root", children=["sub"], levels={"alice": 50}),
        space("sub", children=["root"], parents=["root"], levels={"bob": 50}),
    )
    p = plan(snap, policy("root"))
    assert {r: a.changes for r, a in pl_actions(p).items()} == {rid("sub"): {uid("alice"): (None, 50)}}


def test_a_user_muted_in_the_room_is_not_raised_and_is_reported():
    pl = pl_content({"muted": -10, "demoted": 5}, users_default=10)
    snap = snapshot(
        space("root", children=["x", "y"], levels={"muted": 50, "demoted": 50, "bob": 50}),
        child("x", pl=pl),
        child("y"),
    )
    p = plan(snap, policy("root"))
    assert pl_actions(p)[rid("x")].changes == {uid("bob"): (None, 50)}
    assert pl_actions(p)[rid("y")].changes == {
        uid("muted"): (None, 50),
        uid("demoted"): (None, 50),
        uid("bob"): (None, 50),
    }
    held = [f for f in p.findings if f.code == "restricted_locally"]
    assert sorted(f.message for f in held) == [
        f"{uid('demoted')} is held at 5 in this room, below its default level 10 (muted or demoted here): "
        "the Space's level 50 is not applied",
        f"{uid('muted')} is held at -10 in this room, below its default level 10 (muted or demoted here): "
        "the Space's level 50 is not applied",
    ]
    assert {f.room_id for f in held} == {rid("x")}
    assert_idempotent(snap, policy("root"), p)


def test_a_mute_after_spacesync_raised_the_user_wins_once_the_space_level_changes():
    # spacesync raised alice to 50; the room muted her since (released); the Space now asks 60.
    snap = snapshot(
        space("root", children=["x"], levels={"alice": 60}),
        child(levels={"alice": -1}),
        owned=[OwnedLevel(rid("x"), uid("alice"), 50, None, released=True)],
    )
    p = plan(snap, policy("root"))
    assert not pl_actions(p) and p.stale_levels == ()
    assert (rid("x"), "changed_by_hand") in codes(p)


def test_no_power_is_not_reported_for_a_muted_user_alone():
    weak = pl_content({"muted": -5}, bot_level=40)
    snap = snapshot(space("root", children=["x"], levels={"muted": 30}), child(pl=weak))
    assert (rid("x"), "no_power") not in codes(plan(snap, policy("root")))


def test_record_before_gives_back_the_record_each_kind_of_write_replaced():
    """Undo relies on it: for every write diff_room makes, the record before it follows from the write."""
    x = rid("x")
    cases = [
        # raise of an entry spacesync does not own, with and without an entry before
        (snapshot(space("root", children=["x"], levels={"a": 50}), child()), uid("a")),
        (snapshot(space("root", children=["x"], levels={"a": 50}), child(levels={"a": 10})), uid("a")),
        # raise of its own entry
        (
            snapshot(
                space("root", children=["x"], levels={"a": 75}),
                child(levels={"a": 50}),
                owned=[OwnedLevel(x, uid("a"), 50, None)],
            ),
            uid("a"),
        ),
        (
            snapshot(
                space("root", children=["x"], levels={"a": 75}),
                child(levels={"a": 50}),
                owned=[OwnedLevel(x, uid("a"), 50, 10)],
            ),
            uid("a"),
        ),
        # restore, to no entry and to the entry before
        (
            snapshot(space("root", children=["x"]), child(levels={"a": 50}), owned=[OwnedLevel(x, uid("a"), 50, None)]),
            uid("a"),
        ),
        (
            snapshot(space("root", children=["x"]), child(levels={"a": 50}), owned=[OwnedLevel(x, uid("a"), 50, 10)]),
            uid("a"),
        ),
        # a lower level the Space asks for: back to the level before, kept as spacesync's write
        (
            snapshot(
                space("root", children=["x"], levels={"a": 30}),
                child(levels={"a": 50}),
                owned=[OwnedLevel(x, uid("a"), 50, 10)],
            ),
            uid("a"),
        ),
    ]
    for snap, user in cases:
        action = pl_actions(plan(snap, policy("root")))[x]
        assert record_before(x, user, action.changes[user], action.ownership[user]) == snap.owned_levels.get((x, user))
