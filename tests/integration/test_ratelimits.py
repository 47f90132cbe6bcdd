"""Evictions against a stock Synapse with the bot *not* exempt from its rate limits (`rc_message`: 0.2/s, a
burst of 10): one write per granted slot, a moderator's command answered within a slot, the operator told once."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient as HttpTestClient
from aiohttp.test_utils import TestServer

from spacesync.config import parse_config
from spacesync.engine.runtime import App
from spacesync.testing import FaultProxy, Synapse, TestClient, TestUser, wait_for
from spacesync.testing.faults import LoggedRequest
from spacesync.web import make_app

RATE = 0.2
"""Synapse 1.163's shipped `rc_message`: writes per second ..."""
BURST = 10
"""... and the burst before it."""
ROOMS = 40
SLOT_S = 1 / RATE


class LimitedWorld:
    """Owner, bot and an admin on the stock homeserver. Owner and users are exempt from the limits to keep the
    set-up fast; the bot is exempt only while `setup()` lasts."""

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
async def limited_world(synapse: Synapse) -> AsyncIterator[LimitedWorld]:
    hs = synapse
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

    async def start(spaces: list[dict[str, Any]], admin_room: str, *, url: str | None = None, **extra: Any) -> App:
        w = limited_world
        config = parse_config(
            {
                "homeserver": {"url": url or w.hs.url},
                "bot": {"user_id": w.bot.user_id, "access_token": w.bot.access_token},
                "database": {"url": f"sqlite:{tmp_path}/bot.db"},
                "admin": {"room": admin_room, "users": [w.owner.user_id]},
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


@pytest.mark.timeout(600)
async def test_a_big_eviction_on_a_stock_server_goes_one_write_per_slot_and_a_command_is_answered_within_one(
    limited_world, start_limited_bot, synapse, capsys, caplog
):
    """40 rooms: the bot sends its kicks at once, the first 10 go through, the rest meet 429 once and then
    go one per granted slot; a status command sent meanwhile takes the next slot, its estimate holds, and the
    operator is told once how to lift the limit."""
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
    assert await synapse.exemption(w.bot.user_id) == {}, "the bot is under the stock limits"

    async with FaultProxy(w.hs.url) as proxy:
        app = await start_limited_bot([{"room": space}], admin_room, url=proxy.url)
        await asyncio.sleep(SLOT_S * 2)  # whatever the bot wrote at start is back in the bucket
        proxy.reset_log()
        started = time.time()
        await user.client.leave(space)

        await asyncio.sleep(20)
        asked = time.time()
        command = await owner.send_text(admin_room, "!spacesync status")
        reply = await wait_for(lambda: _reply_to(owner, admin_room, command), timeout=30, interval=0.25)
        answered = time.time() - asked
        ready = await _ready(app)

        async def all_evicted() -> bool:
            members = await asyncio.gather(*(owner.members(r) for r in rooms))
            return all(m.get(user.user_id) == "leave" for m in members)

        await wait_for(all_evicted, timeout=300, interval=1)
        kicks = [r for r in proxy.requests("/kick", "POST") if r.status == 200]
        writes = [r for r in proxy.log if _write(r) and r.status == 200 and r.at <= kicks[-1].at]
        refused = [r for r in proxy.log if _write(r) and r.status == 429 and r.at <= kicks[-1].at]
    finished = kicks[-1].at - started
    estimate = _seconds(reply)
    remaining = kicks[-1].at - asked
    logged = _logged(capsys, caplog, "the homeserver rate-limits the bot's writes")
    with capsys.disabled():
        print(
            f"{len(writes)} writes ({len(kicks)} kicks) in {finished:.1f} s, "
            f"floor {(len(writes) - BURST) / RATE:.1f} s; "
            f"{len(refused)} refused ({sum(1 for r in refused if r.at < started + 3)} in the first 3 s); "
            f"status answered in {answered:.1f} s, estimated {estimate} s, took {remaining:.1f} s"
        )

    assert len(kicks) == ROOMS
    floor = (len(writes) - BURST) / RATE  # every write of the bot draws on the one bucket: kicks, the reply
    assert finished <= 1.1 * floor, f"{len(writes)} writes took {finished:.1f} s, floor {floor:.1f} s"
    slots = len(writes) - BURST
    assert len(refused) <= slots, f"{len(refused)} refused writes in {slots} slots"
    assert answered <= 10, f"status answered after {answered:.1f} s"

    assert abs(estimate - remaining) <= 0.25 * remaining, f"estimate {estimate} s, took {remaining:.0f} s"
    assert "rate-limiting the bot's writes" in reply and "override_ratelimit" in reply
    assert ready["status"] == "ready" and "override_ratelimit" in ready["rate_limited"]["lift"], ready
    assert ready["rate_limited"]["granted_writes_per_s"] == pytest.approx(RATE, rel=0.2)

    notices = [e for e in await owner.messages(admin_room, 100) if "override_ratelimit" in _body(e)]
    told = [e for e in notices if e["sender"] == w.bot.user_id and not _in_reply(e)]
    assert len(told) == 1, "one notice for the episode"
    assert len(logged) == 1 and "override_ratelimit" in logged[0], logged
    assert quote(w.bot.user_id, safe="") in _body(told[0]) and "curl -X POST" in _body(told[0])

    await wait_for(lambda: _no_open(app), timeout=30)
    await app.executor.wait_idle()
    records = await app.store.audit_log(100, target=user.user_id)
    assert sorted(r.room_id for r in records if r.outcome == "done") == sorted(rooms)
    assert not [r for r in records if r.outcome == "failed"]


def _logged(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    """The bot's log lines with `event`: printed by structlog's default logger, or through stdlib logging."""
    printed = [line for line in capsys.readouterr().out.splitlines() if event in line]
    return printed + [str(r.msg) for r in caplog.records if event in str(r.msg)]


async def _ready(app: App) -> dict[str, Any]:
    """What `/ready` answers."""
    async with HttpTestClient(TestServer(make_app(app))) as http:
        response = await http.get("/ready")
        body: dict[str, Any] = await response.json()
        return body


def _write(request: LoggedRequest) -> bool:
    return request.method in ("PUT", "POST") and "/rooms/" in request.path and "/join" not in request.path


def _body(event: dict[str, Any]) -> str:
    return str((event.get("content") or {}).get("body", ""))


def _in_reply(event: dict[str, Any]) -> str | None:
    relates = (event.get("content") or {}).get("m.relates_to") or {}
    return (relates.get("m.in_reply_to") or {}).get("event_id")


async def _reply_to(client: TestClient, room: str, event_id: str) -> str | None:
    for event in await client.messages(room, 20):
        if _in_reply(event) == event_id:
            return _body(event)
    return None


def _seconds(text: str) -> float:
    """The status line's 'expected to finish in ~2 min 30 s' in seconds."""
    match = re.search(r"expected to finish in ~(?:(\d+) min)? ?(?:(\d+) s)?", text)
    assert match and (match[1] or match[2]), text
    return int(match[1] or 0) * 60 + int(match[2] or 0)


async def _no_open(app: App) -> bool:
    return not await app.store.journal.runnable()
