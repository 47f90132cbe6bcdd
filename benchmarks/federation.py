"""Eviction latency across two federating homeservers: a user of B leaves a Space on B; the bot is on A.

Half of the N restricted children live on A, half on B; the bot (App, in-process, SQLite) runs on A.
The time runs from the leave's return (on B) until the bot's last kick reached the long-poll /sync of
an observer on each server who is in every room: A's view (where the bot kicks) and B's view (after
federation relayed the kicks). Also shown: the kicks' own timestamps (last origin_server_ts minus the
leave's return). The single-server figure is benchmarks/eviction.py's.

    .venv/bin/python benchmarks/federation.py [--rooms 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from pathlib import Path

from common import (
    Bench,
    SyncWatcher,
    bot_config,
    bounded,
    fmt_s,
    kicked,
    print_machine,
    print_result,
    print_table,
    run,
    running_bot,
)

from spacesync.testing import FederatedPair, TestUser, join_when_allowed

ROOM_VERSION = "10"


async def register(bench: Bench, name: str) -> TestUser:
    return await bench.user(name)


async def build(a: Bench, b: Bench, n: int) -> tuple[str, list[str], str]:
    """A public Space on B; n restricted children, alternately on A and B; the bot (on A) in all of them."""
    started = time.monotonic()
    bot = a.bot
    levels = {"users": {a.owner.user_id: 100, b.owner.user_id: 100, bot.user_id: 100}}
    space = await b.owner.client.create_space(
        name="federated bench", room_version=ROOM_VERSION, join_rule="public", power_level_content_override=levels
    )
    for user in (bot, a.owner):
        await user.client.join(space, via=[b.synapse.server_name])

    async def child(i: int) -> str:
        home = (a, b)[i % 2]
        room = await home.owner.client.create_room(
            name=f"bench-{i}",
            room_version=ROOM_VERSION,
            join_rule="restricted",
            allow=[space],
            power_level_content_override=levels,
        )
        await b.owner.client.add_child(space, room, via=[home.synapse.server_name])
        await join_when_allowed(bot, room, [home.synapse.server_name])
        return room

    rooms = await bounded((child(i) for i in range(n)), limit=8)
    admin = await a.owner.client.create_room(name="admin", join_rule="invite", invite=[bot.user_id])
    await bot.client.join(admin)
    print(f"setup: Space on B with {n} children on A and B in {time.monotonic() - started:.1f} s")
    return space, rooms, admin


async def join_everywhere(users: list[TestUser], space: str, rooms: list[str], via: list[str]) -> None:
    started = time.monotonic()
    await bounded((join_when_allowed(u, space, via) for u in users), limit=8)
    await bounded((join_when_allowed(u, r, via) for u in users for r in rooms), limit=8)
    print(f"setup: {len(users)} users joined {len(rooms)} rooms in {time.monotonic() - started:.1f} s")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print_machine()
    with tempfile.TemporaryDirectory(prefix="spacesync-bench-federation-") as tmp:
        workdir = Path(tmp)
        pair = FederatedPair(workdir / "pair", default_room_version=ROOM_VERSION)
        started = time.monotonic()
        await pair.start()
        print(
            f"homeservers: {pair.a.server_name} and {pair.b.server_name} "
            f"federating in {time.monotonic() - started:.1f} s"
        )
        suffix = secrets.token_hex(3)
        owner_a = await pair.a.register(f"owner_{suffix}")
        owner_b = await pair.b.register(f"owner_{suffix}")
        bot = await pair.a.register(f"bot_{suffix}")
        a = Bench(pair.a, workdir, owner_a, bot)
        b = Bench(pair.b, workdir, owner_b, bot)
        try:
            for server, user in ((pair.a, owner_a), (pair.b, owner_b), (pair.a, bot)):
                await server.exempt(user.user_id)
            space, rooms, admin = await build(a, b, args.rooms)
            via = [pair.b.server_name, pair.a.server_name]
            observers = [await register(a, "observer"), await register(b, "observer")]
            leavers = [await register(b, f"leaver{r}") for r in range(args.rounds)]
            await join_everywhere([*observers, *leavers], space, rooms, via)
            watchers = [SyncWatcher(a, observers[0]), SyncWatcher(b, observers[1])]
            for watcher in watchers:
                await watcher.start()
            results: list[dict] = []
            config = bot_config(a, workdir, admin, space, concurrency=args.concurrency)
            try:
                async with running_bot(a, config) as app:
                    for leaver in leavers:
                        await leaver.client.leave(space)
                        left, left_wall = time.monotonic(), time.time()
                        result: dict = {}
                        for name, watcher in zip(("A", "B"), watchers, strict=True):
                            seen = await watcher.wait_rooms(rooms, kicked(leaver.user_id, by=bot.user_id), timeout=300)
                            result[f"seen_{name}_s"] = max(s.arrived for s in seen.values()) - left
                            result["last_kick_ts_s"] = (
                                max(s.event["origin_server_ts"] for s in seen.values()) / 1000 - left_wall
                            )
                        results.append(result)
                        await app.executor.wait_idle()
            finally:
                for watcher in watchers:
                    await watcher.stop()
        finally:
            for user in (*a.users, *b.users, owner_a, owner_b, bot):
                await user.client.close()
            await pair.stop()
    print()
    print(
        f"eviction of one user of B from {args.rooms} rooms (half on A, half on B), bot on A, "
        f"executor.concurrency {args.concurrency}: time from the leave until the last kick reached each view"
    )
    rows = [
        [f"round {i + 1}", fmt_s(r["seen_A_s"]), fmt_s(r["seen_B_s"]), fmt_s(r["last_kick_ts_s"])]
        for i, r in enumerate(results)
    ]
    print_table(["run", "A's view (bot's server)", "B's view (leaver's server)", "last kick ts"], rows)
    best_a, best_b = (min(r[key] for r in results) for key in ("seen_A_s", "seen_B_s"))
    print(f"\nbest of {len(results)}: A's view {fmt_s(best_a)}, B's view {fmt_s(best_b)}")
    print_result("federation", {"rooms": args.rooms, "concurrency": args.concurrency, "runs": results})
    return 0


if __name__ == "__main__":
    run(main)
