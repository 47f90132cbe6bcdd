"""Lockdown that only narrows and never forgets, against the real Synapse: a second lockdown after a change by
hand, an unlock right after a restart, and an upgrade of a locked room."""

from __future__ import annotations

import re

from spacesync.testing import wait_for

from .test_commands import ask, ready, reply_for
from .test_spacewide import _cached_rule, join_rules, server_acl, wait_deny, wait_rule


def state_path(room_id: str) -> str:
    return rf"/rooms/{re.escape(room_id)}/state$"


async def test_a_lockdown_only_narrows_and_a_second_one_records_a_change_by_hand(world, start_bot):
    space = await world.space("Demo Community")
    opened = await world.room(space, "Opened", join_rule="public")
    closed = await world.room(space, "Closed", join_rule="invite")
    for room in (opened, closed):  # opted in by m.space.parent: neither join rule names the Space
        await world.owner.client.set_parent(room, space, canonical=True)
    bot = await start_bot([{"room": space}])
    await ready(bot)

    # --knock never opens an invite-only room: it stays invite.
    body = await ask(world, bot, world.owner, "!ss lockdown --knock")
    assert "1 room switching to knock" in body and f"Closed ({closed}): already invite" in body, body
    await wait_rule(world, [opened], "knock")
    await bot.idle()
    assert (await join_rules(world, closed)).get("join_rule") == "invite"
    assert set(await bot.app.store.lockdowns()) == {opened}

    # A moderator tightens the room by hand to restricted; a second lockdown then records that as "before".
    await world.owner.client.set_join_rule(opened, "restricted", allow=[space])
    restricted = await join_rules(world, opened)
    await wait_for(lambda: _cached_rule(bot, opened, "restricted"), timeout=10)
    body = await ask(world, bot, world.owner, "!ss lockdown")
    assert "1 room switching to invite" in body, body
    await wait_rule(world, [opened], "invite")
    await bot.idle()
    assert (await bot.app.store.lockdowns())[opened].previous == restricted

    body = await ask(world, bot, world.owner, "!ss unlock")
    assert "restoring the join rules of 1 room" in body, body
    await wait_rule(world, [opened], "restricted")
    assert await join_rules(world, opened) == restricted, "unlock restored the first lockdown's rule"
    assert (await join_rules(world, closed)).get("join_rule") == "invite"


async def test_an_unlock_right_after_a_restart_waits_for_the_first_read(world, start_bot, fault_proxy, tmp_path):
    space = await world.space("Demo Community")
    rooms = [await world.room(space, f"R{i}") for i in range(2)]
    before = {r: await join_rules(world, r) for r in rooms}
    db = f"sqlite:{tmp_path}/lockdown.db"
    bot = await start_bot([{"room": space}], db_url=db, homeserver_url=fault_proxy.url)
    await ready(bot)
    assert "2 rooms switching to invite" in await ask(world, bot, world.owner, "!ss lockdown")
    await wait_rule(world, rooms, "invite")
    await bot.idle()
    await bot.stop()

    # The unlock arrives while the bot is down; after the start, the first read of one room is slow.
    command = await world.owner.client.send_text(bot.app.admin_room, "!ss unlock")
    slow = fault_proxy.delay_response(state_path(rooms[0]), 4.0, method="GET", times=1)
    bot = await start_bot([{"room": space}], db_url=db, homeserver_url=fault_proxy.url)
    body = (await reply_for(world, bot, command))["body"]
    assert slow.exhausted
    assert "for the first full read" in body and "restoring the join rules of 2 rooms" in body, body
    await wait_rule(world, rooms, "restricted")
    assert {r: await join_rules(world, r) for r in rooms} == before
    await bot.idle()
    assert await bot.app.store.lockdowns() == {}

    # A locked room that cannot be read keeps its record: unknown is no change by hand.
    assert "switching to invite" in await ask(world, bot, world.owner, "!ss lockdown")
    await wait_rule(world, rooms, "invite")
    await bot.idle()
    await bot.stop()
    fault_proxy.fail(state_path(rooms[0]), status=502, method="GET")
    bot = await start_bot([{"room": space}], db_url=db, homeserver_url=fault_proxy.url)
    body = await ask(world, bot, world.owner, "!ss unlock")
    assert rooms[0] in body and "cannot be read now; its lockdown record is kept" in body, body
    assert "restoring the join rules of 1 room" in body, body
    await wait_rule(world, [rooms[1]], "restricted")
    await bot.idle()
    assert set(await bot.app.store.lockdowns()) == {rooms[0]}
    fault_proxy.clear()
    await bot.reconcile()
    assert "restoring the join rules of 1 room" in await ask(world, bot, world.owner, "!ss unlock")
    await wait_rule(world, rooms, "restricted")


async def test_an_upgrade_of_a_locked_room_moves_its_lockdown_and_acl_records(world, start_bot):
    space = await world.space("Demo Community")
    old = await world.room(space, "General")
    client = world.owner.client
    await client.send_state(space, "m.room.server_acl", {"allow": ["*"], "deny": ["evil.example"]})
    before = await join_rules(world, old)
    bot = await start_bot([{"room": space, "server_acl": "sync"}])
    await ready(bot)
    await wait_deny(world, old, ["evil.example"])
    assert "1 room switching to invite" in await ask(world, bot, world.owner, "!ss lockdown")
    await wait_rule(world, [old], "invite")
    await bot.idle()

    new = await client.upgrade_room(old, "10")  # Synapse copies the join rule and the ACL into the new room
    await client.invite(new, world.bot.user_id)  # invite-only, as the lockdown left it: the bot needs an invite

    async def moved() -> bool:
        await bot.reconcile()
        return new in await bot.app.store.lockdowns() and new in await bot.app.store.owned_acl()

    await wait_for(moved, timeout=30, message="the lockdown and ACL records did not move to the replacement")
    assert old not in await bot.app.store.lockdowns()
    assert (await join_rules(world, new)).get("join_rule") == "invite", "the lockdown was undone in the new room"

    # Unlock restores the new room as the old one was; the Space dropping its entry removes it there too.
    body = await ask(world, bot, world.owner, "!ss unlock")
    assert "restoring the join rules of 1 room" in body, body
    await wait_rule(world, [new], before["join_rule"])
    assert await join_rules(world, new) == before
    await client.send_state(space, "m.room.server_acl", {"allow": ["*"], "deny": []})
    await wait_deny(world, new, [])
    assert (await server_acl(world, new))["allow"] == ["*"]


async def test_a_held_knock_lockdown_leaves_a_room_made_invite_only_meanwhile(world, start_bot):
    """The check is made again just before each write: a room made invite-only by hand while the lockdown
    waited for confirmation is not opened to knocks."""
    space = await world.space("Big")
    rooms = [await world.room(space, f"R{i}") for i in range(2)]
    bot = await start_bot([{"room": space, "max_evictions_without_confirmation": 1}])
    await ready(bot)
    body = await ask(world, bot, world.owner, "!ss lockdown --knock")
    assert "Held batch" in body, body
    batch = body.split("Held batch ", 1)[1].split(":", 1)[0]

    await world.owner.client.set_join_rule(rooms[0], "invite")
    assert "Confirmed batch" in await ask(world, bot, world.owner, f"!ss confirm {batch}")
    await wait_rule(world, [rooms[1]], "knock")
    await bot.idle()
    assert (await join_rules(world, rooms[0])).get("join_rule") == "invite", "knock opened an invite-only room"
    assert set(await bot.app.store.lockdowns()) == {rooms[1]}
