"""Integration fixtures: a spacesync bot run in-process against the real Synapse, and a world builder."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from spacesync.config import parse_config
from spacesync.engine.runtime import App
from spacesync.testing import FaultProxy, Synapse, TcpProxy, TestUser, wait_for

from ..conftest import PG_ADMIN_URL, unavailable


class World:
    """An owner (moderator) who builds Spaces and rooms, with the bot invited at power level 100."""

    def __init__(self, owner: TestUser, bot: TestUser) -> None:
        self.owner = owner
        self.bot = bot

    def _levels(self, extra: dict[str, int] | None = None, version: str = "10", **overrides: Any) -> dict[str, Any]:
        """The owner at 100 (in v12 the creator has unlimited power and must not be listed) and the bot at 100."""
        users = {self.bot.user_id: 100} if version == "12" else {self.owner.user_id: 100, self.bot.user_id: 100}
        users.update(extra or {})
        return {"users": users, **overrides}

    async def space(
        self,
        name: str = "space",
        *,
        version: str = "10",
        parent: str | None = None,
        restricted: bool = True,
        levels: dict[str, int] | None = None,
        bot: bool = True,
    ) -> str:
        """A Space: public at the top, restricted to its parent below it."""
        rule = "restricted" if parent and restricted else "public"
        room_id = await self.owner.client.create_space(
            name=name,
            room_version=version,
            join_rule=rule,
            allow=[parent] if parent and restricted else [],
            power_level_content_override=self._levels(levels, version),
        )
        if parent:
            await self.owner.client.add_child(parent, room_id)
        if bot:
            await self.bot.client.join(room_id)
        return room_id

    async def room(
        self,
        parent: str | None,
        name: str = "room",
        *,
        version: str = "10",
        join_rule: str = "restricted",
        allow: list[str] | None = None,
        add_child: bool = True,
        levels: dict[str, int] | None = None,
        bot: bool = True,
        **pl: Any,
    ) -> str:
        """A room, by default restricted to `parent` and listed as its child."""
        if allow is None:
            allow = [parent] if parent and join_rule in ("restricted", "knock_restricted") else []
        room_id = await self.owner.client.create_room(
            name=name,
            room_version=version,
            join_rule=join_rule,
            allow=allow,
            power_level_content_override=self._levels(levels, version, **pl),
        )
        if parent and add_child:
            await self.owner.client.add_child(parent, room_id)
        if bot:
            if join_rule in ("invite", "knock"):
                await self.owner.client.invite(room_id, self.bot.user_id)
            await self.bot.client.join(room_id)
        return room_id

    async def admin_room(self) -> str:
        return await self.room(None, "admin", join_rule="invite")


class Bot:
    """A running spacesync App, in-process, with helpers to wait for it."""

    def __init__(self, app: App, task: asyncio.Task[Any]) -> None:
        self.app = app
        self.task = task

    async def idle(self, timeout: float = 30.0) -> None:
        """Wait until a reconcile ran and the journal has nothing runnable."""

        async def settled() -> bool:
            if self.task.done():
                self.task.result()
            runnable = await self.app.store.journal.runnable()
            return self.app.reconciler.last_reconcile_at is not None and not runnable

        await wait_for(settled, timeout=timeout)
        await self.app.executor.wait_idle()

    async def reconcile(self) -> None:
        await self.app.reconciler.reconcile("test")
        await self.idle()

    async def stop(self) -> None:
        self.app.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 15)


def bot_config(
    synapse: Synapse, bot: TestUser, admin_room: str, db_url: str, spaces: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "homeserver": {"url": synapse.url},
        "bot": {"user_id": bot.user_id, "access_token": bot.access_token, **extra.pop("bot_options", {})},
        "database": {"url": db_url},
        "admin": {"room": admin_room, "users": extra.pop("admins", [])},
        "spaces": spaces,
        "web": {"listen": None},
        "logging": {"level": "INFO", "format": "json"},
        **extra,
    }


async def start_remote_bot(
    server: Synapse, admin: TestUser, bot: TestUser, space: str, db_dir: Path, **extra: Any
) -> tuple[Bot, str]:
    """The bot on `server` for a Space (`join_rules: enforce`) that may live on another server, with an
    admin room that `admin` makes on `server`. Returns the running bot and the admin room."""
    admin_room = await admin.client.create_room(name="admin", join_rule="invite", invite=[bot.user_id])
    await bot.client.join(admin_room)
    spaces = [{"room": space, "join_rules": "enforce"}]
    app = App(parse_config(bot_config(server, bot, admin_room, f"sqlite:{db_dir}/bot.db", spaces, **extra)))
    return Bot(app, asyncio.create_task(app.run())), admin_room


@pytest.fixture
async def world(synapse: Synapse, make_user: Callable[..., Awaitable[TestUser]]) -> World:
    """The owner builds at full speed and the bot acts at full speed: both exempt from the homeserver's rate
    limits through its admin API, as the README tells operators to do for the bot."""
    owner = await make_user("owner", exempt=False)
    bot = await make_user("bot", exempt=False)
    await synapse.exempt(owner.user_id)
    await synapse.exempt(bot.user_id)
    return World(owner, bot)


@pytest.fixture
async def start_bot(synapse: Synapse, world: World, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Bot]]]:
    """`await start_bot(spaces=[{"room": id}], **config)` runs the bot until the test ends.

    `homeserver_url=` points the bot elsewhere than `synapse`, e.g. at the `fault_proxy` in front of it.
    """
    bots: list[Bot] = []
    admin: list[str] = []

    async def start(
        spaces: list[dict[str, Any]], *, db_url: str | None = None, homeserver_url: str | None = None, **extra: Any
    ) -> Bot:
        room = extra.pop("admin_room", None)
        if not admin:
            admin.append(room or await world.admin_room())
        raw = bot_config(synapse, world.bot, admin[0], db_url or f"sqlite:{tmp_path}/bot.db", spaces, **extra)
        if homeserver_url is not None:
            raw["homeserver"]["url"] = homeserver_url
        config = parse_config(raw)
        app = App(config)
        task = asyncio.create_task(app.run())
        bot = Bot(app, task)
        bots.append(bot)
        await bot.idle()
        return bot

    yield start
    for bot in bots:
        await bot.stop()


@pytest.fixture
async def fault_proxy(synapse: Synapse) -> AsyncIterator[FaultProxy]:
    """An HTTP proxy in front of `synapse` that injects faults on request (see spacesync.testing)."""
    async with FaultProxy(synapse.url) as proxy:
        yield proxy


@pytest.fixture
async def pg_proxy() -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the test PostgreSQL; `pg_proxy.dsn(url)` points a database URL at it."""
    upstream = urlsplit(PG_ADMIN_URL)
    host, port = upstream.hostname or "127.0.0.1", upstream.port or 5432
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, TimeoutError) as exc:
        unavailable(f"PostgreSQL at {host}:{port} is unreachable: {exc!r}")
    writer.close()
    async with TcpProxy(host, port) as proxy:
        yield proxy
