"""Lockdown latency: a moderator locks down a Space with N restricted children; how soon are all of them invite-only?

(A) floor: a plain aiohttp loop writing {"join_rule": "invite"} into every child, at 1, 8 and 32 requests in
    flight; the best is the homeserver's floor for this work.
(B) spacesync: the bot (App, in-process, SQLite) runs `!spacesync lockdown`, sent by the owner in the admin room,
    at a couple of executor concurrencies.

Both are timed the same way: from the start (A: the first write sent; B: the command message's send returned) to
the moment the last room's new join rule reaches the long-poll /sync of a third user who is in every room.
Between runs every room is put back to restricted by a plain loop (not timed).

    .venv/bin/python benchmarks/lockdown.py [--rooms 100]
"""

from __future__ import annotations

import time
from collections.abc import Callable

from common import (
    Bench,
    Seen,
    Stopwatch,
    SyncWatcher,
    admin_room,
    build_space,
    homeserver,
    in_flight,
    join_all,
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


def rule_shown(rule: str, after: float, by: str | None = None) -> Callable[[Seen], bool]:
    def match(s: Seen) -> bool:
        e = s.event
        return (
            s.arrived >= after
            and e.get("type") == "m.room.join_rules"
            and (e.get("content") or {}).get("join_rule") == rule
            and (by is None or e.get("sender") == by)
        )

    return match


async def write_rules(bench: Bench, rooms: list[str], content: dict | Callable[[str], dict], concurrency: int) -> None:
    session = await bench.http()
    token = bench.bot.access_token

    async def put(room: str) -> None:
        body = content(room) if callable(content) else content
        await request(
            session, token, "PUT", f"{bench.url}/_matrix/client/v3/rooms/{q(room)}/state/m.room.join_rules/", body
        )

    await in_flight(rooms, concurrency, put)


async def restore(bench: Bench, watcher: SyncWatcher, space: str, rooms: list[str]) -> None:
    """Every room back to restricted to the Space (not timed). A fresh marker each time: Synapse sends no new event
    for state identical to the current one, and the watcher waits for new events."""
    started = time.monotonic()
    restricted = {
        "join_rule": "restricted",
        "allow": [{"type": "m.room_membership", "room_id": space}],
        "bench_restore": int(started * 1000),
    }
    await write_rules(bench, rooms, restricted, 16)
    await watcher.wait_rooms(rooms, rule_shown("restricted", started), timeout=300)


async def floor(bench: Bench, watcher: SyncWatcher, rooms: list[str], concurrency: int) -> dict:
    hs_cpu, cpu, started = process_cpu_s(bench.synapse.pid), time.process_time(), time.monotonic()
    await write_rules(bench, rooms, {"join_rule": "invite"}, concurrency)
    returned = time.monotonic() - started
    seen = await watcher.wait_rooms(rooms, rule_shown("invite", started), timeout=300)
    last = max(s.arrived for s in seen.values()) - started
    return {
        "concurrency": concurrency,
        "returned_s": returned,
        "seen_s": last,
        "cpu_s": time.process_time() - cpu,
        "synapse_cpu_s": process_cpu_s(bench.synapse.pid) - hs_cpu,
    }


async def spacesync(bench: Bench, watcher: SyncWatcher, space: str, rooms: list[str], concurrency: int) -> dict:
    # A fresh admin room per run: a bot with a fresh database would otherwise answer the earlier runs' commands.
    admin = await admin_room(bench)
    async with settled_bot(bench, admin, space, concurrency) as app:
        watch = Stopwatch(bench)
        await bench.owner.client.send_text(admin, "!spacesync lockdown")
        watch.start()
        seen = await watcher.wait_rooms(rooms, rule_shown("invite", watch.started, by=bench.bot.user_id), timeout=300)
        result = watch.stop(seen, concurrency)
        await app.executor.wait_idle()
    return result


async def main() -> int:
    args, floor_c, bot_c = ratio_args(__doc__.splitlines()[0])
    n = args.rooms
    print_machine()
    async with homeserver("lockdown") as bench:
        space, rooms = await build_space(bench, n)
        observer = await bench.user("observer")
        await join_all([observer], space, rooms)
        watcher = SyncWatcher(bench, observer)
        await watcher.start()
        floors: dict[int, list[dict]] = {c: [] for c in floor_c}
        bots: dict[int, list[dict]] = {c: [] for c in bot_c}
        try:
            await floor(bench, watcher, rooms, 8)  # warm Synapse's caches; not counted
            await restore(bench, watcher, space, rooms)
            for _ in range(args.rounds):  # floor and spacesync runs alternate, so drift hits both
                for c in floor_c:
                    await quiesce(bench)
                    floors[c].append(await floor(bench, watcher, rooms, c))
                    await restore(bench, watcher, space, rooms)
                for c in bot_c:
                    bots[c].append(await spacesync(bench, watcher, space, rooms, c))
                    await restore(bench, watcher, space, rooms)
        finally:
            await watcher.stop()
    report_ratio(
        "lockdown",
        f"lockdown of a Space with {n} rooms: time until the last room's invite rule reached an observer's /sync "
        f"(best of {args.rounds}; all runs in brackets)",
        n,
        "rooms/s",
        "plain join-rule loop",
        "first_ts_s",
        floors,
        bots,
    )
    return 0


if __name__ == "__main__":
    run(main)
