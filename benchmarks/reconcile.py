"""Full-reconcile cost: a hierarchy with nothing to do. How many requests, how long, how much memory?

A Space with --rooms children (2 members each: the owner and the bot), and a second Space with
--member-rooms children measured twice, with 2 and then with 20 members per room: the bot's requests
should grow with rooms, not with members. Each measurement runs the bot in a fresh child process
(so its peak RSS is its own): it connects, runs one full reconcile cold and two warm (the periodic
case; the better is shown), and counts its homeserver requests with the
spacesync_homeserver_request_seconds histogram.
Floor: a plain loop of GET /state over the same rooms (best of 1 and 8 in flight).

    .venv/bin/python benchmarks/reconcile.py [--rooms 500] [--member-rooms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    Bench,
    admin_room,
    bot_config,
    build_space,
    fmt_s,
    homeserver,
    in_flight,
    join_all,
    print_machine,
    print_result,
    print_table,
    q,
    quiesce,
    request,
    run,
)


# region the child: one bot process, one measurement
def request_count() -> float:
    from spacesync.metrics import REGISTRY

    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "spacesync_homeserver_request_seconds":
            total += sum(s.value for s in metric.samples if s.name.endswith("_count"))
    return total


async def child(config_path: str) -> int:
    import resource

    from common import quiet_logging

    config_data = json.loads(Path(config_path).read_text())
    quiet_logging(Path(config_path).with_suffix(".log"))
    from spacesync.config import parse_config
    from spacesync.engine.runtime import App

    app = App(parse_config(config_data, env={}))
    await app.start_store()
    try:
        await app.matrix.connect()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        runs = []
        for label in ("cold", "warm", "warm"):
            requests = request_count()
            started = time.monotonic()
            result = await app.reconciler.reconcile("benchmark", refresh=True)
            plan, batches = result.plan, result.batches
            runs.append(
                {
                    "run": label,
                    "seconds": time.monotonic() - started,
                    "requests": int(request_count() - requests),
                    "actions": len(plan.actions),
                    "managed": len(plan.managed),
                    "batches": len(batches),
                }
            )
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"runs": runs, "peak_rss_mib": rss / 1024, "rss_before_mib": rss_before / 1024}))
    finally:
        await app.matrix.close()
        await app.store.stop()
    return 0


# endregion


async def measure_bot(bench: Bench, admin: str, space: str) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bot-", dir=bench.workdir))
    config = bot_config(bench, workdir, admin, space, concurrency=8)
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    await quiesce(bench)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring bot failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


async def floor(bench: Bench, rooms: list[str]) -> dict:
    session = await bench.http()
    best = None
    for concurrency in (1, 8):
        await quiesce(bench)

        async def get(room: str) -> None:
            await request(
                session, bench.bot.access_token, "GET", f"{bench.url}/_matrix/client/v3/rooms/{q(room)}/state"
            )

        started = time.monotonic()
        await in_flight(rooms, concurrency, get)
        seconds = time.monotonic() - started
        if best is None or seconds < best["seconds"]:
            best = {"concurrency": concurrency, "seconds": seconds, "requests": len(rooms)}
    assert best is not None
    return best


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=500)
    parser.add_argument(
        "--member-rooms", type=int, default=100, help="rooms of the Space measured with 2 and then 20 members per room"
    )
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return await child(args.child)
    print_machine()
    results = []
    async with homeserver("reconcile") as bench:
        admin = await admin_room(bench)
        small, small_rooms = await build_space(bench, args.member_rooms, name="small")
        big, big_rooms = await build_space(bench, args.rooms, name="big")
        cases = [(big, [big] + big_rooms, 2), (small, [small] + small_rooms, 2)]
        for space, rooms, members in cases:
            bot = await measure_bot(bench, admin, space)
            results.append({"rooms": len(rooms), "members": members, "bot": bot, "floor": await floor(bench, rooms)})
        extra = await bench.users_named(*(f"member{i}" for i in range(args.members - 2)))
        await join_all(extra, small, small_rooms)
        rooms = [small] + small_rooms
        bot = await measure_bot(bench, admin, small)
        results.append({"rooms": len(rooms), "members": args.members, "bot": bot, "floor": await floor(bench, rooms)})
    print()
    print("one full reconcile with nothing to do (rooms include the Space itself)")
    rows = []
    for r in results:
        cold, *warms = r["bot"]["runs"]
        warm = min(warms, key=lambda x: x["seconds"])
        f = r["floor"]
        rows.append(
            [
                r["rooms"],
                r["members"],
                warm["requests"],
                fmt_s(warm["seconds"]),
                fmt_s(cold["seconds"]),
                f"{r['bot']['peak_rss_mib']:.0f} MiB",
                f"{fmt_s(f['seconds'])} ({f['concurrency']} in flight)",
                f"{warm['seconds'] / f['seconds']:.2f}",
                warm["actions"],
            ]
        )
    print_table(
        [
            "rooms",
            "members/room",
            "requests",
            "reconcile (warm)",
            "reconcile (cold)",
            "peak RSS",
            "floor: GET /state loop",
            "ratio",
            "actions",
        ],
        rows,
    )
    print_result("reconcile", {"results": results})
    return 0


if __name__ == "__main__":
    run(main)
