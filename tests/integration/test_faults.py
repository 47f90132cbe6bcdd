"""The fault-injecting proxies against the real Synapse and PostgreSQL: each fault happens when asked,
and everything else passes through untouched."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from spacesync.testing import (
    FaultProxy,
    Synapse,
    TcpProxy,
    TestbedRequestError,
    TestClient,
    TestUser,
    free_port,
    wait_for,
)

from ..conftest import PG_ADMIN_URL
from .conftest import Bot, World

MakeUser = Callable[..., Awaitable[TestUser]]
WHOAMI = r"/account/whoami$"
PG_ERRORS = (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError)


async def raw_get(
    proxy: FaultProxy, user: TestUser, path: str = "/_matrix/client/v3/account/whoami", *, timeout: float = 10
) -> tuple[int, Any, str]:
    """One GET on a fresh connection (no keep-alive retry can hide a fault): status, headers, body."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.get(proxy.url + path, headers={"Authorization": f"Bearer {user.access_token}"}) as resp:
            return resp.status, resp.headers, await resp.text()


def through(proxy: FaultProxy, user: TestUser) -> TestClient:
    return TestClient(proxy.url, user.access_token, user.user_id)


def room_name(state: list[dict[str, Any]]) -> str:
    return next(event["content"]["name"] for event in state if event["type"] == "m.room.name")


async def test_passes_requests_through_unchanged(fault_proxy: FaultProxy, make_user: MakeUser) -> None:
    user = await make_user("passer")
    async with through(fault_proxy, user) as client:
        assert (await client.whoami())["user_id"] == user.user_id
        room = await client.create_room(name="through the proxy")
        await client.send_state(room, "m.room.topic", {"topic": "sent through"})
        events = await client.messages(room, limit=1)
    assert len(events) == 1  # the query string reached Synapse
    assert await user.client.get_state_event(room, "m.room.topic") == {"topic": "sent through"}
    assert await user.client.get_state_event(room, "m.room.name") == {"name": "through the proxy"}

    assert [(r.method, r.rule, r.status) for r in fault_proxy.log] == [
        ("GET", None, 200),
        ("POST", None, 200),
        ("PUT", None, 200),
        ("GET", None, 200),
    ]
    assert fault_proxy.count(r"/createRoom$") == 1
    assert fault_proxy.count(r"/rooms/", method="GET") == 1
    assert fault_proxy.requests(r"/messages$")[0].path == f"/_matrix/client/v3/rooms/{room}/messages"
    fault_proxy.reset_log()
    assert fault_proxy.count() == 0


async def test_rate_limit_answers_429_then_passes_through(fault_proxy: FaultProxy, make_user: MakeUser) -> None:
    user = await make_user("limited")
    rule = fault_proxy.rate_limit(WHOAMI, retry_after_ms=1500, times=1)

    status, headers, body = await raw_get(fault_proxy, user)
    assert status == 429
    assert headers["Retry-After"] == "2"
    assert '"errcode": "M_LIMIT_EXCEEDED"' in body and '"retry_after_ms": 1500' in body
    status, _, body = await raw_get(fault_proxy, user)
    assert status == 200 and user.user_id in body
    assert rule.hits == 1 and rule.exhausted
    assert [(r.rule, r.upstream_status, r.status) for r in fault_proxy.requests(WHOAMI)] == [
        (rule, None, 429),
        (None, 200, 200),
    ]

    fault_proxy.rate_limit(WHOAMI, retry_after_ms=50, times=2)
    async with through(fault_proxy, user) as client:
        assert (await client.whoami())["user_id"] == user.user_id
        assert client.rate_limited_count == 2


async def test_server_errors_forbidden_and_method_filter(fault_proxy: FaultProxy, make_user: MakeUser) -> None:
    user = await make_user("failing")
    fault_proxy.fail(WHOAMI, status=503, times=2, method="GET")
    fault_proxy.fail(r"/createRoom$", status=500, method="GET")  # never matches: createRoom is a POST
    fault_proxy.forbid(r"/rooms/[^/]+/send/", error="Not allowed here")
    async with through(fault_proxy, user) as client:
        for _ in range(2):
            with pytest.raises(TestbedRequestError) as failed:
                await client.whoami()
            assert (failed.value.status, failed.value.errcode) == (503, "M_UNKNOWN")
        assert (await client.whoami())["user_id"] == user.user_id
        room = await client.create_room(name="created")
        with pytest.raises(TestbedRequestError) as forbidden:
            await client.send_text(room, "hello")
        assert (forbidden.value.status, forbidden.value.errcode) == (403, "M_FORBIDDEN")
    assert [r.status for r in fault_proxy.requests(WHOAMI)] == [503, 503, 200]
    assert all(event["type"] != "m.room.message" for event in await user.client.messages(room))


async def test_hang_holds_requests(fault_proxy: FaultProxy, make_user: MakeUser) -> None:
    user = await make_user("hung")
    forever = fault_proxy.hang(WHOAMI)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await raw_get(fault_proxy, user, timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert fault_proxy.requests(WHOAMI)[0].status is None
    await wait_for(lambda: fault_proxy.in_flight == 0, timeout=2)  # abandoned when the client left

    # Removing the rule lets a held request go on to Synapse.
    held = asyncio.create_task(raw_get(fault_proxy, user))
    await wait_for(lambda: fault_proxy.count(WHOAMI) == 2)
    await asyncio.sleep(0.1)
    assert not held.done()
    forever.remove()
    assert (await held)[0] == 200

    fault_proxy.hang(WHOAMI, 0.3, times=1)
    started = time.monotonic()
    assert (await raw_get(fault_proxy, user))[0] == 200
    assert time.monotonic() - started >= 0.3


async def test_delay_response_returns_a_stale_read(fault_proxy: FaultProxy, make_user: MakeUser) -> None:
    owner = await make_user("owner")
    room = await owner.client.create_room(name="before")
    state_path = rf"/rooms/{re.escape(room)}/state$"
    fault_proxy.delay_response(state_path, 1.0, method="GET", times=1)
    async with through(fault_proxy, owner) as client:
        read = asyncio.create_task(client.get_state(room))
        await wait_for(lambda: [r.upstream_status for r in fault_proxy.requests(state_path)] == [200])
        await owner.client.send_state(room, "m.room.name", {"name": "after"})
        assert not read.done()
        assert room_name(await read) == "before"
        assert room_name(await client.get_state(room)) == "after"


async def test_drop_closes_the_connection(fault_proxy: FaultProxy, make_user: MakeUser) -> None:
    user = await make_user("dropped")
    # aiohttp resends an idempotent request once after a disconnect: drop both attempts.
    rule = fault_proxy.drop(WHOAMI, times=2)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await raw_get(fault_proxy, user)
    assert [(r.rule, r.upstream_status, r.status) for r in fault_proxy.requests(WHOAMI)] == [(rule, None, None)] * 2
    assert (await raw_get(fault_proxy, user))[0] == 200

    fault_proxy.drop(r"/createRoom$", method="POST", times=1)
    async with through(fault_proxy, user) as client:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await client.create_room(name="never made")
        assert await client.joined_rooms() == set()


async def test_rewrite_changes_the_answer(fault_proxy: FaultProxy, make_user: MakeUser) -> None:
    user = await make_user("rewritten")
    fault_proxy.rewrite(WHOAMI, lambda body: {**body, "user_id": 42}, times=1)
    fault_proxy.rewrite(WHOAMI, lambda body: b'{"user_id": ', times=1)
    async with through(fault_proxy, user) as client:
        assert (await client.whoami())["user_id"] == 42
    assert (await raw_get(fault_proxy, user))[::2] == (200, '{"user_id": ')
    assert [r.upstream_status for r in fault_proxy.requests(WHOAMI)] == [200, 200]


async def test_rules_in_order_removed_and_cleared(fault_proxy: FaultProxy, make_user: MakeUser) -> None:
    user = await make_user("ruled")
    fault_proxy.fail(WHOAMI, status=500, times=1)
    forbidden = fault_proxy.forbid(WHOAMI)
    fault_proxy.fail(r"/joined_rooms$")
    statuses = [(await raw_get(fault_proxy, user))[0] for _ in range(3)]
    assert statuses == [500, 403, 403]
    forbidden.remove()
    assert (await raw_get(fault_proxy, user))[0] == 200
    assert (await raw_get(fault_proxy, user, "/_matrix/client/v3/joined_rooms"))[0] == 502
    fault_proxy.clear()
    assert (await raw_get(fault_proxy, user, "/_matrix/client/v3/joined_rooms"))[0] == 200


async def test_stop_abandons_held_requests(synapse: Synapse, make_user: MakeUser) -> None:
    user = await make_user("abandoned")
    async with FaultProxy(synapse.url) as proxy:
        proxy.hang(WHOAMI)
        held = asyncio.create_task(raw_get(proxy, user))
        await wait_for(lambda: proxy.count(WHOAMI) == 1)
        started = time.monotonic()
    assert time.monotonic() - started < 2
    with pytest.raises(aiohttp.ClientConnectionError):
        await held


async def test_unreachable_upstream_and_non_json_rewrite(fault_proxy: FaultProxy, make_user: MakeUser) -> None:
    user = await make_user("odd")
    fault_proxy.rewrite(r"^/_matrix/static/", lambda body: body)
    status, _, body = await raw_get(fault_proxy, user, "/_matrix/static/")
    assert status == 502 and "is not JSON" in body and fault_proxy.log[-1].upstream_status == 200
    async with FaultProxy(f"http://127.0.0.1:{free_port()}") as nowhere:
        status, _, body = await raw_get(nowhere, user)
    assert status == 502 and "unreachable" in body


async def test_bot_runs_through_the_proxy(
    fault_proxy: FaultProxy, world: World, start_bot: Callable[..., Awaitable[Bot]]
) -> None:
    space = await world.space()
    await start_bot([{"room": space}], homeserver_url=fault_proxy.url)
    assert fault_proxy.count(r"/sync$", method="GET") >= 1
    assert all(r.status in (200, None) for r in fault_proxy.log)


async def test_tcp_proxy_relays_and_cuts(pg_proxy: TcpProxy) -> None:
    conn = await asyncpg.connect(pg_proxy.dsn(PG_ADMIN_URL), timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert pg_proxy.connections == 1
        pg_proxy.cut()
        with pytest.raises(PG_ERRORS):
            await conn.fetchval("SELECT 1")
        assert pg_proxy.connections == 0
    finally:
        conn.terminate()
    again = await asyncpg.connect(pg_proxy.dsn(PG_ADMIN_URL), timeout=5)
    try:
        assert await again.fetchval("SELECT 2") == 2
    finally:
        await again.close()


async def test_tcp_proxy_refuses_until_accept(pg_proxy: TcpProxy) -> None:
    pg_proxy.refuse()
    started = time.monotonic()
    with pytest.raises(PG_ERRORS):
        await asyncpg.connect(pg_proxy.dsn(PG_ADMIN_URL), timeout=5)
    assert time.monotonic() - started < 2
    assert pg_proxy.connections == 0
    pg_proxy.accept()
    conn = await asyncpg.connect(pg_proxy.dsn(PG_ADMIN_URL), timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
