"""Which invites the bot accepts: only from admins, only to the admin room or rooms under a managed Space."""

from __future__ import annotations

from spacesync.testing import wait_for


async def membership(world, room_id: str) -> str | None:
    return (await world.owner.client.members(room_id)).get(world.bot.user_id)


async def test_invites_from_admins_to_listed_rooms_only(world, start_bot, make_user):
    space = await world.space("S")
    listed = await world.room(space, "listed", join_rule="invite", bot=False)
    unrelated = await world.room(None, "unrelated", join_rule="invite", bot=False)
    stranger = await make_user("stranger")
    by_stranger = await stranger.client.create_room(name="bait", join_rule="invite")
    bot = await start_bot([{"room": space}], admins=[world.owner.user_id])

    await world.owner.client.invite(listed, world.bot.user_id)
    await world.owner.client.invite(unrelated, world.bot.user_id)
    await stranger.client.invite(by_stranger, world.bot.user_id)

    async def joined_listed() -> bool:
        return await membership(world, listed) == "join"

    await wait_for(joined_listed, timeout=20, message="the bot did not accept an admin's invite to a child room")

    async def declined() -> bool:
        return (await stranger.client.members(by_stranger)).get(world.bot.user_id) == "leave"

    await wait_for(declined, timeout=20, message="the bot did not decline a non-admin's invite")

    await bot.reconcile()
    assert await membership(world, unrelated) == "invite", "an invite to an unrelated room must stay pending"
    assert unrelated in bot.app.invites.pending

    # The pending invite survives a restart; once the Space lists the room, it is accepted.
    await bot.stop()
    bot = await start_bot([{"room": space}], admins=[world.owner.user_id])
    assert unrelated in bot.app.invites.pending
    await world.owner.client.add_child(space, unrelated)

    async def joined_unrelated() -> bool:
        return await membership(world, unrelated) == "join"

    await wait_for(joined_unrelated, timeout=20, message="a pending invite was not accepted once listed")
