"""The encrypted admin room with the crypto stack moderators use (matrix-js-sdk, Rust crypto, excluding
insecure devices as Element does): the bot's device must be cross-signed by the bot's own identity, or the
moderator's client withholds its room keys and never shows the bot's answers."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from spacesync.matrix.trust import master_key
from spacesync.model import RoomID
from spacesync.store import Store
from spacesync.testing import Synapse, TestUser, wait_for
from spacesync.testing.homeserver import free_port
from spacesync.web import make_app

from .conftest import World
from .js_moderator import JsModerator
from .test_encryption import PICKLE_KEY, bot_events, encrypted_admin_room, instances  # noqa: F401 (a fixture)
from .test_operations import config_dict, wait_ready


@pytest.fixture
async def js_moderators(synapse: Synapse):
    """`await js_moderators(user)`: that user on a js-sdk device of its own, cross-signed; closed at the end."""
    made: list[JsModerator] = []

    async def make(user: TestUser) -> JsModerator:
        made.append(await JsModerator.start(synapse, user))
        return made[-1]

    yield make
    for moderator in made:
        await moderator.close()


def trusted_bot(admin_room: str, **admin: Any) -> dict[str, Any]:
    """The bot with encryption and the default key sharing (only devices their owner cross-signed)."""
    return {"admin_room": admin_room, "bot_options": {"pickle_key": PICKLE_KEY}, "admin": {"room": admin_room, **admin}}


async def assert_trusted_answer(moderator: JsModerator, room: str, text: str = "!spacesync status") -> None:
    answer = await moderator.ask(room, text)
    assert "State: running" in answer["body"], answer
    assert answer["encrypted"]
    assert answer["shield"] == {"colour": 0, "reason": None}, answer  # no warning shield: a trusted sender


async def bot_identity(moderator: JsModerator, bot: TestUser) -> tuple[str, dict[str, bool]]:
    """The bot's master key and its devices (signed by the bot's self-signing key or not), as the js client sees."""
    seen = await moderator.devices(bot.user_id)
    return seen["master_key"], {d["device_id"]: d["signed_by_owner"] for d in seen["devices"]}


def cli(config: dict[str, Any], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "cli.yaml"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "spacesync", "-c", str(path), *args], capture_output=True, text=True, timeout=60
    )


def bot_dict(synapse: Synapse, world: World, admin_room: str, db_url: str, space: str) -> dict[str, Any]:
    base = config_dict(synapse, world.bot, admin_room, db_url, space)
    base["bot"]["pickle_key"] = PICKLE_KEY
    return base


async def test_a_moderator_excluding_insecure_devices_gets_encrypted_answers_after_a_restart(
    world: World, start_bot, js_moderators
):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    bot = await start_bot([{"room": space}], **trusted_bot(admin_room))
    owner = await js_moderators(world.owner)
    await assert_trusted_answer(owner, admin_room)
    master, devices = await bot_identity(owner, world.bot)
    device = bot.app.matrix.client.device_id
    assert master and devices == {device: True}
    assert bot.app.crypto.identity is not None and bot.app.crypto.identity.master_key == master
    await bot.stop()

    again = await start_bot([{"room": space}], **trusted_bot(admin_room))
    assert again.app.crypto.identity and again.app.crypto.identity_problem is None, again.app.crypto.problem
    await assert_trusted_answer(owner, admin_room)
    # The same device, still signed by the same identity: nothing new for the moderator's client to judge.
    assert await bot_identity(owner, world.bot) == (master, {device: True})
    assert {e["type"] for e in await bot_events(world, admin_room)} == {"m.room.encrypted"}


async def test_a_standby_taking_over_on_postgres_is_the_same_trusted_device(
    world: World,
    synapse: Synapse,
    pg_url: str,
    tmp_path: Path,
    instances,  # noqa: F811
    js_moderators,
):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    base = bot_dict(synapse, world, admin_room, pg_url, space)
    first = instances(tmp_path, "first", {**base, "web": {"listen": f"127.0.0.1:{free_port()}"}}).start()
    await wait_ready(first.port, 200, timeout=60)
    second = instances(tmp_path, "second", {**base, "web": {"listen": f"127.0.0.1:{free_port()}"}}).start()
    await wait_ready(second.port, 503, timeout=60, reason="standing by")
    owner = await js_moderators(world.owner)
    await assert_trusted_answer(owner, admin_room)
    identity = await bot_identity(owner, world.bot)

    first.signal(signal.SIGKILL)
    assert await first.wait_exit(10) == -signal.SIGKILL
    await wait_ready(second.port, 200, timeout=30)
    try:
        await assert_trusted_answer(owner, admin_room)
    except AssertionError as e:
        raise AssertionError(f"{e}\nthe new leader's log:\n{second.log(60)}") from None
    assert await bot_identity(owner, world.bot) == identity
    assert {e["type"] for e in await bot_events(world, admin_room)} == {"m.room.encrypted"}


async def test_the_recovery_key_restores_the_identity_on_an_empty_database(
    world: World, synapse: Synapse, start_bot, js_moderators, tmp_path: Path
):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    password_login = {"access_token": None, "password": world.bot.password, "pickle_key": PICKLE_KEY}
    first_db = f"sqlite:{tmp_path}/first.db"
    bot = await start_bot([{"room": space}], db_url=first_db, admin_room=admin_room, bot_options=password_login)
    owner = await js_moderators(world.owner)
    await assert_trusted_answer(owner, admin_room)
    master, _ = await bot_identity(owner, world.bot)
    await bot.stop()

    # The operator's one look at the recovery key; a second look finds nothing.
    config = bot_dict(synapse, world, admin_room, first_db, space)
    shown = cli(config, tmp_path, "crypto", "recovery-key")
    assert shown.returncode == 0, shown.stderr
    recovery_key = shown.stdout.strip()
    assert len(recovery_key.split()) == 12
    again = cli(config, tmp_path, "crypto", "recovery-key")
    assert again.returncode == 1 and "shown once already" in again.stderr and recovery_key not in again.stdout

    # The database is lost: a new one, a new login (a new device), the recovery key from the config.
    restored = await start_bot(
        [{"room": space}],
        db_url=f"sqlite:{tmp_path}/second.db",
        bot_options={**password_login, "recovery_key": recovery_key},
    )
    assert restored.app.crypto.identity and restored.app.crypto.identity_problem is None, restored.app.crypto.problem
    new_device = restored.app.matrix.client.device_id
    assert new_device != bot.app.matrix.client.device_id
    await assert_trusted_answer(owner, admin_room)
    master_now, devices = await bot_identity(owner, world.bot)
    assert master_now == master
    assert devices[new_device] is True


async def test_an_identity_the_bot_cannot_open_is_reported_and_kept_until_reset(
    world: World, synapse: Synapse, start_bot, js_moderators, tmp_path: Path, capsys
):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    bot = await start_bot([{"room": space}], db_url=f"sqlite:{tmp_path}/first.db", **trusted_bot(admin_room))
    master = bot.app.crypto.identity.master_key if bot.app.crypto.identity else None
    await bot.stop()
    before = len(await bot_events(world, admin_room))
    capsys.readouterr()

    # A new database and no recovery key: the account's identity is not overwritten.
    lost = await start_bot([{"room": space}], db_url=f"sqlite:{tmp_path}/second.db", **trusted_bot(admin_room))
    assert lost.app.crypto.identity is not None, lost.app.crypto.problem
    problem = lost.app.crypto.identity_problem or ""
    assert "cannot open" in problem and "reset-identity" in problem
    lines = [x for x in capsys.readouterr().out.splitlines() if "cannot open" in x]
    assert len(lines) == 1
    keys = await world.owner.client.request(
        "POST", "/_matrix/client/v3/keys/query", {"device_keys": {world.bot.user_id: []}}
    )
    assert list(keys["master_keys"][world.bot.user_id]["keys"].values()) == [master]
    async with TestClient(TestServer(make_app(lost.app))) as http:
        response = await http.get("/ready")
        assert response.status == 503
        assert any("cannot open" in r for r in (await response.json())["reasons"])
    await wait_for(lambda: lost.app.synced, timeout=20)
    assert len(await bot_events(world, admin_room)) == before + 1  # one notice
    await lost.stop()

    # The operator replaces it on purpose: a new master key, the device signed with it.
    reset = cli(
        bot_dict(synapse, world, admin_room, f"sqlite:{tmp_path}/second.db", space),
        tmp_path,
        "crypto",
        "reset-identity",
    )
    assert reset.returncode == 0, reset.stderr
    # Replacing keys takes the bot's password (user-interactive auth); the login keeps the stored device.
    options = trusted_bot(admin_room)
    options["bot_options"].update(access_token=None, password=world.bot.password)
    fresh = await start_bot([{"room": space}], db_url=f"sqlite:{tmp_path}/second.db", **options)
    assert fresh.app.crypto.identity and fresh.app.crypto.identity_problem is None, fresh.app.crypto.problem
    keys = await world.owner.client.request(
        "POST", "/_matrix/client/v3/keys/query", {"device_keys": {world.bot.user_id: []}}
    )
    new_master = next(iter(keys["master_keys"][world.bot.user_id]["keys"].values()))
    said = "\n".join(x for x in capsys.readouterr().out.splitlines() if "cross-signing" in x or "master" in x)
    assert new_master != master, said
    assert fresh.app.crypto.identity and fresh.app.crypto.identity.master_key == new_master, said


async def test_require_verified_device_takes_commands_from_a_cross_signed_device(
    world: World, start_bot, js_moderators
):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    bot = await start_bot([{"room": space}], **trusted_bot(admin_room, require_verified_device=True))
    owner = await js_moderators(world.owner)
    answer = await owner.ask(admin_room, "!ss pause")
    assert "Paused" in answer["body"], answer
    assert bot.app.reconciler.paused


async def test_an_admin_room_whose_state_cannot_be_read_gets_no_plaintext_and_an_encrypted_reply_later(
    world: World, start_bot, js_moderators, fault_proxy, tmp_path: Path
):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    bot = await start_bot([{"room": space}], **trusted_bot(admin_room))
    await wait_for(lambda: bot.app.synced, timeout=20)
    await bot.stop()
    # A sync position is saved, so /sync will not say again that the room is encrypted; and the database does
    # not remember it (as one written before it did): only a read of the room's state can tell.
    store = Store(f"sqlite:{tmp_path}/bot.db")
    await store.start()
    assert await store.get("next_batch")
    await store.db.execute("DELETE FROM kv WHERE key LIKE 'crypto:room_encrypted:%'")
    await store.stop()

    state_reads = rf"/rooms/{re.escape(admin_room)}/state$"
    fault_proxy.fail(state_reads, status=502, method="GET", times=3)
    again = await start_bot([{"room": space}], homeserver_url=fault_proxy.url, **trusted_bot(admin_room))
    owner = await js_moderators(world.owner)
    await assert_trusted_answer(owner, admin_room)
    assert fault_proxy.count(state_reads, method="GET") >= 4  # failed at login, then read again
    assert fault_proxy.count(r"/send/m\.room\.message/") == 0
    assert fault_proxy.count(r"/send/m\.room\.encrypted/") >= 1
    assert {e["type"] for e in await bot_events(world, admin_room)} == {"m.room.encrypted"}
    assert again.app.crypto.rooms.known(RoomID(admin_room)).value == "encrypted"


async def test_an_admin_whose_identity_changed_is_refused_until_another_admin_trusts_it(
    world: World, start_bot, make_user, js_moderators
):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    second = await make_user("second")
    await world.owner.client.invite(admin_room, second.user_id)
    await second.client.join(admin_room)
    bot = await start_bot(
        [{"room": space}], **trusted_bot(admin_room, require_verified_device=True, users=[second.user_id])
    )
    owner, other = await js_moderators(world.owner), await js_moderators(second)
    await assert_trusted_answer(owner, admin_room)  # both identities pinned on first use
    await assert_trusted_answer(other, admin_room)

    await owner.reset_identity()  # as after a lost recovery key, or an attacker with the owner's password

    async def bot_sees_the_change() -> bool:
        keys = await master_key(bot.app.store.db, world.owner.user_id)
        return keys is not None and keys[0] != keys[1]

    await wait_for(bot_sees_the_change, timeout=20)
    refused = await owner.send(admin_room, "!ss pause")
    # The owner's devices no longer get the bot's room keys: the other admin reads the refusal.
    body = (await other.reply_to(refused))["body"]
    assert "cross-signing identity (master key) changed" in body and f"trust {world.owner.user_id}" in body
    assert not bot.app.reconciler.paused

    assert "Pinned" in (await other.ask(admin_room, f"!ss trust {world.owner.user_id}"))["body"]
    assert "Paused" in (await owner.ask(admin_room, "!ss pause"))["body"]
    assert bot.app.reconciler.paused
