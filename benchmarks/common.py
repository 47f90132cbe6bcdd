"""Shared set-up for the benchmarks: a throwaway Synapse, users, a Space, a /sync watcher, machine facts.

Every benchmark starts its own Synapse (loopback only, rate limits lifted) in a temp dir, measures
the homeserver's own floor for the same work in the same run, and stops it. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spacesync.config import DEFAULT_CONCURRENCY
from spacesync.testing import Synapse, TestUser, wait_for

ROOM_VERSION = "10"
SETUP_CONCURRENCY = 16


def q(segment: str) -> str:
    return quote(segment, safe="")


# region machine facts
def machine_info() -> dict[str, str]:
    """CPU model, cores, RAM, OS, Python, Synapse and mautrix versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "synapse": version("matrix-synapse"),
        "mautrix": version("mautrix"),
        "homeserver db": "SQLite (Synapse), loopback",
    }


def print_machine(info: dict[str, str] | None = None) -> None:
    info = info or machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))


# endregion


# region output
def fmt_s(seconds: float) -> str:
    return f"{seconds:.3f} s"


def print_table(headers: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """A Markdown table (pastes straight into docs/benchmarks.md)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(widths[i]) for i, h in enumerate(headers)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in rows:
        print("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |")


def print_result(name: str, data: dict[str, Any]) -> None:
    """One machine-readable line per run, for collecting figures."""
    print(f"RESULT {name} {json.dumps(data, sort_keys=True)}")


# endregion


# region the homeserver and its users
@dataclass
class Bench:
    """A running throwaway Synapse with an owner (moderator) and a bot account, both at power level 100."""

    synapse: Synapse
    workdir: Path
    owner: TestUser
    bot: TestUser
    users: list[TestUser] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return self.synapse.url

    async def user(self, localpart: str) -> TestUser:
        # Members act at full speed: what is measured is the bot.
        user = await self.synapse.register(f"{localpart}_{secrets.token_hex(3)}", exempt=True)
        self.users.append(user)
        return user

    async def users_named(self, *localparts: str) -> list[TestUser]:
        return list(await asyncio.gather(*(self.user(name) for name in localparts)))

    def levels(self, extra: dict[str, int] | None = None) -> dict[str, Any]:
        return {"users": {self.owner.user_id: 100, self.bot.user_id: 100, **(extra or {})}}

    async def http(self) -> aiohttp.ClientSession:
        """A plain aiohttp session for the floor loops (generous connection limit)."""
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=120)
            )
        return self.session


@contextlib.asynccontextmanager
async def homeserver(prefix: str) -> AsyncIterator[Bench]:
    """Start a stock Synapse in a temp dir; register owner and bot, both exempt from rate limits (as an operator
    exempts the bot); stop it at the end."""
    with tempfile.TemporaryDirectory(prefix=f"spacesync-bench-{prefix}-") as tmp:
        workdir = Path(tmp)
        synapse = Synapse(workdir / "synapse", default_room_version=ROOM_VERSION)
        started = time.monotonic()
        await synapse.start()
        bench: Bench | None = None
        try:
            owner = await synapse.register(f"owner_{secrets.token_hex(3)}")
            bot = await synapse.register(f"bot_{secrets.token_hex(3)}")
            await synapse.exempt(owner.user_id)
            await synapse.exempt(bot.user_id)
            bench = Bench(synapse, workdir, owner, bot)
            print(f"homeserver: Synapse at {synapse.url} up in {time.monotonic() - started:.1f} s")
            yield bench
        finally:
            if bench is not None:
                for user in (bench.owner, bench.bot, *bench.users):
                    await user.client.close()
                if bench.session is not None:
                    await bench.session.close()
            await synapse.stop()


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stopwatch:
    """One benchmarked run, as every bot run measures it: this process's and Synapse's CPU from `__init__`,
    and time from `start()` (the change that sets the bot to work) to the events an observer saw."""

    def __init__(self, bench: Bench) -> None:
        self.synapse_pid = bench.synapse.pid
        self.hs_cpu, self.cpu = process_cpu_s(self.synapse_pid), time.process_time()
        self.started = self.started_wall = 0.0

    def start(self) -> None:
        self.started, self.started_wall = time.monotonic(), time.time()

    def stop(self, seen: dict[str, Seen], concurrency: int) -> dict[str, Any]:
        """The run's figures: `seen_s` (the last event's arrival at the observer), `first_ts_s` and `last_ts_s`
        (the events' own timestamps), the CPU both processes spent."""
        stamps = [s.event["origin_server_ts"] / 1000 - self.started_wall for s in seen.values()]
        return {
            "concurrency": concurrency,
            "seen_s": max(s.arrived for s in seen.values()) - self.started,
            "first_ts_s": min(stamps),
            "last_ts_s": max(stamps),
            "cpu_s": time.process_time() - self.cpu,
            "synapse_cpu_s": process_cpu_s(self.synapse_pid) - self.hs_cpu,
        }


async def quiesce(bench: Bench, *, window: float = 0.5, busy: float = 0.1, timeout: float = 30.0) -> float:
    """Wait until Synapse is idle (under `busy` of a core over `window` seconds): background work
    left by the set-up or a previous run would otherwise be billed to the next run. Returns the wait."""
    started = time.monotonic()
    pid = bench.synapse.pid
    if pid is None or not Path(f"/proc/{pid}/stat").exists():
        return 0.0
    while time.monotonic() - started < timeout:
        before = process_cpu_s(pid)
        await asyncio.sleep(window)
        if process_cpu_s(pid) - before < busy * window:
            break
    return time.monotonic() - started


async def bounded(coros: Iterable[Awaitable[Any]], limit: int = SETUP_CONCURRENCY) -> list[Any]:
    """Run awaitables with at most `limit` in flight; results in order."""
    sem = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[Any]) -> Any:
        async with sem:
            return await aw

    return list(await asyncio.gather(*(one(c) for c in coros)))


async def build_space(bench: Bench, rooms: int, *, name: str = "bench") -> tuple[str, list[str]]:
    """A public Space with `rooms` children restricted to it; the bot joined to all. Built concurrently."""
    started = time.monotonic()
    owner = bench.owner.client
    space = await owner.create_space(
        name=name, room_version=ROOM_VERSION, join_rule="public", power_level_content_override=bench.levels()
    )
    await bench.bot.client.join(space)

    async def child(i: int) -> str:
        room = await owner.create_room(
            name=f"{name}-{i}",
            room_version=ROOM_VERSION,
            join_rule="restricted",
            allow=[space],
            power_level_content_override=bench.levels(),
        )
        await owner.add_child(space, room)
        await bench.bot.client.join(room)
        return room

    children = await bounded(child(i) for i in range(rooms))
    print(f"setup: Space with {rooms} restricted children in {time.monotonic() - started:.1f} s")
    return space, children


async def admin_room(bench: Bench) -> str:
    room = await bench.owner.client.create_room(
        name="admin", room_version=ROOM_VERSION, join_rule="invite", power_level_content_override=bench.levels()
    )
    await bench.owner.client.invite(room, bench.bot.user_id)
    await bench.bot.client.join(room)
    return room


async def join_all(users: Iterable[TestUser], space: str, rooms: list[str]) -> None:
    """Each user joins the Space, then every child (allowed through the Space)."""
    started = time.monotonic()
    users = list(users)
    await bounded(u.client.join(space) for u in users)
    await bounded(u.client.join(r) for u in users for r in rooms)
    print(f"setup: {len(users)} users joined {len(rooms)} rooms in {time.monotonic() - started:.1f} s")


# endregion


# region the bot, in-process
def bot_config(
    bench: Bench, workdir: Path, admin: str, space: str, *, concurrency: int, **extra: Any
) -> dict[str, Any]:
    return {
        "homeserver": {"url": bench.url},
        "bot": {"user_id": bench.bot.user_id, "access_token": bench.bot.access_token},
        "database": {"url": f"sqlite:{workdir}/spacesync.db"},
        "admin": {"room": admin},
        "spaces": [{"room": space, "max_evictions_without_confirmation": 1_000_000}],
        "max_evictions_without_confirmation": 1_000_000,
        "executor": {"concurrency": concurrency},
        "web": {"listen": None},
        "logging": {"level": "INFO", "format": "json"},
        **extra,
    }


_logging_ready = False


def quiet_logging(path: Path) -> None:
    """The bot logs as in production (INFO, JSON) but to a file, so the benchmark's output stays readable."""
    global _logging_ready
    if _logging_ready:
        return
    from spacesync.logs import setup_logging

    setup_logging("INFO", "json", stream=open(path, "a", buffering=1))  # noqa: SIM115 - lives as long as the run
    # structlog's factory swaps the logger class; mautrix's database wants its TraceLogger for new loggers.
    from mautrix.util.logging.trace import TraceLogger

    logging.setLoggerClass(TraceLogger)
    _logging_ready = True


@contextlib.asynccontextmanager
async def running_bot(bench: Bench, config: dict[str, Any]) -> AsyncIterator[Any]:
    """The bot's App running in this process (as tests/integration/conftest.py does), settled before use."""
    quiet_logging(bench.workdir / "spacesync.log")
    from spacesync.config import parse_config
    from spacesync.engine.runtime import App

    app = App(parse_config(config, env={}))
    task = asyncio.create_task(app.run())

    async def settled() -> bool:
        if task.done():
            task.result()
        return app.synced and app.reconciler.last_reconcile_at is not None and not await app.store.journal.runnable()

    try:
        await wait_for(settled, timeout=120, interval=0.05, message="the bot did not settle")
        await app.executor.wait_idle()
        yield app
    finally:
        app.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def settled_bot(bench: Bench, admin: str, space: str, concurrency: int) -> AsyncIterator[Any]:
    """A fresh bot (its own database) managing `space` at `concurrency`, with Synapse idle again once the
    bot's start-up work (initial sync, first reconcile) is done: what a measured bot run starts from."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bot-c{concurrency}-", dir=bench.workdir))
    async with running_bot(bench, bot_config(bench, workdir, admin, space, concurrency=concurrency)) as app:
        await quiesce(bench)
        yield app


# endregion


# region watching the homeserver from outside
SYNC_FILTER = json.dumps(
    {
        "presence": {"types": []},
        "account_data": {"types": []},
        "room": {
            "timeline": {"limit": 200, "types": ["m.room.member", "m.room.power_levels", "m.room.join_rules"]},
            "state": {"types": []},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
    }
)


@dataclass
class Seen:
    room_id: str
    event: dict[str, Any]
    arrived: float
    """time.monotonic() when the /sync answer carrying it arrived."""
    arrived_wall: float
    """time.time() at the same moment (to compare with origin_server_ts)."""


class SyncWatcher:
    """A third user in every room, long-polling /sync, noting when each event first reaches a client.

    It runs in its own process (`python benchmarks/common.py watch ...`), so a busy bot in the
    benchmark's event loop cannot delay what it sees; it holds one long-poll open at all times, so it
    costs the homeserver what any idle client costs. Arrival times are CLOCK_MONOTONIC, which is the
    same clock in every process.
    """

    def __init__(self, bench: Bench, user: TestUser) -> None:
        self.bench = bench
        self.user = user
        self.seen: list[Seen] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).resolve()),
            "watch",
            self.bench.url,
            self.user.access_token,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 60)
        if not line.startswith(b"ready"):
            raise RuntimeError(f"the /sync watcher did not start: {line!r}")
        self._task = asyncio.create_task(self._read())
        await asyncio.sleep(0.2)  # let the long-poll reach the homeserver

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            data = json.loads(line)
            self.seen.append(Seen(data["room_id"], data["event"], data["arrived"], data["arrived_wall"]))
            self._changed.set()

    def matching(self, predicate: Callable[[Seen], bool]) -> dict[str, Seen]:
        """The first matching event per room."""
        out: dict[str, Seen] = {}
        for s in self.seen:
            if s.room_id not in out and predicate(s):
                out[s.room_id] = s
        return out

    async def wait_rooms(
        self, rooms: Iterable[str], predicate: Callable[[Seen], bool], timeout: float
    ) -> dict[str, Seen]:
        """Wait until every room in `rooms` showed a matching event; return them."""
        wanted = set(rooms)
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(lambda s: s.room_id in wanted and predicate(s))
            if len(found) == len(wanted):
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"only {len(found)} of {len(wanted)} rooms showed the change in {timeout:g} s")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


async def _watch(url: str, token: str) -> None:
    """The watcher process: print every timeline event the user's /sync brings, with its arrival time."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        since = None
        while True:
            params = {"timeout": "30000" if since else "0", "filter": SYNC_FILTER}
            if since:
                params["since"] = since
            async with session.get(
                f"{url}/_matrix/client/v3/sync", params=params, headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                body = await resp.json()
                arrived, arrived_wall = time.monotonic(), time.time()
                if resp.status != 200:
                    raise RuntimeError(f"/sync answered {resp.status}: {body}")
            lines = []
            if since is None:
                lines.append("ready")  # the initial sync: everything up to now is history
            else:
                for room_id, room in ((body.get("rooms") or {}).get("join") or {}).items():
                    for event in (room.get("timeline") or {}).get("events") or []:
                        event.pop("unsigned", None)
                        lines.append(
                            json.dumps(
                                {"room_id": room_id, "event": event, "arrived": arrived, "arrived_wall": arrived_wall}
                            )
                        )
            since = body["next_batch"]
            if lines:
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()


def kicked(user_id: str, by: str | None = None) -> Callable[[Seen], bool]:
    def match(s: Seen) -> bool:
        e = s.event
        return (
            e.get("type") == "m.room.member"
            and e.get("state_key") == user_id
            and (e.get("content") or {}).get("membership") == "leave"
            and e.get("sender") != user_id
            and (by is None or e.get("sender") == by)
        )

    return match


def level_shown(user_id: str, level: int) -> Callable[[Seen], bool]:
    def match(s: Seen) -> bool:
        e = s.event
        return (
            e.get("type") == "m.room.power_levels"
            and ((e.get("content") or {}).get("users") or {}).get(user_id) == level
        )

    return match


async def in_flight(items: list[Any], concurrency: int, fn: Callable[[Any], Awaitable[Any]]) -> None:
    """Work through `items` keeping at most `concurrency` requests in flight (a plain worker pool)."""
    queue = list(reversed(items))

    async def worker() -> None:
        while queue:
            await fn(queue.pop())

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)))))


async def request(session: aiohttp.ClientSession, token: str, method: str, url: str, body: Any = None) -> Any:
    async with session.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{method} {url} answered {resp.status}: {data}")
        return data


# endregion


def run(main: Callable[[], Awaitable[int | None]]) -> None:
    sys.exit(asyncio.run(main()) or 0)


if __name__ == "__main__" and sys.argv[1:2] == ["watch"]:
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        asyncio.run(_watch(sys.argv[2], sys.argv[3]))


def report_ratio(
    name: str,
    title: str,
    rooms: int,
    rate: str,
    floor_label: str,
    first_key: str,
    floors: dict[int, list[dict[str, Any]]],
    bots: dict[int, list[dict[str, Any]]],
) -> float:
    """Print the floor and spacesync runs as one table, the best-vs-best ratio, and the RESULT line."""
    best_floor = {c: min(rs, key=lambda x: x["seen_s"]) for c, rs in floors.items()}
    best_bot = {c: min(rs, key=lambda x: x["seen_s"]) for c, rs in bots.items()}
    best_a = min(best_floor.values(), key=lambda x: x["seen_s"])
    best_b = min(best_bot.values(), key=lambda x: x["seen_s"])

    def runs(results: list[dict[str, Any]]) -> str:
        return "[" + ", ".join(f"{x['seen_s']:.2f}" for x in results) + "]"

    def row(label: str, r: dict[str, Any], all_runs: list[dict[str, Any]], extra: str = "") -> list[str]:
        return [
            label,
            fmt_s(r["seen_s"]),
            f"{rooms / r['seen_s']:.1f}",
            f"{r['cpu_s']:.2f} s",
            f"{r['synapse_cpu_s']:.2f} s",
            runs(all_runs) + extra,
        ]

    print()
    print(title)
    rows = [row(f"A floor: {floor_label}, {c} in flight", r, floors[c]) for c, r in best_floor.items()]
    rows += [
        row(f"B spacesync, executor.concurrency {c}", r, bots[c], f"; first +{r[first_key] * 1000:.0f} ms")
        for c, r in best_bot.items()
    ]
    print_table(["run", "time", rate, "client CPU", "Synapse CPU", "runs (s)"], rows)
    ratio = best_b["seen_s"] / best_a["seen_s"]
    print(
        f"\nA (best floor, {best_a['concurrency']} in flight) = {fmt_s(best_a['seen_s'])}; "
        f"B (best spacesync, concurrency {best_b['concurrency']}) = {fmt_s(best_b['seen_s'])}; "
        f"B/A = {ratio:.2f} (goal <= 1.2)"
    )
    result: dict[str, Any] = {"rooms": rooms, "floor": floors, "spacesync": bots, "ratio": round(ratio, 3)}
    shipped = best_bot.get(DEFAULT_CONCURRENCY)
    if shipped is not None:
        result["default_ratio"] = round(shipped["seen_s"] / best_a["seen_s"], 3)
        print(
            f"B at the shipped default (concurrency {DEFAULT_CONCURRENCY}) = {fmt_s(shipped['seen_s'])}; "
            f"B/A = {result['default_ratio']:.2f} (goal <= 1.1)"
        )
    print_result(name, result)
    return ratio


def ratio_args(description: str) -> tuple[argparse.Namespace, list[int], list[int]]:
    """The options the floor-vs-spacesync scripts share: rooms, rounds, and the concurrencies to try."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="repeat every run; the best of each is kept")
    parser.add_argument("--floor-concurrency", default="1,8,32")
    parser.add_argument("--bot-concurrency", default="8,16,32")
    args = parser.parse_args()
    return args, [int(c) for c in args.floor_concurrency.split(",")], [int(c) for c in args.bot_concurrency.split(",")]
