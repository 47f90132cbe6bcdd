"""Power-level mirroring latency: one promotion in a Space with N children; how soon do all children show it?

(A) floor: a plain aiohttp loop of N m.room.power_levels PUTs (one per child, contents prepared
    beforehand), at 1, 8 and 32 in flight; the best is the homeserver's floor.
(B) spacesync: the owner raises a user to 50 in the Space; the bot (App, in-process, SQLite) mirrors it
    into every child.

Both are timed to the moment the last child's new m.room.power_levels reaches the long-poll /sync of an
observer who is in every room; A from its first PUT, B from the promotion PUT's return.

    .venv/bin/python benchmarks/power_levels.py [--rooms 100]
"""

from __future__ import annotations

import time

from common import (
    Bench,
    Stopwatch,
    SyncWatcher,
    admin_room,
    bounded,
    build_space,
    homeserver,
    in_flight,
    join_all,
    level_shown,
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

LEVEL = 50


async def floor(bench: Bench, watcher: SyncWatcher, rooms: list[str], user_id: str, concurrency: int) -> dict:
    session = await bench.http()
    token = bench.bot.access_token

    def url(room: str) -> str:
        return f"{bench.url}/_matrix/client/v3/rooms/{q(room)}/state/m.room.power_levels/"

    current = await bounded(request(session, token, "GET", url(room)) for room in rooms)
    contents = {}
    for room, content in zip(rooms, current):
        content["users"] = {**content.get("users", {}), user_id: LEVEL}
        contents[room] = content
    await quiesce(bench)

    async def put(room: str) -> None:
        await request(session, token, "PUT", url(room), contents[room])

    hs_cpu, cpu, started = process_cpu_s(bench.synapse.pid), time.process_time(), time.monotonic()
    await in_flight(rooms, concurrency, put)
    returned = time.monotonic() - started
    seen = await watcher.wait_rooms(rooms, level_shown(user_id, LEVEL), timeout=300)
    return {
        "concurrency": concurrency,
        "returned_s": returned,
        "cpu_s": time.process_time() - cpu,
        "synapse_cpu_s": process_cpu_s(bench.synapse.pid) - hs_cpu,
        "seen_s": max(s.arrived for s in seen.values()) - started,
    }


async def spacesync(
    bench: Bench, watcher: SyncWatcher, space: str, rooms: list[str], admin: str, user_id: str, concurrency: int
) -> dict:
    async with settled_bot(bench, admin, space, concurrency) as app:
        levels = await bench.owner.client.get_power_levels(space)
        levels["users"] = {**levels.get("users", {}), user_id: LEVEL}
        watch = Stopwatch(bench)
        await bench.owner.client.send_state(space, "m.room.power_levels", levels)
        watch.start()
        try:
            seen = await watcher.wait_rooms(rooms, level_shown(user_id, LEVEL), timeout=120)
        except TimeoutError as e:
            shown = len(watcher.matching(level_shown(user_id, LEVEL)))
            plan = app.reconciler.last_plan
            journal = await app.store.journal.depth()
            log_tail = (bench.workdir / "spacesync.log").read_text().splitlines()[-15:]
            print("journal:", journal, "\nthe bot's last log lines:\n" + "\n".join(log_tail))
            raise SystemExit(
                f"power-level mirroring did not reach every child: {e}; {shown} rooms show {user_id} at "
                f"{LEVEL}; last plan: {len(plan.actions) if plan else '?'} actions, "
                f"findings {[str(f) for f in (plan.findings if plan else [])][:5]}"
            ) from None
        result = watch.stop(seen, concurrency)
        await app.executor.wait_idle()
    return result


async def main() -> int:
    args, floor_c, bot_c = ratio_args(__doc__.splitlines()[0])
    n = args.rooms
    print_machine()
    async with homeserver("power-levels") as bench:
        space, rooms = await build_space(bench, n)
        admin = await admin_room(bench)
        observer = await bench.user("observer")
        await join_all([observer], space, rooms)
        runs = [("floor", c, r) for r in range(args.rounds) for c in floor_c]
        runs += [("bot", c, r) for r in range(args.rounds) for c in bot_c]
        users = await bench.users_named("warmup", *(f"{kind}{c}r{r}" for kind, c, r in runs))
        plan = dict(zip(runs, users[1:]))
        watcher = SyncWatcher(bench, observer)
        await watcher.start()
        floors: dict[int, list[dict]] = {c: [] for c in floor_c}
        bots: dict[int, list[dict]] = {c: [] for c in bot_c}
        try:
            await floor(bench, watcher, rooms, users[0].user_id, 8)  # warm Synapse's caches; not counted
            for r in range(args.rounds):  # floor and spacesync runs alternate, so drift hits both
                for c in floor_c:
                    floors[c].append(await floor(bench, watcher, rooms, plan["floor", c, r].user_id, c))
                for c in bot_c:
                    bots[c].append(await spacesync(bench, watcher, space, rooms, admin, plan["bot", c, r].user_id, c))
        finally:
            await watcher.stop()
    report_ratio(
        "power_levels",
        f"one promotion mirrored into {n} rooms: time until the last child's new power levels reached an "
        f"observer's /sync (best of {args.rounds}; all runs in brackets)",
        n,
        "writes/s",
        "plain PUT loop",
        "first_ts_s",
        floors,
        bots,
    )
    return 0


if __name__ == "__main__":
    run(main)
