"""Acting on the present, against the real Synapse behind the fault proxy holding kicks, unbans and state writes
(a rate-limited homeserver): every queued action is checked again the moment it is sent, and failures end."""

from __future__ import annotations

import asyncio
import re

import pytest

from spacesync.metrics import REGISTRY
from spacesync.model import ActionKind
from spacesync.store import Status
from spacesync.testing import wait_for

from .test_commands import ask, bot_notices, one_at_a_time_behind, ready
from .test_failures import bodies, kick_path, membership
from .test_joinrules import opted_in_child
from .test_spacewide import join_rules


def superseded_total(kind: str) -> float:
    return REGISTRY.get_sample_value("spacesync_actions_superseded_total", {"kind": kind}) or 0.0


async def entries_of(bot, kind: ActionKind, status: Status | None = None) -> list:
    rows = await bot.app.store.db.fetch("SELECT DISTINCT batch FROM journal WHERE kind=$1", kind.value)
    out = []
    for row in rows:
        out.extend(
            e
            for e in await bot.app.store.journal.batch_entries(row["batch"])
            if e.action.kind is kind and (status is None or e.status is status)
        )
    return out


def held_room(rule_path: str, fault_proxy, suffix: str) -> str:
    """The room of the one request the proxy holds (its path names the room)."""
    (request,) = fault_proxy.requests(rule_path, method="POST")
    match = re.search(r"/rooms/([^/]+)/" + suffix, request.path)
    assert match is not None, request.path
    return match.group(1)


async def test_a_user_back_in_the_space_while_their_kicks_wait_is_not_kicked_further(
    world, make_user, start_bot, fault_proxy
):
    space, user, bot = await one_at_a_time_behind(world, make_user, start_bot, fault_proxy)
    before = superseded_total("kick")
    held = fault_proxy.hang(r"/kick$", method="POST")
    await user.client.leave(space)
    await wait_for(lambda: held.hits == 1, timeout=20)  # one kick on the wire, two queued behind it
    kicked = held_room(r"/kick$", fault_proxy, "kick")

    await user.client.join(space)  # back in the Space while the two kicks wait
    await wait_for(
        lambda: bot.app.cache.get(space).membership(user.user_id).value == "join", timeout=20, message="no rejoin"
    )
    held.remove()  # the kick already sent goes through; the homeserver answers the queue again
    await bot.idle()
    await asyncio.sleep(0.5)  # room for a wrongly started kick to show up

    assert fault_proxy.count(r"/kick$", method="POST") == 1, "a kick was sent after the user came back"
    rooms = {e.action.room_id for e in await entries_of(bot, ActionKind.KICK)}
    assert len(rooms) == 3 and kicked in rooms
    for room in rooms - {kicked}:
        assert await membership(world, room, user.user_id) == "join", "kicked from a room after coming back"
    superseded = await entries_of(bot, ActionKind.KICK, Status.SUPERSEDED)
    assert {e.action.room_id for e in superseded} == rooms - {kicked}
    assert {e.error for e in superseded} == {f"{user.user_id} rejoined the Space"}
    assert superseded_total("kick") - before == 2
    records = await bot.app.store.audit_log(10, target=user.user_id)
    assert sorted(r.outcome for r in records if r.kind == "kick") == ["done", "superseded", "superseded"]

    async def notice() -> str | None:
        return next((b for b in bodies(await bot_notices(world, bot)) if b.startswith("Batch ")), None)

    text = await wait_for(notice, timeout=15)
    assert "1 action done, 2 superseded" in text, text
    assert f"2 superseded: {user.user_id} rejoined the Space" in text, text


@pytest.mark.parametrize("lifted_by", ["undo", "space_unban"])
async def test_a_ban_a_moderator_places_while_unbans_wait_stays(world, make_user, start_bot, fault_proxy, lifted_by):
    """spacesync's unbans wait (one on the wire), from `undo` of its batch banning a leaver (`on_leave: ban`) or
    from the Space's unban of a Space ban; a moderator replaces spacesync's ban with their own in another room
    meanwhile: that ban is never lifted."""
    space = await world.space("S")
    rooms = [await world.room(space, f"R{i}") for i in range(3)]
    user = await make_user("banned")
    for room in (space, *rooms):
        await user.client.join(room)
    on_leave = "ban" if lifted_by == "undo" else "kick"
    bot = await start_bot(
        [{"room": space, "on_leave": on_leave}], homeserver_url=fault_proxy.url, executor={"concurrency": 1}
    )
    await ready(bot)
    if lifted_by == "undo":
        await user.client.leave(space)
    else:
        await world.owner.client.ban(space, user.user_id, reason="spam")
    for room in rooms:
        await wait_for(lambda room=room: _is(world, room, user.user_id, "ban"), timeout=30)
    await bot.idle()
    (batch,) = {e.batch for e in await entries_of(bot, ActionKind.BAN)}

    held = fault_proxy.hang(r"/unban$", method="POST")
    if lifted_by == "undo":
        reply = await ask(world, bot, world.owner, f"!ss undo {batch}")
        assert "3 unbans" in reply, reply
    else:
        await world.owner.client.unban(space, user.user_id)
    await wait_for(lambda: held.hits == 1, timeout=20)  # one unban on the wire, two queued behind it
    on_the_wire = held_room(r"/unban$", fault_proxy, "unban")
    by_hand = next(r for r in rooms if r != on_the_wire)
    # A moderator's own ban replaces spacesync's in one room while its unban waits.
    await world.owner.client.unban(by_hand, user.user_id)
    await world.owner.client.ban(by_hand, user.user_id, reason="by hand")
    held.remove()
    await bot.idle()
    await asyncio.sleep(0.5)

    event = await world.owner.client.get_state_event(by_hand, "m.room.member", user.user_id)
    assert event is not None and event.get("membership") == "ban" and event.get("reason") == "by hand"
    assert fault_proxy.count(re.escape(f"/rooms/{by_hand}/unban"), method="POST") == 0, "the moderator's ban was lifted"
    (entry,) = [e for e in await entries_of(bot, ActionKind.UNBAN) if e.action.room_id == by_hand]
    assert entry.status is Status.SUPERSEDED, entry
    if lifted_by == "undo":  # a moderator's command is not re-planned: the ban read fresh before sending tells
        assert f"banned by {world.owner.user_id}" in (entry.error or ""), entry
    assert await membership(world, on_the_wire, user.user_id) == "leave", "the unban already sent went through"


async def _is(world, room: str, user_id: str, value: str) -> bool:
    return await membership(world, room, user_id) == value


async def test_a_room_locked_by_hand_while_an_enforce_write_waits_stays_locked(
    world, make_user, start_bot, fault_proxy
):
    space = await world.space("S")
    busy = await world.room(space, "Busy")
    room = await opted_in_child(world, space, "R", join_rule="restricted")
    user = await make_user("leaver")
    for r in (space, busy):
        await user.client.join(r)
    bot = await start_bot(
        [{"room": space, "join_rules": "enforce"}], homeserver_url=fault_proxy.url, executor={"concurrency": 1}
    )
    await ready(bot)
    held = fault_proxy.hang(kick_path(busy), method="POST")
    await user.client.leave(space)
    await wait_for(lambda: held.hits == 1, timeout=20)  # the executor's one slot is taken

    await world.owner.client.set_join_rule(room, "public")  # opened by hand: enforce plans to restrict it again
    await wait_for(lambda: entries_of(bot, ActionKind.SET_JOIN_RULES, Status.PENDING), timeout=20)
    await world.owner.client.set_join_rule(room, "invite")  # then locked by hand while that write waits
    held.remove()
    await bot.idle()
    await asyncio.sleep(0.5)

    assert (await join_rules(world, room)).get("join_rule") == "invite", "the enforce write undid the lock"
    assert fault_proxy.count(re.escape(f"/rooms/{room}/state/m.room.join_rules"), method="PUT") == 0
    (enforce,) = await entries_of(bot, ActionKind.SET_JOIN_RULES)
    assert enforce.status is Status.SUPERSEDED and "(now invite)" in (enforce.error or ""), enforce


async def test_a_lockdown_arriving_while_an_enforce_write_waits_stays(world, start_bot, fault_proxy):
    space = await world.space("S")
    room = await opted_in_child(world, space, "R", join_rule="restricted")
    bot = await start_bot([{"room": space, "join_rules": "enforce"}], homeserver_url=fault_proxy.url)
    await ready(bot)
    bot.app.executor.backoff_s = 5.0
    path = re.escape(f"/rooms/{room}/state/m.room.join_rules")
    refused = fault_proxy.forbid(path, method="PUT", times=1)  # the enforce write waits out a backoff

    await world.owner.client.set_join_rule(room, "public")
    await wait_for(lambda: refused.hits == 1, timeout=20)
    reply = await ask(world, bot, world.owner, "!ss lockdown")
    assert "switching to invite" in reply, reply
    await wait_for(lambda: entries_of(bot, ActionKind.SET_JOIN_RULES, Status.SUPERSEDED), timeout=20)
    await bot.idle()

    assert (await join_rules(world, room)).get("join_rule") == "invite", "the enforce write overwrote the lockdown"
    assert fault_proxy.count(path, method="PUT") == 2, "one refused enforce write, one lockdown write"
    (enforce,) = [e for e in await entries_of(bot, ActionKind.SET_JOIN_RULES) if e.action.cause == "join_rules"]
    assert enforce.status is Status.SUPERSEDED, enforce


async def test_a_room_answering_502_on_kicks_parks_once_and_stays_quiet(world, make_user, start_bot, fault_proxy):
    space = await world.space("S")
    broken = await world.room(space, "Broken")
    fine = await world.room(space, "Fine")
    user = await make_user("leaver")
    for room in (space, broken, fine):
        await user.client.join(room)
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url, executor={"max_failures": 3})
    await ready(bot)
    bot.app.executor.backoff_s = 0.2
    rule = fault_proxy.fail(kick_path(broken), status=502, method="POST")

    await user.client.leave(space)
    await wait_for(lambda: _is(world, fine, user.user_id, "leave"), timeout=30)
    await wait_for(lambda: bot.app.store.journal.parked(), timeout=90, message="the failing kick was not parked")
    for _ in range(6):  # reconcile cycles, each planning the kick again
        await bot.app.reconciler.reconcile("reconcile")
        await asyncio.sleep(0.5)
    await bot.idle()

    assert rule.hits == 3, f"{rule.hits} kick requests: 502s were not bounded by max_failures"
    assert await membership(world, broken, user.user_id) == "join"
    notices = [b for b in bodies(await bot_notices(world, bot)) if "Parked" in b or "failed" in b]
    assert len(notices) == 1, notices
    assert user.user_id in notices[0] and "failed 3 times" in notices[0] and "502" in notices[0], notices[0]
    (parked,) = await bot.app.store.journal.parked()
    assert parked.action.room_id == broken and len(await entries_of(bot, ActionKind.KICK)) == 2


async def test_while_a_batch_is_held_a_second_one_is_held_too(world, make_user, start_bot):
    """Held users count toward the guard's window: 4 leavers over a limit of 3 are held, and 3 more leaving
    after them (within the limit on their own) wait with them instead of being kicked unconfirmed."""
    space = await world.space("S")
    room = await world.room(space, "R")
    first = [await make_user(f"first{i}") for i in range(4)]
    second = [await make_user(f"second{i}") for i in range(3)]
    for user in (*first, *second):
        await user.client.join(space)
        await user.client.join(room)
    for user in first:  # before the bot starts: its first plan holds all four at once
        await user.client.leave(space)
    bot = await start_bot([{"room": space, "max_evictions_without_confirmation": 3}])
    journal = bot.app.store.journal

    async def held(users) -> bool:
        return {u.user_id for u in users} <= {e.action.user_id for e in await journal.by_status(Status.HELD)}

    await wait_for(lambda: held(first), timeout=30, message="the first batch was not held")
    await ready(bot)
    for user in second:
        await user.client.leave(space)
    await wait_for(lambda: held(second), timeout=30, message="the second batch was not held")
    await bot.idle()
    await asyncio.sleep(0.5)

    for user in (*first, *second):
        assert await membership(world, room, user.user_id) == "join", f"{user.user_id} evicted unconfirmed"
    assert len({e.batch for e in await journal.by_status(Status.HELD)}) == 1, "later evictions join the held batch"
    held_notices = [b for b in bodies(await bot_notices(world, bot)) if b.startswith("⚠ Held batch")]
    assert len(held_notices) == 1, held_notices
