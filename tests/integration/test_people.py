"""Acting on one person across a Space from the admin room, against the real Synapse: ban (pre-emptive), unban,
kick, redact, and the undo of each."""

from __future__ import annotations

import re

import pytest

from spacesync.testing import TestbedRequestError, wait_for

from .test_commands import ask, bot_notices, membership, ready
from .test_encryption import bot_events, crypto_bot, encrypted_admin_room, moderators  # noqa: F401 (a fixture)
from .test_eviction import wait_membership
from .test_spacewide import redacted


def batch_of(body: str) -> str:
    return body.split(" as batch ", 1)[1].split(".", 1)[0]


async def finished(world, bot, batch: str, timeout: float = 20) -> str:
    """The batch's summary notice."""

    async def found() -> str | None:
        for event in await bot_notices(world, bot):
            if event["content"]["body"].startswith(f"Batch {batch} finished"):
                return event["content"]["body"]
        return None

    return await wait_for(found, timeout=timeout, message=f"no summary of batch {batch}")


async def test_a_pre_emptive_ban_lands_everywhere_keeps_a_never_member_out_and_undo_lifts_it(
    world, start_bot, make_user
):
    space = await world.space("Community")
    rooms = [await world.room(space, f"R{i}") for i in range(2)]
    spammer = await make_user("spammer")
    # propagate_bans off: the command bans in each room itself, not through the Space ban.
    bot = await start_bot([{"room": space, "propagate_bans": False}])
    await ready(bot)

    refused = await ask(world, bot, world.owner, f"!ss ban {world.owner.user_id}")
    assert refused.startswith("Refused:") and "a creator of the room" in refused

    link = f"https://matrix.to/#/{spammer.user_id}"
    body = await ask(world, bot, world.owner, f"!ss ban {link} known spammer")
    assert f"Ban {spammer.user_id} in 3 rooms as batch" in body
    batch = batch_of(body)
    await wait_membership(world, [space, *rooms], spammer.user_id, "ban")
    event = await world.owner.client.get_state_event(rooms[1], "m.room.member", spammer.user_id)
    assert event["reason"] == "known spammer"
    assert "banned " in await finished(world, bot, batch)

    for room in (space, rooms[0]):  # the Space, and a restricted join through it
        with pytest.raises(TestbedRequestError):
            await spammer.client.join(room)
    # The planner keeps a command's ban: a full reconcile lifts nothing.
    await bot.reconcile()
    assert {await membership(world, r, spammer.user_id) for r in (space, *rooms)} == {"ban"}

    body = await ask(world, bot, world.owner, f"!ss undo {batch}")
    assert "3 unbans" in body
    await wait_membership(world, [space, *rooms], spammer.user_id, "leave")
    await bot.idle()
    assert not [b for b in await bot.app.store.placed_bans() if b.user_id == spammer.user_id]


async def test_unban_lifts_only_spacesyncs_bans_and_its_undo_bans_again(world, start_bot, make_user):
    space = await world.space("Community")
    mine, theirs = await world.room(space, "Mine"), await world.room(space, "Theirs")
    troll = await make_user("troll")
    await world.owner.client.ban(theirs, troll.user_id, reason="by hand")
    bot = await start_bot([{"room": space, "propagate_bans": False}])
    await ready(bot)

    body = await ask(world, bot, world.owner, f"!ss ban {troll.user_id}")
    assert "in 2 rooms" in body and "Theirs" in body and f"already banned by {world.owner.user_id}" in body
    await wait_membership(world, [space, mine], troll.user_id, "ban")
    await bot.idle()

    body = await ask(world, bot, world.owner, f"!ss unban {troll.user_id} appeal accepted")
    assert f"Unban {troll.user_id} in 2 rooms" in body
    assert "not by spacesync: lift it by hand" in body
    await wait_membership(world, [space, mine], troll.user_id, "leave")
    assert await membership(world, theirs, troll.user_id) == "ban"  # the moderator's own ban stays
    await bot.idle()

    body = await ask(world, bot, world.owner, f"!ss undo {batch_of(body)}")
    assert "2 bans" in body
    await wait_membership(world, [space, mine], troll.user_id, "ban")
    await bot.idle()
    causes = {b.room_id: b.cause for b in await bot.app.store.placed_bans() if b.user_id == troll.user_id}
    assert causes == {space: "command_ban", mine: "command_ban"}


async def test_kick_removes_from_the_space_and_every_room_and_undo_reinvites(world, start_bot, make_user):
    space = await world.space("Community")
    rooms = [await world.room(space, f"R{i}") for i in range(2)]
    quiet = await world.room(space, "Quiet")
    user, bystander = await make_user("rowdy"), await make_user("bystander")
    for who in (user, bystander):
        for room in (space, *rooms):
            await who.client.join(room)
    moderator, admin, exempt = await make_user("moderator"), await make_user("admin"), await make_user("exempt")
    await world.owner.client.set_user_level(space, moderator.user_id, 100)
    # on_leave none: spacesync itself would evict nobody; the command alone kicks from the rooms.
    bot = await start_bot([{"room": space, "on_leave": "none", "exempt": [exempt.user_id]}], admins=[admin.user_id])
    await ready(bot)
    for who, why in (
        (moderator, "at or above the bot's power level in the Space"),
        (admin, "is a spacesync admin"),
        (exempt, "is exempt"),
        (world.bot, "is the bot itself"),
    ):
        refused = await ask(world, bot, world.owner, f"!ss kick {who.user_id}")
        assert refused.startswith("Refused:") and why in refused, refused

    pill = f'<a href="https://matrix.to/#/{user.user_id}">rowdy</a>'
    body = await ask(world, bot, world.owner, "!ss kick rowdy calm down", html=f"!ss kick {pill} calm down")
    assert f"Kick {user.user_id} in 3 rooms" in body and "Quiet" not in body
    await wait_membership(world, [space, *rooms], user.user_id, "leave")
    assert await membership(world, quiet, user.user_id) is None
    assert {await membership(world, r, bystander.user_id) for r in (space, *rooms)} == {"join"}
    await bot.idle()

    body = await ask(world, bot, world.owner, f"!ss undo {batch_of(body)}")
    assert "3 re-invites" in body
    await wait_membership(world, [space, *rooms], user.user_id, "invite")


async def test_redact_removes_the_users_messages_everywhere_and_nobody_elses(world, start_bot, make_user):
    space = await world.space("Community")
    rooms = [await world.room(space, f"R{i}") for i in range(2)]
    spammer, bystander = await make_user("spammer"), await make_user("bystander")
    sent: dict[str, dict[str, list[str]]] = {spammer.user_id: {}, bystander.user_id: {}}
    for who in (spammer, bystander):
        for room in (space, *rooms):
            await who.client.join(room)
        for room in rooms:
            sent[who.user_id][room] = [await who.client.send_text(room, f"message {i}") for i in range(3)]
    bot = await start_bot([{"room": space}])
    await ready(bot)

    body = await ask(world, bot, world.owner, f"!ss redact {spammer.user_id} 2 spam wave")
    assert f"Redact {spammer.user_id} in 3 rooms" in body and "cannot be undone" in body
    batch = batch_of(body)
    summary = await finished(world, bot, batch)
    assert "4 messages redacted" in summary
    for room in rooms:
        first, *last = sent[spammer.user_id][room]
        for event_id in last:
            assert await redacted(world, room, event_id)
        assert not await redacted(world, room, first)
        for event_id in sent[bystander.user_id][room]:
            assert not await redacted(world, room, event_id)
    # They are still joined: a redaction is no eviction.
    assert await membership(world, rooms[0], spammer.user_id) == "join"

    assert "cannot be undone" in await ask(world, bot, world.owner, f"!ss undo {batch}")

    bot.app.executor.stop()  # the run waits: `status` shows it open
    body = await ask(world, bot, world.owner, f"!ss redact {spammer.user_id} --since 1h")
    status = await ask(world, bot, world.owner, "!ss status")
    assert f"Redacting: {spammer.user_id} in 3 rooms (batch {batch_of(body)})" in status
    bot.app.executor.resume()
    assert "2 messages redacted" in await finished(world, bot, batch_of(body))
    for room in rooms:
        assert await redacted(world, room, sent[spammer.user_id][room][0])
        for event_id in sent[bystander.user_id][room]:
            assert not await redacted(world, room, event_id)


async def test_ban_and_its_undo_from_an_encrypted_admin_room(world, start_bot, make_user, moderators):  # noqa: F811
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    room = await world.room(space, "General")
    spammer = await make_user("spammer")
    bot = await start_bot([{"room": space}], **crypto_bot(world, admin_room))
    await wait_for(lambda: bot.app.synced, timeout=20)
    owner = await moderators(world.owner, "owner")

    body = await owner.ask(admin_room, f"!ss ban {spammer.user_id} raid")
    assert f"Ban {spammer.user_id} in 2 rooms" in body
    await wait_membership(world, [space, room], spammer.user_id, "ban")
    await bot.idle()
    assert "2 unbans" in await owner.ask(admin_room, f"!ss undo {batch_of(body)}")
    await wait_membership(world, [space, room], spammer.user_id, "leave")
    assert {e["type"] for e in await bot_events(world, admin_room)} == {"m.room.encrypted"}


async def test_redact_waits_out_429s_and_is_retried_after_a_failure(world, start_bot, make_user, fault_proxy):
    space = await world.space("Community")
    room = await world.room(space, "General")
    spammer = await make_user("spammer")
    for r in (space, room):
        await spammer.client.join(r)
    sent = [await spammer.client.send_text(room, f"spam {i}") for i in range(4)]
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url)
    await ready(bot)
    redactions = re.compile(r"/rooms/[^/]+/redact/")
    fault_proxy.rate_limit(redactions, retry_after_ms=300, method="PUT", times=2)
    # Then one answers 502: the entry backs off, and its retry redacts what is left, each message once.
    fault_proxy.fail(redactions, status=502, method="PUT", times=1)

    body = await ask(world, bot, world.owner, f"!ss redact {spammer.user_id}")
    assert "4 messages redacted" in await finished(world, bot, batch_of(body), timeout=40)
    for event_id in sent:
        assert await redacted(world, room, event_id)
    assert fault_proxy.count(redactions, method="PUT") == 4 + 2 + 1  # each message once, plus the faults


async def test_a_ban_over_the_limit_is_held_until_confirmed(world, start_bot, make_user):
    space = await world.space("Community")
    rooms = [await world.room(space, f"R{i}") for i in range(2)]
    other = await world.space("Other")
    spammer = await make_user("spammer")
    bot = await start_bot([{"room": space, "max_evictions_without_confirmation": 2}, {"room": other}])
    await ready(bot)

    body = await ask(world, bot, world.owner, f"!ss ban {spammer.user_id} --space {space} raid")
    assert body.startswith("⚠ Held batch") and "ban" in body and "in 3 rooms, over the limit of 2" in body
    batch = body.split("Held batch ", 1)[1].split(":", 1)[0]
    await bot.idle()
    assert await membership(world, space, spammer.user_id) is None
    assert "Confirmed batch" in await ask(world, bot, world.owner, f"!ss confirm {batch}")
    await wait_membership(world, [space, *rooms], spammer.user_id, "ban")
    assert await membership(world, other, spammer.user_id) is None  # --space: the other Space is left alone
