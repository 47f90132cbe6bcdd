"""User mode against appservice mode on one Synapse with its stock rate limits: a user leaves a Space with N
restricted children; how soon is the user out of all of them?

(A) floor: a plain aiohttp loop kicking an identical user from every child as the appservice's bot (never
    throttled), 32 in flight: the homeserver's own unthrottled floor, measured in the same run.
(B) spacesync in user mode: an ordinary account (its access token) under the stock `rc_message` limit
    (0.2/s, burst 10): past the burst, every kick waits out a 429.
(C) spacesync in appservice mode: the registration's user with `rate_limited: false`; the leave arrives in a
    transaction instead of a /sync answer.

Timed as benchmarks/eviction.py times them: to the moment the last kick reaches an observer's /sync.

    .venv/bin/python benchmarks/appservice.py [--rooms 100]
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    Bench,
    Stopwatch,
    SyncWatcher,
    admin_room,
    bot_config,
    bounded,
    build_space,
    fmt_s,
    in_flight,
    join_all,
    kicked,
    print_machine,
    print_result,
    print_table,
    q,
    quiesce,
    request,
    run,
    running_bot,
)

from spacesync.config import AppserviceConfig
from spacesync.demo_appservice import appservice_user
from spacesync.model import UserID
from spacesync.registration import make_registration, read_registration, write_registration
from spacesync.testing import Synapse, TestUser
from spacesync.testing.homeserver import free_port

CONCURRENCY = 32


@dataclass
class TwoBots(Bench):
    """The Bench with a second bot: `bot` is the user-mode account, `appservice_bot` the registration's user."""

    appservice_bot: TestUser | None = None

    def levels(self, extra: dict[str, int] | None = None) -> dict[str, Any]:
        assert self.appservice_bot is not None
        return super().levels({self.appservice_bot.user_id: 100, **(extra or {})})


async def floor(bench: TwoBots, watcher: SyncWatcher, rooms: list[str], user_id: str, as_token: str) -> dict[str, Any]:
    """Kicks with the as_token acting as the bot (identity assertion), as spacesync sends them: the bot's own
    device token would be throttled (only the appservice's token is exempt)."""
    session = await bench.http()
    assert bench.appservice_bot is not None
    acting_as = q(bench.appservice_bot.user_id)
    watch = Stopwatch(bench)
    watch.start()

    async def kick(room: str) -> None:
        url = f"{bench.url}/_matrix/client/v3/rooms/{q(room)}/kick?user_id={acting_as}"
        await request(session, as_token, "POST", url, {"user_id": user_id, "reason": "benchmark floor"})

    await in_flight(rooms, CONCURRENCY, kick)
    return watch.stop(await watcher.wait_rooms(rooms, kicked(user_id), timeout=900), CONCURRENCY)


async def evict(bench: TwoBots, watcher: SyncWatcher, config: dict[str, Any], space: str, rooms: list[str], user, by):
    async with running_bot(bench, config) as app:
        await quiesce(bench)
        watch = Stopwatch(bench)
        await user.client.leave(space)
        watch.start()
        seen = await watcher.wait_rooms(rooms, kicked(user.user_id, by=by), timeout=1800)
        result = watch.stop(seen, CONCURRENCY)
        result["ratelimit_wait_s"] = round(app.matrix.ratelimit_wait_s, 2)
        await app.executor.wait_idle()
    return result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=100)
    n = parser.parse_args().rooms
    print_machine()
    with tempfile.TemporaryDirectory(prefix="spacesync-bench-appservice-") as tmp:
        workdir = Path(tmp)
        listen = free_port()
        registration = workdir / "registration.yaml"
        bot_id = UserID("@spacesync:localhost")
        write_registration(registration, make_registration(bot_id, AppserviceConfig("127.0.0.1", listen, "", "")))
        synapse = Synapse(workdir / "synapse", app_service_config_files=[registration])  # stock limits
        started = time.monotonic()
        await synapse.start()
        print(f"homeserver: Synapse (stock rate limits) at {synapse.url} up in {time.monotonic() - started:.1f} s")
        try:
            owner = await synapse.register(f"owner_{secrets.token_hex(3)}")
            user_bot = await synapse.register(f"userbot_{secrets.token_hex(3)}")
            as_token = read_registration(str(registration))["as_token"]
            as_bot = await appservice_user(synapse, as_token, "spacesync")
            for account in (owner, user_bot, as_bot):  # the set-up's joins; the bots' are dropped before the runs
                await synapse.exempt(account.user_id)
            bench = TwoBots(synapse, workdir, owner, user_bot, appservice_bot=as_bot)
            space, rooms = await build_space(bench, n)
            await as_bot.client.join(space)
            await bounded(as_bot.client.join(r) for r in rooms)
            admin = await admin_room(bench)
            await owner.client.invite(admin, as_bot.user_id)
            await as_bot.client.join(admin)
            observer, *victims = await bench.users_named("observer", "floor", "usermode", "appservice")
            for user in (observer, *victims):
                await synapse.exempt(user.user_id)
            await join_all([observer, *victims], space, rooms)
            watcher = SyncWatcher(bench, observer)
            await watcher.start()
            try:
                await quiesce(bench)
                server_admin = await synapse.register(f"admin_{secrets.token_hex(3)}", admin=True)
                bench.users.append(server_admin)
                for bot in (user_bot, as_bot):  # both bots back under the stock limits
                    await request(
                        await bench.http(),
                        server_admin.access_token,
                        "DELETE",
                        f"{bench.url}/_synapse/admin/v1/users/{q(bot.user_id)}/override_ratelimit",
                    )
                a = await floor(bench, watcher, rooms, victims[0].user_id, as_token)
                user_mode = bot_config(bench, workdir / "user", admin, space, concurrency=CONCURRENCY)
                (workdir / "user").mkdir()
                b = await evict(bench, watcher, user_mode, space, rooms, victims[1], user_bot.user_id)
                as_mode = bot_config(bench, workdir / "as", admin, space, concurrency=CONCURRENCY)
                as_mode["bot"] = {"user_id": as_bot.user_id}
                as_mode["appservice"] = {"listen": f"127.0.0.1:{listen}", "registration": str(registration)}
                (workdir / "as").mkdir()
                c = await evict(bench, watcher, as_mode, space, rooms, victims[2], as_bot.user_id)
            finally:
                await watcher.stop()
                for user in (owner, user_bot, as_bot, *bench.users):
                    await user.client.close()
                if bench.session is not None:
                    await bench.session.close()
        finally:
            await synapse.stop()
    print(f"\neviction of one user from {n} rooms on stock rate limits: until the last kick reached a /sync")
    rows = [
        ["A floor: plain kick loop as the appservice, 32 in flight", a],
        ["B spacesync, user mode (access token)", b],
        ["C spacesync, appservice mode", c],
    ]
    print_table(
        ["run", "time", "kicks/s", "429 wait", "B or C / A"],
        [
            [label, fmt_s(r["seen_s"]), f"{n / r['seen_s']:.1f}", f"{r.get('ratelimit_wait_s', 0):.1f} s"]
            + [f"{r['seen_s'] / a['seen_s']:.2f}"]
            for label, r in rows
        ],
    )
    print_result("appservice", {"rooms": n, "floor": a, "user_mode": b, "appservice": c})
    return 0


if __name__ == "__main__":
    run(main)
