"""Evictions against the real Synapse: cascades, shared rooms, cycles, opt-in and bans."""

from __future__ import annotations

from spacesync.testbed import wait_for


async def joined(client, room_id):
    return await client.joined_members(room_id)


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
        return (user.user_id not in await joined(world.owner.client, sub)
                and user.user_id not in await joined(world.owner.client, room))
    await wait_for(gone, timeout=20)
    members = await world.owner.client.members(room)
    assert members[user.user_id] == "leave"
    records = await bot.app.store.audit_log(10, target=user.user_id)
    assert {r.room_id for r in records if r.outcome == "done"} == {sub, room}
