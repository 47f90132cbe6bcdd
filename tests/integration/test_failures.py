"""Failures end, against the real Synapse behind the fault proxy: refused actions park, 429s and hangs are
waited out on every path, stale journal entries are re-planned, and the guard counts over time."""

from __future__ import annotations

import asyncio
import re
import time

from spacesync.model import Action, ActionKind
from spacesync.store import Status, Store
from spacesync.testing import wait_for

from .test_commands import ask, bot_notices, one_at_a_time_behind, ready


def kick_path(room_id: str) -> str:
    return re.escape(f"/rooms/{room_id}/kick")


async def membership(world, room_id: str, user_id: str) -> str | None:
    return (await world.owner.client.members(room_id)).get(user_id)


async def left(world, room_id: str, user_id: str) -> bool:
    return await membership(world, room_id, user_id) == "leave"


def bodies(notices: list[dict]) -> list[str]:
    return [(e.get("content") or {}).get("body", "") for e in notices]


async def test_a_refused_kick_parks_once_and_retry_runs_it(world, make_user, start_bot, fault_proxy):
    space = await world.space("S")
    blocked = await world.room(space, "Blocked")
    others = [await world.room(space, f"Open{i}") for i in range(2)]
    user = await make_user("leaver")
    for room in (space, blocked, *others):
        await user.client.join(room)
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url, executor={"max_failures": 3})
    await ready(bot)
    rule = fault_proxy.forbid(kick_path(blocked), method="POST", error="kicks are refused by a module")

    await user.client.leave(space)
    for room in others:
        await wait_for(lambda room=room: left(world, room, user.user_id), timeout=30)
    await wait_for(lambda: bot.app.store.journal.parked(), timeout=60, message="the refused kick was not parked")

    # Several reconcile cycles (and the /sync triggers between them) plan the kick again each time.
    for _ in range(4):
        await bot.app.reconciler.reconcile("reconcile")
        await asyncio.sleep(0.5)
    await bot.idle()
    assert rule.hits == 3, f"{rule.hits} kick requests: the refused kick was not bounded by max_failures"
    assert await membership(world, blocked, user.user_id) == "join"
    parked_notices = [b for b in bodies(await bot_notices(world, bot)) if "Parked" in b]
    assert len(parked_notices) == 1, parked_notices
    assert user.user_id in parked_notices[0] and "403 M_FORBIDDEN" in parked_notices[0]
    parked = await bot.app.store.journal.parked()
    assert len(parked) == 1 and parked[0].action.room_id == blocked
    status = await ask(world, bot, world.owner, "!spacesync status")
    assert "1 parked" in status and parked[0].batch in status
    assert "parked" in await ask(world, bot, world.owner, f"!spacesync batch {parked[0].batch}")
    assert "(parked: refused repeatedly)" in await ask(world, bot, world.owner, "!spacesync plan")

    rule.remove()
    reply = await ask(world, bot, world.owner, "!spacesync retry all")
    assert "Retrying 1 parked action" in reply
    await wait_for(lambda: left(world, blocked, user.user_id), timeout=30, message="retry did not kick")
    assert not await bot.app.store.journal.parked()


async def test_retry_of_one_batch_runs_its_parked_action(world, make_user, start_bot, fault_proxy):
    space = await world.space("S")
    blocked = await world.room(space, "Blocked")
    user = await make_user("leaver")
    for room in (space, blocked):
        await user.client.join(room)
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url, executor={"max_failures": 1})
    await ready(bot)
    rule = fault_proxy.forbid(kick_path(blocked), method="POST", error="kicks are refused by a module")
    await user.client.leave(space)
    await wait_for(lambda: bot.app.store.journal.parked(), timeout=60, message="the refused kick was not parked")
    batch = (await bot.app.store.journal.parked())[0].batch

    rule.remove()
    reply = await ask(world, bot, world.owner, f"!spacesync retry {batch}")
    assert f"Retrying 1 parked action of batch {batch}" in reply, reply
    await wait_for(lambda: left(world, blocked, user.user_id), timeout=30, message="retry <batch> did not kick")
    assert not await bot.app.store.journal.parked()


async def test_a_notice_meeting_429_waits_and_is_sent(world, start_bot, fault_proxy):
    space = await world.space("S")
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url)
    await ready(bot)
    before = bot.app.matrix.ratelimit_wait_s
    rule = fault_proxy.rate_limit(r"/send/m\.room\.message/", method="PUT", retry_after_ms=1500, times=2)
    started = time.monotonic()
    await bot.app.notify("notice through a rate limit")
    assert rule.hits == 2
    assert time.monotonic() - started >= 2.9
    assert bot.app.matrix.ratelimit_wait_s - before >= 2.9
    notices = bodies(await bot_notices(world, bot))
    assert notices.count("notice through a rate limit") == 1


async def test_a_state_read_meeting_429_succeeds_after_the_wait(world, make_user, start_bot, fault_proxy):
    space = await world.space("S")
    room = await world.room(space, "R")
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url)
    rule = fault_proxy.rate_limit(re.escape(f"/rooms/{room}/state") + "$", method="GET", retry_after_ms=1500, times=2)
    plan = (await bot.app.reconciler.reconcile("reconcile")).plan
    assert rule.hits == 2
    assert room in plan.managed
    assert not [f for f in plan.findings if f.room_id == room and f.code == "unreachable"], plan.findings


async def test_a_hanging_kick_times_out_and_is_retried_while_other_kicks_complete(
    world, make_user, start_bot, fault_proxy
):
    space = await world.space("S")
    slow = await world.room(space, "Slow")
    others = [await world.room(space, f"R{i}") for i in range(4)]
    user = await make_user("leaver")
    for room in (space, slow, *others):
        await user.client.join(room)
    await start_bot(
        [{"room": space}], homeserver={"url": fault_proxy.url, "request_timeout": "3s"}, executor={"concurrency": 2}
    )
    rule = fault_proxy.hang(kick_path(slow), method="POST", times=1)

    await user.client.leave(space)
    await wait_for(lambda: rule.hits == 1, timeout=30)
    for room in others:
        await wait_for(lambda room=room: left(world, room, user.user_id), timeout=30)
    assert await membership(world, slow, user.user_id) == "join", "the hung kick went through"
    await wait_for(lambda: left(world, slow, user.user_id), timeout=30, message="the hung kick was not retried")
    assert fault_proxy.count(kick_path(slow), method="POST") == 2


async def test_a_journaled_kick_of_a_user_back_in_the_space_is_not_run(world, make_user, start_bot, tmp_path):
    space = await world.space("S")
    room = await world.room(space, "R")
    user = await make_user("returner")
    for r in (space, room):
        await user.client.join(r)
    db_url = f"sqlite:{tmp_path}/bot.db"
    bot = await start_bot([{"room": space}], db_url=db_url)
    await bot.stop()

    # The user left while the bot was down; the kick is journaled as a plan from then would have it.
    await user.client.leave(space)
    store = Store(db_url)
    await store.start()
    try:
        kick = Action(ActionKind.KICK, room, user.user_id, reason="left the Space", space_id=space, cause="left")
        await store.journal.add_batch("a1b2c3", "sync", None, [kick], Status.PENDING)
    finally:
        await store.stop()
    await user.client.join(space)  # back before the bot starts again

    bot = await start_bot([{"room": space}], db_url=db_url)
    await bot.idle()
    assert await membership(world, room, user.user_id) == "join", "a kick that is no longer wanted ran"
    records = await bot.app.store.audit_log(20, target=user.user_id)
    assert [r.outcome for r in records if r.kind == "kick"] == ["superseded"]
    entries = await bot.app.store.journal.batch_entries("a1b2c3")
    assert [(e.status, e.error) for e in entries] == [(Status.SUPERSEDED, f"{user.user_id} rejoined the Space")]


async def test_a_kick_waiting_in_backoff_is_dropped_when_the_user_came_back(world, make_user, start_bot, fault_proxy):
    space = await world.space("S")
    room = await world.room(space, "R")
    user = await make_user("hesitant")
    for r in (space, room):
        await user.client.join(r)
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url)
    bot.app.executor.backoff_s = 4.0
    rule = fault_proxy.forbid(kick_path(room), method="POST", times=1)

    await user.client.leave(space)
    await wait_for(lambda: rule.hits == 1, timeout=30)
    await user.client.join(space)  # back while the refused kick waits out its backoff

    async def settled() -> list:
        entries = await bot.app.store.journal.batch_entries(await _kick_batch(bot, room))
        return [e for e in entries if e.status in (Status.SUPERSEDED, Status.DONE)]

    (entry,) = await wait_for(settled, timeout=30)
    assert entry.status is Status.SUPERSEDED
    assert await membership(world, room, user.user_id) == "join"
    assert fault_proxy.count(kick_path(room), method="POST") == 1, "the kick was sent again"


async def _kick_batch(bot, room: str) -> str:
    rows = await bot.app.store.db.fetch("SELECT batch FROM journal WHERE kind='kick' AND room_id=$1", room)
    return rows[0]["batch"] if rows else ""


async def test_a_slow_exodus_is_held_after_the_limit_in_one_batch(world, make_user, start_bot):
    space = await world.space("S")
    room = await world.room(space, "R")
    users = [await make_user(f"drip{i}") for i in range(5)]
    for user in users:
        await user.client.join(space)
        await user.client.join(room)
    bot = await start_bot([{"room": space, "max_evictions_without_confirmation": 3}])
    await ready(bot)
    journal = bot.app.store.journal

    async def held_users() -> set[str]:
        return {e.action.user_id for e in await journal.by_status(Status.HELD)}

    for i, user in enumerate(users):
        await user.client.leave(space)
        if i < 3:
            await wait_for(lambda user=user: left(world, room, user.user_id), timeout=30)
        else:
            await wait_for(lambda user=user: _contains(held_users(), user.user_id), timeout=30)
        await bot.idle()
        await asyncio.sleep(0.5)  # one leaver per /sync, with a pause between
    for user in users[3:]:
        assert await membership(world, room, user.user_id) == "join"
    held = await journal.by_status(Status.HELD)
    assert {e.action.user_id for e in held} == {u.user_id for u in users[3:]}
    batches = {e.batch for e in held}
    assert len(batches) == 1, batches
    batch = batches.pop()
    held_notices = [b for b in bodies(await bot_notices(world, bot)) if b.startswith("⚠ Held batch")]
    assert len(held_notices) == 1 and batch in held_notices[0], held_notices

    assert "Confirmed batch" in await ask(world, bot, world.owner, f"!spacesync confirm {batch}")
    for user in users[3:]:
        await wait_for(lambda user=user: left(world, room, user.user_id), timeout=30)


async def _contains(users, user_id: str) -> bool:
    return user_id in await users


async def test_queued_kicks_dropped_by_an_exemption_are_never_sent(world, make_user, start_bot, fault_proxy):
    """The executor holds queued entries in memory between journal reads: one cancelled meanwhile must not run."""
    space, user, bot = await one_at_a_time_behind(world, make_user, start_bot, fault_proxy)
    held = fault_proxy.hang(r"/kick$", method="POST")
    await user.client.leave(space)
    await wait_for(lambda: held.hits == 1, timeout=20)  # one kick on the wire, two queued behind it

    reply = await ask(world, bot, world.owner, f"!ss exempt add {user.user_id}")
    assert "2 queued or held evictions against them dropped" in reply
    held.remove()  # the kick already sent goes through
    await bot.idle()
    await asyncio.sleep(0.5)  # room for a wrongly started kick to show up
    assert held.hits == 1 and fault_proxy.count(r"/kick$", method="POST") == 1
    records = await bot.app.store.audit_log(10, target=user.user_id)
    assert [r.outcome for r in records if r.kind == "kick"] == ["done"]
