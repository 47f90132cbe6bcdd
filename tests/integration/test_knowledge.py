"""Evict only on knowledge, against the real Synapse: membership histories, unreadable rooms, reads that
race /sync, grace on spacesync's own clock, malformed state. Each test fails without its safeguard."""

from __future__ import annotations

import asyncio
import re
import time

from spacesync.testing import wait_for

from .test_eviction import joined, wait_membership


def findings(bot, code):
    plan = bot.app.reconciler.last_plan
    assert plan is not None
    return [f for f in plan.findings if f.code == code]


async def space_room_member(world, make_user):
    """A Space S, a room R restricted to it, and a user joined to both."""
    space = await world.space("S")
    room = await world.room(space, "R")
    user = await make_user("alice")
    for r in (space, room):
        await user.client.join(r)
    return space, room, user


def state_path(room_id: str) -> str:
    return rf"/rooms/{re.escape(room_id)}/state$"


async def test_a_declined_invite_or_rejected_knock_is_no_departure(world, start_bot, make_user, tmp_path):
    space = await world.space("S")
    knock_space = await world.space("K")
    await world.owner.client.set_join_rule(knock_space, "knock")
    room = await world.room(space, "R", allow=[space, knock_space])
    guest, knocker, leaver = await make_user("guest"), await make_user("knocker"), await make_user("leaver")
    for user in (guest, knocker):  # in the room by invite, never members of a Space
        await world.owner.client.invite(room, user.user_id)
        await user.client.join(room)
    for r in (space, room):
        await leaver.client.join(r)
    bot = await start_bot([{"room": space}, {"room": knock_space}])

    await world.owner.client.invite(space, guest.user_id)
    await guest.client.leave(space)  # declines the Space invite: invite -> leave
    await knocker.client.request("POST", f"/_matrix/client/v3/knock/{knock_space}", {})
    await world.owner.client.kick(knock_space, knocker.user_id)  # rejects the knock: knock -> leave
    await leaver.client.leave(space)  # a real departure, for contrast
    await wait_membership(world, [room], leaver.user_id, "leave", timeout=15)
    await bot.reconcile()
    assert {guest.user_id, knocker.user_id} <= await joined(world.owner.client, room)

    # A restart reads the Space from /state, which carries no prev_content: still no eviction.
    await bot.stop()
    bot = await start_bot([{"room": space}, {"room": knock_space}])
    await bot.reconcile()
    assert {guest.user_id, knocker.user_id} <= await joined(world.owner.client, room)
    assert not findings(bot, "history_unknown"), "the previous memberships were readable: nothing to report"


async def test_a_departure_is_sticky_through_a_rejected_knock_or_a_declined_invite(world, start_bot, make_user):
    """leave -> knock -> knock rejected, and leave -> invite -> invite declined, during a grace period: both
    departed (the last leave replaced a knock or an invite, yet they had been members), evicted once the grace
    period, counted from the leave spacesync saw, is over."""
    space = await world.space("S")
    await world.owner.client.set_join_rule(space, "knock")
    room = await world.room(space, "R")
    knocker, invitee = await make_user("knocker"), await make_user("invitee")
    for user in (knocker, invitee):
        await world.owner.client.invite(space, user.user_id)
        await user.client.join(space)
        await user.client.join(room)
    bot = await start_bot([{"room": space, "grace_period": 4}])
    assert {knocker.user_id, invitee.user_id} <= await joined(world.owner.client, room)

    left = time.monotonic()
    await knocker.client.leave(space)
    await invitee.client.leave(space)
    await knocker.client.request("POST", f"/_matrix/client/v3/knock/{space}", {})
    await world.owner.client.invite(space, invitee.user_id)
    await bot.reconcile()  # spacesync sees the knock and the invite: still departed, the grace runs on
    await world.owner.client.kick(space, knocker.user_id)  # rejects the knock: knock -> leave
    await invitee.client.leave(space)  # declines the invite: invite -> leave
    await bot.reconcile()
    assert {knocker.user_id, invitee.user_id} <= await joined(world.owner.client, room), "evicted within the grace"
    await wait_membership(world, [room], knocker.user_id, "leave", timeout=20)
    await wait_membership(world, [room], invitee.user_id, "leave", timeout=20)
    assert time.monotonic() - left >= 3.5, "evicted before the grace period was over"


async def test_a_departure_then_a_rejected_knock_before_the_bot_ever_ran_is_evicted(world, start_bot, make_user):
    """No record: the history is read back through replaces_state, past the knock and its rejection, to the join."""
    space = await world.space("S")
    await world.owner.client.set_join_rule(space, "knock")
    room = await world.room(space, "R")
    user = await make_user("alice")
    await world.owner.client.invite(space, user.user_id)
    for r in (space, room):
        await user.client.join(r)
    await user.client.leave(space)
    await user.client.request("POST", f"/_matrix/client/v3/knock/{space}", {})
    await world.owner.client.kick(space, user.user_id)  # rejects the knock: knock -> leave
    bot = await start_bot([{"room": space}])
    await wait_membership(world, [room], user.user_id, "leave", timeout=15)
    assert bot.app.observer.history.lookups >= 2, "the knock and the leave before it were read"


async def test_a_departure_while_the_bot_never_ran_is_still_evicted(world, start_bot, make_user):
    """No record and no /sync history: the leave's previous membership is read through replaces_state."""
    space, room, user = await space_room_member(world, make_user)
    await user.client.leave(space)
    for i in range(60):  # push the leave out of the timeline the bot's first /sync shows it
        await world.owner.client.send_text(space, f"news {i}")
    bot = await start_bot([{"room": space}])
    await wait_membership(world, [room], user.user_id, "leave", timeout=15)
    assert bot.app.observer.history.lookups >= 1, "the previous membership was read from the homeserver"


async def test_a_parent_space_answering_502_keeps_its_members_in(world, start_bot, make_user, fault_proxy):
    # R answers to Spaces A and B (m.space.parent with matching children; restricted to A only).
    a, b = await world.space("A"), await world.space("B")
    room = await world.room(a, "R", allow=[a])
    await world.owner.client.add_child(b, room)
    for parent in (a, b):
        await world.owner.client.set_parent(room, parent, canonical=parent == a)
    user = await make_user("alice")
    for r in (a, b, room):
        await user.client.join(r)
    bot = await start_bot([{"room": a}, {"room": b}], homeserver_url=fault_proxy.url)
    assert room in bot.app.reconciler.last_plan.managed

    # B was read once; now every read of it fails. Its last known state is kept, never dropped.
    fault_proxy.fail(state_path(b), status=502, method="GET")
    await bot.reconcile()
    await user.client.leave(a)
    await asyncio.sleep(1)
    await bot.reconcile()
    assert user.user_id in await joined(world.owner.client, room), "kicked although entitled through B"
    assert any(f.room_id == b for f in findings(bot, "unreachable"))

    # B never read at all (a fresh start): R names it as a parent, so R's members stay.
    await bot.stop()
    bot = await start_bot([{"room": a}, {"room": b}], homeserver_url=fault_proxy.url)
    await bot.reconcile()
    assert user.user_id in await joined(world.owner.client, room)
    assert any(f.room_id == room for f in findings(bot, "unchecked_entitlement"))

    # B reads again, and the user is still in it: still entitled. Then they leave B too.
    fault_proxy.clear()
    await bot.reconcile()
    assert user.user_id in await joined(world.owner.client, room)
    await user.client.leave(b)
    await wait_membership(world, [room], user.user_id, "leave", timeout=15)


async def test_a_change_during_the_first_read_of_a_space_is_not_lost(world, start_bot, make_user, fault_proxy):
    space, room, user = await space_room_member(world, make_user)
    # The bot's first /state read of the Space answers late: what it returns predates the leave below.
    fault_proxy.delay_response(state_path(space), 3.0, method="GET", times=1)
    starting = asyncio.create_task(start_bot([{"room": space}], homeserver_url=fault_proxy.url))
    await wait_for(
        lambda: fault_proxy.count(state_path(space), method="GET") >= 1,
        timeout=20,
        message="the bot never read the Space",
    )
    await asyncio.sleep(0.5)
    await user.client.leave(space)  # reaches the bot through /sync while its read is in flight
    await starting
    # Well before the next full reconcile (an hour away), the leave has been acted on.
    await wait_membership(world, [room], user.user_id, "leave", timeout=15)


async def test_grace_runs_from_when_spacesync_saw_the_departure(world, start_bot, make_user):
    space, room, user = await space_room_member(world, make_user)
    await user.client.leave(space)
    await asyncio.sleep(4)  # by the leave's origin_server_ts, a 3 s grace period is long over
    started = time.monotonic()
    bot = await start_bot([{"room": space, "grace_period": 3}])
    assert user.user_id in await joined(world.owner.client, room), "the grace period ran on the sender's clock"
    assert bot.app.reconciler.last_plan.recheck_at_ms is not None
    await wait_membership(world, [room], user.user_id, "leave", timeout=15)
    assert time.monotonic() - started >= 2.5


async def test_a_malformed_state_event_skips_itself_not_the_room(world, start_bot, make_user, fault_proxy):
    space, room, user = await space_room_member(world, make_user)

    def junk(events):
        return [
            *events,
            {
                "type": "m.room.member",
                "state_key": "@junk:localhost",
                "event_id": "$junk",
                "sender": ["@junk:localhost"],
                "origin_server_ts": "yesterday",
                "content": {"membership": "join"},
            },
            {
                "type": "m.room.member",
                "state_key": "@late:localhost",
                "event_id": "$late",
                "sender": "@late:localhost",
                "origin_server_ts": "yesterday",
                "content": {"membership": "join"},
            },
            {
                "type": "m.space.child",
                "state_key": "!elsewhere:localhost",
                "event_id": "$child",
                "sender": "@x:localhost",
                "content": ["via", "localhost"],
            },
        ]

    fault_proxy.rewrite(state_path(space), junk, method="GET")
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url)
    malformed = findings(bot, "malformed")
    assert [f.room_id for f in malformed] == [space] and "2 state event(s)" in malformed[0].message
    await user.client.leave(space)
    await wait_membership(world, [room], user.user_id, "leave", timeout=15)
