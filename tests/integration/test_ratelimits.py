"""Evictions against a Synapse with its default rate limits: 429 answers are waited out, nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from spacesync.config import parse_config
from spacesync.engine.runtime import App
from spacesync.testing import Synapse, TestUser, wait_for

ROOMS = 12  # more than rc_message's default burst of 10


class LimitedWorld:
    """Owner, bot and an admin on the default-limits homeserver. Owner and users are exempt from the
    limits to keep the set-up fast; the bot is exempt only while `setup()` lasts."""

    def __init__(self, hs: Synapse, owner: TestUser, bot: TestUser, admin: TestUser) -> None:
        self.hs = hs
        self.owner = owner
        self.bot = bot
        self.admin = admin
        self.users: list[TestUser] = []

    async def _override(self, method: str, user_id: str) -> None:
        body = {"messages_per_second": 0, "burst_count": 0} if method == "POST" else None
        await self.admin.client.request(
            method, f"/_synapse/admin/v1/users/{quote(user_id, safe='')}/override_ratelimit", body
        )

    async def user(self, name: str) -> TestUser:
        user = await self.hs.register(f"{name}_{secrets.token_hex(4)}")
        self.users.append(user)
        await self._override("POST", user.user_id)
        return user

    @contextlib.asynccontextmanager
    async def setup(self) -> AsyncIterator[None]:
        """Lift the bot's limits while the world is built (its joins), then restore Synapse's defaults."""
        await self._override("POST", self.bot.user_id)
        try:
            yield
        finally:
            await self._override("DELETE", self.bot.user_id)

    def levels(self) -> dict[str, Any]:
        return {"users": {self.owner.user_id: 100, self.bot.user_id: 100}}

    async def close(self) -> None:
        for user in (self.owner, self.bot, self.admin, *self.users):
            await user.client.close()


@pytest.fixture
async def limited_world(synapse_default_limits: Synapse) -> AsyncIterator[LimitedWorld]:
    hs = synapse_default_limits
    tag = secrets.token_hex(4)
    owner = await hs.register(f"owner_{tag}")
    bot = await hs.register(f"bot_{tag}")
    admin = await hs.register(f"admin_{tag}", admin=True)
    await hs.exempt(owner.user_id)
    await hs.exempt(admin.user_id)
    world = LimitedWorld(hs, owner, bot, admin)
    yield world
    await world.close()


@pytest.fixture
async def start_limited_bot(
    limited_world: LimitedWorld, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[App]]]:
    """`await start_limited_bot(spaces, admin_room)` runs an in-process App until the test ends."""
    running: list[tuple[App, asyncio.Task[Any]]] = []

    async def start(spaces: list[dict[str, Any]], admin_room: str, **extra: Any) -> App:
        w = limited_world
        config = parse_config(
            {
                "homeserver": {"url": w.hs.url},
                "bot": {"user_id": w.bot.user_id, "access_token": w.bot.access_token},
                "database": {"url": f"sqlite:{tmp_path}/bot.db"},
                "admin": {"room": admin_room, "users": []},
                "spaces": spaces,
                "web": {"listen": None},
                "logging": {"level": "INFO", "format": "json"},
                **extra,
            }
        )
        app = App(config)
        task = asyncio.create_task(app.run())
        running.append((app, task))

        async def settled() -> bool:
            if task.done():
                task.result()
            return app.reconciler.last_reconcile_at is not None and not await app.store.journal.runnable()

        await wait_for(settled, timeout=60)
        return app

    yield start
    for app, task in running:
        app.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)


async def test_evictions_complete_under_default_rate_limits(limited_world, start_limited_bot):
    w = limited_world
    owner = w.owner.client
    async with w.setup():
        space = await owner.create_space(name="S", join_rule="public", power_level_content_override=w.levels())
        rooms = []
        for i in range(ROOMS):
            room = await owner.create_room(
                name=f"R{i}", join_rule="restricted", allow=[space], power_level_content_override=w.levels()
            )
            await owner.add_child(space, room)
            rooms.append(room)
        admin_room = await owner.create_room(name="admin", join_rule="invite", invite=[w.bot.user_id])
        for room in (space, *rooms, admin_room):
            await w.bot.client.join(room)
    user = await w.user("leaver")
    for room in (space, *rooms):
        await user.client.join(room)

    app = await start_limited_bot([{"room": space}], admin_room)
    assert app.executor.ratelimit_wait_s == 0

    await user.client.leave(space)

    async def all_evicted() -> bool:
        members = await asyncio.gather(*(owner.members(r) for r in rooms))
        return all(m.get(user.user_id) == "leave" for m in members)

    await wait_for(all_evicted, timeout=120, interval=0.5)

    assert app.executor.ratelimit_wait_s > 0, "no 429 was seen: is the bot still exempt from rate limits?"
    await wait_for(lambda: _no_open(app), timeout=30)
    await app.executor.wait_idle()
    records = await app.store.audit_log(50, target=user.user_id)
    assert sorted(r.room_id for r in records if r.outcome == "done") == sorted(rooms)
    assert not [r for r in records if r.outcome == "failed"]


async def _no_open(app: App) -> bool:
    return not await app.store.journal.runnable()
