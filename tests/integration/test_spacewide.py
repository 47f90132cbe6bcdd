"""Space-wide moderation against the real Synapse: lockdown and unlock."""

from __future__ import annotations

from urllib.parse import quote

from spacesync.matrix.state import REDACT_EVENTS_UNSTABLE
from spacesync.metrics import REGISTRY
from spacesync.testing import wait_for

from .test_commands import ask, bot_notices, ready
from .test_eviction import wait_membership


async def join_rules(world, room_id: str) -> dict:
    return await world.owner.client.get_state_event(room_id, "m.room.join_rules") or {}


async def wait_rule(world, rooms: list[str], rule: str, timeout: float = 20.0) -> None:
    async def reached() -> bool:
        rules = [(await join_rules(world, r)).get("join_rule") for r in rooms]
        return all(r == rule for r in rules)

    await wait_for(reached, timeout=timeout, message=f"not all of {rooms} are {rule}")


async def test_lockdown_survives_enforce_and_unlock_restores_only_untouched_rooms(world, start_bot, make_user):
    space = await world.space("Demo Community")
    general = await world.room(space, "General")
    knocking = await world.room(space, "Lobby", join_rule="knock_restricted")
    touched = await world.room(space, "Touched")
    alice = await make_user("alice")
    for r in (space, general):
        await alice.client.join(r)
    before = {r: await join_rules(world, r) for r in (general, knocking, touched)}
    bot = await start_bot([{"room": space, "join_rules": "enforce", "restrict_invite_rooms": True}])
    await ready(bot)

    body = await ask(world, bot, world.owner, "!ss lockdown")
    assert "Lockdown of Demo Community" in body and "3 rooms switching to invite" in body
    await wait_rule(world, [general, knocking, touched], "invite")

    async def summary() -> str | None:
        for event in await bot_notices(world, bot):
            text = event["content"]["body"]
            if text.startswith("Batch ") and "locked down (join rule invite) in 3 rooms" in text:
                return text
        return None

    assert "!spacesync undo" in await wait_for(summary, timeout=15)

    # join_rules: enforce (with restrict_invite_rooms) would restrict an invite room: a lockdown is not undone,
    # and the locked rooms stay part of their Space: a departure is still evicted.
    await bot.reconcile()
    assert (await join_rules(world, general)).get("join_rule") == "invite"
    assert any(f.code == "locked_down" for f in bot.app.reconciler.last_plan.findings)
    await alice.client.leave(space)

    async def evicted() -> bool:
        return alice.user_id not in await world.owner.client.joined_members(general)

    await wait_for(evicted, timeout=20)

    # A moderator opens one room by hand meanwhile: unlock leaves it alone and says so.
    await world.owner.client.set_join_rule(touched, "public")
    await wait_for(lambda: _cached_rule(bot, touched, "public"), timeout=10)
    body = await ask(world, bot, world.owner, f"!ss unlock {space}")
    assert "restoring the join rules of 2 rooms" in body
    assert "Touched" in body and "changed by hand since (now public), left alone" in body
    await wait_rule(world, [general], "restricted")
    await wait_rule(world, [knocking], "knock_restricted")
    assert await join_rules(world, general) == before[general]
    assert await join_rules(world, knocking) == before[knocking]
    assert (await join_rules(world, touched)).get("join_rule") == "public"
    await bot.idle()
    assert await bot.app.store.lockdowns() == {}


def _cached_rule(bot, room_id: str, rule: str) -> bool:
    room = bot.app.cache.get(room_id)
    return room is not None and room.join_rule == rule


async def test_a_large_lockdown_is_held_and_its_undo_unlocks(world, start_bot):
    space = await world.space("Big")
    rooms = [await world.room(space, f"R{i}") for i in range(3)]
    bot = await start_bot([{"room": space, "max_evictions_without_confirmation": 2}])
    await ready(bot)

    body = await ask(world, bot, world.owner, "!ss lockdown --knock")
    assert "Held batch" in body and "lockdown of 3 rooms" in body and "over the limit of 2" in body
    batch = body.split("Held batch ", 1)[1].split(":", 1)[0]
    await bot.idle()
    assert [(await join_rules(world, r)).get("join_rule") for r in rooms] == ["restricted"] * 3

    assert "Confirmed batch" in await ask(world, bot, world.owner, f"!ss confirm {batch}")
    await wait_rule(world, rooms, "knock")
    await bot.idle()
    assert set(await bot.app.store.lockdowns()) == set(rooms)

    body = await ask(world, bot, world.owner, f"!ss undo {batch}")
    assert "3 join-rule restores" in body
    await wait_rule(world, rooms, "restricted")
    await bot.idle()
    assert await bot.app.store.lockdowns() == {}
    assert "Nothing is locked down" in await ask(world, bot, world.owner, "!ss unlock")


async def server_acl(world, room_id: str) -> dict | None:
    return await world.owner.client.get_state_event(room_id, "m.room.server_acl")


async def wait_deny(world, room_id: str, deny: list[str], timeout: float = 20.0) -> None:
    async def reached() -> bool:
        return ((await server_acl(world, room_id)) or {}).get("deny") == deny

    await wait_for(
        reached, timeout=timeout, message=f"{room_id} does not deny exactly {deny}: {await server_acl(world, room_id)}"
    )


async def test_server_acl_mirrors_space_entries_and_keeps_a_moderators_own(world, start_bot, tmp_path):
    space = await world.space("Demo Community")
    own = await world.room(space, "Own ACL")
    bare = await world.room(space, "No ACL")
    client = world.owner.client
    await client.send_state(space, "m.room.server_acl", {"allow": ["*"], "deny": ["evil.example", "*.bad.example"]})
    await client.send_state(own, "m.room.server_acl", {"allow": ["*"], "deny": ["mine.example"]})
    db = f"sqlite:{tmp_path}/acl.db"
    bot = await start_bot([{"room": space, "server_acl": "sync"}], db_url=db)

    await wait_deny(world, own, ["mine.example", "evil.example", "*.bad.example"])
    await wait_deny(world, bare, ["evil.example", "*.bad.example"])
    assert (await server_acl(world, bare))["allow"] == ["*"]
    await bot.idle()
    assert (await bot.app.store.owned_acl())[own] == {"evil.example", "*.bad.example"}

    # A moderator adds an entry by hand that the Space then lists too, and later drops: it stays (not spacesync's).
    await client.send_state(
        own,
        "m.room.server_acl",
        {"allow": ["*"], "deny": ["mine.example", "evil.example", "*.bad.example", "hand.example"]},
    )
    await client.send_state(space, "m.room.server_acl", {"allow": ["*"], "deny": ["*.bad.example", "hand.example"]})
    await wait_deny(world, own, ["mine.example", "*.bad.example", "hand.example"])
    await wait_deny(world, bare, ["*.bad.example", "hand.example"])
    await client.send_state(space, "m.room.server_acl", {"allow": ["*"], "deny": ["*.bad.example"]})
    await wait_deny(world, bare, ["*.bad.example"])
    await bot.reconcile()
    assert (await server_acl(world, own))["deny"] == ["mine.example", "*.bad.example", "hand.example"]

    # Sync off, then on again: the moderator's own entries survive both.
    await bot.stop()
    await client.send_state(space, "m.room.server_acl", {"allow": ["*"], "deny": ["*.bad.example", "new.example"]})
    bot = await start_bot([{"room": space, "server_acl": "off"}], db_url=db)
    await bot.reconcile()
    assert (await server_acl(world, own))["deny"] == ["mine.example", "*.bad.example", "hand.example"]
    await bot.stop()
    bot = await start_bot([{"room": space, "server_acl": "sync"}], db_url=db)
    await wait_deny(world, own, ["mine.example", "*.bad.example", "hand.example", "new.example"])
    # The bot's own server is never denied, whatever the Space lists (Synapse refuses such an ACL in the Space
    # itself, so only the plan shows it here): the rooms keep the bot reachable.
    bot_server = world.bot.user_id.split(":", 1)[1]
    for room in (own, bare):
        acl = await server_acl(world, room)
        assert bot_server not in acl["deny"] and "*" not in acl["deny"]


async def redacted(world, room_id: str, event_id: str) -> bool:
    path = f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/event/{quote(event_id, safe='')}"
    event = await world.owner.client.request("GET", path)
    return not event.get("content") and "redacted_because" in (event.get("unsigned") or {})


async def test_a_space_ban_carries_redact_events_on_a_stock_server_and_redact_on_ban_removes_the_last_messages(
    world, start_bot, make_user
):
    """MSC4293 off, as Synapse ships: `/ban` would drop the flag, so spacesync sends each ban as the member state
    event itself and every room's ban carries `redact_events` under both names."""
    space = await world.space("Demo Community")
    rooms = [await world.room(space, "General"), await world.room(space, "Random")]
    flagged, plain = await make_user("flagged"), await make_user("plain")
    sent: dict[str, list[str]] = {}
    for user in (flagged, plain):
        for r in (space, *rooms):
            await user.client.join(r)
        sent[user.user_id] = [await user.client.send_text(rooms[0], f"spam {i}") for i in range(3)]
    await start_bot([{"room": space, "redact_on_ban": 2}])
    before = REGISTRY.get_sample_value("spacesync_redactions_total", {"outcome": "done"}) or 0.0

    # The moderator's client sends the Space ban as state, the only way the flag survives on a stock server.
    content = {"membership": "ban", "reason": "raid", "redact_events": True, REDACT_EVENTS_UNSTABLE: True}
    await world.owner.client.send_state(space, "m.room.member", content, state_key=flagged.user_id)
    await wait_membership(world, rooms, flagged.user_id, "ban")
    for room in rooms:
        ban = await world.owner.client.get_state_event(room, "m.room.member", flagged.user_id)
        assert ban is not None and ban.get("reason") == "banned in Demo Community"
        assert ban.get("redact_events") is True and ban.get(REDACT_EVENTS_UNSTABLE) is True, ban

    # A plain Space ban: redact_on_ban 2 removes the last two messages in the room, and counts them.
    await world.owner.client.ban(space, plain.user_id, reason="spam")
    await wait_membership(world, rooms, plain.user_id, "ban")
    ban = await world.owner.client.get_state_event(rooms[0], "m.room.member", plain.user_id)
    assert ban is not None and REDACT_EVENTS_UNSTABLE not in ban and "redact_events" not in ban
    first, *last = sent[plain.user_id]
    for event_id in last:
        await wait_for(lambda e=event_id: redacted(world, rooms[0], e), timeout=20, message=f"{event_id} not redacted")
    assert not await redacted(world, rooms[0], first)
    after = REGISTRY.get_sample_value("spacesync_redactions_total", {"outcome": "done"}) or 0.0
    assert after - before >= 2


async def test_unroutable_child_entries_are_reported_and_refreshed_keeping_order_and_suggested(
    world, start_bot, tmp_path
):
    space = await world.space("Demo Community")
    room = await world.room(space, "General")
    stale = {"via": ["gone.example"], "order": "a1", "suggested": True}
    await world.owner.client.send_state(space, "m.space.child", stale, state_key=room)
    db = f"sqlite:{tmp_path}/via.db"

    bot = await start_bot([{"room": space}], db_url=db)
    await bot.reconcile()
    found = [f for f in bot.app.reconciler.last_plan.findings if f.code == "unroutable_child"]
    assert len(found) == 1 and room in found[0].message and "gone.example" in found[0].message
    assert await world.owner.client.get_state_event(space, "m.space.child", room) == stale

    async def announced() -> bool:  # moderators hear of it once, from the periodic reconcile's findings
        for event in await world.owner.client.messages(bot.app.admin_room, limit=30):
            body = event.get("content", {}).get("body", "")
            if event.get("sender") == world.bot.user_id and "need attention" in body and "gone.example" in body:
                return True
        return False

    await wait_for(announced, timeout=15, message="the unroutable child was not announced")
    await bot.stop()

    bot = await start_bot([{"room": space, "refresh_via": True}], db_url=db)
    server = world.bot.user_id.split(":", 1)[1]

    async def refreshed() -> bool:
        content = await world.owner.client.get_state_event(space, "m.space.child", room)
        return content == {"via": [server], "order": "a1", "suggested": True}

    await wait_for(refreshed, timeout=20, message="child entry not refreshed")
    await bot.reconcile()
    assert not [f for f in bot.app.reconciler.last_plan.findings if f.code == "unroutable_child"]


async def test_policy_server_is_mirrored_where_rooms_have_none_and_removed_only_where_spacesync_set_it(
    world, start_bot
):
    space = await world.space("Demo Community")
    bare = await world.room(space, "No policy")
    own = await world.room(space, "Own policy")
    client = world.owner.client
    first = {"via": "policy.example", "public_keys": {"ed25519": "Zmlyc3Q"}}
    theirs = {"via": "own.example", "public_keys": {"ed25519": "b3du"}}
    await client.send_state(space, "m.room.policy", first)
    await client.send_state(own, "m.room.policy", theirs)
    bot = await start_bot([{"room": space, "policy_server": "sync"}])

    async def policy_is(room_id: str, content: dict) -> bool:
        return (await client.get_state_event(room_id, "m.room.policy") or {}) == content

    await wait_for(lambda: policy_is(bare, first), timeout=20, message="policy server not mirrored")
    second = {"via": "policy2.example", "public_keys": {"ed25519": "c2Vjb25k"}}
    await client.send_state(space, "m.room.policy", second)
    await wait_for(lambda: policy_is(bare, second), timeout=20, message="policy server change not followed")
    await client.send_state(space, "m.room.policy", {})
    await wait_for(lambda: policy_is(bare, {}), timeout=20, message="policy server not removed")
    await bot.reconcile()
    assert await policy_is(own, theirs), "a room's own policy server was touched"
    assert await bot.app.store.owned_policy() == {}
