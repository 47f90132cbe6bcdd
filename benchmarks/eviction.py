"""Eviction latency: a user leaves a Space with N restricted children; how soon is the user out of all of them?

(A) floor: a plain aiohttp loop kicking an identical user from every child, at 1, 8 and 32 requests in
    flight; the best is the homeserver's floor for this work.
(B) spacesync: the bot (App, in-process, SQLite) evicts the user after the leave, at a couple of
    executor concurrencies.

Both are timed the same way: from the start (A: the first kick sent; B: the leave request returned)
to the moment the last kick reaches the long-poll /sync of a third user who is in every room.
B is also shown by the kick events' own timestamps (last origin_server_ts minus the leave's return).

    .venv/bin/python benchmarks/eviction.py [--rooms 100]
"""

from __future__ import annotations

import time

from common import (
    Bench,
    Stopwatch,
    SyncWatcher,
    admin_room,
    build_space,
    homeserver,
    in_flight,
    join_all,
    kicked,
    print_machine,
    process_cpu_s,
    q,
    quiesce,
    ratio_args,
    report_ratio,
    request,
    run,
    settled_bot,
)


async def floor(bench: Bench, watcher: SyncWatcher, rooms: list[str], user_id: str, concurrency: int) -> dict:
    session = await bench.http()
    token = bench.bot.access_token

    async def kick(room: str) -> None:
        await request(
            session,
            token,
            "POST",
            f"{bench.url}/_matrix/client/v3/rooms/{q(room)}/kick",
            {"user_id": user_id, "reason": "benchmark floor"},
        )

    hs_cpu, cpu, started = process_cpu_s(bench.synapse.pid), time.process_time(), time.monotonic()
    await in_flight(rooms, concurrency, kick)
    returned = time.monotonic() - started
    seen = await watcher.wait_rooms(rooms, kicked(user_id), timeout=300)
    last = max(s.arrived for s in seen.values()) - started
    return {
        "concurrency": concurrency,
        "returned_s": returned,
        "seen_s": last,
        "cpu_s": time.process_time() - cpu,
        "synapse_cpu_s": process_cpu_s(bench.synapse.pid) - hs_cpu,
    }


async def spacesync(
    bench: Bench, watcher: SyncWatcher, space: str, rooms: list[str], admin: str, user, concurrency: int
) -> dict:
    async with settled_bot(bench, admin, space, concurrency) as app:
        watch = Stopwatch(bench)
        await user.client.leave(space)
        watch.start()
        seen = await watcher.wait_rooms(rooms, kicked(user.user_id, by=bench.bot.user_id), timeout=300)
        result = watch.stop(seen, concurrency)
        await app.executor.wait_idle()
    return result


async def main() -> int:
    args, floor_c, bot_c = ratio_args(__doc__.splitlines()[0])
    n = args.rooms
    print_machine()
    async with homeserver("eviction") as bench:
        space, rooms = await build_space(bench, n)
        admin = await admin_room(bench)
        observer = await bench.user("observer")
        runs = [("floor", c, r) for r in range(args.rounds) for c in floor_c]
        runs += [("bot", c, r) for r in range(args.rounds) for c in bot_c]
        users = await bench.users_named("warmup", *(f"{kind}{c}r{r}" for kind, c, r in runs))
        await join_all([observer, *users], space, rooms)
        warmup, users = users[0], users[1:]
        watcher = SyncWatcher(bench, observer)
        await watcher.start()
        floors: dict[int, list[dict]] = {c: [] for c in floor_c}
        bots: dict[int, list[dict]] = {c: [] for c in bot_c}
        plan = dict(zip(runs, users))
        try:
            await floor(bench, watcher, rooms, warmup.user_id, 8)  # warm Synapse's caches; not counted
            for r in range(args.rounds):  # floor and spacesync runs alternate, so drift hits both
                for c in floor_c:
                    await quiesce(bench)
                    floors[c].append(await floor(bench, watcher, rooms, plan["floor", c, r].user_id, c))
                for c in bot_c:
                    bots[c].append(await spacesync(bench, watcher, space, rooms, admin, plan["bot", c, r], c))
        finally:
            await watcher.stop()
    report_ratio(
        "eviction",
        f"eviction of one user from {n} rooms: time until the last kick reached an observer's /sync "
        f"(best of {args.rounds}; all runs in brackets)",
        n,
        "kicks/s",
        "plain kick loop",
        "first_ts_s",
        floors,
        bots,
    )
    return 0


if __name__ == "__main__":
    run(main)
