"""Power-level mirroring against the real Synapse: Space levels carried into managed rooms, on room
versions 10, 11 and 12 (where creators have unlimited power and must never appear in `users`)."""

from __future__ import annotations

from typing import Any

import pytest

from spacesync.store import Status
from spacesync.testing import TestbedRequestError, wait_for

from .test_commands import ask, ready

VERSIONS = ["10", "11", "12"]


# region builders: World.space/room put the owner into `users`, which a v12 room refuses (the owner
# creates it and is its creator), so the rooms here are built with overrides that depend on the version.
def levels_for(world, version: str, users: dict[str, int] | None = None, **pl: Any) -> dict[str, Any]:
    """A power_level_content_override: the bot at 100 and, before v12, the owner at 100."""
    base = {world.bot.user_id: 100}
    if version != "12":
        base[world.owner.user_id] = 100
    base.update(users or {})
    return {"users": base, **pl}


async def make_space(
    world,
    version: str,
    parent: str | None = None,
    *,
    name: str = "space",
    users: dict[str, int] | None = None,
    **pl: Any,
) -> str:
    """A Space: public at the top, restricted to its parent below it; the bot joined."""
    room_id = await world.owner.client.create_space(
        name=name,
        room_version=version,
        join_rule="restricted" if parent else "public",
        allow=[parent] if parent else [],
        power_level_content_override=levels_for(world, version, users, **pl),
    )
    if parent:
        await world.owner.client.add_child(parent, room_id)
    await world.bot.client.join(room_id)
    return room_id


async def make_room(
    world, version: str, parent: str, *, name: str = "room", users: dict[str, int] | None = None, **pl: Any
) -> str:
    """A room restricted to `parent` and listed as its child (so it opted in); the bot joined."""
    room_id = await world.owner.client.create_room(
        name=name,
        room_version=version,
        join_rule="restricted",
        allow=[parent],
        power_level_content_override=levels_for(world, version, users, **pl),
    )
    await world.owner.client.add_child(parent, room_id)
    await world.bot.client.join(room_id)
    return room_id


# endregion


async def users_of(world, room_id: str) -> dict[str, Any]:
    return (await world.owner.client.get_power_levels(room_id)).get("users", {})


async def wait_level(world, room_id: str, user_id: str, level: int | None, timeout: float = 20) -> None:
    """Wait until the user's `users` entry in the room is `level` (None: no entry)."""

    async def reached() -> bool:
        return (await users_of(world, room_id)).get(user_id) == level

    await wait_for(
        reached,
        timeout=timeout,
        message=f"{user_id} never reached {level} in {room_id}: {await users_of(world, room_id)}",
    )


async def remove_user_level(client, room_id: str, user_id: str) -> None:
    content = await client.get_power_levels(room_id)
    content["users"] = {u: v for u, v in content.get("users", {}).items() if u != user_id}
    await client.send_state(room_id, "m.room.power_levels", content)


async def assert_no_creator_in_users(world, rooms: list[str]) -> None:
    for room_id in rooms:
        create = await world.owner.client.get_state_event(room_id, "m.room.create")
        assert create is not None
        creators = {world.owner.user_id, *create.get("additional_creators", [])}
        assert not creators & set(await users_of(world, room_id)), room_id


def findings(bot, code: str, room_id: str | None = None) -> list:
    plan = bot.app.reconciler.last_plan
    if plan is None:
        return []
    return [f for f in plan.findings if f.code == code and (room_id is None or f.room_id == room_id)]


@pytest.mark.parametrize("version", VERSIONS)
async def test_promotion_in_the_space_reaches_rooms_of_its_subspaces(world, start_bot, make_user, version):
    space = await make_space(world, version, name="S")
    sub = await make_space(world, version, space, name="T")
    rooms = [await make_room(world, version, sub, name=f"R{i}") for i in range(2)]
    direct = await make_room(world, version, space, name="D")
    mod = await make_user("mod")
    await start_bot([{"room": space}])

    await world.owner.client.set_user_level(space, mod.user_id, 50)

    for room_id in [sub, *rooms, direct]:
        await wait_level(world, room_id, mod.user_id, 50)
    if version == "12":
        await assert_no_creator_in_users(world, [space, sub, *rooms, direct])


@pytest.mark.parametrize("version", VERSIONS)
async def test_room_local_entry_and_other_keys_stay(world, start_bot, make_user, version):
    space = await make_space(world, version, name="S")
    local = await make_user("local")
    mod = await make_user("mod")
    room = await make_room(
        world,
        version,
        space,
        name="R",
        users={local.user_id: 30},
        events={"m.room.name": 60, "m.room.power_levels": 100, "m.room.topic": 10},
        kick=60,
        invite=20,
        notifications={"room": 40},
    )
    other = await make_room(world, version, space, name="O")
    await start_bot([{"room": space}])
    before = await world.owner.client.get_power_levels(room)

    await world.owner.client.set_user_level(space, mod.user_id, 50)

    await wait_level(world, room, mod.user_id, 50)
    await wait_level(world, other, mod.user_id, 50)
    after = await world.owner.client.get_power_levels(room)
    assert after.pop("users") == {**before.pop("users"), mod.user_id: 50}
    assert after == before
    assert local.user_id not in await users_of(world, other)


@pytest.mark.parametrize("version", VERSIONS)
async def test_demotion_reverts_only_what_the_bot_set(world, start_bot, make_user, version):
    space = await make_space(world, version, name="S")
    sub = await make_space(world, version, space, name="T")
    mod = await make_user("mod")
    fresh = await make_room(world, version, sub, name="fresh")
    had = await make_room(world, version, sub, name="had", users={mod.user_id: 10})
    await start_bot([{"room": space}])
    await world.owner.client.set_user_level(space, mod.user_id, 50)
    for room_id in (sub, fresh, had):
        await wait_level(world, room_id, mod.user_id, 50)

    await remove_user_level(world.owner.client, space, mod.user_id)

    await wait_level(world, sub, mod.user_id, None)
    await wait_level(world, fresh, mod.user_id, None)
    await wait_level(world, had, mod.user_id, 10)
    assert mod.user_id not in await users_of(world, space)


@pytest.mark.parametrize("version", VERSIONS)
async def test_value_changed_by_hand_survives_the_demotion(world, start_bot, make_user, version):
    space = await make_space(world, version, name="S")
    mod = await make_user("mod")
    touched = await make_room(world, version, space, name="touched")
    untouched = await make_room(world, version, space, name="untouched")
    bot = await start_bot([{"room": space}])
    await world.owner.client.set_user_level(space, mod.user_id, 50)
    await wait_level(world, touched, mod.user_id, 50)
    await wait_level(world, untouched, mod.user_id, 50)

    await world.owner.client.set_user_level(touched, mod.user_id, 40)
    await bot.reconcile()
    await remove_user_level(world.owner.client, space, mod.user_id)

    await wait_level(world, untouched, mod.user_id, None)
    await bot.reconcile()
    assert (await users_of(world, touched)).get(mod.user_id) == 40
    assert (touched, mod.user_id) not in await bot.app.store.owned_levels()


async def test_v12_creators_never_enter_users(world, start_bot, make_user):
    space = await make_space(world, "12", name="S")
    sub = await make_space(world, "12", space, name="T")
    room = await make_room(world, "12", sub, name="R")
    mod = await make_user("mod")
    create = await world.owner.client.get_state_event(space, "m.room.create")
    assert create is not None and create["room_version"] == "12"
    # Measured: Synapse refuses a v12 override or event that lists the creator.
    with pytest.raises(TestbedRequestError) as refused:
        await world.owner.client.create_room(
            room_version="12", power_level_content_override={"users": {world.owner.user_id: 100}}
        )
    assert refused.value.status == 400
    bot = await start_bot([{"room": space}])

    await world.owner.client.set_user_level(space, mod.user_id, 50)

    for room_id in (sub, room):
        await wait_level(world, room_id, mod.user_id, 50)
    await bot.reconcile()
    await assert_no_creator_in_users(world, [space, sub, room])
    assert not findings(bot, "no_power") and not findings(bot, "above_bot")


async def test_v12_space_creator_mirrored_into_a_room_someone_else_created(world, start_bot, make_user):
    """The Space's creator counts as `creator_level` (capped below the bot) where it is not a creator."""
    space = await make_space(world, "12", name="S")
    other = await make_user("other")
    room = await other.client.create_room(
        name="R",
        room_version="12",
        join_rule="restricted",
        allow=[space],
        power_level_content_override={"users": {world.bot.user_id: 100}},
    )
    await world.owner.client.add_child(space, room)
    await world.bot.client.join(room)
    await start_bot([{"room": space}])

    async def owner_mirrored() -> bool:
        return (await other.client.get_power_levels(room))["users"].get(world.owner.user_id) == 99

    await wait_for(owner_mirrored, timeout=20)
    assert other.user_id not in (await other.client.get_power_levels(room))["users"]
    await assert_no_creator_in_users(world, [space])


@pytest.mark.parametrize("version", VERSIONS)
async def test_nobody_reaches_the_bots_level(world, start_bot, make_user, version):
    space = await make_space(world, version, name="S")
    boss = await make_user("boss")
    room = await make_room(
        world, version, space, name="R", users={world.bot.user_id: 90}, events={"m.room.power_levels": 90}
    )
    await start_bot([{"room": space}])

    await world.owner.client.set_user_level(space, boss.user_id, 100)

    await wait_level(world, room, boss.user_id, 89)
    assert (await users_of(world, room))[world.bot.user_id] == 90
    if version != "12":
        assert (await users_of(world, room))[world.owner.user_id] == 100


async def test_malformed_user_id_in_the_space_is_skipped_with_a_warning(world, start_bot, make_user):
    space = await make_space(world, "10", name="S")
    room = await make_room(world, "10", space, name="R")
    mod = await make_user("mod")
    bot = await start_bot([{"room": space}])
    content = await world.owner.client.get_power_levels(space)
    # Measured: Synapse refuses keys without "@" and ":" (400 "Not a valid user_id") but checks no more.
    with pytest.raises(TestbedRequestError) as refused:
        await world.owner.client.send_state(
            space, "m.room.power_levels", {**content, "users": {**content["users"], "not-a-user": 50}}
        )
    assert refused.value.status == 400
    bad = f"@not a user:{world.owner.client.server_name}"

    await world.owner.client.send_state(
        space, "m.room.power_levels", {**content, "users": {**content["users"], bad: 50, mod.user_id: 50}}
    )

    await wait_level(world, room, mod.user_id, 50)
    assert bad not in await users_of(world, room)
    warned = await wait_for(lambda: findings(bot, "invalid_user", space))
    assert any(repr(bad) in f.message for f in warned)


@pytest.mark.parametrize("weak", ["bot_at_0", "event_level_above_bot"])
async def test_bot_without_power_in_one_room_is_reported(world, start_bot, make_user, weak):
    space = await make_space(world, "10", name="S")
    mod = await make_user("mod")
    if weak == "bot_at_0":
        powerless = await make_room(world, "10", space, name="weak", users={world.bot.user_id: 0})
    else:
        powerless = await make_room(
            world, "10", space, name="weak", users={world.bot.user_id: 90}, events={"m.room.power_levels": 95}
        )
    fine = [await make_room(world, "10", space, name=f"ok{i}") for i in range(2)]
    bot = await start_bot([{"room": space}])

    await world.owner.client.set_user_level(space, mod.user_id, 50)

    for room_id in fine:
        await wait_level(world, room_id, mod.user_id, 50)
    await wait_for(lambda: findings(bot, "no_power", powerless))
    assert mod.user_id not in await users_of(world, powerless)
    entries = await bot.app.store.journal.by_status(Status.FAILED)
    assert not [e for e in entries if e.action.room_id == powerless]


async def test_power_levels_off_mirrors_nothing(world, start_bot, make_user):
    space = await make_space(world, "10", name="S")
    room = await make_room(world, "10", space, name="R")
    mod = await make_user("mod")
    bot = await start_bot([{"room": space, "power_levels": "off"}])
    before = await world.owner.client.get_power_levels(room)

    await world.owner.client.set_user_level(space, mod.user_id, 50)
    await wait_for(
        lambda: mod.user_id in (bot.app.cache.get(space).power_levels.users if bot.app.cache.get(space) else {})
    )
    await bot.reconcile()

    assert await world.owner.client.get_power_levels(room) == before
    assert not [a for a in bot.app.reconciler.last_plan.actions if a.kind.value == "set_power_levels"]
    assert await bot.app.store.owned_levels() == {}


async def test_quick_successive_changes_all_reach_the_rooms(world, start_bot, make_user):
    """Two promotions a moment apart, for two users: neither is lost while the first is written."""
    space = await make_space(world, "10", name="S")
    rooms = [await make_room(world, "10", space, name=f"R{i}") for i in range(3)]
    alice, bob = await make_user("alice"), await make_user("bob")
    await start_bot([{"room": space}])

    await world.owner.client.set_user_level(space, alice.user_id, 30)
    await wait_level(world, rooms[0], alice.user_id, 30)
    await world.owner.client.set_user_level(space, bob.user_id, 40)
    await world.owner.client.set_user_level(space, alice.user_id, 45)

    for room_id in rooms:
        await wait_level(world, room_id, bob.user_id, 40, timeout=10)
        await wait_level(world, room_id, alice.user_id, 45, timeout=10)


async def test_a_user_muted_in_a_room_is_not_raised_there(world, start_bot, make_user):
    space = await make_space(world, "10", name="S")
    alice = await make_user("alice")
    muted = await make_room(world, "10", space, name="muted", users={alice.user_id: -10})
    demoted = await make_room(world, "10", space, name="demoted", users={alice.user_id: 5}, users_default=10)
    fine = await make_room(world, "10", space, name="fine")
    bot = await start_bot([{"room": space}])

    await world.owner.client.set_user_level(space, alice.user_id, 50)

    await wait_level(world, fine, alice.user_id, 50)
    await bot.reconcile()
    assert (await users_of(world, muted))[alice.user_id] == -10
    assert (await users_of(world, demoted))[alice.user_id] == 5
    held = findings(bot, "restricted_locally")
    assert sorted(f.room_id for f in held) == sorted([muted, demoted])
    message = next(f.message for f in held if f.room_id == muted)
    assert alice.user_id in message and "-10" in message and "default level 0" in message and "50" in message
    assert (muted, alice.user_id) not in await bot.app.store.owned_levels()


async def mod_at_50(world, start_bot, make_user):
    """A Space S and a room R below it, the bot running, and a user the Space raised to 50, mirrored into R."""
    space = await make_space(world, "10", name="S")
    room = await make_room(world, "10", space, name="R")
    mod = await make_user("mod")
    bot = await start_bot([{"room": space}])
    await ready(bot)
    await world.owner.client.set_user_level(space, mod.user_id, 50)
    await wait_level(world, room, mod.user_id, 50)
    return space, room, mod, bot


async def test_undo_of_a_level_change_leaves_true_records_for_a_later_demotion(world, start_bot, make_user):
    space, room, mod, bot = await mod_at_50(world, start_bot, make_user)
    await world.owner.client.set_user_level(space, mod.user_id, 75)
    await wait_level(world, room, mod.user_id, 75)
    await bot.idle()

    async def raise_batch() -> str | None:
        for record in await bot.app.store.audit_log(20):
            if record.kind == "set_power_levels" and record.room_id == room and record.outcome == "done":
                entries = await bot.app.store.journal.batch_entries(record.batch)
                if any(e.action.changes.get(mod.user_id) == (50, 75) for e in entries):
                    return record.batch
        return None

    batch = await wait_for(raise_batch, timeout=10)

    await ask(world, bot, world.owner, "!ss pause")  # look at the undo alone, before the Space's level returns
    assert "1 power-level restore" in await ask(world, bot, world.owner, f"!ss undo {batch}")
    await wait_level(world, room, mod.user_id, 50)
    await bot.app.executor.wait_idle()
    owned = (await bot.app.store.owned_levels()).get((room, mod.user_id))
    assert owned is not None and (owned.written, owned.previous) == (50, None)

    await ask(world, bot, world.owner, "!ss resume")  # the Space still asks 75: written again
    await wait_level(world, room, mod.user_id, 75)
    await remove_user_level(world.owner.client, space, mod.user_id)
    await wait_level(world, room, mod.user_id, None)


async def test_a_level_changed_by_hand_is_not_raised_again_until_released(world, start_bot, make_user):
    """The room's moderators demote a user back to the room default; the Space later raises them: the room's
    own change stands (reported) until '!spacesync powerlevels release' hands the entry back."""
    space, room, mod, bot = await mod_at_50(world, start_bot, make_user)

    await remove_user_level(world.owner.client, room, mod.user_id)  # back to the room default, by hand
    await bot.reconcile()
    await world.owner.client.set_user_level(space, mod.user_id, 60)
    await bot.reconcile()
    await bot.reconcile()
    assert mod.user_id not in await users_of(world, room), "a level changed by hand was raised again"
    changed = [f for f in findings(bot, "changed_by_hand") if f.room_id == room]
    assert changed and "powerlevels release" in changed[0].message

    body = await ask(world, bot, world.owner, f"!ss powerlevels release {room} {mod.user_id}")
    assert "Released 1 level changed by hand" in body and mod.user_id in body, body
    await wait_level(world, room, mod.user_id, 60)
    assert "nothing to release" in await ask(world, bot, world.owner, "!ss powerlevels release all")
