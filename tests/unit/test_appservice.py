"""Appservice mode without a homeserver: the registration written, the config section read (one-line errors), a
transaction put in the shape of a /sync answer, and the command line."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient as WebClient
from aiohttp.test_utils import TestServer
from ruamel.yaml import YAML

from spacesync.cli import main
from spacesync.config import AppserviceConfig, ConfigError, parse_config
from spacesync.engine.transport import KEEP_TYPES
from spacesync.matrix.appservice import TransactionServer, sync_answer
from spacesync.model import UserID
from spacesync.registration import covers, make_registration, read_registration, write_registration

BOT = "@spacesync:example.org"


def raw(appservice: dict[str, Any] | None, **bot: Any) -> dict[str, Any]:
    return {
        "homeserver": {"url": "https://matrix.example.org"},
        "bot": {"user_id": BOT, **bot},
        "admin": {"room": "!admin:example.org"},
        "appservice": appservice,
    }


def registration_file(tmp_path: Path, **changes: Any) -> Path:
    data = make_registration(UserID(BOT), AppserviceConfig("127.0.0.1", 29317, "", ""))
    data.update(changes)
    path = tmp_path / "registration.yaml"
    path.write_text(json.dumps(data))
    return path


def test_the_registration_names_only_the_bot_and_is_never_rate_limited(tmp_path: Path) -> None:
    data = make_registration(UserID(BOT), AppserviceConfig("127.0.0.1", 29317, "", ""))
    assert data["url"] == "http://127.0.0.1:29317"
    assert data["rate_limited"] is False
    assert data["as_token"] != data["hs_token"] and len(data["as_token"]) >= 64
    assert data["sender_localpart"] == "spacesync-appservice"
    [users] = data["namespaces"]["users"]
    assert users["exclusive"] is True
    assert re.match(users["regex"], BOT)
    for other in ("@spacesync:example.org.evil", "@spacesyncx:example.org", "@xspacesync:example.org"):
        assert not re.match(users["regex"], other), other
    again = make_registration(UserID(BOT), AppserviceConfig("127.0.0.1", 29317, "", ""))
    assert again["as_token"] != data["as_token"]

    path = tmp_path / "registration.yaml"
    write_registration(path, data)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert YAML(typ="safe").load(path.read_text()) == data
    with pytest.raises(FileExistsError):
        write_registration(path, again)


def test_the_config_reads_the_tokens_from_the_registration(tmp_path: Path) -> None:
    path = registration_file(tmp_path)
    tokens = read_registration(str(path))
    config = parse_config(raw({"listen": "0.0.0.0:29317", "registration": str(path)}), env={})
    assert config.appservice is not None
    assert (config.appservice.as_token, config.appservice.hs_token) == (tokens["as_token"], tokens["hs_token"])
    assert config.bot.access_token is None and config.bot.password is None
    assert tokens["as_token"] not in repr(config) and tokens["hs_token"] not in repr(config)


def test_tokens_given_directly_or_in_files(tmp_path: Path) -> None:
    (tmp_path / "hs").write_text("hs-secret\n")
    section = {"listen": "127.0.0.1:1", "as_token": "as-secret", "hs_token_file": str(tmp_path / "hs")}
    config = parse_config(raw(section), env={})
    assert config.appservice is not None
    assert (config.appservice.as_token, config.appservice.hs_token) == ("as-secret", "hs-secret")


@pytest.mark.parametrize(
    ("appservice", "bot", "expected"),
    [
        ({"registration": "/nonexistent/r.yaml"}, {}, "appservice.registration: no such file"),
        ({"as_token": "a"}, {}, "appservice.hs_token: missing"),
        ({"as_token": "a", "hs_token": "a"}, {}, "as_token and hs_token are the same"),
        ({"as_token": "a", "hs_token": "b"}, {"access_token": "t"}, "bot.access_token: not used by an appservice"),
        ({"as_token": "a", "hs_token": "b", "listen": "nowhere"}, {}, 'appservice.listen: expected "host:port"'),
        ({"as_token": "a", "hs_token": "b", "id": "a b"}, {}, "appservice.id"),
        ({"as_token": "a", "hs_tokn": "b"}, {}, "appservice.hs_tokn: unknown key; did you mean 'hs_token'?"),
    ],
)
def test_bad_appservice_config_is_one_line(appservice: dict[str, Any], bot: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(raw(appservice, **bot), env={})
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_a_registration_for_another_bot_or_with_the_bot_as_sender_is_refused(tmp_path: Path) -> None:
    other = registration_file(tmp_path, namespaces={"users": [{"exclusive": True, "regex": "^@other:example.org$"}]})
    with pytest.raises(ConfigError, match=r"does not cover bot\.user_id"):
        parse_config(raw({"registration": str(other)}), env={})
    (tmp_path / "registration.yaml").unlink()
    sender = registration_file(tmp_path, sender_localpart="spacesync")
    with pytest.raises(ConfigError, match="Synapse refuses /sync to an appservice's sender"):
        parse_config(raw({"registration": str(sender)}), env={})
    assert not covers({"namespaces": {"users": [{"exclusive": False, "regex": ".*"}]}}, BOT)


def test_a_transaction_becomes_a_sync_answer() -> None:
    room, other = "!room:example.org", "!other:example.org"
    leave = {
        "type": "m.room.member",
        "state_key": "@alice:example.org",
        "room_id": room,
        "sender": "@alice:example.org",
        "content": {"membership": "leave"},
        "prev_content": {"membership": "join"},
        "event_id": "$1",
    }
    topic = {"type": "m.room.topic", "state_key": "", "room_id": room, "content": {"topic": "x"}, "event_id": "$2"}
    invite = {
        "type": "m.room.member",
        "state_key": BOT,
        "room_id": other,
        "sender": "@mod:example.org",
        "content": {"membership": "invite"},
        "unsigned": {"invite_room_state": [{"type": "m.room.name", "state_key": "", "content": {"name": "n"}}]},
        "event_id": "$3",
    }
    kicked = {**invite, "room_id": "!gone:example.org", "content": {"membership": "leave"}, "event_id": "$4"}
    message = {"type": "m.room.message", "room_id": room, "sender": "@mod:example.org", "content": {}, "event_id": "$5"}
    answer = sync_answer([leave, topic, invite, kicked, message, {"no": "room"}], BOT, KEEP_TYPES)
    rooms = answer["rooms"]
    timeline = rooms["join"][room]["timeline"]
    assert [e["event_id"] for e in timeline["events"]] == ["$1", "$5"]  # no topic: not a type spacesync reads
    assert timeline["events"][0]["unsigned"]["prev_content"] == {"membership": "join"}
    assert [e["type"] for e in rooms["invite"][other]["invite_state"]["events"]] == ["m.room.name", "m.room.member"]
    assert set(rooms["leave"]) == {"!gone:example.org"}


def test_the_command_writes_the_registration_the_config_then_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registration = tmp_path / "registration.yaml"
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(raw({"listen": "127.0.0.1:29317", "registration": str(registration)})))
    assert main(["-c", str(config), "appservice", "registration"]) == 0
    written = read_registration(str(registration))
    out = capsys.readouterr()
    assert written["as_token"] not in out.out + out.err and written["hs_token"] not in out.out + out.err
    assert written["url"] == "http://127.0.0.1:29317"
    assert main(["-c", str(config), "check-config"]) == 0
    assert main(["-c", str(config), "appservice", "registration"]) == 1
    assert "exists" in capsys.readouterr().err
    assert read_registration(str(registration)) == written

    plain = tmp_path / "plain.yaml"
    plain.write_text(json.dumps({k: v for k, v in raw(None, access_token="t").items() if k != "appservice"}))
    assert main(["-c", str(plain), "appservice", "registration"]) == 2
    assert "appservice: not set" in capsys.readouterr().err


async def test_the_transaction_server_answers_by_token_leadership_and_outcome() -> None:
    """401 without the hs_token; 503 while standing by (the homeserver sends it again); 500 when the handler
    failed (again); 200 only after the handler returned."""
    applied: list[tuple[str, int]] = []
    refusal: list[str | None] = ["standing by"]
    failing = [True]

    async def handler(txn_id: str, events: list[dict[str, Any]]) -> None:
        if failing[0]:
            raise RuntimeError("database gone")
        applied.append((txn_id, len(events)))

    server = TransactionServer("hs-secret", handler, lambda: refusal[0])
    path = "/_matrix/app/v1/transactions/7"
    body = {"events": [{"type": "m.room.message", "room_id": "!r:x"}]}
    auth = {"Authorization": "Bearer hs-secret"}
    async with WebClient(TestServer(server.app)) as web:
        assert (await web.put(path, json=body, headers={"Authorization": "Bearer wrong"})).status == 401
        assert (await web.put(path, json=body)).status == 401
        answer = await web.put(path, json=body, headers=auth)
        assert answer.status == 503 and (await answer.json())["errcode"] == "M_UNKNOWN"
        refusal[0] = None
        assert (await web.put(path, json=body, headers=auth)).status == 500
        assert applied == []
        failing[0] = False
        assert (await web.put(path, data=b"{not json", headers=auth)).status == 400
        assert (await web.put(path, json=body, headers=auth)).status == 200
        assert applied == [("7", 1)]
        assert (await web.post("/_matrix/app/v1/ping", json={}, headers=auth)).status == 200


def test_tokens_given_in_the_config_are_the_registrations(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(raw({"listen": "127.0.0.1:29317", "as_token": "as-given", "hs_token": "hs-given"})))
    out = tmp_path / "registration.yaml"
    assert main(["-c", str(config), "appservice", "registration", "-o", str(out), "--url", "http://bot:29317"]) == 0
    written = read_registration(str(out))
    assert (written["as_token"], written["hs_token"], written["url"]) == ("as-given", "hs-given", "http://bot:29317")
