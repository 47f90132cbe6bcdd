"""The scale benchmark keeps working: its synthetic homeserver serves what a sync filter asks for, and a small
run takes the real `spacesync run` process through start-up, a no-op reconcile, a leave and a held exodus."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _members(sync: dict) -> int:
    rooms = sync["rooms"]["join"].values()
    return sum(
        1
        for room in rooms
        for e in room["state"]["events"] + room["timeline"]["events"]
        if e["type"] == "m.room.member"
    )


async def test_the_synthetic_homeserver_honours_the_sync_filter() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCHMARKS / "synthetic.py"),
        "serve",
        *("--rooms", "5", "--members", "40", "--users", "100", "--bot-token", "B", "--owner-token", "O"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 30)).split()[1].decode()
        headers = {"Authorization": "Bearer B"}
        async with aiohttp.ClientSession(headers=headers) as http:

            async def sync(flt: dict, since: str | None = None) -> dict:
                params = {"filter": json.dumps(flt), "timeout": "0"}
                if since:
                    params["since"] = since
                async with http.get(f"{url}/_matrix/client/v3/sync", params=params) as resp:
                    assert resp.status == 200
                    return await resp.json()

            full = await sync({"room": {"timeline": {"limit": 10}}})
            lazy = await sync({"room": {"timeline": {"limit": 10}, "state": {"lazy_load_members": True}}})
            no_members = await sync({"room": {"timeline": {"limit": 0}, "state": {"not_types": ["m.room.member"]}}})
            # 7 rooms: the Space (100 users, the owner, the bot), the admin room (owner, bot), 5 children (40 + 2)
            assert _members(full) == 102 + 2 + 5 * 42
            assert _members(lazy) <= 7 * 12 < _members(full)
            assert _members(no_members) == 0
            info = await (await http.get(f"{url}/_bench/info")).json()
            room = info["children"][0]
            async with http.get(f"{url}/_matrix/client/v3/rooms/{quote(room)}/state") as resp:
                state = await resp.json()
            member = next(
                e["state_key"]
                for e in state
                if e["type"] == "m.room.member" and e["state_key"] not in (info["owner"], info["bot"])
            )
            async with http.post(
                f"{url}/_matrix/client/v3/rooms/{quote(room)}/kick", json={"user_id": member, "reason": "test"}
            ) as resp:
                assert resp.status == 200
            later = await sync({"room": {"timeline": {"limit": 10}}}, since=full["next_batch"])
            (event,) = later["rooms"]["join"][room]["timeline"]["events"]
            assert event["state_key"] == member and event["content"]["membership"] == "leave"
            assert event["unsigned"]["prev_content"]["membership"] == "join"
            # The bot kicked out of a room: the room shows under `leave`, no longer under `join`.
            async with http.post(
                f"{url}/_matrix/client/v3/rooms/{quote(room)}/kick",
                json={"user_id": info["bot"]},
                headers={"Authorization": "Bearer O"},
            ) as resp:
                assert resp.status == 200
            gone = await sync({"room": {"timeline": {"limit": 10}}}, since=later["next_batch"])
            assert room not in gone["rooms"].get("join", {})
            (event,) = gone["rooms"]["leave"][room]["timeline"]["events"]
            assert event["state_key"] == info["bot"] and event["sender"] == info["owner"]
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.timeout(120)
def test_a_small_scale_run_reaches_its_plan_evicts_the_leaver_and_holds_the_exodus() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "scale.py"),
            *(
                "--rooms",
                "20",
                "--members",
                "30",
                "--users",
                "300",
                "--exodus",
                "30",
                "--timeout",
                "30",
                "--periodic",
                "10",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT scale "))
    result = json.loads(line.split(" ", 2)[2])["synthetic"]
    assert result["first_plan"]["managed"] == 21  # the Space and its 20 children
    assert result["cold_start_s"] > 0 and result["floor"]["seconds"] > 0
    assert result["startup"]["state"]["requests"] >= 21
    assert result["initial_sync"]["requests"] == 1 and result["initial_sync"]["bytes"] > 0
    # The first /sync lazy-loads members: a fraction of what reading every room's state takes.
    assert result["initial_sync"]["bytes"] < result["floor"]["bytes"] / 4, result["initial_sync"]
    assert result["peak_rss"] > 0 and result["steady_rss"] > 0
    assert result["noop"]["planned"] == 0 and result["noop"]["classes"]["state"]["requests"] >= 21
    # The timer's reconcile reads a rolling slice, not every room.
    assert result["periodic"]["planned"] == 0 and result["periodic"]["rooms_read"] < 21
    assert result["leave"]["rooms"] > 0 and result["leave"]["kicks"] == result["leave"]["rooms"]
    assert result["exodus"]["kicks_sent"] == 0 and result["exodus"]["held_actions"] > 0
