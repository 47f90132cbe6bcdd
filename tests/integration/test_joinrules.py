"""Join rules, room upgrades and invite sync against the real Synapse."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from spacesync.testing import wait_for

from .test_commands import bot_notices


def allow_entry(room_id: str) -> dict[str, str]:
    return {"type": "m.room_membership", "room_id": room_id}


async def join_rules(world, room_id: str) -> dict[str, Any]:
    return await world.owner.client.get_state_event(room_id, "m.room.join_rules") or {}


async def wait_join_rules(world, room_id: str, expected: dict[str, Any], timeout: float = 20) -> None:
    async def reached() -> bool:
        return await join_rules(world, room_id) == expected

    await wait_for(
        reached,
        timeout=timeout,
        message=f"{room_id} join rules never became {expected}: {await join_rules(world, room_id)}",
    )


def findings(bot, code: str, room_id: str | None = None) -> list:
    plan = bot.app.reconciler.last_plan
    if plan is None:
        return []
    return [f for f in plan.findings if f.code == code and (room_id is None or f.room_id == room_id)]


def acted_in(bot, room_id: str) -> list:
    plan = bot.app.reconciler.last_plan
    return [a for a in plan.actions if a.room_id == room_id] if plan else []


async def opted_in_child(world, space: str, name: str, *, join_rule: str, version: str = "10", **kw: Any) -> str:
    """A child of `space` that opted in through m.space.parent (matched by the Space's m.space.child)."""
    room_id = await world.room(space, name, join_rule=join_rule, version=version, **kw)
    await world.owner.client.set_parent(room_id, space)
    return room_id


async def test_invite_room_opted_in_by_parent_becomes_restricted(world, start_bot):
    space = await world.space("S")
    room = await opted_in_child(world, space, "R", join_rule="invite")
    bot = await start_bot([{"room": space, "join_rules": "enforce", "restrict_invite_rooms": True}])

    await wait_join_rules(world, room, {"join_rule": "restricted", "allow": [allow_entry(space)]})
    await bot.reconcile()
    assert not acted_in(bot, room)
    assert room in bot.app.reconciler.last_plan.managed


async def test_invite_room_added_by_extra_rooms_becomes_restricted(world, start_bot):
    space = await world.space("S")
    room = await world.room(space, "R", join_rule="invite", add_child=False)
    bot = await start_bot(
        [{"room": space, "join_rules": "enforce", "restrict_invite_rooms": True, "extra_rooms": [room]}]
    )

    await wait_join_rules(world, room, {"join_rule": "restricted", "allow": [allow_entry(space)]})
    assert room in bot.app.reconciler.last_plan.managed


async def test_enforce_alone_leaves_an_invite_room_invite_only_and_reports_it(world, start_bot):
    space = await world.space("S")
    invite = await opted_in_child(world, space, "invite", join_rule="invite")
    public = await opted_in_child(world, space, "public", join_rule="public")
    bot = await start_bot([{"room": space, "join_rules": "enforce"}])

    # The public room is restricted (that only narrows who may join): the same pass left the invite room alone.
    await wait_join_rules(world, public, {"join_rule": "restricted", "allow": [allow_entry(space)]})
    await bot.reconcile()
    assert await join_rules(world, invite) == {"join_rule": "invite"}
    assert invite in bot.app.reconciler.last_plan.managed
    assert not acted_in(bot, invite)
    kept = findings(bot, "invite_kept", invite)
    assert len(kept) == 1 and "restrict_invite_rooms: true" in kept[0].message
    assert not [r for r in await bot.app.store.audit_log(50) if r.room_id == invite]


async def test_public_room_becomes_restricted(world, start_bot):
    space = await world.space("S")
    room = await opted_in_child(world, space, "R", join_rule="public")
    await start_bot([{"room": space, "join_rules": "enforce"}])

    await wait_join_rules(world, room, {"join_rule": "restricted", "allow": [allow_entry(space)]})


async def test_knock_becomes_knock_restricted(world, start_bot):
    space = await world.space("S")
    room = await opted_in_child(world, space, "R", join_rule="knock")
    await start_bot([{"room": space, "join_rules": "enforce"}])

    await wait_join_rules(world, room, {"join_rule": "knock_restricted", "allow": [allow_entry(space)]})


async def test_restricted_room_gains_its_parent_and_keeps_other_entries(world, start_bot):
    space = await world.space("S")
    elsewhere = await world.room(None, "elsewhere", join_rule="invite", bot=False)
    room = await world.room(space, "R", join_rule="restricted", allow=[elsewhere], bot=False)
    custom = {"type": "org.example.custom", "note": "kept"}
    await world.owner.client.send_state(
        room,
        "m.room.join_rules",
        {"join_rule": "restricted", "allow": [allow_entry(elsewhere), custom], "org.example.extra": 1},
    )
    await world.owner.client.set_parent(room, space)
    await world.owner.client.invite(room, world.bot.user_id)
    await world.bot.client.join(room)
    bot = await start_bot([{"room": space, "join_rules": "enforce"}])

    await wait_join_rules(
        world,
        room,
        {
            "join_rule": "restricted",
            "allow": [allow_entry(elsewhere), custom, allow_entry(space)],
            "org.example.extra": 1,
        },
    )
    await bot.reconcile()
    assert not acted_in(bot, room)


@pytest.mark.parametrize("rule", ["invite", "knock"])
async def test_v7_room_gets_upgrade_advice_and_is_left_alone(world, start_bot, rule):
    space = await world.space("S")
    room = await opted_in_child(world, space, "old", join_rule=rule, version="7")
    before = await join_rules(world, room)
    bot = await start_bot([{"room": space, "join_rules": "enforce"}])
    await bot.reconcile()

    advice = findings(bot, "version", room)
    assert advice and "upgrade to 10" in advice[0].message
    assert room in bot.app.reconciler.last_plan.managed
    assert not acted_in(bot, room)
    assert await join_rules(world, room) == before == {"join_rule": rule}


async def test_audit_mode_reports_and_changes_nothing(world, start_bot):
    space = await world.space("S")
    invite = await opted_in_child(world, space, "invite", join_rule="invite")
    knock = await opted_in_child(world, space, "knock", join_rule="knock")
    elsewhere = await world.room(None, "elsewhere", join_rule="invite")
    lacking = await opted_in_child(world, space, "lacking", join_rule="restricted", allow=[elsewhere])
    rooms = (invite, knock, lacking)
    before = {r: await join_rules(world, r) for r in rooms}
    bot = await start_bot([{"room": space}])
    await bot.reconcile()

    assert findings(bot, "not_restricted", invite) and findings(bot, "not_restricted", knock)
    assert findings(bot, "allow_missing", lacking)
    assert not [a for a in bot.app.reconciler.last_plan.actions if a.kind.value == "set_join_rules"]
    assert {r: await join_rules(world, r) for r in rooms} == before
    assert not [r for r in await bot.app.store.audit_log(50) if r.room_id in rooms]


async def test_upgraded_room_is_followed(world, start_bot, make_user):
    space = await world.space("S")
    old = await world.room(space, "R")
    alice = await make_user("alice")
    await alice.client.join(space)
    await alice.client.join(old)
    mod = await make_user("mod")
    await world.owner.client.set_user_level(space, mod.user_id, 50)
    bot = await start_bot([{"room": space}])

    async def mirrored() -> bool:
        return (await world.owner.client.get_power_levels(old)).get("users", {}).get(mod.user_id) == 50

    await wait_for(mirrored, timeout=20, message="the Space's promotion never reached the old room")

    new = await world.owner.client.upgrade_room(old, "10")

    async def repointed() -> bool:
        new_child = await world.owner.client.get_state_event(space, "m.space.child", new)
        old_child = await world.owner.client.get_state_event(space, "m.space.child", old)
        return bool(new_child and new_child.get("via")) and not (old_child or {}).get("via")

    await wait_for(repointed, timeout=20, message="the Space's m.space.child was not re-pointed")
    assert await join_rules(world, new) == {"join_rule": "restricted", "allow": [allow_entry(space)]}

    async def bot_in_new_room() -> bool:
        return world.bot.user_id in await world.owner.client.joined_members(new)

    await wait_for(bot_in_new_room, timeout=20, message="the bot never joined the replacement room")
    await alice.client.join(new)
    await bot.reconcile()
    assert new in bot.app.reconciler.last_plan.managed
    assert old not in bot.app.reconciler.last_plan.managed
    assert (new, mod.user_id) in await bot.app.store.owned_levels()

    # The level spacesync wrote in the old room is its own in the new one: a demotion undoes it there.
    levels = await world.owner.client.get_power_levels(space)
    levels["users"].pop(mod.user_id)
    await world.owner.client.send_state(space, "m.room.power_levels", levels)

    async def demoted() -> bool:
        return mod.user_id not in (await world.owner.client.get_power_levels(new)).get("users", {})

    await wait_for(demoted, timeout=20, message="the demotion did not reach the replacement room")

    await alice.client.leave(space)

    async def evicted() -> bool:
        return alice.user_id not in await world.owner.client.joined_members(new)

    await wait_for(evicted, timeout=20, message="the Space leaver was not evicted from the replacement room")
    assert (await world.owner.client.members(new))[alice.user_id] == "leave"


async def test_invite_sync_invites_exactly_the_missing_space_members(world, start_bot, make_user):
    space = await world.space("S")
    room = await opted_in_child(world, space, "R", join_rule="invite")
    users = {name: await make_user(name) for name in ("inboth", "missing", "roomonly", "banned", "leaver")}
    for name in ("inboth", "missing", "banned", "leaver"):
        await users[name].client.join(space)
    for name in ("inboth", "roomonly"):
        await world.owner.client.invite(room, users[name].user_id)
        await users[name].client.join(room)
    await world.owner.client.ban(room, users["banned"].user_id)
    await users["leaver"].client.leave(space)
    before = await world.owner.client.members(room)

    bot = await start_bot([{"room": space, "invite_members": True}])

    async def invited() -> bool:
        return (await world.owner.client.members(room)).get(users["missing"].user_id) == "invite"

    await wait_for(invited, timeout=20, message="the missing Space member was not invited")
    await bot.reconcile()
    assert await world.owner.client.members(room) == {**before, users["missing"].user_id: "invite"}
    assert (await join_rules(world, room))["join_rule"] == "invite"
    invites = [r for r in await bot.app.store.audit_log(50) if r.kind == "invite"]
    assert [(r.room_id, r.target) for r in invites] == [(room, users["missing"].user_id)]


async def test_invite_sync_respects_a_declined_invite(world, start_bot, make_user):
    """A member who declines the bot's invite (or leaves the room) is not invited again and again."""
    space = await world.space("S")
    room = await opted_in_child(world, space, "R", join_rule="invite")
    member = await make_user("member")
    quitter = await make_user("quitter")
    for user in (member, quitter):
        await user.client.join(space)
    await world.owner.client.invite(room, quitter.user_id)
    await quitter.client.join(room)
    await quitter.client.leave(room)
    bot = await start_bot([{"room": space, "invite_members": True}])

    async def invited() -> bool:
        return (await world.owner.client.members(room)).get(member.user_id) == "invite"

    await wait_for(invited, timeout=20)
    await member.client.leave(room)
    await bot.reconcile()
    await bot.reconcile()

    members = await world.owner.client.members(room)
    assert members[member.user_id] == "leave" and members[quitter.user_id] == "leave"
    invites = [r for r in await bot.app.store.audit_log(50) if r.kind == "invite"]
    assert [(r.room_id, r.target) for r in invites] == [(room, member.user_id)]


async def test_an_invitee_who_blocks_invites_is_asked_once_and_reported_once(world, start_bot, make_user):
    """MSC4380: an invitee whose account blocks invites makes the homeserver answer M_INVITE_BLOCKED, which is
    final: the invite is parked at the first refusal, never sent again, and moderators hear of it once."""
    space = await world.space("S")
    room = await opted_in_child(world, space, "R", join_rule="invite")
    blocker = await make_user("blocker")
    await blocker.client.join(space)
    path = f"/_matrix/client/v3/user/{quote(blocker.user_id, safe='')}/account_data/m.invite_permission_config"
    await blocker.client.request("PUT", path, {"default_action": "block"})

    bot = await start_bot([{"room": space, "invite_members": True}], executor={"max_failures": 3})

    async def parked() -> bool:
        return any(r.outcome == "parked" for r in await bot.app.store.audit_log(50) if r.kind == "invite")

    await wait_for(parked, timeout=30, message="the blocked invite was not parked")
    await bot.reconcile()
    await bot.reconcile()
    invites = [r for r in await bot.app.store.audit_log(50) if r.kind == "invite"]
    assert [(r.target, r.outcome) for r in invites] == [(blocker.user_id, "parked")]
    entries = [e for e in await bot.app.store.journal.parked(limit=10) if e.action.user_id == blocker.user_id]
    assert len(entries) == 1 and entries[0].failures == 1, "parked at the first refusal, not retried"
    assert "M_INVITE_BLOCKED" in (entries[0].error or "")
    told = [e for e in await bot_notices(world, bot) if "M_INVITE_BLOCKED" in e["content"]["body"]]
    assert len(told) == 1
    assert (await world.owner.client.members(room)).get(blocker.user_id) is None


async def member_event(world, room_id: str, user_id: str) -> dict[str, Any] | None:
    for event in await world.owner.client.get_state(room_id):
        if event.get("type") == "m.room.member" and event.get("state_key") == user_id:
            return event
    return None


async def test_bans_spacesync_placed_follow_an_upgrade_and_lift_with_the_space_ban(world, start_bot, make_user):
    space = await world.space("S")
    old = await world.room(space, "R")
    mallory = await make_user("mallory")
    for room_id in (space, old):
        await mallory.client.join(room_id)
    bot = await start_bot([{"room": space}])

    await world.owner.client.ban(space, mallory.user_id, reason="spam")

    async def banned_by_bot(room_id: str) -> bool:
        event = await member_event(world, room_id, mallory.user_id)
        return bool(event) and event["content"]["membership"] == "ban" and event["sender"] == world.bot.user_id

    await wait_for(lambda: banned_by_bot(old), timeout=20, message="the Space ban was not carried into the room")
    await bot.idle()

    new = await world.owner.client.upgrade_room(old, "10")

    # Synapse copies the ban into the replacement in the upgrader's name; the bot makes it its own again.
    await wait_for(
        lambda: banned_by_bot(new),
        timeout=30,
        message="the bot's ban was not carried into the replacement: "
        f"{await member_event(world, new, mallory.user_id)}",
    )
    await bot.idle()
    assert (new, mallory.user_id) in {(b.room_id, b.user_id) for b in await bot.app.store.placed_bans()}

    await world.owner.client.unban(space, mallory.user_id)

    async def lifted() -> bool:
        return (await world.owner.client.members(new)).get(mallory.user_id) == "leave"

    await wait_for(lifted, timeout=30, message="the Space unban did not lift the ban in the replacement")
    event = await member_event(world, new, mallory.user_id)
    assert event["sender"] == world.bot.user_id
