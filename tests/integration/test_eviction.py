"""Evictions against the real Synapse: cascades, shared rooms, cycles, opt-in and bans."""

from __future__ import annotations

import asyncio

from spacesync.model import ActionKind
from spacesync.store import Status
from spacesync.testing import wait_for


async def joined(client, room_id):
    return await client.joined_members(room_id)


async def membership(world, room_id, user_id):
    """The user's membership in the room as the owner sees it (None: never had one)."""
    return (await world.owner.client.members(room_id)).get(user_id)


async def wait_membership(world, rooms, user_id, expected, timeout=20.0):
    """Wait until the user's membership is `expected` in every room."""

    async def reached():
        for room in rooms:
            if await membership(world, room, user_id) != expected:
                return False
        return True

    await wait_for(reached, timeout=timeout, message=f"{user_id} not {expected} in all of {rooms}")


async def invite_and_join(world, user, *rooms):
    for room in rooms:
        await world.owner.client.invite(room, user.user_id)
        await user.client.join(room)


def findings(bot, code):
    plan = bot.app.reconciler.last_plan
    assert plan is not None
    return [f for f in plan.findings if f.code == code]


async def test_leave_cascades_through_subspace(world, start_bot, make_user):
    space = await world.space("S")
    sub = await world.space("T", parent=space)
    room = await world.room(sub, "R")
    user = await make_user("alice")
    for r in (space, sub, room):
        await user.client.join(r)
    bot = await start_bot([{"room": space}])
    assert user.user_id in await joined(world.owner.client, room)

    await user.client.leave(space)

    async def gone():
        return user.user_id not in await joined(world.owner.client, sub) and user.user_id not in await joined(
            world.owner.client, room
        )

    await wait_for(gone, timeout=20)
    members = await world.owner.client.members(room)
    assert members[user.user_id] == "leave"
    await bot.idle()
    records = await bot.app.store.audit_log(10, target=user.user_id)
    assert {r.room_id for r in records if r.outcome == "done"} == {sub, room}

    # One grouped notice in the admin room says who was removed from which rooms, and how to undo it.
    async def summary():
        for event in await world.owner.client.messages(bot.app.admin_room, limit=20):
            body = event.get("content", {}).get("body", "")
            if event.get("sender") == world.bot.user_id and body.startswith("Batch "):
                return event["content"]
        return None

    content = await wait_for(summary, timeout=10)
    assert f"kicked {user.user_id} in 2 rooms: R, T" in content["body"]
    assert "!spacesync undo" in content["body"] and "<code>" in content["formatted_body"]


# 1. A room shared by two Spaces


async def test_room_in_two_root_spaces_needs_both_left(world, start_bot, make_user):
    a = await world.space("A")
    b = await world.space("B")
    shared = await world.room(a, "shared", allow=[a, b])
    await world.owner.client.add_child(b, shared)
    only_a = await world.room(a, "only A")
    user = await make_user("alice")
    for r in (a, b, shared, only_a):
        await user.client.join(r)
    bot = await start_bot([{"room": a}, {"room": b}])

    await user.client.leave(a)
    await wait_membership(world, [only_a], user.user_id, "leave")
    await bot.reconcile()
    assert user.user_id in await joined(world.owner.client, shared), "kicked although still in Space B"

    await user.client.leave(b)
    await wait_membership(world, [shared], user.user_id, "leave")
    await bot.idle()
    records = await bot.app.store.audit_log(10, target=user.user_id)
    assert sorted(r.room_id for r in records if r.outcome == "done") == sorted([only_a, shared])


async def test_room_in_root_and_subspace_needs_both_left(world, start_bot, make_user):
    root = await world.space("S")
    sub = await world.space("T", parent=root)
    shared = await world.room(sub, "shared")  # restricted to T, listed by T and by S
    await world.owner.client.add_child(root, shared)
    only_sub = await world.room(sub, "only T")
    user = await make_user("alice")
    for r in (root, sub, shared, only_sub):
        await user.client.join(r)
    bot = await start_bot([{"room": root}])

    await user.client.leave(sub)
    await wait_membership(world, [only_sub], user.user_id, "leave")
    await bot.reconcile()
    assert user.user_id in await joined(world.owner.client, shared), "kicked although still in Space S"

    await user.client.leave(root)
    await wait_membership(world, [shared], user.user_id, "leave")
    await bot.idle()
    records = await bot.app.store.audit_log(10, target=user.user_id)
    assert sorted(r.room_id for r in records if r.outcome == "done") == sorted([only_sub, shared])


# 2. Cycles


async def test_space_cycle_terminates_and_still_evicts(world, start_bot, make_user):
    a = await world.space("A")
    b = await world.space("B", parent=a)  # restricted to A: opted in
    await world.owner.client.add_child(b, a)  # B lists A: a cycle
    room = await world.room(b, "R")
    user = await make_user("alice")
    for r in (a, b, room):
        await user.client.join(r)
    bot = await start_bot([{"room": a}])

    cycles = findings(bot, "cycle")
    assert cycles, bot.app.reconciler.last_plan.findings
    assert any(a in f.message or b in f.message for f in cycles)
    assert set(bot.app.reconciler.last_plan.managed) >= {a, b, room}

    await user.client.leave(a)
    await wait_membership(world, [b, room], user.user_id, "leave")


async def test_space_cycle_leaving_the_subspace_keeps_the_root(world, start_bot, make_user):
    a = await world.space("A")
    b = await world.space("B", parent=a)
    await world.owner.client.add_child(b, a)
    user = await make_user("alice")
    for r in (a, b):
        await user.client.join(r)
    bot = await start_bot([{"room": a}])

    await user.client.leave(b)
    await bot.reconcile()
    assert user.user_id in await joined(world.owner.client, a), "kicked from the root Space for leaving a sub-Space"


# 3. Opt-in


async def test_only_opted_in_children_are_enforced(world, start_bot, make_user):
    space = await world.space("S")
    foreign = await world.room(space, "not opted in", join_rule="invite")
    by_parent = await world.room(space, "opted in by m.space.parent", join_rule="invite")
    await world.owner.client.set_parent(by_parent, space)
    by_config = await world.room(None, "opted in by extra_rooms", join_rule="invite")
    user = await make_user("alice")
    await user.client.join(space)
    await invite_and_join(world, user, foreign, by_parent, by_config)
    bot = await start_bot([{"room": space, "extra_rooms": [by_config]}])

    not_opted = findings(bot, "not_opted_in")
    assert [f.room_id for f in not_opted] == [foreign]
    managed = set(bot.app.reconciler.last_plan.managed)
    assert {by_parent, by_config} <= managed and foreign not in managed

    await user.client.leave(space)
    await wait_membership(world, [by_parent, by_config], user.user_id, "leave")
    await bot.reconcile()
    assert user.user_id in await joined(world.owner.client, foreign), "kicked from a room that did not opt in"
    assert [f.room_id for f in findings(bot, "not_opted_in")] == [foreign]


# 4. Bans


async def test_space_ban_cascades_and_unban_lifts_only_own_bans(world, start_bot, make_user):
    space = await world.space("S")
    sub = await world.space("T", parent=space)
    room = await world.room(space, "R1")
    deep = await world.room(sub, "R2")
    never = await world.room(sub, "R3 (never a member)")
    manual = await world.room(space, "M (banned by hand)")
    user = await make_user("mallory")
    for r in (space, sub, room, deep, manual):
        await user.client.join(r)
    await world.owner.client.ban(manual, user.user_id, reason="by hand")
    bot = await start_bot([{"room": space}])
    assert await membership(world, never, user.user_id) is None

    await world.owner.client.ban(space, user.user_id, reason="spam")
    placed_rooms = [sub, room, deep, never]
    await wait_membership(world, placed_rooms, user.user_id, "ban")
    await bot.idle()
    placed = {b.room_id for b in await bot.app.store.placed_bans() if b.user_id == user.user_id}
    assert placed == set(placed_rooms)

    await world.owner.client.unban(space, user.user_id)
    await wait_membership(world, placed_rooms, user.user_id, "leave")
    await bot.reconcile()
    assert await membership(world, manual, user.user_id) == "ban", "a moderator's own ban was lifted"
    assert not {b for b in await bot.app.store.placed_bans() if b.user_id == user.user_id}


# 5. Kicked from the Space


async def test_kick_from_space_kicks_from_children(world, start_bot, make_user):
    space = await world.space("S")
    room = await world.room(space, "R")
    user = await make_user("alice")
    for r in (space, room):
        await user.client.join(r)
    bot = await start_bot([{"room": space}])

    await world.owner.client.kick(space, user.user_id, reason="bye")
    await wait_membership(world, [room], user.user_id, "leave")
    event = await world.owner.client.get_state_event(room, "m.room.member", user.user_id)
    assert "kicked" in event.get("reason", "")
    await bot.idle()
    records = [r for r in await bot.app.store.audit_log(10, target=user.user_id) if r.room_id == room]
    assert len(records) == 1 and records[0].outcome == "done" and records[0].kind == "kick"
    assert records[0].reason == "kicked from S"


async def test_reasons_name_the_space_in_the_member_event(world, start_bot, make_user):
    """The reason users' clients show ("left Demo Community") comes from the configured template."""
    space = await world.space("Demo Community")
    room = await world.room(space, "General")
    alice, bob = await make_user("alice"), await make_user("bob")
    for user in (alice, bob):
        for r in (space, room):
            await user.client.join(r)
    await start_bot([{"room": space}], reason_template="{event} {space} (automatic)")

    await alice.client.leave(space)
    await wait_membership(world, [room], alice.user_id, "leave")
    event = await world.owner.client.get_state_event(room, "m.room.member", alice.user_id)
    assert event.get("reason") == "left Demo Community (automatic)"

    await world.owner.client.ban(space, bob.user_id, reason="spam")
    await wait_membership(world, [room], bob.user_id, "ban")
    event = await world.owner.client.get_state_event(room, "m.room.member", bob.user_id)
    assert event.get("reason") == "banned in Demo Community (automatic)"


# 6. Protected users


async def test_exempt_admin_and_powerful_users_are_not_kicked(world, start_bot, make_user):
    exempt = await make_user("exempt")
    admin = await make_user("admin")
    strong = await make_user("strong")
    plain = await make_user("plain")
    space = await world.space("S")
    room = await world.room(space, "R", levels={strong.user_id: 100})
    users = (exempt, admin, strong, plain)
    for user in users:
        await user.client.join(space)
        await user.client.join(room)
    bot = await start_bot([{"room": space, "exempt": [exempt.user_id]}], admins=[admin.user_id])

    for user in users:
        await user.client.leave(space)
    await wait_membership(world, [room], plain.user_id, "leave")
    await bot.reconcile()
    assert {exempt.user_id, admin.user_id, strong.user_id} <= await joined(world.owner.client, room)
    protected = [f.message for f in findings(bot, "protected") if f.room_id == room]
    assert any(strong.user_id in m and "power level" in m for m in protected), protected
    assert any(exempt.user_id in m and "exempt" in m for m in protected), protected
    assert any(admin.user_id in m and "admin" in m for m in protected), protected


# 7. on_leave


async def test_on_leave_ban_bans_and_none_does_nothing(world, start_bot, make_user):
    banning = await world.space("bans")
    banned_room = await world.room(banning, "R ban")
    passive = await world.space("passive")
    passive_room = await world.room(passive, "R none")
    u1 = await make_user("u1")
    u2 = await make_user("u2")
    for r in (banning, banned_room):
        await u1.client.join(r)
    for r in (passive, passive_room):
        await u2.client.join(r)
    bot = await start_bot([{"room": banning, "on_leave": "ban"}, {"room": passive, "on_leave": "none"}])

    await u2.client.leave(passive)
    await u1.client.leave(banning)
    await wait_membership(world, [banned_room], u1.user_id, "ban")
    await bot.reconcile()
    assert u2.user_id in await joined(world.owner.client, passive_room)
    assert not [a for a in bot.app.reconciler.last_plan.actions if a.user_id == u2.user_id]
    assert not await bot.app.store.audit_log(10, target=u2.user_id)


# 8. Grace period


async def member_events(world, room_id, user_id):
    """The user's m.room.member events in the room's timeline, oldest first."""
    events = await world.owner.client.messages(room_id, limit=200)
    return [e for e in reversed(events) if e.get("type") == "m.room.member" and e.get("state_key") == user_id]


async def test_grace_period(world, start_bot, make_user):
    space = await world.space("S")
    room = await world.room(space, "R")
    back = await make_user("back")
    gone = await make_user("gone")
    for user in (back, gone):
        await user.client.join(space)
        await user.client.join(room)
    bot = await start_bot([{"room": space, "grace_period": 3}])

    await gone.client.leave(space)
    await back.client.leave(space)
    await asyncio.sleep(0.5)
    await back.client.join(space)
    await wait_membership(world, [room], gone.user_id, "leave", timeout=15)

    # Server timestamps, so that a slow machine cannot make the test pass or fail by chance.
    left = [e for e in await member_events(world, space, gone.user_id) if e["content"]["membership"] == "leave"]
    kicks = [e for e in await member_events(world, room, gone.user_id) if e["sender"] == world.bot.user_id]
    assert len(left) == 1 and len(kicks) == 1
    assert kicks[0]["origin_server_ts"] - left[0]["origin_server_ts"] >= 3000, "evicted within the grace period"
    back_events = await member_events(world, space, back.user_id)
    assert [e["content"]["membership"] for e in back_events[-2:]] == ["leave", "join"]
    assert back_events[-1]["origin_server_ts"] - back_events[-2]["origin_server_ts"] < 3000

    await bot.reconcile()
    assert back.user_id in await joined(world.owner.client, room)
    assert not [e for e in await member_events(world, room, back.user_id) if e["sender"] == world.bot.user_id]


# 9. Catch-up after downtime


async def test_catch_up_after_downtime(world, start_bot, make_user):
    space = await world.space("S")
    room = await world.room(space, "R")
    user = await make_user("alice")
    for r in (space, room):
        await user.client.join(r)
    bot = await start_bot([{"room": space}])
    await bot.stop()

    await user.client.leave(space)
    await asyncio.sleep(0.3)
    assert user.user_id in await joined(world.owner.client, room)

    bot2 = await start_bot([{"room": space}])
    await wait_membership(world, [room], user.user_id, "leave", timeout=15)
    await bot2.idle()
    records = await bot2.app.store.audit_log(10, target=user.user_id)
    assert [(r.room_id, r.outcome) for r in records] == [(room, "done")]


# 10. Mass-action guard


async def test_mass_action_guard_holds_then_release_and_cancel(world, start_bot, make_user):
    space = await world.space("S")
    room = await world.room(space, "R")
    users = [await make_user(f"u{i}") for i in range(3)]
    for user in users:
        await user.client.join(space)
        await user.client.join(room)
    ids = {u.user_id for u in users}
    config = [{"room": space, "max_evictions_without_confirmation": 2}]
    bot = await start_bot(config)
    await bot.stop()
    # Three leaves seen at once, as after a state reset: one plan with three evictions.
    await asyncio.gather(*(u.client.leave(space) for u in users))
    bot = await start_bot(config)
    store = bot.app.store

    held = await store.journal.by_status(Status.HELD)
    assert {e.action.user_id for e in held} == ids and all(e.action.kind is ActionKind.KICK for e in held)
    batches = {e.batch for e in held}
    assert len(batches) == 1
    first = batches.pop()
    assert ids <= await joined(world.owner.client, room), "kicked without confirmation"

    assert await bot.app.reconciler.cancel(first) == 3
    assert not await store.journal.by_status(Status.HELD)
    assert {e.status for e in await store.journal.batch_entries(first)} == {Status.CANCELLED}
    await bot.reconcile()
    assert ids <= await joined(world.owner.client, room), "a cancelled batch ran"
    assert not await store.audit_log(10, target=users[0].user_id)

    # The next reconcile holds the evictions again, as a new batch: release it.
    held = await store.journal.by_status(Status.HELD)
    assert {e.action.user_id for e in held} == ids
    again = {e.batch for e in held}
    assert len(again) == 1 and first not in again
    assert await bot.app.reconciler.release(again.pop()) == 3
    for user in users:
        await wait_membership(world, [room], user.user_id, "leave")
    await bot.idle()
    assert not await store.journal.by_status(Status.HELD, Status.PENDING, Status.RUNNING)


# 11. Dry run


async def test_dry_run_kicks_nothing(world, start_bot, make_user):
    space = await world.space("S")
    room = await world.room(space, "R")
    user = await make_user("alice")
    for r in (space, room):
        await user.client.join(r)
    bot = await start_bot([{"room": space}], dry_run=True)

    await user.client.leave(space)

    def planned():
        plan = bot.app.reconciler.last_plan
        return plan is not None and any(
            a.kind is ActionKind.KICK and a.user_id == user.user_id and a.room_id == room for a in plan.actions
        )

    await wait_for(planned, timeout=15)
    await bot.reconcile()
    assert planned()
    assert user.user_id in await joined(world.owner.client, room)
    assert not await bot.app.store.journal.by_status(*Status)
    assert not await bot.app.store.audit_log(10)


async def test_held_ban_confirmed_after_a_moderator_banned_by_hand_keeps_the_moderators_ban(
    world, start_bot, make_user
):
    """Confirming a held Space ban must not replace a moderator's ban in a room (and later lift it)."""
    space = await world.space("S")
    room = await world.room(space, "R")
    users = [await make_user(f"spammer{i}") for i in range(2)]
    for user in users:
        await user.client.join(space)
        await user.client.join(room)
    config = [{"room": space, "max_evictions_without_confirmation": 1}]
    bot = await start_bot(config)
    await bot.stop()
    for user in users:  # two bans seen in one pass: held
        await world.owner.client.ban(space, user.user_id, reason="spam")
    bot = await start_bot(config)

    async def held() -> list:
        return await bot.app.store.journal.by_status(Status.HELD)

    entries = await wait_for(held, timeout=20)
    await world.owner.client.ban(room, users[0].user_id, reason="by hand, in R")

    async def cache_sees_it() -> bool:
        state = bot.app.cache.get(room)
        return state is not None and state.members[users[0].user_id].sender == world.owner.user_id

    await wait_for(cache_sees_it, timeout=10)
    await bot.app.reconciler.release(entries[0].batch)
    await wait_membership(world, [room], users[1].user_id, "ban")
    await bot.idle()

    event = await world.owner.client.get_state_event(room, "m.room.member", users[0].user_id)
    assert event["reason"] == "by hand, in R"
    placed = {b.user_id for b in await bot.app.store.placed_bans() if b.room_id == room}
    assert placed == {users[1].user_id}

    for user in users:
        await world.owner.client.unban(space, user.user_id)
    await wait_membership(world, [room], users[1].user_id, "leave")
    await bot.reconcile()
    assert (await world.owner.client.members(room))[users[0].user_id] == "ban"


async def test_confirming_a_held_batch_skips_users_exempted_or_back_since(world, start_bot, make_user):
    space = await world.space("S")
    room = await world.room(space, "R")
    users = [await make_user(f"u{i}") for i in range(3)]
    for user in users:
        await user.client.join(space)
        await user.client.join(room)
    config = [{"room": space, "max_evictions_without_confirmation": 1}]
    bot = await start_bot(config)
    await bot.stop()
    for user in users:
        await user.client.leave(space)
    bot = await start_bot(config)
    held = await bot.app.store.journal.by_status(Status.HELD)
    assert {e.action.user_id for e in held} == {u.user_id for u in users}

    exempted, returned, evicted = users
    await bot.app.store.add_exempt(exempted.user_id, world.owner.user_id)
    await returned.client.join(space)
    assert await bot.app.reconciler.release(held[0].batch) == 1
    await wait_membership(world, [room], evicted.user_id, "leave")
    await bot.idle()
    joined_now = await joined(world.owner.client, room)
    assert {exempted.user_id, returned.user_id} <= joined_now
    statuses = {e.action.user_id: e.status for e in await bot.app.store.journal.batch_entries(held[0].batch)}
    assert statuses == {
        exempted.user_id: Status.CANCELLED,
        returned.user_id: Status.CANCELLED,
        evicted.user_id: Status.DONE,
    }


# 9. Nobody left behind silently


async def test_the_batch_notice_names_a_room_where_the_kick_could_not_happen(world, start_bot, make_user):
    from .test_commands import ask, ready

    space = await world.space("S")
    kicked_from = await world.room(space, "Kicks work")
    stays_in = await world.room(space, "No kick power", levels={world.bot.user_id: 40})
    user = await make_user("alice")
    for room_id in (space, kicked_from, stays_in):
        await user.client.join(room_id)
    bot = await start_bot([{"room": space}])
    await ready(bot)

    await user.client.leave(space)
    await wait_membership(world, [kicked_from], user.user_id, "leave")

    async def summary():
        for event in await world.owner.client.messages(bot.app.admin_room, limit=30):
            body = event.get("content", {}).get("body", "")
            if event.get("sender") == world.bot.user_id and body.startswith("Batch ") and user.user_id in body:
                return event["content"]
        return None

    content = await wait_for(summary, timeout=20)
    assert f"kicked {user.user_id} in 1 room: Kicks work" in content["body"], content["body"]
    assert (
        f"not kicked: {user.user_id} in No kick power: the bot lacks the power to kick there (needs 50)"
        in content["body"]
    ), content["body"]
    assert "1 left in place" in content["body"].splitlines()[0]
    assert user.user_id in await joined(world.owner.client, stays_in)

    whois = await ask(world, bot, world.owner, f"!ss whois {user.user_id}")
    assert "not kicked: the bot lacks the power to kick there (needs 50)" in whois, whois
    assert f"No kick power ({stays_in}): join" in whois


async def test_queued_kicks_reach_the_subspace_then_the_biggest_rooms_first(world, start_bot, make_user):
    """One at a time (concurrency 1), so every kick but the first waits in the queue: the subspace goes first,
    then the rooms by joined members, most first, whatever their room ids."""
    space = await world.space("S")
    sub = await world.space("T", parent=space)
    rooms = {size: await world.room(space, f"R{size}") for size in (0, 3, 1, 2)}
    user = await make_user("leaver")
    crowd = [await make_user(f"member{i}") for i in range(3)]
    for r in (space, sub, *rooms.values()):
        await user.client.join(r)
    for member in crowd:
        await member.client.join(space)
    for size, room in rooms.items():
        for member in crowd[:size]:
            await member.client.join(room)
    bot = await start_bot([{"room": space}], executor={"concurrency": 1})

    await user.client.leave(space)
    await wait_membership(world, [sub, *rooms.values()], user.user_id, "leave", timeout=30)
    await bot.idle()
    records = await bot.app.store.audit_log(20, target=user.user_id)
    kicked = [r.room_id for r in reversed(records) if r.kind == "kick" and r.outcome == "done"]
    assert kicked == [sub, rooms[3], rooms[2], rooms[1], rooms[0]]
