"""spacesync as an application service on a Synapse with its stock rate limits: the generated registration in
`app_service_config_files`, events pushed in transactions (no /sync of rooms at all), actions never throttled,
transactions applied once, a standby taking over without losing one, encryption through the bot's device."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import TestClient as WebClient
from aiohttp.test_utils import TestServer

from spacesync.config import AppserviceConfig, parse_config
from spacesync.demo_appservice import appservice_user
from spacesync.engine.runtime import App, FatalError
from spacesync.metrics import APPSERVICE_TRANSACTIONS
from spacesync.model import UserID
from spacesync.registration import make_registration, read_registration, write_registration
from spacesync.store import Store
from spacesync.testing import FaultProxy, Synapse, TestClient, TestUser, wait_for
from spacesync.testing.homeserver import free_port
from spacesync.testing.process import spawn_bot
from spacesync.web import make_app

from ..conftest import _start_synapse
from .conftest import Bot, World
from .test_commands import replies_to, reply_for
from .test_encryption import PICKLE_KEY, encrypted_admin_room
from .test_eviction import wait_membership

BOT = "@spacesync:localhost"


@attrs.define
class Appservice:
    synapse: Synapse
    registration: Path
    listen: int
    """Where the bot listens for transactions."""
    pusher: FaultProxy
    """Between the homeserver and the bot (the registration's url): faults in the transactions' path."""
    as_token: str
    bot_token: str
    """A device of the bot's own (an appservice login), for the test's joins on the bot's behalf."""


@pytest.fixture(scope="module")
async def appservice(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Appservice]:
    """A Synapse with stock rate limits that loads spacesync's registration (written by the code behind
    `spacesync appservice registration`)."""
    workdir = tmp_path_factory.mktemp("synapse-appservice")
    listen = free_port()
    async with FaultProxy(f"http://127.0.0.1:{listen}") as pusher:
        registration = workdir / "registration.yaml"
        listen_at = AppserviceConfig("127.0.0.1", listen, "", "")
        write_registration(registration, make_registration(UserID(BOT), listen_at, url=pusher.url))
        synapse = Synapse(workdir, app_service_config_files=[registration])
        await _start_synapse(synapse)
        as_token = read_registration(str(registration))["as_token"]
        try:
            bot = await appservice_user(synapse, as_token, BOT[1:].partition(":")[0])
            await bot.client.close()
            yield Appservice(synapse, registration, listen, pusher, as_token, bot.access_token)
        finally:
            await synapse.stop()


@pytest.fixture
async def as_world(appservice: Appservice) -> AsyncIterator[World]:
    """The owner (exempted from the limits: only the bot's are under test) and the bot acting with the as_token."""
    synapse = appservice.synapse
    owner = await synapse.register(f"owner_{secrets.token_hex(4)}")
    await synapse.exempt(owner.user_id)
    bot = TestUser(BOT, appservice.bot_token, "", "", TestClient(synapse.url, appservice.bot_token, BOT))
    yield World(owner, bot)
    await owner.client.close()
    await bot.client.close()


def as_config(
    appservice: Appservice, world: World, admin_room: str, db_url: str, spaces: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "homeserver": {"url": extra.pop("homeserver_url", appservice.synapse.url)},
        "bot": {"user_id": BOT, **extra.pop("bot_options", {})},
        "database": {"url": db_url},
        "admin": {"room": admin_room, "users": [world.owner.user_id]},
        "spaces": spaces,
        "web": {"listen": None},
        "logging": {"level": "INFO", "format": "json"},
        "appservice": {"listen": f"127.0.0.1:{appservice.listen}", "registration": str(appservice.registration)},
        **extra,
    }


@pytest.fixture
async def start_as_bot(appservice: Appservice, as_world: World, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await start_as_bot(admin_room, spaces, **config)`: the bot in appservice mode, in-process, taking
    transactions; stopped at the end."""
    bots: list[Bot] = []

    async def start(admin_room: str, spaces: list[dict[str, Any]], *, wait: bool = True, **extra: Any) -> Bot:
        db_url = extra.pop("db_url", f"sqlite:{tmp_path}/bot.db")
        app = App(parse_config(as_config(appservice, as_world, admin_room, db_url, spaces, **extra)))
        bot = Bot(app, asyncio.create_task(app.run()))
        bots.append(bot)
        if wait:
            await taking(bot)
            await bot.idle()
        return bot

    yield start
    for bot in bots:
        with contextlib.suppress(Exception):
            await bot.stop()


async def taking(bot: Bot, timeout: float = 60) -> None:
    async def ready() -> bool:
        if bot.task.done():
            bot.task.result()
        return bot.app.transport is not None and bot.app.transport.taking

    await wait_for(ready, timeout=timeout, message="the bot does not take transactions")


def transactions(outcome: str) -> float:
    return APPSERVICE_TRANSACTIONS.labels(outcome=outcome)._value.get()


async def test_evictions_bans_power_levels_and_commands_arrive_as_transactions(
    appservice: Appservice, as_world: World, start_as_bot
):
    world = as_world
    space = await world.space("Community")
    rooms = [await world.room(space, f"R{i}") for i in range(3)]
    admin_room = await world.admin_room()
    synapse = appservice.synapse
    alice, bob, carol = [await synapse.register(f"{name}_{secrets.token_hex(3)}") for name in ("alice", "bob", "c")]
    for user in (alice, carol):
        for room in (space, *rooms):
            await user.client.join(room)
    await bob.client.join(space)
    await bob.client.join(rooms[0])
    applied = transactions("applied")
    async with FaultProxy(synapse.url) as homeserver:
        bot = await start_as_bot(admin_room, [{"room": space}], homeserver_url=homeserver.url)

        await alice.client.leave(space)
        await wait_membership(world, rooms, alice.user_id, "leave")
        await world.owner.client.ban(space, bob.user_id, reason="spam")
        await wait_membership(world, rooms, bob.user_id, "ban")
        await world.owner.client.set_user_level(space, carol.user_id, 50)

        async def mirrored() -> bool:
            for room in rooms:
                levels = await world.owner.client.get_power_levels(room)
                if levels.get("users", {}).get(carol.user_id) != 50:
                    return False
            return True

        await wait_for(mirrored, timeout=30, message="carol's level not mirrored")
        asked = await world.owner.client.send_text(admin_room, "!spacesync status")
        assert "State: running" in (await reply_for(world, bot, asked))["body"]

        # Everything came pushed: the bot never asked for /sync, and its actions were never throttled
        # although the homeserver keeps its stock limits (rc_message 0.2/s, burst 10: 12 actions here).
        assert homeserver.count(r"/sync$") == 0
        assert transactions("applied") > applied
        assert bot.app.matrix.ratelimit_wait_s == 0
        assert not [r for r in homeserver.requests() if r.status == 429]


async def test_a_transaction_answered_into_the_void_is_applied_once_after_a_restart(
    appservice: Appservice, as_world: World, start_as_bot, tmp_path: Path
):
    """The bot applies a transaction, its answer never reaches the homeserver, the bot goes down: the homeserver
    sends the same transaction again to the next instance, which answers it without applying it again."""
    world = as_world
    space = await world.space("Community")
    admin_room = await world.admin_room()
    bot = await start_as_bot(admin_room, [{"room": space}])
    lost = appservice.pusher.rewrite(r"/transactions/", lambda _: b"", method="PUT", times=1)
    duplicates = transactions("duplicate")

    asked = await world.owner.client.send_text(admin_room, "!spacesync status")
    await wait_for(lambda: lost.hits == 1, timeout=30, message="no transaction reached the bot")
    await bot.stop()
    again = await start_as_bot(admin_room, [{"room": space}], wait=False)
    await wait_for(lambda: transactions("duplicate") > duplicates, timeout=60, message="the retry never came")
    await reply_for(world, again, asked)
    await asyncio.sleep(2)
    assert len(await replies_to(world, again, asked)) == 1
    assert again.app.transport is not None


async def test_a_bot_killed_while_applying_a_transaction_applies_it_once_when_the_homeserver_sends_it_again(
    appservice: Appservice, as_world: World, start_as_bot, pg_url: str, tmp_path: Path
):
    """The bot (its own process) has queued a transaction's command but not yet stored the transaction's id (a
    lock held on that table stops it there) when it is killed: the homeserver sends the transaction again to
    the next instance, which applies it, and the command is answered once."""
    world = as_world
    space = await world.space("Community")
    admin_room = await world.admin_room()
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(as_config(appservice, world, admin_room, pg_url, [{"room": space}])))
    process = await spawn_bot(config, tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    pushed = appservice.pusher.requests
    seen = len(pushed(r"/transactions/"))
    await world.owner.client.send_text(admin_room, "hello")
    await wait_for(lambda: any(r.status == 200 for r in pushed(r"/transactions/")[seen:]), timeout=60)

    async def quiet() -> bool:  # nothing in flight, nothing new for 2 s: the next transaction is the command's
        count = len(pushed(r"/transactions/"))
        await asyncio.sleep(2)
        return appservice.pusher.in_flight == 0 and len(pushed(r"/transactions/")) == count

    await wait_for(quiet, timeout=60)
    store = Store(pg_url)
    await store.start()
    try:
        async with store.db.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE appservice_txn IN EXCLUSIVE MODE")  # reads pass, writes wait
            seen = len(pushed(r"/transactions/"))
            asked = await world.owner.client.send_text(admin_room, "!spacesync status")

            async def queued() -> bool:
                return await store.db.fetchval("SELECT 1 FROM command_queue WHERE event_id=$1", asked) is not None

            await wait_for(queued, timeout=60, message="the command was not queued")
            unanswered = [r for r in pushed(r"/transactions/")[seen:] if r.status is None]
            assert len(unanswered) == 1, "the transaction was answered before its id was stored"
            stuck = unanswered[0]
            process.kill()
            await process.wait()
        again = await start_as_bot(admin_room, [{"room": space}], db_url=pg_url)

        async def sent_again() -> bool:
            return any(r.path == stuck.path and r.status == 200 for r in pushed(r"/transactions/"))

        await wait_for(sent_again, timeout=60, message="the homeserver did not send the transaction again")
        assert "State: running" in (await reply_for(world, again, asked, timeout=60))["body"]
        await asyncio.sleep(2)
        assert len(await replies_to(world, again, asked)) == 1
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await store.stop()


async def test_a_standby_answers_503_and_takes_over_without_losing_a_transaction(
    appservice: Appservice, as_world: World, start_as_bot, pg_url: str, pg_proxy
):
    """The leader goes away while the standby cannot take the lock yet (its database is cut off): the homeserver's
    transactions meet the standby, get 503, and are applied once the standby leads."""
    world = as_world
    space = await world.space("Community")
    room = await world.room(space, "R")
    admin_room = await world.admin_room()
    alice = await appservice.synapse.register(f"alice_{secrets.token_hex(3)}")
    await alice.client.join(space)
    await alice.client.join(room)
    first = await start_as_bot(admin_room, [{"room": space}], db_url=pg_url)
    second = await start_as_bot(admin_room, [{"room": space}], db_url=pg_proxy.dsn(pg_url), wait=False)
    await wait_for(lambda: second.app.transport is not None and second.app.transport.server.runner is not None)
    async with WebClient(TestServer(make_app(second.app))) as web:
        answer = await web.get("/ready")
        assert answer.status == 503
        reasons = (await answer.json())["reasons"]
        assert any("appservice: transactions answered 503" in r for r in reasons), reasons

    pg_proxy.refuse()
    pg_proxy.cut()
    first.task.cancel()  # the leader goes away (its listener with it)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await first.task
    assert first.app.transport is not None and first.app.transport.server.runner is None
    refused = transactions("refused")
    await alice.client.leave(space)
    asked = await world.owner.client.send_text(admin_room, "!spacesync status")
    await wait_for(lambda: transactions("refused") > refused, timeout=30, message="the homeserver met no standby")
    assert not second.app.leader

    pg_proxy.accept()  # the standby takes the lock, then the homeserver's retry
    await taking(second, timeout=60)
    await wait_membership(world, [room], alice.user_id, "leave", timeout=90)
    assert "State: running" in (await reply_for(world, second, asked, timeout=90))["body"]
    await second.stop()  # before its database proxy goes: a transaction stuck on it would hold the homeserver


async def test_an_encrypted_command_is_answered_through_the_bots_device(
    appservice: Appservice, as_world: World, start_as_bot
):
    """The js-sdk moderator (excluding insecure devices, as Element) gets a trusted, encrypted answer: the bot's
    device, logged in with the as_token, is cross-signed; its to-device messages come through its own /sync."""
    from .js_moderator import JsModerator

    world = as_world
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    bot = await start_as_bot(admin_room, [{"room": space}], bot_options={"pickle_key": PICKLE_KEY})
    assert bot.app.crypto.ready and bot.app.crypto.identity_problem is None, bot.app.crypto.problem
    moderator = await JsModerator.start(appservice.synapse, world.owner)
    try:
        answer = await moderator.ask(admin_room, "!spacesync status")
        assert "State: running" in answer["body"], answer
        assert answer["encrypted"]
        assert answer["shield"] == {"colour": 0, "reason": None}, answer
    finally:
        await moderator.close()


async def test_a_token_the_homeserver_refuses_stops_the_bot_with_one_line(
    appservice: Appservice, as_world: World, tmp_path: Path
):
    raw = as_config(appservice, as_world, "!nowhere:localhost", f"sqlite:{tmp_path}/bot.db", [])
    raw["appservice"] = {"listen": f"127.0.0.1:{free_port()}", "as_token": "not-the-token", "hs_token": "other"}
    app = App(parse_config(raw))
    with pytest.raises(FatalError) as error:
        await asyncio.wait_for(app.run(), 30)
    assert str(error.value).startswith("appservice: the homeserver does not accept the as_token; list the registration")
    assert "\n" not in str(error.value)
