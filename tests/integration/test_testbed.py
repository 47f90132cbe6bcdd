"""The test bed itself: a real Synapse, the raw client and throwaway databases."""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable

import aiohttp
import asyncpg
import pytest
from mautrix.util.async_db import Database

from spacesync.testing import Synapse, TestbedRequestError, TestUser, wait_for
from spacesync.testing.stock import STOCK_DEVIATIONS

REQUIRED = {
    "server_name", "report_stats", "media_store_path", "enable_registration", "default_room_version",
    "listeners", "database", "log_config",
}  # fmt: skip
"""What a config must name anyway: these are no deviation from the shipped defaults."""

MakeUser = Callable[..., Awaitable[TestUser]]


async def test_registration_gives_a_working_token(make_user: MakeUser) -> None:
    alice = await make_user("alice", displayname="Alice")

    whoami = await alice.client.whoami()

    assert whoami["user_id"] == alice.user_id
    assert whoami["device_id"] == alice.device_id


async def test_restricted_child_is_joinable_through_its_space(make_user: MakeUser) -> None:
    owner, guest = await make_user("owner"), await make_user("guest")
    space = await owner.client.create_space(name="Space", join_rule="public")
    child = await owner.client.create_room(name="Child", join_rule="restricted", allow=[space])
    await owner.client.add_child(space, child)
    await owner.client.set_parent(child, space)

    with pytest.raises(TestbedRequestError) as refused:
        await guest.client.join(child)
    assert refused.value.status == 403

    await guest.client.join(space)
    await guest.client.join(child)

    assert await owner.client.joined_members(child) == {owner.user_id, guest.user_id}
    join_event = await owner.client.get_state_event(child, "m.room.member", guest.user_id)
    assert join_event is not None
    assert join_event["join_authorised_via_users_server"] == owner.user_id
    assert await guest.client.get_state_event(space, "m.space.child", child) == {
        "via": [owner.client.server_name],
        "suggested": False,
    }


async def test_upgrade_leaves_a_tombstone(make_user: MakeUser) -> None:
    owner = await make_user("owner")
    old = await owner.client.create_room(name="Old", room_version="10")

    new = await owner.client.upgrade_room(old, "11")

    assert new != old
    tombstone = await owner.client.get_state_event(old, "m.room.tombstone")
    assert tombstone is not None
    assert tombstone["replacement_room"] == new
    create = await owner.client.get_state_event(new, "m.room.create")
    assert create is not None
    assert create["room_version"] == "11"


async def test_pg_url_is_a_connectable_empty_database(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT current_database()") == pg_url.rsplit("/", 1)[1]
        tables = await conn.fetchval("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        assert tables == 0
    finally:
        await conn.close()


async def test_db_url_serves_both_backends(db_url: str) -> None:
    db = Database.create(db_url)
    await db.start()
    try:
        await db.execute("CREATE TABLE probe (value INTEGER)")
        await db.execute("INSERT INTO probe (value) VALUES (42)")
        assert await db.fetchval("SELECT value FROM probe") == 42
    finally:
        await db.stop()


async def test_the_test_homeserver_is_stock_but_for_the_listed_deviations(synapse: Synapse) -> None:
    config = json.loads(synapse.config_path.read_text())
    assert set(config) - REQUIRED == set(STOCK_DEVIATIONS)
    assert not [key for key in config if key.startswith("rc_") and key != "rc_login"]
    assert "experimental_features" not in config


@pytest.mark.slow
async def test_client_rides_out_default_rate_limits(synapse: Synapse) -> None:
    user = await synapse.register(f"chatty_{secrets.token_hex(4)}")
    try:
        room = await user.client.create_room(name="Burst")
        bodies = [f"message {i}" for i in range(11)]

        for body in bodies:
            await user.client.send_text(room, body)

        assert user.client.rate_limited_count > 0
        sent = [
            event["content"]["body"]
            for event in reversed(await user.client.messages(room))
            if event["type"] == "m.room.message"
        ]
        assert sent == bodies
    finally:
        await user.client.close()


async def test_exempt_lifts_a_users_rate_limits(synapse: Synapse) -> None:
    user = await synapse.register(f"exempt_{secrets.token_hex(4)}")
    try:
        assert await synapse.exemption(user.user_id) == {}
        await synapse.exempt(user.user_id)
        assert await synapse.exemption(user.user_id) == {"messages_per_second": 0, "burst_count": 0}
        room = await user.client.create_room(name="Unlimited")

        for i in range(15):
            await user.client.send_text(room, f"message {i}")

        assert user.client.rate_limited_count == 0
    finally:
        await user.client.close()


async def test_homeserver_survives_a_crash_and_restart(synapse: Synapse, make_user: MakeUser) -> None:
    alice = await make_user("alice")
    room = await alice.client.create_room(name="Durable")
    port = synapse.port

    await synapse.kill()
    with pytest.raises(aiohttp.ClientError):
        await alice.client.whoami()
    await synapse.restart()

    assert synapse.port == port
    assert await wait_for(alice.client.joined_rooms) == {room}
