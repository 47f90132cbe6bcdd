"""Policy lists against the real Synapse: user rules ban in the Space and its rooms, literal and glob, held over
the guard's limit, lifted with their rule; rules from senders without power count for nothing; server rules reach
room ACLs through the ACL safety rules."""

from __future__ import annotations

from spacesync.testing import wait_for

from .test_commands import _held_batch, ask, bot_notices, membership, ready
from .test_eviction import wait_membership
from .test_spacewide import wait_deny

USER_RULE = "m.policy.rule.user"


async def list_room(world, name: str = "Ban list", levels: dict | None = None) -> str:
    """A public policy list room (typed m.policy, MSC3784) the owner writes rules into."""
    return await world.owner.client.create_room(
        name=name,
        join_rule="public",
        creation_content={"type": "m.policy"},
        power_level_content_override={"users": {world.owner.user_id: 100, **(levels or {})}},
    )


async def ban_rule(user, room_id: str, key: str, entity: str, reason: str = "spam", kind: str = "user") -> str:
    content = {"entity": entity, "recommendation": "m.ban", "reason": reason}
    return await user.client.send_state(room_id, f"m.policy.rule.{kind}", content, state_key=key)


async def test_literal_and_glob_rules_ban_the_right_people_held_over_the_limit_and_lifted_with_the_rule(
    world, start_bot, make_user
):
    space = await world.space("Community")
    room = await world.room(space, "General")
    spam1, spam2, alice, stranger = [await make_user(n) for n in ("spamfirst", "spamsecond", "alice", "stranger")]
    for user in (spam1, spam2, alice):
        for r in (space, room):
            await user.client.join(r)
    deputy = await make_user("deputy")
    lst = await list_room(world, levels={deputy.user_id: 50})
    await deputy.client.join(lst)
    server = spam1.user_id.split(":", 1)[1]
    # A rule whose sender lost the power to send it: it counts for nothing.
    await ban_rule(deputy, lst, "alice", alice.user_id, "made up")
    await world.owner.client.set_user_level(lst, deputy.user_id, 0)
    await ban_rule(world.owner, lst, "stranger", stranger.user_id, "known spammer")
    await ban_rule(world.owner, lst, "spam-glob", f"@spam*:{server}", "spam wave")

    bot = await start_bot([{"room": space, "policy_lists": [lst], "max_evictions_without_confirmation": 2}])
    await ready(bot)
    batch = await _held_batch(bot)  # three users from one Space: over the limit of 2, held for a moderator
    review = await ask(world, bot, world.owner, f"!ss batch {batch}")
    assert spam1.user_id in review and spam2.user_id in review and stranger.user_id in review
    assert alice.user_id not in review
    assert "Confirmed batch" in await ask(world, bot, world.owner, f"!ss confirm {batch}")

    for user in (spam1, spam2, stranger):
        await wait_membership(world, [space, room], user.user_id, "ban")
    event = await world.owner.client.get_state_event(space, "m.room.member", stranger.user_id)
    assert event["reason"] == "known spammer"
    await bot.reconcile()
    # Undo leaves a list's bans alone (the rule is what to change), and the bans carried down from them.
    body = await ask(world, bot, world.owner, f"!ss undo {batch}")
    assert body.startswith(f"Nothing to undo in batch {batch}")
    assert "remove the rule from the list" in body and "carried down from the ban in Community" in body
    members = await world.owner.client.members(space)
    assert {u for u, m in members.items() if m == "ban"} == {spam1.user_id, spam2.user_id, stranger.user_id}
    assert await membership(world, room, alice.user_id) == "join"

    # The rule nobody with the power sent is said once in the admin room.
    async def announced() -> bool:
        for event in await bot_notices(world, bot):
            body = event["content"]["body"]
            if "need attention" in body and "rule(s) from senders without the power to send them" in body:
                return True
        return False

    await wait_for(announced, timeout=20, message="the ignored rule was not announced")

    # `whois` and `lists` name the rule and what it caused.
    whois = await ask(world, bot, world.owner, f"!ss whois {spam1.user_id}")
    assert f"@spam*:{server}" in whois and "spam wave" in whois
    lists = await ask(world, bot, world.owner, "!ss lists")
    assert "Ban list" in lists and "2 user ban rules" in lists and "1 ignored" in lists and "3 users banned" in lists

    # `unban` leaves a list's ban alone: the rule is what to change.
    body = await ask(world, bot, world.owner, f"!ss unban {spam1.user_id}")
    assert f"Nothing to unban for {spam1.user_id}" in body and "remove the rule from the list" in body
    assert "carried down from the ban in Community" in body

    # The glob rule goes: the bans placed for it are lifted; the literal rule's stays.
    await world.owner.client.send_state(lst, USER_RULE, {}, state_key="spam-glob")
    for user in (spam1, spam2):
        await wait_membership(world, [space, room], user.user_id, "leave")
    await bot.reconcile()
    assert await membership(world, room, stranger.user_id) == "ban"
    assert await membership(world, space, stranger.user_id) == "ban"


async def test_a_moderators_own_ban_is_never_lifted_when_the_rule_goes(world, start_bot, make_user):
    space = await world.space("Community")
    room = await world.room(space, "General")
    troll = await make_user("troll")
    for r in (space, room):
        await troll.client.join(r)
    lst = await list_room(world)
    await world.owner.client.ban(room, troll.user_id, reason="by hand")
    await ban_rule(world.owner, lst, "troll", troll.user_id)
    bot = await start_bot([{"room": space, "policy_lists": [lst]}])
    await wait_membership(world, [space], troll.user_id, "ban")
    await world.owner.client.send_state(lst, USER_RULE, {}, state_key="troll")
    await wait_membership(world, [space], troll.user_id, "leave")
    await bot.reconcile()
    assert await membership(world, room, troll.user_id) == "ban"


async def test_a_list_that_cannot_be_read_keeps_the_bans_until_it_can(world, start_bot, make_user):
    space = await world.space("Community")
    troll = await make_user("troll")
    await troll.client.join(space)
    lst = await list_room(world)
    private = await list_room(world, "Private list")
    await world.owner.client.set_join_rule(private, "invite")
    await ban_rule(world.owner, lst, "troll", troll.user_id)
    bot = await start_bot([{"room": space, "policy_lists": [lst, private]}])
    await wait_membership(world, [space], troll.user_id, "ban", timeout=30)  # the list it can read still acts
    await ready(bot)
    lists = await ask(world, bot, world.owner, "!ss lists")
    assert "Private list" not in lists and f"{private}: cannot be read now" in lists, lists

    # The rule goes, but the unread list might ban the troll too: unknown is not absent, the ban stays.
    await world.owner.client.send_state(lst, USER_RULE, {}, state_key="troll")
    await wait_for(lambda: _rule_gone(bot, lst), timeout=30, message="the rule's removal did not arrive")
    await bot.reconcile()
    assert await membership(world, space, troll.user_id) == "ban"

    # An admin invites the bot to the private list: it joins, reads it, finds no rule, and lifts the ban.
    await world.owner.client.invite(private, world.bot.user_id)
    await wait_membership(world, [space], troll.user_id, "leave", timeout=60)


def _rule_gone(bot, list_id: str) -> bool:
    room = bot.app.cache.get(list_id)
    return room is not None and not room.policy_rules


async def test_server_rules_reach_room_acls_only_through_the_acl_safety_rules(world, start_bot):
    space = await world.space("Community")
    room = await world.room(space, "General")
    lst = await list_room(world)
    bot_server = world.bot.user_id.split(":", 1)[1]
    await ban_rule(world.owner, lst, "evil", "evil.example", kind="server")
    await ban_rule(world.owner, lst, "own", bot_server, kind="server")
    await ban_rule(world.owner, lst, "all", "*", kind="server")

    bot = await start_bot([{"room": space, "policy_lists": [lst]}])
    await bot.reconcile()
    assert await world.owner.client.get_state_event(room, "m.room.server_acl") is None  # server_acl is off
    await bot.stop()

    bot = await start_bot([{"room": space, "policy_lists": [lst], "server_acl": "sync"}])
    await wait_deny(world, room, ["evil.example"])
    await bot.reconcile()
    findings = [f for f in bot.app.reconciler.last_plan.findings if f.code == "acl_refused" and f.room_id == room]
    assert any(bot_server in f.message for f in findings) and any("every server" in f.message for f in findings)

    await world.owner.client.send_state(lst, "m.policy.rule.server", {}, state_key="evil")

    async def lifted() -> bool:
        return ((await world.owner.client.get_state_event(room, "m.room.server_acl")) or {}).get("deny") == []

    await wait_for(lifted, timeout=20, message="the list's server entry was not removed with its rule")
