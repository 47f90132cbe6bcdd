"""A Space that spans two really federating homeservers: the Space on B, rooms on A and B, the bot on A.

One world (and one running bot) is shared by the tests: each test makes its own users, so their
effects do not overlap. Memberships are checked in both servers' views of a room."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from spacesync.store import Status
from spacesync.testing import FederatedPair, Synapse, TestUser, join_when_allowed, wait_for, wait_until_federating

from .conftest import Bot, start_remote_bot

VERSION = "12"


@dataclass
class Fed:
    """Two servers, an owner (moderator) on each, the bot on A, and a v12 Space on B with rooms on both."""

    pair: FederatedPair
    owner_a: TestUser
    owner_b: TestUser
    bot_user: TestUser
    space: str
    room_a: str
    room_b: str
    admin_room: str
    bot: Bot
    users: list[TestUser]

    @property
    def a(self) -> Synapse:
        return self.pair.a

    @property
    def b(self) -> Synapse:
        return self.pair.b

    async def user(self, server: Synapse, name: str) -> TestUser:
        user = await server.register(f"{name}_{secrets.token_hex(4)}")
        await server.exempt(user.user_id)
        self.users.append(user)
        return user

    async def views(self, room_id: str, user_id: str) -> tuple[str | None, str | None]:
        """The user's membership in the room as server A and as server B see it."""
        on_a = (await self.owner_a.client.members(room_id)).get(user_id)
        on_b = (await self.owner_b.client.members(room_id)).get(user_id)
        return on_a, on_b

    async def wait_views(self, rooms: list[str], user_id: str, expected: str | None, timeout: float = 30.0) -> None:
        """Wait until both servers agree the user's membership is `expected` in every room."""

        async def reached() -> bool:
            for room in rooms:
                if await self.views(room, user_id) != (expected, expected):
                    return False
            return True

        await wait_for(reached, timeout=timeout, message=f"{user_id} not {expected} on both servers in {rooms}")

    async def join_all(self, user: TestUser, rooms: list[str]) -> None:
        """Join the rooms in order, routed through the server of each room's creator."""
        for room in rooms:
            await join_when_allowed(user, room, [self.b.server_name, self.a.server_name])
            await self.wait_views([room], user.user_id, "join")


def levels(*users: str, **extra: Any) -> dict[str, Any]:
    return {"users": dict.fromkeys(users, 100), **extra}


async def create_space(owner: TestUser, bot: TestUser, name: str) -> str:
    """A v12 Space (the creator has unlimited power and is not listed in `users`)."""
    return await owner.client.create_space(
        name=name, room_version=VERSION, join_rule="public", power_level_content_override=levels(bot.user_id)
    )


async def create_child(owner: TestUser, bot: TestUser, space: str, name: str, *, others: tuple[str, ...] = ()) -> str:
    """A v12 room restricted to the Space, with the bot (and `others`) at 100."""
    return await owner.client.create_room(
        name=name,
        room_version=VERSION,
        join_rule="restricted",
        allow=[space],
        power_level_content_override=levels(bot.user_id, *others),
    )


@pytest.fixture(scope="module")
async def fed(federation: FederatedPair, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fed]:
    a, b = federation.a, federation.b
    suffix = secrets.token_hex(3)
    owner_a = await a.register(f"owner_a_{suffix}")
    owner_b = await b.register(f"owner_b_{suffix}")
    bot_user = await a.register(f"bot_{suffix}")
    for server, user in ((a, owner_a), (b, owner_b), (a, bot_user)):
        await server.exempt(user.user_id)

    space = await create_space(owner_b, bot_user, "federated space")
    # owner_a moderates the Space too: a v12 creator cannot be listed, so B's owner raises A's.
    await owner_b.client.set_user_level(space, owner_a.user_id, 100)
    room_b = await create_child(owner_b, bot_user, space, "room on B", others=(owner_a.user_id,))
    await owner_b.client.add_child(space, room_b, via=[b.server_name])
    room_a = await create_child(owner_a, bot_user, space, "room on A", others=(owner_b.user_id,))
    await owner_b.client.add_child(space, room_a, via=[a.server_name])
    # remote joins into each room first, then the local ones (see the notes on racing joins)
    for user in (owner_a, bot_user):
        await user.client.join(space, via=[b.server_name])
        await user.client.join(room_b, via=[b.server_name])
    # A's first joins are partial-state joins: /members answers once A holds the full state, and only
    # then can A vouch for B's users joining the restricted room on A
    await owner_a.client.members(space)
    await join_when_allowed(owner_b, room_a, [a.server_name])
    await bot_user.client.join(room_a)
    admins = [owner_a.user_id, owner_b.user_id]
    bot, admin_room = await start_remote_bot(
        a, owner_a, bot_user, space, tmp_path_factory.mktemp("fedbot"), admins=admins
    )
    world = Fed(federation, owner_a, owner_b, bot_user, space, room_a, room_b, admin_room, bot, [])
    try:
        await bot.idle(60)
        yield world
    finally:
        await bot.stop()
        for user in (owner_a, owner_b, bot_user, *world.users):
            await user.client.close()


async def test_two_servers_federate_with_the_documented_settings(federation: FederatedPair) -> None:
    a, b = federation.a, federation.b
    assert a.server_name == f"127.0.0.1:{a.federation_port}" and b.server_name == f"127.0.0.1:{b.federation_port}"
    config = json.loads(a.config_path.read_text())
    assert config["federation_verify_certificates"] is False
    assert config["ip_range_blacklist"] == [] and config["federation_ip_range_blacklist"] == []
    assert config["trusted_key_servers"] == []
    assert set(config["federation_domain_whitelist"]) == {a.server_name, b.server_name}
    assert any(listener.get("tls") and listener["port"] == a.federation_port for listener in config["listeners"])
    # a user of A really joins a room of B, and B sees the join
    host = await b.register(f"host_{secrets.token_hex(4)}")
    guest = await a.register(f"guest_{secrets.token_hex(4)}")
    try:
        room = await host.client.create_room(name="probe", join_rule="public")
        await guest.client.join(room, via=[b.server_name])
        await wait_for(lambda: _joined(host, room, guest.user_id), timeout=30)
    finally:
        await host.client.close()
        await guest.client.close()


async def _joined(viewer: TestUser, room: str, user_id: str) -> bool:
    return user_id in await viewer.client.joined_members(room)


async def test_v12_child_created_on_the_other_server_after_start_is_joined(fed: Fed) -> None:
    # v12 room ids carry no server name: only the m.space.child `via` says where the room lives
    room = await create_child(fed.owner_b, fed.bot_user, fed.space, "late room on B")
    assert ":" not in room
    await fed.owner_b.client.add_child(fed.space, room, via=[fed.b.server_name])

    await wait_for(lambda: _joined(fed.owner_b, room, fed.bot_user.user_id), timeout=45)
    await wait_for(lambda: room in fed.bot.app.observer.joined, timeout=30)
    # read (hence managed) once the homeserver holds its full state: /sync then shows it
    await wait_for(lambda: fed.bot.app.observer.cache.get(room) is not None, timeout=30)
    assert room not in fed.bot.app.observer.awaiting_full_state


async def test_members_of_both_servers_who_leave_the_space_are_evicted_from_rooms_on_both(fed: Fed) -> None:
    on_b = await fed.user(fed.b, "leaver_b")
    on_a = await fed.user(fed.a, "leaver_a")
    stays = await fed.user(fed.b, "stays_b")
    for user in (on_b, on_a, stays):
        await fed.join_all(user, [fed.space, fed.room_b, fed.room_a])

    await on_b.client.leave(fed.space)
    await on_a.client.leave(fed.space)

    for user in (on_b, on_a):
        await fed.wait_views([fed.room_a, fed.room_b], user.user_id, "leave")
    await fed.bot.idle(60)
    assert await fed.views(fed.room_a, stays.user_id) == ("join", "join")
    assert await fed.views(fed.room_b, stays.user_id) == ("join", "join")


async def test_space_ban_by_a_moderator_on_the_other_server_reaches_rooms_on_both(fed: Fed) -> None:
    target_a = await fed.user(fed.a, "banned_a")
    target_b = await fed.user(fed.b, "banned_b")
    for user in (target_a, target_b):
        await fed.join_all(user, [fed.space, fed.room_b, fed.room_a])

    # owner_b moderates the Space from B; the bot lives on A
    await fed.owner_b.client.ban(fed.space, target_a.user_id, reason="spam")
    await fed.owner_b.client.ban(fed.space, target_b.user_id, reason="spam")

    for user in (target_a, target_b):
        await fed.wait_views([fed.room_a, fed.room_b], user.user_id, "ban")


async def _level(viewer: TestUser, room: str, user_id: str) -> int | None:
    levels = await viewer.client.get_power_levels(room)
    level = (levels.get("users") or {}).get(user_id)
    return level if isinstance(level, int) else None


async def test_remote_users_space_power_is_mirrored_and_the_remote_creator_is_left_alone(fed: Fed) -> None:
    mod_b = await fed.user(fed.b, "mod_b")
    await fed.join_all(mod_b, [fed.space, fed.room_b, fed.room_a])

    await fed.owner_b.client.set_user_level(fed.space, mod_b.user_id, 50)

    async def mirrored() -> bool:
        for room in (fed.room_a, fed.room_b):
            for viewer in (fed.owner_a, fed.owner_b):
                if await _level(viewer, room, mod_b.user_id) != 50:
                    return False
        return True

    await wait_for(mirrored, timeout=45, message="the Space level of a user of B was not mirrored on both servers")
    await fed.bot.idle(60)
    # owner_b created the Space and room_b in room version 12: unlimited power, never written into `users`
    for viewer in (fed.owner_a, fed.owner_b):
        assert await _level(viewer, fed.room_b, fed.owner_b.user_id) is None


async def test_public_rooms_on_both_servers_opted_in_by_parent_become_restricted(fed: Fed) -> None:
    rooms = []
    for owner, server in ((fed.owner_a, fed.a), (fed.owner_b, fed.b)):
        room = await owner.client.create_room(
            name=f"public room on {server.server_name}",
            room_version=VERSION,
            join_rule="public",
            power_level_content_override=levels(fed.bot_user.user_id),
        )
        other = fed.owner_b if owner is fed.owner_a else fed.owner_a
        await other.client.join(room, via=[server.server_name])
        await fed.bot_user.client.join(room, via=[server.server_name])
        # the room opts in by naming the Space (on B) as its parent; the Space lists it with the room's server
        await owner.client.set_parent(room, fed.space, via=[fed.b.server_name])
        await fed.owner_b.client.add_child(fed.space, room, via=[server.server_name])
        rooms.append(room)

    async def restricted() -> bool:
        for room in rooms:
            for viewer in (fed.owner_a, fed.owner_b):
                rule = await viewer.client.get_state_event(room, "m.room.join_rules")
                allow = [entry.get("room_id") for entry in (rule or {}).get("allow") or ()]
                if (rule or {}).get("join_rule") != "restricted" or fed.space not in allow:
                    return False
        return True

    await wait_for(restricted, timeout=45, message="public rooms opted in to the Space were not restricted")


async def test_an_upgrade_on_the_other_server_is_followed_and_the_space_re_pointed(fed: Fed) -> None:
    old = await create_child(fed.owner_b, fed.bot_user, fed.space, "to be upgraded")
    await fed.owner_b.client.set_parent(old, fed.space, via=[fed.b.server_name])
    await fed.owner_b.client.add_child(fed.space, old, via=[fed.b.server_name])
    await wait_for(lambda: _joined(fed.owner_b, old, fed.bot_user.user_id), timeout=45)
    await wait_for(lambda: old in fed.bot.app.observer.joined, timeout=30)
    await fed.bot.reconcile()

    new = await fed.owner_b.client.upgrade_room(old, VERSION)
    assert ":" not in new  # a v12 id: the bot must route its join by other means

    await wait_for(lambda: _joined(fed.owner_b, new, fed.bot_user.user_id), timeout=60)

    async def re_pointed() -> bool:
        for viewer in (fed.owner_a, fed.owner_b):
            child = await viewer.client.get_state_event(fed.space, "m.space.child", new)
            gone = await viewer.client.get_state_event(fed.space, "m.space.child", old)
            if not (child or {}).get("via") or (gone or {}).get("via"):
                return False
        return True

    await wait_for(re_pointed, timeout=60, message="the Space's child entry was not moved to the upgraded room")
    child = await fed.owner_b.client.get_state_event(fed.space, "m.space.child", new)
    assert fed.b.server_name in (child or {})["via"]


async def test_a_remote_v12_creator_who_leaves_the_space_is_never_acted_on(fed: Fed) -> None:
    creator = await fed.user(fed.b, "creator_b")
    member = await fed.user(fed.b, "member_b")
    for user in (creator, member):
        await join_when_allowed(user, fed.space, [fed.b.server_name])
    room = await create_child(creator, fed.bot_user, fed.space, "a creator's room on B")
    await fed.owner_b.client.add_child(fed.space, room, via=[fed.b.server_name])
    await wait_for(lambda: fed.bot.app.observer.cache.get(room) is not None, timeout=45)
    for user in (fed.owner_a, fed.owner_b, member):
        await join_when_allowed(user, room, [fed.b.server_name])
    await fed.wait_views([room], member.user_id, "join")

    await creator.client.leave(fed.space)
    await member.client.leave(fed.space)

    # the member is evicted from the creator's room; the creator (unlimited power in v12) is left alone
    await fed.wait_views([room], member.user_id, "leave")
    await fed.bot.reconcile()
    assert await fed.views(room, creator.user_id) == ("join", "join")
    plan = fed.bot.app.reconciler.last_plan
    assert plan is not None and not [a for a in plan.actions if a.user_id == creator.user_id]
    journaled = await fed.bot.app.store.journal.by_status(*Status)
    assert not [e for e in journaled if e.action.user_id == creator.user_id], "an action against a v12 creator"
    kicks = [e for e in journaled if e.action.user_id == member.user_id and e.action.room_id == room]
    assert kicks, "the member's eviction was journaled (so the journal is the right place to look)"
    for viewer in (fed.owner_a, fed.owner_b):
        assert await _level(viewer, room, creator.user_id) is None


async def _ask(fed: Fed, user: TestUser, text: str, timeout: float = 30) -> str:
    """Send a command to the admin room (on A) and return the bot's reply."""
    await wait_for(lambda: fed.bot.app.synced and fed.bot.app.command_handler is not None, timeout=20)
    event_id = await user.client.send_text(fed.admin_room, text)

    async def reply() -> str | None:
        for event in await fed.owner_a.client.messages(fed.admin_room, limit=50):
            content = event.get("content") or {}
            target = ((content.get("m.relates_to") or {}).get("m.in_reply_to") or {}).get("event_id")
            if event.get("sender") == fed.bot_user.user_id and target == event_id:
                body: str = content.get("body", "")
                return body
        return None

    return await wait_for(reply, timeout=timeout, interval=0.2, message=f"no reply to {text!r}")


async def test_a_remote_admin_names_remote_rooms_and_users_in_commands(fed: Fed) -> None:
    if fed.owner_b.user_id not in await fed.owner_a.client.joined_members(fed.admin_room):
        await fed.owner_a.client.invite(fed.admin_room, fed.owner_b.user_id)
        await fed.owner_b.client.join(fed.admin_room, via=[fed.a.server_name])
    member = await fed.user(fed.b, "member_b")
    await fed.join_all(member, [fed.space, fed.room_b, fed.room_a])
    await fed.bot.reconcile()

    whois = await _ask(fed, fed.owner_b, f"!ss whois {member.user_id}")
    assert fed.room_b in whois and fed.room_a in whois, whois

    # a user id whose server part is an IP literal with a port
    assert "is exempt" in await _ask(fed, fed.owner_b, f"!ss exempt add {member.user_id}")
    await member.client.leave(fed.space)
    await _ask(fed, fed.owner_b, "!ss sync")
    await fed.bot.idle(60)
    assert await fed.views(fed.room_b, member.user_id) == ("join", "join")
    assert "no longer exempt" in await _ask(fed, fed.owner_b, f"!ss exempt remove {member.user_id}")
    await fed.wait_views([fed.room_a, fed.room_b], member.user_id, "leave")


def _findings(fed: Fed, code: str) -> set[str]:
    plan = fed.bot.app.reconciler.last_plan
    return {f.room_id for f in plan.findings if f.code == code} if plan is not None else set()


async def test_a_stopped_server_is_reported_nothing_is_evicted_by_mistake_and_all_resumes(fed: Fed) -> None:
    """Runs last in this module: it stops B and starts it again.

    The bot reads through A, which keeps serving its own copy of B's rooms while B is down: that copy
    may be stale, but it is never empty, so the members of B stay. What cannot work without B (joining
    a room only B is in) is reported as unreachable and done once B is back."""
    stays_b = await fed.user(fed.b, "stays_b")
    leaver_a = await fed.user(fed.a, "leaver_a")
    for user in (stays_b, leaver_a):
        await fed.join_all(user, [fed.space, fed.room_b, fed.room_a])
    only_on_b = await create_child(fed.owner_b, fed.bot_user, fed.space, "only on B")
    await fed.bot.reconcile()

    await fed.b.stop()
    try:
        # Made on A while B is down: a child that only B can let the bot into, and a leave.
        await fed.owner_a.client.add_child(fed.space, only_on_b, via=[fed.b.server_name])
        await leaver_a.client.leave(fed.space)

        async def evicted_on_a() -> bool:
            for room in (fed.room_a, fed.room_b):
                if (await fed.owner_a.client.members(room)).get(leaver_a.user_id) != "leave":
                    return False
            return True

        await wait_for(evicted_on_a, timeout=45, message="the leaver was not evicted while B was down")
        await fed.bot.reconcile()
        assert only_on_b in _findings(fed, "unreachable"), fed.bot.app.reconciler.last_plan
        assert only_on_b not in fed.bot.app.observer.joined
        for room in (fed.room_a, fed.room_b, fed.space):
            assert (await fed.owner_a.client.members(room)).get(stays_b.user_id) == "join"
    finally:
        await fed.b.start()
    await wait_until_federating(fed.a, fed.b)

    # B catches up with the kick made while it was down, and the bot gets into B's room.
    await fed.wait_views([fed.room_b], leaver_a.user_id, "leave", timeout=60)

    async def joined_only_on_b() -> bool:
        await fed.bot.reconcile()
        return await _joined(fed.owner_b, only_on_b, fed.bot_user.user_id)

    await wait_for(joined_only_on_b, timeout=90, interval=2, message="the bot did not join B's room after B returned")
    await fed.bot.reconcile()
    assert only_on_b not in _findings(fed, "unreachable")
    for room in (fed.room_a, fed.room_b):
        assert await fed.views(room, stays_b.user_id) == ("join", "join")
