"""`spacesync run` as a real process: kill -9 mid-eviction, SIGTERM, and a homeserver that goes away."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from spacesync.store import Status, Store
from spacesync.testing import Synapse, TestUser, spawn_bot, wait_for

from ..conftest import unavailable

ROOMS = 40


class BotProcess:
    """`python -m spacesync -c <config> run` in its own session, its stderr (JSON log lines) in a file."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = await spawn_bot(
                self.config_path, self.config_path.parent, stdout=log, stderr=log, start_new_session=True
            )

    @property
    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    async def wait_event(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        count: int = 1,
        timeout: float = 30.0,
        interval: float = 0.1,
    ) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]] | None:
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(f"the bot exited with {self.proc.returncode}:\n{self.text[-3000:]}")
            matches = [e for e in self.events() if predicate(e)]
            return matches if len(matches) >= count else None

        return await wait_for(
            found, timeout=timeout, interval=interval, message=f"log event not seen; log tail:\n{self.text[-3000:]}"
        )

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def reap(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def reconciled(event: dict[str, Any]) -> bool:
    return event.get("event") == "reconciled"


def kicked(user_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e.get("event") == "action"
        and e.get("action") == "kick"
        and e.get("user") == user_id
        and e.get("outcome") in ("done", "already_done")
    )


@pytest.fixture
async def bot_process(tmp_path: Path) -> AsyncIterator[Callable[..., BotProcess]]:
    """`bot_process(homeserver_url, bot, admin_room, db_url, spaces, **extra)` writes a config file and
    returns an unstarted BotProcess; every process is killed at the end of the test."""
    made: list[BotProcess] = []

    def make(
        homeserver_url: str, bot: TestUser, admin_room: str, db_url: str, spaces: list[dict[str, Any]], **extra: Any
    ) -> BotProcess:
        n = len(made)
        config = {
            "homeserver": {"url": homeserver_url},
            "bot": {"user_id": bot.user_id, "access_token": bot.access_token},
            "database": {"url": db_url},
            "admin": {"room": admin_room, "users": []},
            "spaces": spaces,
            "web": {"listen": None},
            "logging": {"level": "INFO", "format": "json"},
            **extra,
        }
        path = tmp_path / f"config{n}.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        process = BotProcess(path, tmp_path / f"bot{n}.log")
        made.append(process)
        return process

    yield make
    for process in made:
        await process.reap()


def synapse_url(world) -> str:
    return world.owner.client.base_url


async def kick_events(client, room_id: str, user_id: str, bot_id: str) -> int:
    """How many times the bot kicked `user_id` in the room, read from the room's timeline."""
    events = await client.messages(room_id, limit=200)
    assert any(e.get("type") == "m.room.create" for e in events), "the timeline was not read to its start"
    return sum(
        1
        for e in events
        if e.get("type") == "m.room.member"
        and e.get("state_key") == user_id
        and (e.get("content") or {}).get("membership") == "leave"
        and e.get("sender") == bot_id
    )


async def test_kill_9_mid_eviction_kicks_each_room_exactly_once(world, make_user, bot_process, db_url):
    space = await world.space("S")
    rooms = list(await asyncio.gather(*(world.room(space, f"R{i}") for i in range(ROOMS))))
    user = await make_user("leaver")
    await user.client.join(space)
    await asyncio.gather(*(user.client.join(r) for r in rooms))
    admin_room = await world.admin_room()
    owner = world.owner.client

    async def still_in() -> list[str]:
        joined = await asyncio.gather(*(owner.joined_members(r) for r in rooms))
        return [r for r, members in zip(rooms, joined) if user.user_id in members]

    assert len(await still_in()) == ROOMS
    spaces = [{"room": space, "max_evictions_without_confirmation": ROOMS}]
    first = bot_process(synapse_url(world), world.bot, admin_room, db_url, spaces, executor={"concurrency": 1})
    await first.start()
    await first.wait_event(reconciled, timeout=30)

    await user.client.leave(space)
    await first.wait_event(kicked(user.user_id), count=3, timeout=30, interval=0.005)
    first.signal(signal.SIGKILL)
    assert await first.wait(10) == -signal.SIGKILL
    remaining = await still_in()
    assert 0 < len(remaining) < ROOMS, f"kill -9 missed the window: {len(remaining)} rooms left"

    second = bot_process(synapse_url(world), world.bot, admin_room, db_url, spaces, executor={"concurrency": 1})
    await second.start()

    async def all_gone() -> bool:
        return not await still_in()

    await wait_for(all_gone, timeout=60, interval=0.5, message=f"not evicted everywhere:\n{second.text[-3000:]}")

    counts = await asyncio.gather(*(kick_events(owner, r, user.user_id, world.bot.user_id) for r in rooms))
    assert counts == [1] * ROOMS, dict(zip(rooms, counts))

    second.signal(signal.SIGTERM)
    assert await second.wait(10) == 0
    assert "Traceback" not in second.text

    # The bot's own records agree: one finished kick per room, nothing left open.
    store = Store(db_url)
    await store.start()
    try:
        records = await store.audit_log(1000, target=user.user_id)
        assert not await store.journal.by_status(Status.PENDING, Status.RUNNING, Status.HELD, Status.FAILED)
    finally:
        await store.stop()
    finished = sorted(r.room_id for r in records if r.kind == "kick" and r.outcome in ("done", "already_done"))
    assert finished == sorted(rooms)


async def test_sigterm_exits_0_within_10s(world, bot_process, tmp_path):
    space = await world.space("S")
    await world.room(space, "R")
    admin_room = await world.admin_room()
    bot = bot_process(synapse_url(world), world.bot, admin_room, f"sqlite:{tmp_path}/bot.db", [{"room": space}])
    await bot.start()
    await bot.wait_event(reconciled, timeout=30)

    bot.signal(signal.SIGTERM)
    assert await bot.wait(10) == 0
    assert "Traceback" not in bot.text
    assert any(e.get("event") == "stopped" for e in bot.events())


async def test_bot_recovers_when_the_homeserver_restarts(tmp_path, bot_process):
    hs = Synapse(tmp_path / "synapse")
    try:
        await hs.start()
    except (RuntimeError, OSError) as e:
        unavailable(f"cannot start Synapse: {e}")
    users: list[TestUser] = []
    try:
        owner, bot, user = [await hs.register(f"{name}") for name in ("owner", "bot", "leaver")]
        users += [owner, bot, user]
        levels = {"users": {owner.user_id: 100, bot.user_id: 100}}
        space = await owner.client.create_space(name="S", join_rule="public", power_level_content_override=levels)
        room = await owner.client.create_room(
            name="R", join_rule="restricted", allow=[space], power_level_content_override=levels
        )
        await owner.client.add_child(space, room)
        admin_room = await owner.client.create_room(name="admin", join_rule="invite", invite=[bot.user_id])
        for r in (space, room, admin_room):
            await bot.client.join(r)
        for r in (space, room):
            await user.client.join(r)

        process = bot_process(hs.url, bot, admin_room, f"sqlite:{tmp_path}/bot.db", [{"room": space}])
        await process.start()
        await process.wait_event(reconciled, timeout=30)

        await hs.kill()
        await process.wait_event(lambda e: e.get("event", "").startswith("homeserver unreachable"), timeout=30)
        await hs.restart()
        for u in users:
            await u.client.close()  # drop connections to the killed server
        await process.wait_event(lambda e: e.get("event") == "homeserver reachable again", timeout=90)

        await user.client.leave(space)

        async def evicted() -> bool:
            return (await owner.client.members(room)).get(user.user_id) == "leave"

        await wait_for(evicted, timeout=30, message=f"not evicted after the restart:\n{process.text[-3000:]}")
        assert process.proc.returncode is None, "the bot exited"
        process.signal(signal.SIGTERM)
        assert await process.wait(10) == 0
        assert "Traceback" not in process.text, process.text[-5000:]
    finally:
        for u in users:
            await u.client.close()
        await hs.stop()
