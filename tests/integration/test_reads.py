"""What the bot reads from the homeserver, against the real Synapse behind the fault proxy: a slow first /sync
is waited for, a gappy timeline re-reads that room only, and a periodic reconcile that finds nothing new reads
only a slice of the rooms. Each test fails without its change."""

from __future__ import annotations

import asyncio
import re
import time

from spacesync.testing import wait_for

from .test_eviction import wait_membership
from .test_knowledge import space_room_member

SYNC = r"/_matrix/client/v3/sync$"


def state_path(room_id: str) -> str:
    return rf"/rooms/{re.escape(room_id)}/state$"


def state_reads(proxy) -> list[str]:
    return [r.path for r in proxy.requests(r"/state$", method="GET")]


async def test_an_initial_sync_slower_than_the_request_timeout_is_waited_for(world, start_bot, make_user, fault_proxy):
    space, room, user = await space_room_member(world, make_user)
    # The first /sync answers after 5 s: longer than the 2 s request timeout.
    slow = fault_proxy.delay_response(SYNC, 5.0, method="GET", times=1)
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url, homeserver={"request_timeout": "2s"})
    await wait_for(lambda: bot.app.synced, timeout=30, message="the first /sync was never completed")
    assert slow.hits == 1
    first = fault_proxy.requests(SYNC, method="GET")[0]
    assert first.status == 200, "the bot gave up on the first /sync"
    assert bot.app.homeserver_up

    # and it goes on to work from /sync
    await user.client.leave(space)
    await wait_membership(world, [room], user.user_id, "leave", timeout=20)


async def test_a_gappy_timeline_re_reads_that_room_only(world, start_bot, make_user, fault_proxy):
    space = await world.space("S")
    rooms = [await world.room(space, f"R{i}") for i in range(4)]
    user = await make_user("alice")
    for r in (space, *rooms):
        await user.client.join(r)
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url)
    await wait_for(lambda: bot.app.synced, timeout=30)
    await asyncio.sleep(1)

    # Hold the bot's /sync while the Space moves on: a leave, then more messages than one timeline holds.
    held = fault_proxy.hang(SYNC, None, method="GET")
    await world.owner.client.send_text(rooms[0], "wake the long-poll")
    await wait_for(lambda: held.hits >= 1, timeout=40, message="the bot's /sync was never held")
    await user.client.leave(space)
    for i in range(60):
        await world.owner.client.send_text(space, f"chatter {i}")
    fault_proxy.reset_log()
    held.remove()

    # A lazy-loading server may leave the leave out of that gappy answer: the Space, and only it, is read again.
    await wait_membership(world, rooms, user.user_id, "leave", timeout=30)
    await asyncio.sleep(1)
    reads = state_reads(fault_proxy)
    assert any(re.search(state_path(space), p) for p in reads)
    assert all(re.search(state_path(space), p) for p in reads), f"rooms other than the gappy one were read: {reads}"


async def test_a_periodic_reconcile_that_finds_nothing_reads_only_a_slice(world, start_bot, fault_proxy):
    space = await world.space("S")
    for i in range(8):
        await world.room(space, f"R{i}")
    bot = await start_bot(
        [{"room": space}], homeserver_url=fault_proxy.url, reconcile_interval="10s", reread_interval="60s"
    )
    full_bytes = bot.app.reconciler.last_read_bytes
    full_requests = bot.app.reconciler.last_read_requests
    assert full_requests >= 9
    fault_proxy.reset_log()
    before = bot.app.reconciler.last_reconcile_at

    # two periodic reconciles, 10 s apart: each reads ~9 rooms x 10 s / 60 s, not all 9 (the first may come
    # early after a slow start on a busy machine: the interval is measured between the two)
    await wait_for(lambda: bot.app.reconciler.last_reconcile_at != before, timeout=20)
    second = bot.app.reconciler.last_reconcile_at
    started = time.monotonic()
    await wait_for(lambda: bot.app.reconciler.last_reconcile_at != second, timeout=20)
    reads = state_reads(fault_proxy)
    assert time.monotonic() - started >= 8
    assert 1 <= len(reads) <= 5, f"a no-op periodic reconcile read {len(reads)} rooms' state"
    assert bot.app.reconciler.last_read_bytes < full_bytes
    assert bot.app.reconciler.last_read_requests < full_requests


async def test_use_state_after_is_asked_and_what_it_says_is_applied(world, start_bot, make_user, fault_proxy, synapse):
    """MSC4222: the bot asks /sync for `use_state_after`; Synapse 1.163 honours it for an account with its
    `msc4222` feature on. The proxy takes the leaver's membership events out of every timeline, so only
    `state_after` tells of the departure: the bot evicts from it at once."""
    space, room, user = await space_room_member(world, make_user)
    await synapse.enable_feature(world.bot.user_id, "msc4222")

    def hide_departures(body):
        for section in ((body.get("rooms") or {}).get("join") or {}).values():
            timeline = section.get("timeline") or {}
            timeline["events"] = [e for e in timeline.get("events") or [] if e.get("state_key") != user.user_id]
        return body

    fault_proxy.rewrite(SYNC, hide_departures, method="GET")
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url)
    assert bot.app.matrix.sync_options.get("org.matrix.msc4222.use_state_after") == "true"
    await user.client.leave(space)
    await wait_membership(world, [room], user.user_id, "leave", timeout=20)
    assert bot.app.sync.state_after_answers > 0, "the homeserver answered with state_after"
