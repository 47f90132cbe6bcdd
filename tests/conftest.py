"""Shared fixtures: real Synapse homeservers, registered users and throwaway databases."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import asyncpg
import pytest

from spacesync.testing import FederatedPair, Synapse, TestUser

PG_ADMIN_URL = os.environ.get("SPACESYNC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

_PG_CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

MakeUser = Callable[..., Awaitable[TestUser]]


def unavailable(message: str) -> NoReturn:
    """Skip when a test dependency is missing; fail instead on CI, where it must be there."""
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


async def _start_synapse(synapse: Synapse) -> None:
    try:
        await synapse.start()
        return
    except (RuntimeError, OSError) as exc:
        problem = f"cannot start Synapse: {exc}"
    unavailable(problem)


@pytest.fixture(scope="session")
async def synapse(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Synapse]:
    """One stock homeserver (Synapse's shipped defaults but `testing.stock.STOCK_DEVIATIONS`, rate limits
    included), shared by the whole session. Tests exempt the accounts that need speed (`Synapse.exempt`)."""
    hs = Synapse(tmp_path_factory.mktemp("synapse"))
    await _start_synapse(hs)
    yield hs
    await hs.stop()


@pytest.fixture(scope="session")
async def federation(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FederatedPair]:
    """Two homeservers that federate with each other over loopback, started only by the tests that ask."""
    pair = FederatedPair(tmp_path_factory.mktemp("federation"))
    try:
        await pair.start()
    except (RuntimeError, OSError) as exc:
        unavailable(f"cannot start two federating Synapses: {exc}")
    yield pair
    await pair.stop()


@pytest.fixture(scope="session")
def synapse_a(federation: FederatedPair) -> Synapse:
    """The first federating homeserver (where the bot lives in the federation tests)."""
    return federation.a


@pytest.fixture(scope="session")
def synapse_b(federation: FederatedPair) -> Synapse:
    """The second federating homeserver (where the Spaces live in the federation tests)."""
    return federation.b


@pytest.fixture
async def make_user(synapse: Synapse) -> AsyncIterator[MakeUser]:
    """Factory: ``await make_user("alice")`` registers a fresh ``@alice_<hex>`` on ``synapse``. Members act at
    full speed (exempt from rate limits through the admin API) unless ``exempt=False``: what tests measure is
    the bot, which each test exempts or not itself."""
    users: list[TestUser] = []

    async def make(
        localpart: str = "user",
        *,
        admin: bool = False,
        displayname: str | None = None,
        password: str | None = None,
        exempt: bool = True,
    ) -> TestUser:
        user = await synapse.register(
            f"{localpart}_{secrets.token_hex(4)}",
            admin=admin,
            displayname=displayname,
            password=password,
            exempt=exempt,
        )
        users.append(user)
        return user

    yield make
    for user in users:
        await user.client.close()


async def _pg_admin_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except _PG_CONNECT_ERRORS as exc:
        problem = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc!r}"
    unavailable(problem)


@contextlib.asynccontextmanager
async def _throwaway_pg_database() -> AsyncIterator[str]:
    name = f"spacesync_test_{secrets.token_hex(6)}"
    conn = await _pg_admin_connection()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield urlsplit(PG_ADMIN_URL)._replace(path=f"/{name}").geturl()
    finally:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """URL of an empty PostgreSQL database, dropped after the test."""
    async with _throwaway_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty database, once for each backend."""
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path}/spacesync.db"
    else:
        async with _throwaway_pg_database() as url:
            yield url
