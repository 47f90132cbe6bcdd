"""Operations against the real Synapse and PostgreSQL: /health, /ready, /metrics, standby, the SQLite lock
and graceful shutdown. The bot runs in-process where that is enough, as `spacesync run` subprocesses where
the test needs a process to kill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spacesync.config import parse_config
from spacesync.engine.runtime import App
from spacesync.store import LEADER_LOCK_KEY, Store
from spacesync.testing import Synapse, TestUser, free_port, spawn_bot, wait_for
from spacesync.web import start_web

from ..conftest import unavailable

MEMBER_FILTER = json.dumps(
    {
        "presence": {"types": []},
        "account_data": {"types": []},
        "room": {
            "timeline": {"limit": 100, "types": ["m.room.member"]},
            "state": {"types": []},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
    }
)


# region helpers
def config_dict(
    synapse: Synapse,
    bot: TestUser,
    admin_room: str,
    db_url: str,
    space: str,
    *,
    port: int | None = None,
    concurrency: int = 8,
) -> dict[str, Any]:
    return {
        "homeserver": {"url": synapse.url},
        "bot": {"user_id": bot.user_id, "access_token": bot.access_token},
        "database": {"url": db_url},
        "admin": {"room": admin_room},
        "spaces": [{"room": space}],
        "max_evictions_without_confirmation": 1000,
        "executor": {"concurrency": concurrency},
        "web": {"listen": f"127.0.0.1:{port}" if port else None},
        "logging": {"level": "INFO", "format": "json"},
    }


async def http_get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of one GET; status 0 when nothing listens."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(url) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), await resp.text()
    except (TimeoutError, aiohttp.ClientError):
        return 0, "", ""


async def ready(port: int) -> tuple[int, dict[str, Any]]:
    status, _, body = await http_get(f"http://127.0.0.1:{port}/ready")
    try:
        return status, json.loads(body) if body else {}
    except ValueError:
        return status, {"raw": body}


async def wait_ready(port: int, want: int, timeout: float, reason: str | None = None) -> dict[str, Any]:
    """Poll /ready until it answers `want` (and, for a 503, names `reason`)."""
    last: list[Any] = []

    async def check() -> dict[str, Any] | None:
        status, body = await ready(port)
        last[:] = [status, body]
        if status != want:
            return None
        if reason is not None and not any(reason in r for r in body.get("reasons", [])):
            return None
        return body or {"status": status}

    try:
        return await wait_for(check, timeout=timeout, interval=0.1)
    except TimeoutError:
        raise AssertionError(
            f"/ready on :{port} never answered {want} {reason or ''} in {timeout:g} s; last answer {last}"
        ) from None


def kick_counter(metrics_text: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if (
                sample.name == "spacesync_actions_total"
                and sample.labels.get("kind") == "kick"
                and sample.labels.get("outcome") == "done"
            ):
                return sample.value
    return 0.0


@contextlib.asynccontextmanager
async def serving(config: dict[str, Any]) -> AsyncIterator[App]:
    """The bot in-process with its web listener, started the way `spacesync run` starts them."""
    conf = parse_config(config, env={})
    app = App(conf)
    assert conf.web is not None
    runner = await start_web(app, conf.web.host, conf.web.port)
    task = asyncio.create_task(app.run())
    try:
        yield app
    finally:
        app.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        await runner.cleanup()


async def build_rooms(world: Any, space: str, count: int) -> list[str]:
    return list(await asyncio.gather(*(world.room(space, f"room-{i}") for i in range(count))))


async def join_everywhere(user: TestUser, space: str, rooms: list[str]) -> None:
    await user.client.join(space)
    await asyncio.gather(*(user.client.join(r) for r in rooms))


class KickWatch:
    """A member's /sync long-poll that notices the bot's kicks of one user as they happen."""

    def __init__(self, client: Any, bot_id: str, user_id: str) -> None:
        self.client = client
        self.bot_id = bot_id
        self.user_id = user_id
        self.rooms: set[str] = set()
        self._since: str | None = None

    async def _sync(self, timeout_ms: int) -> None:
        params = {"timeout": str(timeout_ms), "filter": MEMBER_FILTER}
        if self._since:
            params["since"] = self._since
        data = await self.client.request("GET", "/_matrix/client/v3/sync", params=params)
        self._since = data["next_batch"]
        for room_id, room in ((data.get("rooms") or {}).get("join") or {}).items():
            for event in (room.get("timeline") or {}).get("events") or []:
                if (
                    event.get("type") == "m.room.member"
                    and event.get("state_key") == self.user_id
                    and event.get("sender") == self.bot_id
                    and (event.get("content") or {}).get("membership") == "leave"
                ):
                    self.rooms.add(room_id)

    async def start(self) -> None:
        await self._sync(0)
        self.rooms.clear()

    async def wait(self, at_least: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while len(self.rooms) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"saw {len(self.rooms)} kicks, expected {at_least} within {timeout:g} s")
            await self._sync(1000)
        return len(self.rooms)


async def kicks_by_room(client: Any, rooms: list[str], bot_id: str, user_id: str) -> dict[str, int]:
    """How many times the bot kicked the user in each room, from each room's timeline."""

    async def count(room: str) -> int:
        events = await client.messages(room, limit=200)
        return sum(
            1
            for e in events
            if e.get("type") == "m.room.member"
            and e.get("state_key") == user_id
            and e.get("sender") == bot_id
            and (e.get("content") or {}).get("membership") == "leave"
        )

    return dict(zip(rooms, await asyncio.gather(*(count(r) for r in rooms))))


async def still_joined(client: Any, rooms: list[str], user_id: str) -> list[str]:
    members = await asyncio.gather(*(client.joined_members(r) for r in rooms))
    return [r for r, m in zip(rooms, members) if user_id in m]


async def each_kicked_once(world: Any, rooms: list[str], user: Any, db_url: str, why: Any) -> None:
    """Wait until the user is out of every room, then check each was kicked exactly once and the journal is clean.
    `why()` gives the failure message (the processes' logs)."""

    async def all_out() -> bool:
        return not await still_joined(world.owner.client, rooms, user.user_id)

    try:
        await wait_for(all_out, timeout=60)
    except TimeoutError:
        raise AssertionError(why()) from None
    counts = await kicks_by_room(world.owner.client, rooms, world.bot.user_id, user.user_id)
    assert counts == {r: 1 for r in rooms}, {r: n for r, n in counts.items() if n != 1}
    await check_journal(db_url, rooms)


async def terminate_leader_connection(pg_url: str) -> None:
    """End the database connection that holds the leadership lock in this test's database (as a network
    cut or a PostgreSQL restart would): exactly one must hold it."""
    conn = await asyncpg.connect(pg_url)
    try:
        holders = await conn.fetch(
            "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database WHERE l.locktype = 'advisory'"
            " AND l.granted AND l.objid = $1 AND d.datname = current_database()",
            LEADER_LOCK_KEY,
        )
        assert len(holders) == 1, holders
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", holders[0]["pid"])
    finally:
        await conn.close()


async def check_journal(db_url: str, rooms: list[str]) -> None:
    """Nothing left open, and per room at most one kick that the homeserver accepted ("done").

    A room may also carry an "already_done" entry: a kick recovered after a crash, or one planned from a
    state read that raced the kick (the executor checks the membership, so nothing is sent twice)."""
    if db_url.startswith("sqlite:"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(db_url[len("sqlite:") :])) as db:
            db.row_factory = sqlite3.Row
            journal = db.execute("SELECT * FROM journal").fetchall()
            audit = db.execute("SELECT * FROM audit").fetchall()
    else:
        conn = await asyncpg.connect(db_url)
        try:
            journal = await conn.fetch("SELECT * FROM journal")
            audit = await conn.fetch("SELECT * FROM audit")
        finally:
            await conn.close()
    dump = "\n".join(str(dict(r)) for r in [*journal, *audit])
    assert {r["status"] for r in journal} == {"done"}, dump
    assert {r["kind"] for r in journal} == {"kick"}, dump
    done = [r["room_id"] for r in audit if r["kind"] == "kick" and r["outcome"] == "done"]
    assert len(done) == len(set(done)), dump
    finished = {r["room_id"] for r in audit if r["kind"] == "kick" and r["outcome"] in ("done", "already_done")}
    assert finished == set(rooms), dump


class Process:
    """`spacesync -c CONFIG run` as a child process, output in a log file."""

    def __init__(self, tmp_path: Path, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.config_path = tmp_path / f"{name}.yaml"
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log_path = tmp_path / f"{name}.log"
        self.port = int(config["web"]["listen"].rsplit(":", 1)[1]) if config["web"]["listen"] else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPACESYNC_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spacesync", "-c", str(self.config_path), "run"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.config_path.parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.proc.poll()

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def reap(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
async def processes() -> AsyncIterator[Callable[..., Process]]:
    started: list[Process] = []

    def make(tmp_path: Path, name: str, config: dict[str, Any]) -> Process:
        p = Process(tmp_path, name, config)
        started.append(p)
        return p

    yield make
    for p in started:
        p.reap()


# endregion


# region /health, /ready, /metrics
async def test_health_ready_and_metrics(world, synapse, make_user, tmp_path):
    space = await world.space("ops")
    room = await world.room(space, "ops-room")
    admin = await world.admin_room()
    user = await make_user("leaver")
    await join_everywhere(user, space, [room])
    port = free_port()
    config = config_dict(synapse, world.bot, admin, f"sqlite:{tmp_path}/bot.db", space, port=port)
    base = f"http://127.0.0.1:{port}"
    async with serving(config) as app:
        status, ctype, body = await http_get(f"{base}/health")
        assert status == 200 and ctype.startswith("application/json")
        assert json.loads(body)["status"] == "ok"

        body = await wait_ready(port, 200, timeout=30)
        assert body == {"status": "ready"}
        assert app.leader and app.logged_in and app.synced

        status, ctype, text = await http_get(f"{base}/metrics")
        assert status == 200
        assert ctype.startswith("text/plain"), ctype
        families = list(text_string_to_metric_families(text))
        assert families, "no metrics at all"
        ours = ("spacesync_", "process_")  # and the standard process collector's (memory, CPU, file descriptors)
        for family in families:
            assert family.name.startswith(ours), family.name
            for sample in family.samples:
                assert sample.name.startswith(ours), sample.name
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                assert line.split()[2].startswith(ours), line
            elif line and not line.startswith("#"):
                assert line.startswith(ours), line
        names = {f.name for f in families}
        assert {"spacesync_actions", "spacesync_leader", "spacesync_homeserver_request_seconds"} <= names
        assert {"process_resident_memory_bytes", "spacesync_bytes_read", "spacesync_reconcile_bytes_read"} <= names
        samples = {s.name: s.value for f in families for s in f.samples if not s.labels}
        assert samples["process_resident_memory_bytes"] > 0
        assert samples["spacesync_reconcile_bytes_read"] > 0, "the first full reconcile read the world"
        before = kick_counter(text)

        await user.client.leave(space)

        async def gone() -> bool:
            return user.user_id not in await world.owner.client.joined_members(room)

        await wait_for(gone, timeout=30)

        async def counted() -> float:
            _, _, text = await http_get(f"{base}/metrics")
            after = kick_counter(text)
            return after if after >= before + 1 else 0.0

        after = await wait_for(counted, timeout=15)
        assert after == before + 1


async def test_ready_says_why_while_the_homeserver_is_down(tmp_path):
    hs = Synapse(tmp_path / "hs")
    try:
        await hs.start()
    except (RuntimeError, OSError) as e:
        unavailable(f"cannot start Synapse: {e}")
    owner = bot = None
    try:
        owner = await hs.register("owner")
        bot = await hs.register("bot")
        levels = {"users": {owner.user_id: 100, bot.user_id: 100}}
        space = await owner.client.create_space(name="S", join_rule="public", power_level_content_override=levels)
        await bot.client.join(space)
        admin = await owner.client.create_room(name="admin", join_rule="invite", power_level_content_override=levels)
        await owner.client.invite(admin, bot.user_id)
        await bot.client.join(admin)
        port = free_port()
        config = config_dict(hs, bot, admin, f"sqlite:{tmp_path}/bot.db", space, port=port)
        async with serving(config) as app:
            await wait_ready(port, 200, timeout=30)

            await hs.kill()
            body = await wait_ready(port, 503, timeout=15, reason="homeserver unreachable")
            assert body["status"] == "unready"
            assert app.leader  # still the acting instance: only the homeserver is missing
            status, _, _ = await http_get(f"http://127.0.0.1:{port}/health")
            assert status == 200  # alive, though not ready

            await hs.start()  # same port, same database
            await wait_ready(port, 200, timeout=60)
    finally:
        for user in (owner, bot):
            if user is not None:
                await user.client.close()
        await hs.stop()


# endregion


# region standby, the SQLite lock, shutdown
@pytest.mark.slow
async def test_standby_takes_over_after_kill_9_and_finishes_exactly_once(
    world, synapse, make_user, pg_url, tmp_path, processes
):
    space = await world.space("ha")
    rooms = await build_rooms(world, space, 30)
    admin = await world.admin_room()
    user = await make_user("leaver")
    await join_everywhere(user, space, rooms)

    base = config_dict(synapse, world.bot, admin, pg_url, space, concurrency=1)
    first = processes(tmp_path, "first", {**base, "web": {"listen": f"127.0.0.1:{free_port()}"}}).start()
    await wait_ready(first.port, 200, timeout=60)
    second = processes(tmp_path, "second", {**base, "web": {"listen": f"127.0.0.1:{free_port()}"}}).start()
    body = await wait_ready(second.port, 503, timeout=60, reason="standing by")
    assert body["status"] == "unready"
    await asyncio.sleep(1)
    assert (await ready(first.port))[0] == 200, "the active instance lost its leadership"
    assert (await ready(second.port))[0] == 503, "two instances act at once"

    watch = KickWatch(world.owner.client, world.bot.user_id, user.user_id)
    await watch.start()
    await user.client.leave(space)
    await watch.wait(1, timeout=30)
    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert await first.wait_exit(10) == -signal.SIGKILL
    left = await still_joined(world.owner.client, rooms, user.user_id)
    assert left, "the first instance finished every kick before it was killed: nothing left to take over"

    await wait_ready(second.port, 200, timeout=15)
    took_over = time.monotonic() - killed_at
    assert took_over <= 15

    await each_kicked_once(world, rooms, user, pg_url, lambda: f"the standby did not finish; its log:\n{second.log()}")

    second.signal(signal.SIGTERM)
    assert await second.wait_exit(15) == 0, second.log()


@pytest.mark.slow
async def test_active_instance_that_loses_its_lock_stands_by_and_takes_over_again(
    world, synapse, make_user, pg_url, tmp_path, processes
):
    """PostgreSQL frees the advisory lock when the lock's connection drops (a restart, a network cut, an
    operator's pg_terminate_backend): the standby then takes over, so the old leader stops acting; it keeps
    running as the standby, and leads again once the other instance is gone."""
    space = await world.space("split")
    room = await world.room(space, "split-room")
    admin = await world.admin_room()
    user = await make_user("leaver")
    await join_everywhere(user, space, [room])
    base = config_dict(synapse, world.bot, admin, pg_url, space)
    first = processes(tmp_path, "first", {**base, "web": {"listen": f"127.0.0.1:{free_port()}"}}).start()
    await wait_ready(first.port, 200, timeout=60)
    second = processes(tmp_path, "second", {**base, "web": {"listen": f"127.0.0.1:{free_port()}"}}).start()
    await wait_ready(second.port, 503, timeout=60, reason="standing by")

    await terminate_leader_connection(pg_url)

    await wait_ready(second.port, 200, timeout=15)
    await wait_ready(first.port, 503, timeout=15, reason="standing by")
    assert await first.wait_exit(3) is None, f"the old leader exited:\n{first.log()}"
    assert "lost the leadership lock" in first.log(200), first.log()

    second.signal(signal.SIGKILL)
    assert await second.wait_exit(10) == -signal.SIGKILL
    await wait_ready(first.port, 200, timeout=15)
    await user.client.leave(space)

    async def kicked() -> bool:
        return user.user_id not in await world.owner.client.joined_members(room)

    try:
        await wait_for(kicked, timeout=30)
    except TimeoutError:
        raise AssertionError(f"the instance that led again does not act; its log:\n{first.log()}") from None
    assert first.proc is not None and first.proc.poll() is None


@pytest.mark.slow
async def test_lock_lost_alone_stands_by_then_leads_again(
    world, synapse, make_user, pg_url, pg_proxy, tmp_path, processes
):
    """With no standby to take over, an instance whose database goes away (connections cut, new ones
    refused) stands by, says why on /ready, and leads again once the database is back, without exiting."""
    space = await world.space("alone")
    room = await world.room(space, "alone-room")
    admin = await world.admin_room()
    user = await make_user("leaver")
    await join_everywhere(user, space, [room])
    config = config_dict(synapse, world.bot, admin, pg_proxy.dsn(pg_url), space, port=free_port())
    bot = processes(tmp_path, "alone", config).start()
    await wait_ready(bot.port, 200, timeout=60)

    pg_proxy.refuse()
    pg_proxy.cut()
    body = await wait_ready(bot.port, 503, timeout=15, reason="standing by")
    assert "database unreachable" in body["reasons"], body

    async def metrics_say_down() -> bool:
        _, _, metrics = await http_get(f"http://127.0.0.1:{bot.port}/metrics")
        return "spacesync_leader 0.0" in metrics and "spacesync_database_up 0.0" in metrics

    await wait_for(metrics_say_down, timeout=15, message="the metrics never showed the outage")
    await asyncio.sleep(2)
    assert await bot.wait_exit(0) is None, f"the bot exited:\n{bot.log()}"
    pg_proxy.accept()

    await wait_ready(bot.port, 200, timeout=30)
    log = bot.log(300)
    assert "lost the leadership lock" in log and "taking over" in log, log
    assert "Traceback" not in log, log
    await user.client.leave(space)

    async def kicked() -> bool:
        return user.user_id not in await world.owner.client.joined_members(room)

    try:
        await wait_for(kicked, timeout=30)
    except TimeoutError:
        raise AssertionError(f"the bot does not act after the database came back; its log:\n{bot.log()}") from None
    bot.signal(signal.SIGTERM)
    assert await bot.wait_exit(15) == 0, bot.log()


@pytest.mark.slow
async def test_database_blip_mid_batch_under_active_and_standby(
    world, synapse, make_user, pg_url, pg_proxy, tmp_path, processes
):
    """Every database connection cut and new ones refused for ~5 s while a batch runs: both instances keep
    running, one of them leads afterwards, and the batch completes with each room kicked exactly once."""
    space = await world.space("blip")
    rooms = await build_rooms(world, space, 40)
    admin = await world.admin_room()
    user = await make_user("leaver")
    await join_everywhere(user, space, rooms)
    base = config_dict(synapse, world.bot, admin, pg_proxy.dsn(pg_url), space, concurrency=1)
    first = processes(tmp_path, "first", {**base, "web": {"listen": f"127.0.0.1:{free_port()}"}}).start()
    await wait_ready(first.port, 200, timeout=60)
    second = processes(tmp_path, "second", {**base, "web": {"listen": f"127.0.0.1:{free_port()}"}}).start()
    await wait_ready(second.port, 503, timeout=60, reason="standing by")

    watch = KickWatch(world.owner.client, world.bot.user_id, user.user_id)
    await watch.start()
    await user.client.leave(space)
    await watch.wait(1, timeout=30)
    pg_proxy.refuse()
    pg_proxy.cut()
    left = await still_joined(world.owner.client, rooms, user.user_id)
    assert left, "every kick ran before the database went away: nothing was cut short"
    for p in (first, second):
        await wait_ready(p.port, 503, timeout=15, reason="database unreachable")
    await asyncio.sleep(5)
    pg_proxy.accept()

    async def one_leader() -> list[int] | None:
        codes = [(await ready(p.port))[0] for p in (first, second)]
        return codes if sorted(codes) == [200, 503] else None

    try:
        await wait_for(one_leader, timeout=30)
    except TimeoutError:
        raise AssertionError(
            f"no single leader after the blip\nfirst:\n{first.log()}\nsecond:\n{second.log()}"
        ) from None

    await each_kicked_once(
        world, rooms, user, pg_url, lambda: f"the batch did not finish\nfirst:\n{first.log()}\nsecond:\n{second.log()}"
    )
    for p in (first, second):
        assert p.proc is not None and p.proc.poll() is None, f"{p.name} exited:\n{p.log()}"
        assert "Traceback" not in p.log(1000), p.log(1000)
    codes = sorted([(await ready(p.port))[0] for p in (first, second)])
    assert codes == [200, 503], codes
    for p in (first, second):
        p.signal(signal.SIGTERM)
        assert await p.wait_exit(15) == 0, p.log()


async def test_sqlite_second_instance_refuses_to_start(world, synapse, start_bot, tmp_path):
    space = await world.space("lock")
    admin = await world.admin_room()
    db_url = f"sqlite:{tmp_path}/bot.db"
    await start_bot([{"room": space}], db_url=db_url, admin_room=admin)
    config_path = tmp_path / "second.yaml"
    config = config_dict(synapse, world.bot, admin, db_url, space)
    config_path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPACESYNC_")}
    proc = await spawn_bot(config_path, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
    err = stderr.decode()
    assert proc.returncode not in (0, None), err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("spacesync: database.url:"), lines[0]
    assert "another spacesync instance" in lines[0]


@pytest.mark.slow
async def test_sigterm_mid_batch_exits_cleanly_and_a_restart_finishes(world, synapse, make_user, tmp_path, processes):
    space = await world.space("stop")
    rooms = await build_rooms(world, space, 30)
    admin = await world.admin_room()
    user = await make_user("leaver")
    await join_everywhere(user, space, rooms)
    config = config_dict(synapse, world.bot, admin, f"sqlite:{tmp_path}/bot.db", space, port=free_port(), concurrency=1)

    first = processes(tmp_path, "first", config).start()
    await wait_ready(first.port, 200, timeout=60)
    watch = KickWatch(world.owner.client, world.bot.user_id, user.user_id)
    await watch.start()
    await user.client.leave(space)
    await watch.wait(1, timeout=30)
    first.signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    code = await first.wait_exit(10)
    assert code == 0, f"exit {code} {time.monotonic() - stopped_at:.1f} s after SIGTERM:\n{first.log()}"
    left = await still_joined(world.owner.client, rooms, user.user_id)
    assert left, "every kick ran after SIGTERM: a stopping bot should not start new actions"

    again = processes(tmp_path, "again", config).start()
    await wait_ready(again.port, 200, timeout=60)

    await each_kicked_once(
        world,
        rooms,
        user,
        config["database"]["url"],
        lambda: f"the restarted bot did not finish; its log:\n{again.log()}",
    )
    again.signal(signal.SIGTERM)
    assert await again.wait_exit(15) == 0, again.log()


# endregion


async def test_no_action_is_sent_once_the_lock_cannot_be_confirmed(world, synapse, make_user, pg_url, fault_proxy):
    """A kick waits out a 429 while the lock's connection is terminated: the instance must not send it
    again once the wait ends, since it no longer holds the lock; it sends it only after taking the lock
    back (checking first that the user is not already out)."""
    space = await world.space("fence")
    room = await world.room(space, "fence-room")
    admin = await world.admin_room()
    user = await make_user("leaver")
    await join_everywhere(user, space, [room])
    port = free_port()
    config = config_dict(synapse, world.bot, admin, pg_url, space, port=port)
    config["homeserver"]["url"] = fault_proxy.url
    async with serving(config) as app:
        await wait_ready(port, 200, timeout=30)
        limited = fault_proxy.rate_limit(r"/kick$", retry_after_ms=3000, method="POST", times=1)
        await user.client.leave(space)
        await wait_for(lambda: limited.hits == 1, timeout=30, message="the kick never reached the homeserver")

        await terminate_leader_connection(pg_url)
        await wait_for(lambda: not app.leader, timeout=10, message="the lost lock went unnoticed")
        deadline = time.monotonic() + 30
        while not app.leader:
            assert fault_proxy.count(r"/kick$", method="POST") == 1, "a kick was sent without the lock"
            assert time.monotonic() < deadline, "the instance never took the lock back"
            await asyncio.sleep(0.05)

        async def kicked() -> bool:
            return user.user_id not in await world.owner.client.joined_members(room)

        await wait_for(kicked, timeout=30)
        assert await kicks_by_room(world.owner.client, [room], world.bot.user_id, user.user_id) == {room: 1}
        assert fault_proxy.count(r"/kick$", method="POST") == 2


# region commands across a crash
def _replies(events: list[dict[str, Any]], bot_id: str, event_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("sender") == bot_id
        and (e.get("content") or {}).get("msgtype") == "m.notice"
        and ((e["content"].get("m.relates_to") or {}).get("m.in_reply_to") or {}).get("event_id") == event_id
    ]


@pytest.mark.slow
async def test_commands_received_before_kill_9_are_answered_once_after_restart(
    world, synapse, fault_proxy, tmp_path, processes
):
    """Two commands: the first is running (its reply reached the homeserver, the answer to the bot is held
    back), the second is queued behind it. kill -9, restart: the second is run and answered, the first is
    not run again and keeps its single reply."""
    space = await world.space("cmd")
    admin = await world.admin_room()
    db_url = f"sqlite:{tmp_path}/bot.db"
    config = config_dict(synapse, world.bot, admin, db_url, space, port=free_port())
    config["admin"]["users"] = [world.owner.user_id]
    held = fault_proxy.delay_response(r"/send/m\.room\.message/spacesync-reply-", 120, method="PUT", times=1)
    first = processes(tmp_path, "first", {**config, "homeserver": {"url": fault_proxy.url}}).start()
    await wait_ready(first.port, 200, timeout=60)
    await asyncio.sleep(1)  # commands are read from the second /sync answer on

    running = await world.owner.client.send_text(admin, "!ss status")
    await wait_for(lambda: held.hits == 1, timeout=30, message="the first reply never left the bot")
    waiting = await world.owner.client.send_text(admin, "!ss exempt add @someone:localhost")

    def queued() -> bool:
        import sqlite3

        with contextlib.closing(sqlite3.connect(db_url[len("sqlite:") :])) as db:
            return db.execute("SELECT 1 FROM command_queue WHERE event_id=?", (waiting,)).fetchone() is not None

    await wait_for(queued, timeout=30, message="the second command never reached the database")
    first.signal(signal.SIGKILL)
    assert await first.wait_exit(10) == -signal.SIGKILL
    events = await world.owner.client.messages(admin, limit=50)
    assert len(_replies(events, world.bot.user_id, running)) == 1  # sent before the kill, answer held back
    assert not _replies(events, world.bot.user_id, waiting)

    again = processes(tmp_path, "again", config).start()
    await wait_ready(again.port, 200, timeout=60)

    async def answered() -> list[dict[str, Any]] | None:
        found = _replies(await world.owner.client.messages(admin, limit=50), world.bot.user_id, waiting)
        return found or None

    try:
        reply = (await wait_for(answered, timeout=30))[0]
    except TimeoutError:
        raise AssertionError(f"the queued command was not answered after the restart:\n{again.log()}") from None
    assert "exempt" in reply["content"]["body"].lower(), reply
    await asyncio.sleep(3)  # time for a wrong second answer to show
    events = await world.owner.client.messages(admin, limit=50)
    assert len(_replies(events, world.bot.user_id, waiting)) == 1
    replies = _replies(events, world.bot.user_id, running)
    assert len(replies) == 1, replies
    assert "State:" in replies[0]["content"]["body"]  # the original answer, not a second one
    assert "command cut short" in again.log(200)
    again.signal(signal.SIGTERM)
    assert await again.wait_exit(15) == 0, again.log()

    store = Store(db_url)
    await store.start()
    try:
        assert await store.pending_commands() == []
        assert await store.exempt_users() == {"@someone:localhost"}
    finally:
        await store.stop()


# endregion
