"""Partial-state joins on two really federating Synapses: the Space and its rooms on B, the bot on A.

Synapse A joins B's rooms with partial state (faster joins) and then resyncs the full state from B
with ``/_matrix/federation/v1/state_ids/`` reads. B's federation endpoint, as A sees it, is a fault
proxy (``FederatedPair(front_b=True)``): holding those reads for one room holds A's resync of that
room open for as long as the test needs, while every other request between the servers passes.
The bot runs with an eager /sync filter (partial-state rooms left out) and with a lazy-loading one
(partial-state rooms shown at once): the detection must not depend on which."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from spacesync.engine import sync as sync_module
from spacesync.engine.observer import PARTIAL_STATE
from spacesync.store import Status
from spacesync.testing import FaultProxy, FederatedPair, TestUser, join_when_allowed, wait_for

from ..conftest import unavailable
from .conftest import Bot, start_remote_bot


async def restricted_room(owner: TestUser, bot: TestUser, space: str, name: str) -> str:
    """A room on the owner's server restricted to the Space, with the bot at 100 (not yet listed in the Space)."""
    levels = {"users": {owner.user_id: 100, bot.user_id: 100}}
    return await owner.client.create_room(
        name=name, join_rule="restricted", allow=[space], power_level_content_override=levels
    )


def sync_filter(lazy: bool) -> str:
    document = json.loads(sync_module.SYNC_FILTER)
    document["room"]["state"]["lazy_load_members"] = lazy
    return json.dumps(document)


@dataclass
class World:
    pair: FederatedPair
    front: FaultProxy
    owner_b: TestUser
    bot_user: TestUser
    space: str
    elsewhere: str
    bot: Bot
    users: list[TestUser]

    async def user(self, name: str) -> TestUser:
        user = await self.pair.b.register(f"{name}_{secrets.token_hex(4)}")
        await self.pair.b.exempt(user.user_id)
        self.users.append(user)
        return user

    async def membership(self, room: str, user_id: str) -> tuple[str | None, str | None]:
        """The user's membership as A (through the bot's account) and as B see it."""
        on_a = (await self.bot_user.client.members(room)).get(user_id)
        on_b = (await self.owner_b.client.members(room)).get(user_id)
        return on_a, on_b

    async def wait_membership(self, room: str, user_id: str, expected: str, timeout: float = 30) -> None:
        async def reached() -> bool:
            return await self.membership(room, user_id) == (expected, expected)

        await wait_for(reached, timeout=timeout, message=f"{user_id} not {expected} on both servers in {room}")


@pytest.fixture(scope="module", params=[False, True], ids=["eager-sync", "lazy-loading-sync"])
async def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    pair = FederatedPair(tmp_path_factory.mktemp("partial"), front_b=True)
    try:
        await pair.start()
    except (RuntimeError, OSError) as exc:
        unavailable(f"cannot start two federating Synapses: {exc}")
    assert pair.b_front is not None
    a, b = pair.a, pair.b
    owner_a = await a.register(f"owner_a_{secrets.token_hex(3)}")
    owner_b = await b.register(f"owner_b_{secrets.token_hex(3)}")
    bot_user = await a.register(f"bot_{secrets.token_hex(3)}")
    for server, user in ((a, owner_a), (b, owner_b), (a, bot_user)):
        await server.exempt(user.user_id)
    levels = {"users": {owner_b.user_id: 100, bot_user.user_id: 100}}
    space = await owner_b.client.create_space(name="space", join_rule="public", power_level_content_override=levels)
    elsewhere = await restricted_room(owner_b, bot_user, space, "elsewhere")
    await owner_b.client.add_child(space, elsewhere, via=[b.server_name])
    await bot_user.client.join(space, via=[b.server_name])
    await join_when_allowed(bot_user, elsewhere, [b.server_name])
    for room in (space, elsewhere):  # /members answers once A holds the room's full state
        await bot_user.client.members(room)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sync_module, "SYNC_FILTER", sync_filter(lazy=request.param))
        bot, _ = await start_remote_bot(a, owner_a, bot_user, space, tmp_path_factory.mktemp("partialbot"))
        world = World(pair, pair.b_front, owner_b, bot_user, space, elsewhere, bot, [])
        try:
            await world.bot.idle(60)
            yield world
        finally:
            await world.bot.stop()
            for user in (owner_a, owner_b, bot_user, *world.users):
                await user.client.close()
            await pair.stop()


def findings(world: World, code: str) -> dict[str, str]:
    plan = world.bot.app.reconciler.last_plan
    return {f.room_id: f.message for f in plan.findings if f.code == code} if plan is not None else {}


async def test_a_partial_state_room_is_reported_and_waited_for_while_other_rooms_are_served(world: World) -> None:
    b = world.pair.b
    leaver = await world.user("leaver")
    await join_when_allowed(leaver, world.space, [b.server_name])
    await join_when_allowed(leaver, world.elsewhere, [b.server_name])
    await world.wait_membership(world.elsewhere, leaver.user_id, "join")
    # A room only B is in, with the leaver in it: A's join will be a partial-state join.
    held = await restricted_room(world.owner_b, world.bot_user, world.space, "held")
    await leaver.client.join(held)
    resync = re.compile(rf"^/_matrix/federation/v1/state_ids/{re.escape(held)}$")
    hold = world.front.hang(resync, method="GET")

    await world.owner_b.client.add_child(world.space, held, via=[b.server_name])

    # The bot joins the new child; A's resync of it is held at the proxy.
    async def joined() -> bool:
        return (await world.owner_b.client.members(held)).get(world.bot_user.user_id) == "join"

    await wait_for(joined, timeout=45, message="the bot did not join the room on B")
    await wait_for(lambda: world.front.count(resync) > 0, timeout=30, message="A did not resync the room")
    # The join really is partial: Synapse A holds /state reads of the room until its resync ends.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(world.bot_user.client.get_state(held), 2)

    await leaver.client.leave(world.space)

    # Elsewhere the bot carries on: the leaver is evicted there while the held room waits.
    await world.wait_membership(world.elsewhere, leaver.user_id, "leave")
    await world.bot.reconcile()
    assert findings(world, "partial_state").get(held, "").endswith(f"({PARTIAL_STATE})"), findings(
        world, "partial_state"
    )
    assert held not in findings(world, "unreachable")
    assert (await world.owner_b.client.members(held)).get(leaver.user_id) == "join"
    journaled = await world.bot.app.store.journal.by_status(*Status)
    assert not [e for e in journaled if e.action.room_id == held], "an action planned in a partial-state room"
    assert [e for e in world.front.requests(resync) if e.status is None], "the resync was not held all along"

    # The resync ends: the bot reads the room's full state and evicts the leaver there too.
    hold.remove()
    await world.wait_membership(held, leaver.user_id, "leave", timeout=60)
    await world.bot.reconcile()
    assert held not in findings(world, "partial_state")
    assert held not in world.bot.app.observer.awaiting_full_state
