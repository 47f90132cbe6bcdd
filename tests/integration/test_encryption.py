"""The encrypted admin room against the real Synapse, with matrix-nio (its own Olm/Megolm implementation,
vodozemac) playing the moderators: commands in, replies out, all end-to-end encrypted."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from nio import AsyncClient, AsyncClientConfig, MegolmEvent, RoomMessageNotice, RoomSendResponse, SyncResponse

from spacesync.commands import REFUSAL, UNVERIFIED_REFUSAL
from spacesync.store import Store
from spacesync.testing import Synapse, TestUser, wait_for
from spacesync.testing.homeserver import free_port
from spacesync.web import make_app

from .conftest import World
from .test_operations import Process, config_dict, wait_ready

PICKLE_KEY = "a-test-pickle-key-of-32-chars-xx"
ENCRYPTION = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}


class Moderator:
    """A user on a real end-to-end-encrypting client (matrix-nio), with its e2e store in a directory."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.notices: list[RoomMessageNotice] = []
        self.undecryptable: list[MegolmEvent] = []

    @classmethod
    async def log_in(cls, synapse: Synapse, user: TestUser, store: Path) -> Moderator:
        store.mkdir(parents=True, exist_ok=True)
        device_id = (await user.client.whoami())["device_id"]
        client = AsyncClient(
            synapse.url,
            user.user_id,
            device_id=device_id,
            store_path=str(store),
            config=AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True),
        )
        client.restore_login(user.user_id, device_id, user.access_token)
        moderator = cls(client)
        await moderator.sync()
        return moderator

    async def sync(self) -> None:
        """One /sync, with the key upload, query and claim a client does between them."""
        if self.client.should_upload_keys:
            await self.client.keys_upload()
        response = await self.client.sync(timeout=300, full_state=self.client.next_batch is None)
        assert isinstance(response, SyncResponse), response
        if self.client.should_query_keys:
            await self.client.keys_query()
        for room in response.rooms.join.values():
            for event in room.timeline.events:
                if isinstance(event, RoomMessageNotice):
                    self.notices.append(event)
                elif isinstance(event, MegolmEvent):
                    self.undecryptable.append(event)

    async def send(self, room_id: str, text: str) -> str:
        await self.sync()
        response = await self.client.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": text}, ignore_unverified_devices=True
        )
        assert isinstance(response, RoomSendResponse), response
        return response.event_id

    async def reply_to(self, event_id: str, timeout: float = 30) -> RoomMessageNotice:
        """The bot's notice answering `event_id`, decrypted by this client."""

        async def found() -> RoomMessageNotice | None:
            await self.sync()
            for notice in self.notices:
                relates = notice.source.get("content", {}).get("m.relates_to") or {}
                if (relates.get("m.in_reply_to") or {}).get("event_id") == event_id:
                    return notice
            return None

        return await wait_for(found, timeout=timeout, interval=0.2, message=f"no decrypted reply to {event_id}")

    async def ask(self, room_id: str, text: str) -> str:
        notice = await self.reply_to(await self.send(room_id, text))
        assert notice.decrypted, "the reply was not encrypted"
        assert notice.source["content"].get("format") == "org.matrix.custom.html"
        return notice.body

    async def close(self) -> None:
        await self.client.close()


@pytest.fixture
async def moderators(synapse: Synapse, tmp_path: Path):
    """`await moderator(user)`: that user on matrix-nio; all closed at the end."""
    made: list[Moderator] = []

    async def make(user: TestUser, name: str = "") -> Moderator:
        moderator = await Moderator.log_in(synapse, user, tmp_path / f"nio-{name or secrets.token_hex(3)}")
        made.append(moderator)
        return moderator

    yield make
    for moderator in made:
        await moderator.close()


@pytest.fixture
async def instances():
    """`spacesync run` child processes, killed at the end."""
    started: list[Process] = []

    def make(tmp_path: Path, name: str, config: dict[str, Any]) -> Process:
        started.append(Process(tmp_path, name, config))
        return started[-1]

    yield make
    for process in started:
        process.reap()


async def encrypted_admin_room(world: World) -> str:
    """The admin room as Element makes it: private, encrypted from the start."""
    room_id = await world.owner.client.create_room(
        name="admin",
        join_rule="invite",
        initial_state=[ENCRYPTION],
        power_level_content_override=world._levels(),
    )
    await world.owner.client.invite(room_id, world.bot.user_id)
    await world.bot.client.join(room_id)
    return room_id


def nio_admin(admin_room: str, **options: Any) -> dict[str, Any]:
    """matrix-nio has no cross-signing: its devices get room keys only when the bot shares with every device."""
    return {"room": admin_room, "share_keys_with": "all", **options}


def crypto_bot(world: World, admin_room: str, **extra: Any) -> dict[str, Any]:
    return {
        "admin_room": admin_room,
        "bot_options": {"pickle_key": PICKLE_KEY},
        "admin": nio_admin(admin_room, **extra.pop("admin", {})),
        **extra,
    }


async def bot_events(world: World, room_id: str) -> list[dict[str, Any]]:
    """Every non-state event the bot sent into the room, as the homeserver stores it."""
    events = await world.owner.client.messages(room_id, limit=200)
    return [e for e in events if e.get("sender") == world.bot.user_id and "state_key" not in e]


async def test_encrypted_command_gets_encrypted_reply_and_non_admin_is_refused(world, start_bot, make_user, moderators):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    bot = await start_bot([{"room": space}], **crypto_bot(world, admin_room))
    await wait_for(lambda: bot.app.synced, timeout=20)
    assert bot.app.crypto.ready

    owner = await moderators(world.owner, "owner")
    body = await owner.ask(admin_room, "!spacesync status")
    assert "State: running" in body

    mallory = await make_user("mallory")
    await world.owner.client.invite(admin_room, mallory.user_id)
    await mallory.client.join(admin_room)
    intruder = await moderators(mallory, "mallory")
    assert await intruder.ask(admin_room, "!ss pause") == REFUSAL

    # Everything the bot said here went out encrypted: nothing readable by the homeserver.
    sent = await bot_events(world, admin_room)
    assert len(sent) >= 2
    assert {e["type"] for e in sent} == {"m.room.encrypted"}
    assert not owner.undecryptable  # (mallory cannot read what was said before she joined, as it should be)


async def test_restart_keeps_the_device_and_the_conversation_goes_on(world, start_bot, moderators):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    bot = await start_bot([{"room": space}], **crypto_bot(world, admin_room))
    owner = await moderators(world.owner, "owner")
    assert "State: running" in await owner.ask(admin_room, "!spacesync status")
    machine = bot.app.crypto.machine
    assert machine is not None and machine.account is not None
    device, identity = bot.app.matrix.client.device_id, machine.account.identity_key
    await bot.stop()

    again = await start_bot([{"room": space}], bot_options={"pickle_key": PICKLE_KEY}, admin=nio_admin(admin_room))
    await wait_for(lambda: again.app.synced, timeout=20)
    machine = again.app.crypto.machine
    assert machine is not None and machine.account is not None
    # The same device with the same keys, read back from the database: nothing new to verify.
    assert again.app.matrix.client.device_id == device
    assert machine.account.identity_key == identity
    devices = await world.bot.client.request("GET", "/_matrix/client/v3/devices")
    assert [d["device_id"] for d in devices["devices"]] == [device]
    # The Megolm session the moderator shared before the restart still decrypts their next command.
    assert "State: running" in await owner.ask(admin_room, "!ss status")
    assert not owner.undecryptable
    assert {e["type"] for e in await bot_events(world, admin_room)} == {"m.room.encrypted"}


async def claim_one_time_keys(world: World, device: str, count: int) -> None:
    """What other devices do to start talking to the bot: each claim takes one of its one-time keys, oldest first."""
    for _ in range(count):
        claimed = await world.owner.client.request(
            "POST",
            "/_matrix/client/v3/keys/claim",
            {"one_time_keys": {world.bot.user_id: {device: "signed_curve25519"}}},
        )
        assert claimed["one_time_keys"][world.bot.user_id][device]


async def test_a_crypto_store_from_before_a_key_upload_uploads_new_keys_and_answers(
    world, start_bot, moderators, tmp_path, capsys
):
    """The homeserver holds one-time keys the bot's account no longer knows, under the ids it generates next: a
    store restored from before an upload (or a bot killed between an upload and its save, before spacesync saved
    keys first). Synapse refuses such keys for good ("One time key … already exists")."""
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    options = crypto_bot(world, admin_room)
    bot = await start_bot([{"room": space}], **options)
    assert bot.app.crypto.ready
    device = bot.app.matrix.client.device_id
    await bot.stop()
    store = Store(f"sqlite:{tmp_path}/bot.db")
    await store.start()
    before = await store.db.fetchval("SELECT account FROM crypto_account")
    await store.stop()

    # Ten keys claimed, ten new ones uploaded by the next run; then the account is put back as it was.
    await claim_one_time_keys(world, device, 10)
    again = await start_bot([{"room": space}], **options)
    assert again.app.crypto.ready
    await again.stop()
    store = Store(f"sqlite:{tmp_path}/bot.db")
    await store.start()
    await store.db.execute("UPDATE crypto_account SET account=$1", before)
    await store.stop()
    await claim_one_time_keys(world, device, 10)
    capsys.readouterr()

    restored = await start_bot([{"room": space}], **options)
    assert restored.app.crypto.ready, restored.app.crypto.problem
    said = [x for x in capsys.readouterr().out.splitlines() if "one-time keys" in x]
    assert len(said) == 1 and "uploading new ones under later ids" in said[0], said
    count = await world.bot.client.request("POST", "/_matrix/client/v3/keys/upload", {})
    assert count["one_time_key_counts"]["signed_curve25519"] == 50
    owner = await moderators(world.owner, "owner")
    assert "State: running" in await owner.ask(admin_room, "!ss status")
    assert not owner.undecryptable


async def test_held_batch_notice_is_encrypted_and_confirm_works_in_an_encrypted_managed_room(
    world, start_bot, make_user, moderators
):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    # A managed room that is itself encrypted: spacesync only reads and writes its state, never encrypted.
    room = await world.owner.client.create_room(
        name="General",
        join_rule="restricted",
        allow=[space],
        initial_state=[ENCRYPTION],
        power_level_content_override=world._levels(),
    )
    await world.owner.client.add_child(space, room)
    await world.bot.client.join(room)
    users = []
    for i in range(2):
        user = await make_user(f"member{i}")
        await user.client.join(space)
        await user.client.join(room)
        users.append(user)
    bot = await start_bot([{"room": space, "max_evictions_without_confirmation": 1}], **crypto_bot(world, admin_room))
    await wait_for(lambda: bot.app.synced, timeout=20)
    owner = await moderators(world.owner, "owner")
    await owner.ask(admin_room, "!ss pause")  # both leaves must reach one plan
    for user in users:
        await user.client.leave(space)
    await owner.ask(admin_room, "!ss resume")

    async def held() -> str | None:
        batches = await bot.app.store.journal.batches(status="held")
        return batches[0].id if batches else None

    batch = await wait_for(held, timeout=20)

    async def held_notice() -> RoomMessageNotice | None:
        await owner.sync()
        return next((n for n in owner.notices if batch in n.body and "relates_to" not in str(n.source)), None)

    notice = await wait_for(held_notice, timeout=20)
    assert notice.decrypted
    assert f"Confirmed batch {batch}" in await owner.ask(admin_room, f"!ss confirm {batch}")

    async def evicted() -> bool:
        members = await world.owner.client.joined_members(room)
        return not any(u.user_id in members for u in users)

    await wait_for(evicted, timeout=20)
    assert {e["type"] for e in await bot_events(world, admin_room)} == {"m.room.encrypted"}
    assert not owner.undecryptable


async def test_takeover_on_postgres_keeps_answering_encrypted(world, synapse, pg_url, tmp_path, instances, moderators):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    base = config_dict(synapse, world.bot, admin_room, pg_url, space)
    base["bot"]["pickle_key"] = PICKLE_KEY
    base["admin"] = nio_admin(admin_room)
    first = instances(tmp_path, "first", {**base, "web": {"listen": f"127.0.0.1:{free_port()}"}}).start()
    await wait_ready(first.port, 200, timeout=60)
    second = instances(tmp_path, "second", {**base, "web": {"listen": f"127.0.0.1:{free_port()}"}}).start()
    await wait_ready(second.port, 503, timeout=60, reason="standing by")
    owner = await moderators(world.owner, "owner")
    assert "State: running" in await owner.ask(admin_room, "!spacesync status")

    first.signal(signal.SIGKILL)
    assert await first.wait_exit(10) == -signal.SIGKILL
    await wait_ready(second.port, 200, timeout=30)
    # The standby is the same device: the moderator's session and the bot's outbound session carry over.
    try:
        assert "State: running" in await owner.ask(admin_room, "!ss status")
    except TimeoutError:
        raise AssertionError(f"the new leader does not answer; its log:\n{second.log(60)}") from None
    assert not owner.undecryptable
    devices = await world.bot.client.request("GET", "/_matrix/client/v3/devices")
    assert len(devices["devices"]) == 1
    assert {e["type"] for e in await bot_events(world, admin_room)} == {"m.room.encrypted"}


async def test_wrong_pickle_key_is_said_in_the_log_on_ready_and_once_in_the_room(world, start_bot, moderators, capsys):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    bot = await start_bot([{"room": space}], **crypto_bot(world, admin_room))
    assert bot.app.crypto.ready
    await bot.stop()
    capsys.readouterr()

    wrong = await start_bot([{"room": space}], bot_options={"pickle_key": "another-key-entirely-0123456789"})
    assert not wrong.app.crypto.ready
    assert "bot.pickle_key does not open the crypto store" in (wrong.app.crypto.problem or "")
    out = capsys.readouterr().out
    assert "pickle_key does not open the crypto store" in out
    line = next(x for x in out.splitlines() if "cannot read or answer" in x)
    assert admin_room in line
    assert PICKLE_KEY not in out and "another-key-entirely" not in out

    async with TestClient(TestServer(make_app(wrong.app))) as http:
        response = await http.get("/ready")
        assert response.status == 503
        assert any("pickle_key" in r for r in (await response.json())["reasons"])

    # One notice says so (it cannot be encrypted); commands get no plaintext answers.
    owner = await moderators(world.owner, "owner")
    await owner.send(admin_room, "!ss status")
    await wait_for(lambda: wrong.app.synced, timeout=20)
    plain = [e for e in await bot_events(world, admin_room) if e["type"] != "m.room.encrypted"]
    assert len(plain) == 1 and "cannot use encryption" in plain[0]["content"]["body"]


async def test_unverified_device_is_refused_when_verification_is_required(world, start_bot, moderators):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    bot = await start_bot([{"room": space}], **crypto_bot(world, admin_room, admin={"require_verified_device": True}))
    owner = await moderators(world.owner, "owner")  # an admin, on a device nobody cross-signed
    assert await owner.ask(admin_room, "!ss pause") == UNVERIFIED_REFUSAL
    assert not bot.app.reconciler.paused


async def test_password_login_logs_in_again_as_the_stored_device(world, start_bot, moderators, tmp_path):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    password_login = {"access_token": None, "password": world.bot.password, "pickle_key": PICKLE_KEY}
    bot = await start_bot(
        [{"room": space}], admin_room=admin_room, bot_options=password_login, admin=nio_admin(admin_room)
    )
    assert bot.app.crypto.ready
    device = bot.app.matrix.client.device_id
    assert device != world.bot.device_id  # a login of its own
    await bot.stop()
    # The saved token is gone (expired, logged out): the bot logs in again, as the device its keys belong to.
    store = Store(f"sqlite:{tmp_path}/bot.db")
    await store.start()
    await store.db.execute("DELETE FROM kv WHERE key LIKE 'access_token:%'")
    await store.stop()

    again = await start_bot([{"room": space}], bot_options=password_login, admin=nio_admin(admin_room))
    assert again.app.crypto.ready, again.app.crypto.problem
    assert again.app.matrix.client.device_id == device
    # Still signed by the same cross-signing identity.
    assert again.app.crypto.identity_problem is None
    assert bot.app.crypto.identity and again.app.crypto.identity
    assert again.app.crypto.identity.master_key == bot.app.crypto.identity.master_key
    assert again.app.crypto.identity and (await again.app.crypto.identity.query()).device_signed
    owner = await moderators(world.owner, "owner")
    assert "State: running" in await owner.ask(admin_room, "!ss status")


async def test_undecryptable_command_gets_one_log_line_and_an_encrypted_reply(world, start_bot, moderators, capsys):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    bot = await start_bot([{"room": space}], **crypto_bot(world, admin_room))
    bot.app.crypto.key_wait_s = 0  # no room key will ever come for this one
    owner = await moderators(world.owner, "owner")
    capsys.readouterr()
    garbled = await world.owner.client.send_event(
        admin_room,
        "m.room.encrypted",
        {
            "algorithm": "m.megolm.v1.aes-sha2",
            "ciphertext": "AwgAEhAAAAAAAAAAAAAAAAAAAAAA",
            "session_id": "no-such-session",
            "sender_key": "no-such-key",
            "device_id": "NOSUCHDEVICE",
        },
    )
    notice = await owner.reply_to(garbled)
    assert notice.decrypted and "could not decrypt" in notice.body
    lines = [x for x in capsys.readouterr().out.splitlines() if "cannot decrypt a message in the admin room" in x]
    assert len(lines) == 1 and admin_room in lines[0] and garbled in lines[0]
    assert {e["type"] for e in await bot_events(world, admin_room)} == {"m.room.encrypted"}


async def test_by_default_room_keys_go_only_to_devices_their_owner_cross_signed(world, start_bot, moderators):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    # The default admin.share_keys_with (cross-signed), as Element does: nio's devices are never cross-signed.
    await start_bot([{"room": space}], admin_room=admin_room, bot_options={"pickle_key": PICKLE_KEY})
    owner = await moderators(world.owner, "owner")
    await owner.send(admin_room, "!spacesync status")

    async def withheld() -> bool:
        await owner.sync()
        return any(e.sender == world.bot.user_id for e in owner.undecryptable)

    await wait_for(withheld, timeout=30, interval=0.2)
    assert not owner.notices
