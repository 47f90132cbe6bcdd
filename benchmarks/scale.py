"""Scale: the whole bot (`spacesync run`, its own process) against a Space of 1,000 rooms x 1,000 members.

The world is served by a synthetic homeserver (benchmarks/synthetic.py, its own process): Synapse-shaped
events, the endpoints spacesync calls, /sync honouring the filter. Everything is measured from outside,
over the client-server API and /proc, so the script keeps working whatever the bot does inside:

- peak RSS (VmHWM of the bot process, sampled and read last) and RSS at steady state;
- bytes per member entry: (steady RSS - RSS of the same bot against an empty world) / member entries;
- cold start: process start until the bot logs its first full reconcile (`reconciled`, trigger
  `reconcile`), against the floor: a plain aiohttp client reading every room's `/state` once at the
  same concurrency (ratio, goal <= 2);
- the requests and bytes of the initial /sync and of the `/state` reads;
- a no-op full reconcile (`!spacesync sync` in the admin room): requests, bytes, time;
- one user leaves the Space: time to the first and the last kick;
- an exodus (1,000 users leave at once): time until the mass-action guard's held notice, and that
  nothing was kicked.

    .venv/bin/python benchmarks/scale.py                      # 1000 rooms x 1000 members, 10000 users
    .venv/bin/python benchmarks/scale.py --quick              # 100 x 100, 1000 users
    .venv/bin/python benchmarks/scale.py --synapse            # 100 x 100 on a real Synapse and on the
                                                              # synthetic server: request counts compared
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    admin_room,
    bounded,
    build_space,
    homeserver,
    in_flight,
    print_machine,
    print_result,
    print_table,
    process_cpu_s,
    q,
    run,
)

from spacesync.testing import spawn_bot

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL_PEAK_MB = 250
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    # rooms, members per room, users (all in the Space), exodus, peak RSS goal (MiB)
    "1000x1000": (1000, 1000, 10_000, 1000, 150),
    "10000x100": (10_000, 100, 10_000, 1000, 250),
    "space100k": (300, 1000, 100_000, 10_000, 250),
}
"""The community shapes measured: many big rooms, many small rooms, one huge Space with a few hundred rooms."""
GOAL_EXODUS_S = 2.0
GOAL_BYTES_PER_ENTRY = 150
GOAL_COLD_RATIO = 2.0
GOAL_FIRST_KICK_MS = 50
TIMEOUT = 3600.0


def mib(n: float) -> str:
    return f"{n / 1024 / 1024:.0f} MiB"


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


# region the homeserver process (synthetic or a recording proxy)
class HomeserverProcess:
    """benchmarks/synthetic.py in its own process: `serve` a generated world or `proxy` a real homeserver."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.session: aiohttp.ClientSession | None = None
        self.seen = 0
        self.records: list[list[Any]] = []

    async def __aenter__(self) -> HomeserverProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "synthetic.py"), *self.args, stdout=asyncio.subprocess.PIPE
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 1800)
        if not line.startswith(b"ready "):
            raise RuntimeError(f"the synthetic homeserver did not start: {line!r}")
        self.url = line.split()[1].decode()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=600)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        assert self.session is not None
        async with self.session.request(method, self.url + path, json=body, params=params) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def fetch(self) -> list[list[Any]]:
        """Every request recorded so far: [index, start, end, method, class, who, status, bytes, room, note]."""
        data = await self.call("GET", "/_bench/requests", after=len(self.records))
        self.records.extend(data["records"])
        return self.records

    async def mark(self) -> int:
        return len(await self.fetch())

    async def bot_since(self, mark: int) -> list[list[Any]]:
        return [r for r in (await self.fetch())[mark:] if r[5] == "bot"]


def by_class(records: list[list[Any]]) -> dict[str, dict[str, float]]:
    """Requests, response bytes and summed request time per endpoint class."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"requests": 0, "bytes": 0, "seconds": 0.0})
    for r in records:
        c = out[r[4]]
        c["requests"] += 1
        c["bytes"] += r[7]
        c["seconds"] += r[2] - r[1]
    return dict(sorted(out.items()))


def totals(classes: dict[str, dict[str, float]], *, without_sync: bool = False) -> tuple[int, int]:
    picked = [v for k, v in classes.items() if not (without_sync and k.startswith("sync"))]
    return int(sum(v["requests"] for v in picked)), int(sum(v["bytes"] for v in picked))


# endregion


# region the bot process
def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes (empty once it is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


class BotProcess:
    """`python -m spacesync -c <config> run` with its log in a file, its memory sampled every 100 ms."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log_path = workdir / "spacesync.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.started_wall = 0.0
        self.started = 0.0
        self.peak_rss = 0
        self.hwm = 0
        self._sampler: asyncio.Task[None] | None = None
        self._log_offset = 0
        self._buffer = b""
        self.lines: list[dict[str, Any]] = []

    async def __aenter__(self) -> BotProcess:
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        self.started_wall, self.started = time.time(), time.monotonic()
        self.proc = await spawn_bot(self.config_path, ROOT, stdout=log, stderr=log)
        log.close()
        self._sampler = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sample()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def sample(self) -> int:
        status = read_status(self.pid)
        rss = status.get("VmRSS", 0)
        self.peak_rss = max(self.peak_rss, rss)
        self.hwm = max(self.hwm, status.get("VmHWM", 0))
        return rss

    async def _sample(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.1)

    def cpu_s(self) -> float:
        try:
            return process_cpu_s(self.pid)
        except OSError:
            return 0.0

    def _read_log(self) -> None:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        self._log_offset += len(data)
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n")
        for raw in complete:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": raw.decode(errors="replace"), "raw": True}
            if isinstance(line, dict):
                self.lines.append(line)

    def log_tail(self, n: int = 15) -> str:
        self._read_log()
        return "\n".join(json.dumps(x)[:400] for x in self.lines[-n:])

    async def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, after: int = 0
    ) -> tuple[int, dict[str, Any]]:
        """The first log line (from index `after`) matching; its index and the line."""
        deadline = time.monotonic() + timeout
        while True:
            self._read_log()
            for i in range(after, len(self.lines)):
                if predicate(self.lines[i]):
                    return i, self.lines[i]
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"the bot exited ({self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bot did not log what was awaited within {timeout:g} s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    def since_start(self, line: dict[str, Any]) -> float:
        """Seconds from the process start to a log line (its own timestamp)."""
        return datetime.fromisoformat(line["timestamp"]).timestamp() - self.started_wall

    async def quiet(self, *, window: float = 1.0, busy: float = 0.05, timeout: float = 600.0) -> None:
        """Wait until the bot uses under `busy` of a core over `window` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = self.cpu_s()
            await asyncio.sleep(window)
            if self.cpu_s() - before < busy * window:
                return


def reconciled(trigger: str) -> Callable[[dict[str, Any]], bool]:
    return lambda line: line.get("event") == "reconciled" and line.get("trigger") == trigger


PERIODIC_S = 30
"""The benchmark's reconcile_interval (--periodic); reread_interval is 24 times it, the ratio of the
defaults (1h, 24h), so a periodic reconcile reads the share of rooms it reads at the defaults."""


def bot_config(url: str, bot: str, token: str, admin: str, space: str, workdir: Path, concurrency: int) -> dict:
    return {
        "reconcile_interval": f"{PERIODIC_S}s",
        "reread_interval": f"{PERIODIC_S * 24}s",
        "homeserver": {"url": url, "request_timeout": "120s"},
        "bot": {"user_id": bot, "access_token": token},
        "database": {"url": f"sqlite:///{workdir}/spacesync.db"},
        "admin": {"room": admin},
        "spaces": [{"room": space}],
        "max_evictions_without_confirmation": 25,
        "walk": {"max_rooms": 100_000, "max_seconds": 3600, "concurrency": concurrency},
        "web": {"listen": None},
        "logging": {"level": "INFO", "format": "json"},
    }


# endregion


# region the world as the benchmark sees it (either homeserver)
@dataclass
class World:
    url: str
    """Where the bot connects (the synthetic server or the recording proxy)."""
    space: str
    admin: str
    children: list[str]
    bot: str
    bot_token: str
    owner: str
    owner_token: str
    member_entries: int
    leaver: str
    leaver_rooms: list[str]
    exodus: list[str]
    leave: Callable[[list[str]], Any]
    """Users leave the Space; returns when done."""
    say: Callable[[str], Any]
    """The owner says something in the admin room."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def all_rooms(self) -> list[str]:
        return [self.space, self.admin, *self.children]


async def floor(world: World, concurrency: int, rounds: int = 2) -> dict[str, float]:
    """A plain client reads every room's state once, `concurrency` requests in flight (best of `rounds`)."""
    best: dict[str, float] = {}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        headers = {"Authorization": f"Bearer {world.owner_token}"}
        for _ in range(rounds):
            size = 0

            async def read(room: str) -> None:
                nonlocal size
                url = f"{world.url}/_matrix/client/v3/rooms/{q(room)}/state"
                async with session.get(url, headers=headers) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"GET /state answered {resp.status}")
                    json.loads(body)  # a client reads what it gets
                    size += len(body)

            cpu, started = time.process_time(), time.monotonic()
            await in_flight(world.all_rooms, concurrency, read)
            took = time.monotonic() - started
            if not best or took < best["seconds"]:
                best = {
                    "seconds": took,
                    "bytes": size,
                    "rooms": len(world.all_rooms),
                    "cpu_s": time.process_time() - cpu,
                }
    return best


async def sample_member(world: World) -> str:
    """One user's member event in the first child, as /state returns it (to compare the servers' shapes)."""
    async with aiohttp.ClientSession() as session:
        url = f"{world.url}/_matrix/client/v3/rooms/{q(world.children[0])}/state"
        async with session.get(url, headers={"Authorization": f"Bearer {world.owner_token}"}) as resp:
            state = await resp.json()
    event = next(e for e in state if e["type"] == "m.room.member" and e["state_key"] not in (world.owner, world.bot))
    return json.dumps(event, separators=(",", ":"))


# endregion


async def measure(
    hs: HomeserverProcess, world: World, workdir: Path, concurrency: int, empty_rss: int, label: str
) -> dict[str, Any]:
    """Start the bot and take it through cold start, a no-op reconcile, one leave and an exodus."""
    out: dict[str, Any] = {"label": label}
    mark = await hs.mark()
    config = bot_config(world.url, world.bot, world.bot_token, world.admin, world.space, workdir, concurrency)
    async with BotProcess(workdir, config) as bot:
        print(f"[{label}] bot started (pid {bot.pid}); waiting for its first full reconcile")
        i, line = await bot.wait_log(reconciled("reconcile"), TIMEOUT)
        cold = bot.since_start(line)
        print(f"[{label}] first full reconcile {cold:.1f} s after the start; peak RSS so far {mib(bot.peak_rss)}")
        # Start-up ends once the initial /sync is in and the bot is idle: what that answer triggers is start-up.
        await wait_records(hs, mark, lambda r: r[4] == "sync (initial)", TIMEOUT)
        await bot.quiet()
        startup = await hs.bot_since(mark)
        initial = [r for r in startup if r[4] == "sync (initial)"]
        out["cold_start_s"] = cold
        out["first_plan"] = {k: line.get(k) for k in ("planned", "queued", "held", "managed", "findings", "seconds")}
        out["startup"] = by_class(startup)
        out["initial_sync"] = {
            "requests": len(initial),
            "bytes": sum(r[7] for r in initial),
            "served_s": sum(r[2] - r[1] for r in initial),
            "done_after_s": (initial[0][2] - bot.started) if initial else None,
        }
        out["peak_rss_startup"] = bot.peak_rss
        out["steady_rss"] = bot.sample()
        out["bytes_per_entry"] = (out["steady_rss"] - empty_rss) / max(1, world.member_entries)

        # A no-op full reconcile, asked for in the admin room.
        mark = await hs.mark()
        cpu = bot.cpu_s()
        sent = time.monotonic()
        await world.say("!spacesync sync")
        _, line = await bot.wait_log(reconciled("command"), TIMEOUT, after=i)
        reply = await wait_records(
            hs, mark, lambda r: r[4] == "send" and r[8] == world.admin and "Reconciled in" in r[9], TIMEOUT
        )
        noop = [r for r in await hs.bot_since(mark) if r[1] <= reply[2]]
        classes = by_class(noop)
        requests, size = totals(classes, without_sync=True)
        out["noop"] = {
            "reconcile_s": line.get("seconds"),
            "until_reply_s": reply[2] - sent,
            "requests": requests,
            "bytes": size,
            "classes": classes,
            "planned": line.get("planned"),
            "cpu_s": bot.cpu_s() - cpu,
        }
        print(f"[{label}] no-op reconcile {line.get('seconds')} s: {requests} requests, {human_bytes(size)}")
        await bot.quiet()

        out["peak_rss_noop"] = bot.peak_rss

        # A periodic reconcile that finds nothing: the timer's, which reads only a rolling slice of the rooms.
        _, line = await bot.wait_log(reconciled("reconcile"), TIMEOUT, after=i + 1)
        out["periodic"] = {k: line.get(k) for k in ("rooms_read", "requests", "bytes_read", "seconds", "planned")}
        print(
            f"[{label}] periodic reconcile {line.get('seconds')} s: {line.get('rooms_read')} rooms read, "
            f"{line.get('requests')} requests, {human_bytes(line.get('bytes_read') or 0)}"
        )
        await bot.quiet()

        # One leaver.
        mark = await hs.mark()
        n_log = len(bot.lines)
        left = time.monotonic()
        await world.leave([world.leaver])
        returned = time.monotonic()
        want = len(world.leaver_rooms)

        def kicks_of(records: list[list[Any]]) -> list[list[Any]]:
            return [r for r in records if r[4] in ("kick", "ban") and r[6] == 200]

        deadline = time.monotonic() + TIMEOUT
        while len(kicks := kicks_of(await hs.bot_since(mark))) < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(kicks)} of {want} kicks")
            await asyncio.sleep(0.05)
        records = await hs.bot_since(mark)
        # The bot's first /sync answer written after the leave returned is the one that carries it; when none was
        # written before the first kick (the bot was busy, its /sync not in flight), the time runs from the leave.
        first = min(r[1] for r in kicks)
        answered = min((r[2] for r in records if r[4].startswith("sync") and r[2] >= returned), default=returned)
        answered = answered if answered <= first else returned
        out["leave"] = {
            "rooms": want,
            "kicks": len(kicks),
            "first_kick_s": min(r[1] for r in kicks) - returned,
            "first_kick_after_sync_s": min(r[1] for r in kicks) - answered,
            "last_kick_s": max(r[2] for r in kicks) - returned,
            "leave_request_s": returned - left,
        }
        _, quick = await bot.wait_log(lambda x: x.get("event") == "reconciled" and x.get("queued"), 60, n_log)
        out["leave"]["quick_plan"] = {k: quick.get(k) for k in ("users", "observe_s", "plan_s", "seconds")}
        print(f"[{label}] one leave: the quick reconcile {out['leave']['quick_plan']}")
        print(
            f"[{label}] one leave: first kick +{out['leave']['first_kick_s'] * 1000:.0f} ms "
            f"(+{out['leave']['first_kick_after_sync_s'] * 1000:.0f} ms after the /sync answer with the leave), "
            f"last of {want} +{out['leave']['last_kick_s']:.2f} s"
        )
        await wait_records(
            hs, mark, lambda r: r[4] == "send" and r[8] == world.admin and r[1] > max(k[2] for k in kicks), 60
        )  # the batch's summary notice
        await bot.quiet()

        out["peak_rss_leave"] = bot.peak_rss

        # The exodus: the guard holds it.
        mark = await hs.mark()
        n_log = len(bot.lines)
        cpu = bot.cpu_s()
        await world.leave(world.exodus)
        returned = time.monotonic()
        held = await wait_records(
            hs, mark, lambda r: r[4] == "send" and r[8] == world.admin and "Held batch" in r[9], TIMEOUT
        )
        _, held_line = await bot.wait_log(lambda x: str(x.get("event", "")).startswith("mass action held"), 60, n_log)
        exodus_records = await hs.bot_since(mark)
        out["exodus"] = {
            "users": len(world.exodus),
            "held_notice_s": held[1] - returned,
            "held_actions": held_line.get("actions"),
            "held_users": held_line.get("users"),
            "kicks_sent": len(kicks_of(exodus_records)),
            "classes": by_class([r for r in exodus_records if r[1] <= held[2]]),
            "cpu_s": bot.cpu_s() - cpu,
        }
        print(
            f"[{label}] exodus of {len(world.exodus)}: held notice +{out['exodus']['held_notice_s']:.2f} s "
            f"({held_line.get('actions')} evictions held, {out['exodus']['kicks_sent']} kicks sent)"
        )
        out["final_rss"] = bot.sample()
    out["peak_rss"] = max(bot.peak_rss, bot.hwm)
    return out


async def wait_records(
    hs: HomeserverProcess, mark: int, predicate: Callable[[list[Any]], bool], timeout: float
) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        for r in await hs.bot_since(mark):
            if predicate(r):
                return r
        if time.monotonic() > deadline:
            raise TimeoutError("the bot did not make the awaited request")
        await asyncio.sleep(0.05)


# region the two homeservers
@contextlib.asynccontextmanager
async def synthetic_world(rooms: int, members: int, users: int, exodus: int, seed: int) -> AsyncIterator[World]:
    bot_token, owner_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    args = ["serve", "--rooms", str(rooms), "--members", str(members), "--users", str(users), "--seed", str(seed)]
    started = time.monotonic()
    async with HomeserverProcess(*args, f"--bot-token={bot_token}", f"--owner-token={owner_token}") as hs:
        info = await hs.call("GET", "/_bench/info")
        leaver = await hs.call("GET", "/_bench/user", index=0) if users else {"user_id": "", "rooms": []}
        exodus_users = [
            (await hs.call("GET", "/_bench/user", index=i))["user_id"] for i in range(1, min(users, exodus + 1))
        ]

        async def leave(who: list[str]) -> None:
            await hs.call("POST", "/_bench/leave", {"room": info["space"], "users": who})

        async def say(body: str) -> None:
            await hs.call("POST", "/_bench/send", {"room": info["admin"], "sender": info["owner"], "body": body})

        world = World(
            url=hs.url,
            space=info["space"],
            admin=info["admin"],
            children=info["children"],
            bot=info["bot"],
            bot_token=bot_token,
            owner=info["owner"],
            owner_token=owner_token,
            member_entries=info["member_entries"],
            leaver=leaver["user_id"],
            leaver_rooms=leaver["rooms"],
            exodus=exodus_users,
            leave=leave,
            say=say,
            extra={"hs": hs, "build_s": time.monotonic() - started},
        )
        yield world


@contextlib.asynccontextmanager
async def synapse_world(rooms: int, members: int, users: int, exodus: int, seed: int) -> AsyncIterator[World]:
    """The same world (same shape, same seeded membership) built on a real Synapse, behind a recording proxy."""
    async with homeserver("scale") as bench:
        started = time.monotonic()
        owner = bench.owner.client
        accounts = await bounded((bench.synapse.register(f"user{i:05d}", exempt=True) for i in range(users)), 8)
        print(f"setup: {users} users registered in {time.monotonic() - started:.1f} s")
        space, children = await build_space(bench, rooms)
        admin = await admin_room(bench)
        await bounded((u.client.join(space) for u in accounts), 16)
        picker = random.Random(seed + 1)
        joins = [(accounts[index], room) for room in children for index in sorted(picker.sample(range(users), members))]
        await bounded((u.client.join(room) for u, room in joins), 16)
        print(f"setup: Space, {rooms} children, {len(joins)} joins in {time.monotonic() - started:.1f} s")
        by_id = {a.user_id: a for a in accounts}
        leaver = accounts[0]
        leaver_rooms = [room for u, room in joins if u is leaver]

        async def leave(who: list[str]) -> None:
            # The bot's /sync is held meanwhile, so it sees every leave in one answer (as on the synthetic server).
            await proxy.call("POST", "/_bench/hold_sync")
            try:
                await bounded((by_id[u].client.leave(space) for u in who), 16)
            finally:
                await proxy.call("POST", "/_bench/release_sync")

        async def say(body: str) -> None:
            await owner.send_text(admin, body)

        async with HomeserverProcess(
            "proxy", f"--upstream={bench.url}", f"--bot-token={bench.bot.access_token}"
        ) as proxy:
            try:
                yield World(
                    url=proxy.url,
                    space=space,
                    admin=admin,
                    children=children,
                    bot=bench.bot.user_id,
                    bot_token=bench.bot.access_token,
                    owner=bench.owner.user_id,
                    owner_token=bench.owner.access_token,
                    member_entries=(users + 2) + rooms * (members + 2) + 2,
                    leaver=leaver.user_id,
                    leaver_rooms=leaver_rooms,
                    exodus=[a.user_id for a in accounts[1 : exodus + 1]],
                    leave=leave,
                    say=say,
                    extra={"hs": proxy, "synapse_pid": bench.synapse.pid, "bench": bench},
                )
            finally:
                for account in accounts:
                    await account.client.close()


# endregion


async def empty_world_rss(concurrency: int, tmp: Path) -> int:
    """The bot's RSS against an empty world (a Space without children, the admin room) once it has settled."""
    async with synthetic_world(0, 0, 0, 0, 1) as world:
        workdir = tmp / "empty"
        workdir.mkdir()
        config = bot_config(world.url, world.bot, world.bot_token, world.admin, world.space, workdir, concurrency)
        async with BotProcess(workdir, config) as bot:
            await bot.wait_log(reconciled("reconcile"), 300)
            await bot.quiet()
            return bot.sample()


async def run_one(
    kind: str, args: argparse.Namespace, tmp: Path, empty_rss: int
) -> tuple[dict[str, Any], dict[str, float], World]:
    make = synapse_world if kind == "synapse" else synthetic_world
    async with make(args.rooms, args.members, args.users, args.exodus, args.seed) as world:
        hs: HomeserverProcess = world.extra["hs"]
        print(
            f"[{kind}] world: {len(world.children)} rooms x {args.members} members of {args.users} users, "
            f"{world.member_entries} member entries; leaver in {len(world.leaver_rooms)} rooms"
        )
        fl = await floor(world, args.concurrency)
        print(f"[{kind}] a member event as /state shows it: {await sample_member(world)}")
        print(f"[{kind}] floor: a plain client reads {fl['rooms']} rooms' state in {fl['seconds']:.2f} s")
        workdir = tmp / kind
        workdir.mkdir()
        try:
            result = await measure(hs, world, workdir, args.concurrency, empty_rss, kind)
        finally:
            if args.log:
                shutil.copyfile(workdir / "spacesync.log", f"{args.log}.{kind}")
        return result, fl, world


def report(args: argparse.Namespace, result: dict[str, Any], fl: dict[str, float], empty_rss: int) -> dict:
    full_size = args.shape is not None or (args.rooms, args.members) == (1000, 1000)
    ratio = result["cold_start_s"] / fl["seconds"]
    state = result["startup"].get("state", {"requests": 0, "bytes": 0})
    init = result["initial_sync"]
    print()
    print(
        f"Scale: {args.rooms} rooms x {args.members} members ({args.users} users), walk.concurrency {args.concurrency}"
    )
    print_table(
        ["measure", "value"],
        [
            ["floor: plain client, GET /state of every room", f"{fl['seconds']:.2f} s, {human_bytes(fl['bytes'])}"],
            ["cold start: process start to first full reconcile", f"{result['cold_start_s']:.2f} s"],
            ["cold start / floor", f"{ratio:.2f}"],
            [
                "initial /sync",
                f"{init['requests']} request(s), {human_bytes(init['bytes'])}, done +{init['done_after_s'] or 0:.1f} s",
            ],
            ["/state reads at start", f"{int(state['requests'])} requests, {human_bytes(state['bytes'])}"],
            ["peak RSS (VmHWM)", mib(result["peak_rss"])],
            [
                "peak RSS by phase: start-up / asked-for reconcile / one leave / exodus",
                " / ".join(mib(result[k]) for k in ("peak_rss_startup", "peak_rss_noop", "peak_rss_leave", "peak_rss")),
            ],
            ["steady RSS / empty-world RSS", f"{mib(result['steady_rss'])} / {mib(empty_rss)}"],
            ["bytes per member entry", f"{result['bytes_per_entry']:.0f} B"],
            [
                "no-op full reconcile",
                f"{result['noop']['reconcile_s']} s, {result['noop']['requests']} requests, "
                f"{human_bytes(result['noop']['bytes'])} (reply +{result['noop']['until_reply_s']:.2f} s)",
            ],
            [
                f"periodic reconcile (every {PERIODIC_S} s, reread_interval {PERIODIC_S * 24} s)",
                f"{result['periodic']['seconds']} s, {result['periodic']['rooms_read']} rooms read, "
                f"{result['periodic']['requests']} requests, {human_bytes(result['periodic']['bytes_read'] or 0)}",
            ],
            [
                "one leave: first / last kick (after the leave returned)",
                f"+{result['leave']['first_kick_s'] * 1000:.0f} ms / +{result['leave']['last_kick_s']:.2f} s "
                f"({result['leave']['kicks']} rooms)",
            ],
            [
                "one leave: first kick after the bot's /sync answer with the leave",
                f"+{result['leave']['first_kick_after_sync_s'] * 1000:.0f} ms",
            ],
            [
                f"exodus of {result['exodus']['users']}: held notice",
                f"+{result['exodus']['held_notice_s']:.2f} s ({result['exodus']['held_actions']} evictions held, "
                f"{result['exodus']['kicks_sent']} kicks sent)",
            ],
        ],
    )
    scale_note = "" if full_size else f" (at {args.rooms}x{args.members}; the goal is for a full shape)"
    # A periodic reconcile reads the rooms that need it and a rolling slice: every room once per reread_interval.
    slice_rooms = (args.rooms + 1) * PERIODIC_S / (PERIODIC_S * 24)  # the Space and its children
    periodic_read = result["periodic"]["rooms_read"] or 0

    def verdict(ok: bool, figure: str) -> str:
        return "met" if ok else f"not met ({figure})"

    goals = [
        [
            f"peak RSS <= {args.peak_goal_mib} MiB{scale_note}",
            verdict(result["peak_rss"] <= args.peak_goal_mib * 1024 * 1024, mib(result["peak_rss"])),
        ],
        [
            f"no-op periodic reconcile reads <= rooms x interval / reread_interval ({slice_rooms:.0f} rooms)",
            verdict(periodic_read <= -(-slice_rooms // 1), f"{periodic_read} rooms"),
        ],
        [
            f"<= {GOAL_BYTES_PER_ENTRY} B per member entry",
            verdict(result["bytes_per_entry"] <= GOAL_BYTES_PER_ENTRY, f"{result['bytes_per_entry']:.0f} B"),
        ],
        [f"first full plan within {GOAL_COLD_RATIO:g}x the floor", verdict(ratio <= GOAL_COLD_RATIO, f"{ratio:.2f}x")],
        [
            f"first kick <= {GOAL_FIRST_KICK_MS} ms after the /sync answer with the leave",
            verdict(
                result["leave"]["first_kick_after_sync_s"] * 1000 <= GOAL_FIRST_KICK_MS,
                f"{result['leave']['first_kick_after_sync_s'] * 1000:.0f} ms",
            ),
        ],
        ["no-op full reconcile bytes (asked for: reads every room)", human_bytes(result["noop"]["bytes"])],
        ["no-op periodic reconcile bytes (a rolling slice)", human_bytes(result["periodic"]["bytes_read"] or 0)],
        [
            f"exodus of {result['exodus']['users']} held by the guard within {GOAL_EXODUS_S:g} s",
            (
                verdict(
                    result["exodus"]["held_notice_s"] <= GOAL_EXODUS_S, f"{result['exodus']['held_notice_s']:.2f} s"
                )
                if result["exodus"]["kicks_sent"] == 0
                else f"not held ({result['exodus']['kicks_sent']} kicks)"
            ),
        ],
    ]
    print()
    print_table(["goal", "result"], goals)
    return {"ratio": round(ratio, 3), "floor": fl, "empty_rss": empty_rss, **result}


def compare(synthetic: dict[str, Any], synapse: dict[str, Any]) -> None:
    """The bot's requests per endpoint class on both homeservers, phase by phase."""
    rows = []
    phases: dict[str, Callable[[dict[str, Any]], dict[str, dict[str, float]]]] = {
        "start-up": lambda r: r["startup"],
        "no-op reconcile": lambda r: r["noop"]["classes"],
        "exodus": lambda r: r["exodus"]["classes"],
    }
    for phase, classes in phases.items():
        a, b = classes(synthetic), classes(synapse)
        for cls in sorted(set(a) | set(b)):
            ra, rb = a.get(cls, {}), b.get(cls, {})
            rows.append(
                [
                    phase,
                    cls,
                    int(ra.get("requests", 0)),
                    int(rb.get("requests", 0)),
                    human_bytes(ra.get("bytes", 0)),
                    human_bytes(rb.get("bytes", 0)),
                ]
            )
    rows.append(["one leave", "kick", synthetic["leave"]["kicks"], synapse["leave"]["kicks"], "", ""])
    print()
    print("The bot's requests per endpoint class: synthetic server vs Synapse, same world")
    print_table(["phase", "class", "synthetic", "Synapse", "bytes (synthetic)", "bytes (Synapse)"], rows)


def parse_args() -> argparse.Namespace:
    global PERIODIC_S
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rooms", type=int, default=None, help="child rooms (default 1000; 100 with --quick)")
    parser.add_argument("--members", type=int, default=None, help="members per child (default 1000; 100 with --quick)")
    parser.add_argument("--users", type=int, default=None, help="distinct users (default 10 x members)")
    parser.add_argument("--exodus", type=int, default=None, help="users leaving at once (default users / 10, 30..1000)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="walk.concurrency (state reads at once), and the floor's (default 8, as shipped)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--periodic", type=int, default=PERIODIC_S, help="reconcile_interval in seconds (>= 10)")
    parser.add_argument("--log", help="keep the bot's log as LOG.synthetic (and LOG.synapse)")
    parser.add_argument("--timeout", type=float, default=3600, help="give up on any one wait after this many seconds")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 rooms x 100 members")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="a community shape: 1000x1000 (1,000 rooms of 1,000 of 10,000 users), 10000x100 (10,000 rooms of 100), "
        "space100k (one Space of 100,000 members, 300 rooms of 1,000; an exodus of 10,000); sets the defaults "
        "of --rooms, --members, --users and --exodus, and the peak RSS goal",
    )
    parser.add_argument(
        "--synapse", action="store_true", help="also build the world on a real Synapse (default 100 x 100) and compare"
    )
    args = parser.parse_args()
    if args.shape and (args.quick or args.synapse):
        parser.error("--shape cannot go with --quick or --synapse (those are 100 x 100)")
    small = args.quick or args.synapse
    rooms, members, users, exodus, peak = SHAPES[args.shape or "1000x1000"]
    args.peak_goal_mib = peak if args.shape else GOAL_PEAK_MB
    args.rooms = args.rooms if args.rooms is not None else (100 if small else rooms)
    args.members = args.members if args.members is not None else (100 if small else members)
    args.users = args.users if args.users is not None else (users if args.shape else 10 * args.members)
    args.exodus = (
        args.exodus if args.exodus is not None else (exodus if args.shape else max(30, min(1000, args.users // 10)))
    )
    if min(args.rooms, args.members) < 1 or args.members > args.users or args.exodus >= args.users:
        parser.error("need rooms >= 1, 1 <= members <= users, and exodus < users")
    if not 1 <= args.concurrency <= 64:
        parser.error("--concurrency must be 1..64")
    if args.periodic < 10:
        parser.error("--periodic: at least 10 (seconds)")
    PERIODIC_S = args.periodic
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    global TIMEOUT
    TIMEOUT = args.timeout
    return args


async def main() -> int:
    args = parse_args()
    print_machine()
    with tempfile.TemporaryDirectory(prefix="spacesync-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        empty_rss = await empty_world_rss(args.concurrency, tmp)
        print(f"empty world: the bot settles at {mib(empty_rss)} RSS")
        result, fl, _ = await run_one("synthetic", args, tmp, empty_rss)
        summary = report(args, result, fl, empty_rss)
        data: dict[str, Any] = {
            "shape": args.shape,
            "rooms": args.rooms,
            "members": args.members,
            "users": args.users,
            "synthetic": summary,
        }
        if args.synapse:
            result_b, fl_b, _ = await run_one("synapse", args, tmp, empty_rss)
            data["synapse"] = report(args, result_b, fl_b, empty_rss)
            compare(result, result_b)
    print_result("scale", data)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run(main)
