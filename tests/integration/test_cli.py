"""The command line: check-config's exit codes and one-line errors, and `plan` changing nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from .conftest import bot_config

BASE = {
    "homeserver": {"url": "http://127.0.0.1:8008"},
    "bot": {"user_id": "@spacesync:example.org", "access_token": "s3cr3t-token"},
    "admin": {"room": "!admin:example.org"},
    "spaces": [{"room": "!space:example.org", "on_leave": "kick"}],
}


def spacesync(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spacesync", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def write(path: Path, data: dict) -> Path:
    with path.open("w") as f:
        YAML().dump(data, f)
    return path


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c["homeserver"].pop("url"), "homeserver.url"),
        (lambda c: c["spaces"][0].update(on_leave="explode"), "spaces[0].on_leave"),
        (lambda c: c.update(database={"url": "mysql://x"}), "database.url"),
        (lambda c: c["spaces"][0].update(on_leav="kick"), "spaces[0].on_leav"),
    ],
)
def test_check_config_rejects_with_one_line(tmp_path, mutate, key):
    config = json.loads(json.dumps(BASE))
    mutate(config)
    result = spacesync("-c", str(write(tmp_path / "c.yaml", config)), "check-config")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "s3cr3t" not in result.stderr


def test_check_config_accepts_the_example(tmp_path):
    result = spacesync("-c", str(Path(__file__).parents[2] / "config.example.yaml"), "check-config")
    assert result.returncode == 0, result.stderr


def test_default_config_path_from_environment(tmp_path, monkeypatch):
    path = write(tmp_path / "elsewhere.yaml", BASE)
    monkeypatch.setenv("SPACESYNC_CONFIG", str(path))
    assert spacesync("check-config", cwd=tmp_path).returncode == 0


async def test_plan_shows_grandchild_eviction_and_changes_nothing(synapse, world, make_user, tmp_path):
    space = await world.space("S")
    sub = await world.space("T", parent=space)
    room = await world.room(sub, "R")
    user = await make_user("leaver")
    for r in (space, sub, room):
        await user.client.join(r)
    await user.client.leave(space)
    admin = await world.admin_room()
    config = bot_config(synapse, world.bot, admin, f"sqlite:{tmp_path}/plan.db", [{"room": space}])
    path = write(tmp_path / "config.yaml", config)

    result = spacesync("-c", str(path), "plan", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    kicks = {(a["room_id"], a["user_id"]) for a in plan["actions"] if a["action"] == "kick"}
    assert kicks == {(sub, user.user_id), (room, user.user_id)}
    assert set(plan["rooms"]) >= {space, sub, room}
    assert all(isinstance(w, str) for w in plan["warnings"])
    assert user.user_id in await world.owner.client.joined_members(room)

    table = spacesync("-c", str(path), "plan")
    assert table.returncode == 0 and "kick" in table.stdout and room in table.stdout
