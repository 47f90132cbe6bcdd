"""Configuration loading: the example file, defaults, secrets, and one-line errors naming the key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from spacesync.config import (
    Config,
    ConfigError,
    DatabaseConfig,
    ShareKeysWith,
    WebConfig,
    default_config_path,
    load_config,
    parse_config,
    parse_duration,
)
from spacesync.model import OnLeave, RoomID, SpacePolicy
from spacesync.refs import RoomRef

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"
TOKEN = "syt_c2VjcmV0_TOPSECRETTOKEN_123"
PASSWORD = "hunter2-very-secret"

DELETE = object()

MINIMAL: dict[str, Any] = {
    "homeserver": {"url": "http://127.0.0.1:8008"},
    "bot": {"user_id": "@spacesync:example.org", "access_token": TOKEN},
    "admin": {"room": "!admin:example.org"},
}


def config(env: dict[str, str] | None = None, **changes: Any) -> Config:
    """MINIMAL with top-level keys replaced (DELETE deletes), parsed with an empty environment."""
    data = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        if value is DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    return parse_config(data, env=env or {})


def error(env: dict[str, str] | None = None, **changes: Any) -> str:
    with pytest.raises(ConfigError) as info:
        config(env, **changes)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_example_loads_with_every_key() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.homeserver.url == "https://matrix.example.org"
    assert cfg.bot.user_id == "@spacesync:example.org"
    assert cfg.bot.access_token == "CHANGE_ME" and cfg.bot.password is None
    assert cfg.admin.room == RoomRef(alias="#spacesync-admin:example.org")
    assert len(cfg.spaces) == 1 and cfg.spaces[0].room == RoomRef(alias="#community:example.org")
    assert cfg.reconcile_interval == 3600.0
    assert cfg.web == WebConfig("127.0.0.1", 9090)
    text = EXAMPLE.read_text()
    for key in (
        "device_id",
        "password_file",
        "power_level_map",
        "max_power_level",
        "creator_level",
        "invite_members",
        "concurrency",
        "max_attempts",
        "max_depth",
        "max_rooms",
        "max_seconds",
        "listen",
        "format",
        "dry_run",
        "guard_window",
        "max_failures",
        "request_timeout",
        "reason_template",
    ):
        assert f"{key}:" in text


def test_defaults() -> None:
    cfg = config(spaces=[{"room": "#space:example.org"}])
    assert cfg.database.url == "sqlite:spacesync.db"
    assert cfg.database.sqlite_path == Path("spacesync.db")
    assert cfg.admin.min_power_level == 50 and cfg.admin.users == frozenset()
    assert cfg.dry_run is False and cfg.max_evictions_without_confirmation == 25
    assert (cfg.executor.concurrency, cfg.executor.max_attempts, cfg.executor.max_failures) == (32, 8, 3)
    assert cfg.guard_window == 600.0 and cfg.spaces[0].guard_window == 600.0
    assert cfg.homeserver.request_timeout == 30.0


def test_guard_window_top_level_and_per_space() -> None:
    cfg = config(
        guard_window="1h", spaces=[{"room": "!a:example.org"}, {"room": "!b:example.org", "guard_window": "90s"}]
    )
    assert cfg.guard_window == 3600.0
    assert [s.guard_window for s in cfg.spaces] == [3600.0, 90.0]
    assert cfg.spaces[1].to_policy(RoomID("!b:example.org")).guard_window_s == 90.0
    assert (cfg.walk.max_depth, cfg.walk.max_rooms, cfg.walk.max_seconds) == (10, 2000, 120)
    assert cfg.walk.concurrency == 8
    assert config(spaces=[{"room": "!a:example.org"}], walk={"concurrency": 2}).walk.concurrency == 2
    assert (cfg.logging.level, cfg.logging.format) == ("INFO", "auto")
    space = cfg.spaces[0]
    assert space.on_leave is OnLeave.KICK and space.power_levels and not space.join_rules_enforce
    assert space.grace_period == 0.0 and space.max_evictions_without_confirmation == 25
    assert config(spaces=DELETE).spaces == ()


def test_space_fields_and_policy() -> None:
    cfg = config(
        max_evictions_without_confirmation=5,
        spaces=[
            {
                "room": "https://matrix.to/#/!space:example.org?via=example.org",
                "on_leave": "ban",
                "exempt": ["@ops:example.org", "matrix:u/bot:example.org"],
                "extra_rooms": ["!extra:example.org", "#lounge:example.org"],
                "grace_period": "10m",
                "power_levels": "off",
                "power_level_map": {100: 50},
                "max_power_level": 90,
                "join_rules": "enforce",
                "restrict_invite_rooms": True,
                "invite_members": True,
            },
            {"room": "#other:example.org", "max_evictions_without_confirmation": 100},
        ],
    )
    first, second = cfg.spaces
    assert first.room == RoomRef(room_id="!space:example.org", via=("example.org",))
    assert first.grace_period == 600.0 and first.max_evictions_without_confirmation == 5
    assert second.max_evictions_without_confirmation == 100
    policy = first.to_policy(
        "!space:example.org",
        exempt_extra=frozenset({"@extra:example.org"}),
        extra_rooms_resolved=frozenset({"!extra:example.org", "!lounge:example.org"}),
    )
    assert policy == SpacePolicy(
        room_id="!space:example.org",
        on_leave=OnLeave.BAN,
        exempt=frozenset({"@ops:example.org", "@bot:example.org", "@extra:example.org"}),
        extra_rooms=frozenset({"!extra:example.org", "!lounge:example.org"}),
        grace_period_s=600.0,
        power_levels=False,
        power_level_map={100: 50},
        max_power_level=90,
        enforce_join_rules=True,
        restrict_invite_rooms=True,
        invite_members=True,
        max_evictions_without_confirmation=5,
    )
    with pytest.raises(ValueError, match=r"#lounge:example\.org"):
        first.to_policy("!space:example.org")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"homeserver": {}},
            'homeserver.url: missing; set it to your homeserver\'s client URL, e.g. "https://matrix.example.org"',
        ),
        ({"homeserver": DELETE}, "homeserver.url: missing;"),
        ({"admin": DELETE}, "admin.room: missing;"),
        ({"homeserver": {"url": "ftp://x"}}, "homeserver.url: 'ftp://x' is not an http(s) URL"),
        (
            {"homeserver": {"url": "https://hs.example/_matrix/client"}},
            "homeserver.url: 'https://hs.example/_matrix/client' includes an API path; use the base URL, e.g. \"https://hs.example\"",
        ),
        (
            {"spaces": [{"room": "!s:example.org", "on_leave": "explode"}]},
            "spaces[0].on_leave: 'explode' is not one of kick, ban, none",
        ),
        (
            {"database": {"url": "mysql://x"}},
            "database.url: unsupported scheme 'mysql'; use sqlite:PATH or postgresql://…",
        ),
        ({"database": {"url": "spacesync.db"}}, "database.url: no scheme"),
        (
            {"spaces": [{"room": "!s:example.org", "on_leav": "kick"}]},
            "spaces[0].on_leav: unknown key; did you mean 'on_leave'?",
        ),
        (
            {"spaces": [{"room": "!s:example.org", "restrict_invite_room": True}]},
            "spaces[0].restrict_invite_room: unknown key; did you mean 'restrict_invite_rooms'?",
        ),
        (
            {"spaces": [{"room": "!s:example.org", "restrict_invite_rooms": "yes"}]},
            "spaces[0].restrict_invite_rooms: expected true or false, got 'yes'",
        ),
        ({"reconcile_intervall": "1h"}, "reconcile_intervall: unknown key; did you mean 'reconcile_interval'?"),
        ({"zzz": 1}, "zzz: unknown key; expected one of homeserver, bot,"),
        (
            {"spaces": [{"room": "!s:example.org", "grace_period": "5 minutes"}]},
            "spaces[0].grace_period: '5 minutes' is not a duration;",
        ),
        ({"spaces": [{"room": "!s:example.org", "grace_period": -1}]}, "spaces[0].grace_period: -1 is not a duration"),
        ({"reconcile_interval": "5s"}, "reconcile_interval: '5s' is below the minimum of 10s"),
        ({"guard_window": "soon"}, "guard_window: 'soon' is not a duration;"),
        ({"guard_window": 0}, "guard_window: 0 is below the minimum of 1s"),
        (
            {"spaces": [{"room": "!s:example.org", "guard_window": "-5m"}]},
            "spaces[0].guard_window: '-5m' is not a duration",
        ),
        ({"executor": {"max_failures": 0}}, "executor.max_failures: 0 is out of range; use a number between 1 and 100"),
        (
            {"homeserver": {"url": "https://example.org", "request_timeout": "0.5s"}},
            "homeserver.request_timeout: '0.5s' is below the minimum of 1s",
        ),
        ({"web": {"listen": 9090}}, 'web.listen: expected "host:port", got 9090'),
        ({"web": {"listen": "localhost"}}, "web.listen: expected \"host:port\", got 'localhost'"),
        ({"web": {"listen": "[::1]:99999"}}, 'web.listen: expected "host:port"'),
        ({"dry_run": "yes"}, "dry_run: expected true or false, got 'yes'"),
        ({"dry_run": None}, "dry_run: expected true or false, got null"),
        ({"executor": {"concurrency": 0}}, "executor.concurrency: 0 is out of range; use a number between 1 and 64"),
        ({"executor": {"concurrency": "8"}}, "executor.concurrency: expected a whole number, got '8'"),
        ({"admin": {"room": "foo"}}, "admin.room: 'foo' is not a room: expected !id:server"),
        ({"admin": {}}, "admin.room: missing;"),
        ({"admin": {"room": "!a:example.org", "users": ["bob"]}}, "admin.users[0]: 'bob' is not a user"),
        (
            {"admin": {"room": "!a:example.org", "users": "@bob:example.org"}},
            "admin.users: expected a list, got '@bob:example.org'",
        ),
        ({"spaces": [{"on_leave": "kick"}]}, "spaces[0].room: missing;"),
        ({"spaces": {"room": "!s:example.org"}}, "spaces: expected a list, got a mapping"),
        (
            {"spaces": [{"room": "!s:example.org", "power_level_map": {"admin": 50}}]},
            "spaces[0].power_level_map: key 'admin' is not a power level",
        ),
        (
            {"spaces": [{"room": "!s:example.org"}, {"room": "!s:example.org"}]},
            "spaces[1].room: '!s:example.org' is listed twice",
        ),
        ({"logging": {"level": "loud"}}, "logging.level: 'loud' is not one of DEBUG, INFO, WARNING, ERROR"),
        ({"bot": {"user_id": "spacesync", "access_token": TOKEN}}, "bot.user_id: 'spacesync' is not a user"),
        ({"reason_template": "{event} {room}"}, "reason_template: unknown placeholder {room}; use {event}, {space}"),
        ({"reason_template": "{event} {space"}, "reason_template: expected '}' before end of string; write"),
        ({"reason_template": "{event}"}, "reason_template: names no Space; include {space}"),
        ({"reason_template": "{space:>5d}"}, "reason_template: cannot be filled in"),
        ({"reason_template": 5}, "reason_template: expected a string, got 5"),
        (
            {"spaces": [{"room": "!s:example.org", "policy_lists": "#bans:example.org"}]},
            "spaces[0].policy_lists: expected a list, got '#bans:example.org'",
        ),
        (
            {"spaces": [{"room": "!s:example.org", "policy_lists": ["bans"]}]},
            "spaces[0].policy_lists[0]: 'bans' is not a room",
        ),
    ],
)
def test_errors_name_the_key(changes: dict[str, Any], expected: str) -> None:
    assert error(**changes).startswith(expected)


def test_values_accepted() -> None:
    assert config().reason_template == "{event} {space}"
    assert config(reason_template="[mod] {event} {space} ({space_id})").reason_template.startswith("[mod]")
    assert config(web={"listen": "[::1]:9090"}).web == WebConfig("::1", 9090)
    assert config(web={"listen": None}).web is None
    assert config(web={"listen": ""}).web is None
    assert config(logging={"level": "debug", "format": "json"}).logging.level == "DEBUG"
    assert config(reconcile_interval=30).reconcile_interval == 30.0
    assert config(database={"url": "sqlite:///var/lib/spacesync/db.sqlite"}).database.sqlite_path == Path(
        "/var/lib/spacesync/db.sqlite"
    )
    assert not config(database={"url": "postgres://u:p@db/spacesync"}).database.is_sqlite


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (0, 0.0),
        (1.5, 1.5),
        ("30s", 30.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("45", 45.0),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "h", "-5s", True, None, [1], "1 hour"])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_two_credentials() -> None:
    message = error(bot={"user_id": "@b:example.org", "access_token": TOKEN, "password": PASSWORD})
    assert message.startswith("bot: access_token and password are both set; keep exactly one of")
    assert TOKEN not in message and PASSWORD not in message


def test_no_credential() -> None:
    message = error(bot={"user_id": "@b:example.org", "access_token": None})
    assert message.startswith(
        "bot: no credential; set one of access_token, access_token_file, password or password_file"
    )
    assert "SPACESYNC_ACCESS_TOKEN" in message


def test_credentials_from_env() -> None:
    bot = {"user_id": "@b:example.org"}
    cfg = config(env={"SPACESYNC_ACCESS_TOKEN": TOKEN}, bot=bot)
    assert (cfg.bot.access_token, cfg.bot.password) == (TOKEN, None)
    cfg = config(env={"SPACESYNC_PASSWORD": PASSWORD}, bot=bot)
    assert (cfg.bot.access_token, cfg.bot.password) == (None, PASSWORD)
    # The environment overrides the file.
    cfg = config(env={"SPACESYNC_ACCESS_TOKEN": TOKEN}, bot={**bot, "access_token": "CHANGE_ME"})
    assert cfg.bot.access_token == TOKEN
    assert error(env={"SPACESYNC_ACCESS_TOKEN": TOKEN, "SPACESYNC_PASSWORD": PASSWORD}, bot=bot).startswith(
        "bot: SPACESYNC_ACCESS_TOKEN and SPACESYNC_PASSWORD are both set"
    )


def test_database_url_from_env() -> None:
    cfg = config(env={"SPACESYNC_DATABASE_URL": "postgresql://spacesync:pw@db:5432/spacesync"})
    assert cfg.database.url == "postgresql://spacesync:pw@db:5432/spacesync"
    assert error(env={"SPACESYNC_DATABASE_URL": "mysql://u:pw@x"}).startswith(
        "SPACESYNC_DATABASE_URL: unsupported scheme 'mysql'"
    )


def test_secret_files(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    cfg = config(bot={"user_id": "@b:example.org", "access_token_file": str(token_file)})
    assert cfg.bot.access_token == TOKEN
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    cfg = config(bot={"user_id": "@b:example.org", "password_file": str(password_file)})
    assert (cfg.bot.access_token, cfg.bot.password) == (None, PASSWORD)
    missing = tmp_path / "nope"
    message = error(bot={"user_id": "@b:example.org", "access_token_file": str(missing)})
    assert message.startswith(f"bot.access_token_file: no such file {str(missing)!r}")
    (tmp_path / "empty").write_text("\n")
    assert error(bot={"user_id": "@b:example.org", "password_file": str(tmp_path / "empty")}).startswith(
        "bot.password_file: file"
    )


def test_secrets_never_shown() -> None:
    db_url = f"postgresql://spacesync:{PASSWORD}@db:5432/spacesync?sslmode=require"
    cfg = config(bot={"user_id": "@b:example.org", "password": PASSWORD}, database={"url": db_url})
    text = repr(cfg)
    assert PASSWORD not in text and TOKEN not in text
    assert cfg.database.safe_url == "postgresql://spacesync:***@db:5432/spacesync?sslmode=require"
    assert "postgresql://spacesync:***@db" in repr(cfg.database)
    assert "password=***" in DatabaseConfig(f"postgresql://db/x?password={PASSWORD}").safe_url
    assert PASSWORD not in repr(config(env={"SPACESYNC_DATABASE_URL": db_url}))
    assert TOKEN not in repr(config(env={"SPACESYNC_ACCESS_TOKEN": TOKEN}))
    # Wrong types and bad URLs do not echo secret values either.
    for changes in (
        {"bot": {"user_id": "@b:example.org", "access_token": [TOKEN]}},
        {"bot": {"user_id": "@b:example.org", "password": PASSWORD, "access_token": TOKEN}},
        {"database": {"url": f"mysql://u:{PASSWORD}@x"}},
        {"database": {"url": f"postgresql://u:{PASSWORD}@x:notaport/db"}},
        {"database": {"url": [PASSWORD]}},
    ):
        message = error(**changes)
        assert PASSWORD not in message and TOKEN not in message, message


def test_yaml_syntax_error_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("homeserver:\n  url: http://x\n bot: [1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert message.startswith(f"{path} line 3: ")
    assert "\n" not in message


def test_yaml_duplicate_key_hides_value(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"bot:\n  access_token: a\n  access_token: {TOKEN}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path} line 3: found duplicate key")
    assert TOKEN not in str(info.value)


def test_missing_and_empty_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^config.yaml: no such file; copy config.example.yaml and fill it in$"):
        load_config("config.yaml", env={})
    (tmp_path / "config.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"^config.yaml: the file is empty"):
        load_config("config.yaml", env={})
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"^config: expected a mapping of settings, got a list$"):
        load_config("config.yaml", env={})


def test_default_config_path() -> None:
    assert default_config_path({}) == Path("config.yaml")
    assert default_config_path({"SPACESYNC_CONFIG": "/etc/spacesync.yaml"}) == Path("/etc/spacesync.yaml")


def test_pickle_key_from_config_or_file_never_shown(tmp_path: Path) -> None:
    assert config().bot.pickle_key is None
    assert config().admin.require_verified_device is False
    key = "0123456789abcdef-pickle"
    cfg = config(bot={**MINIMAL["bot"], "pickle_key": key})
    assert cfg.bot.pickle_key == key and key not in repr(cfg)
    key_file = tmp_path / "pickle"
    key_file.write_text(key + "\n")
    assert config(bot={**MINIMAL["bot"], "pickle_key_file": str(key_file)}).bot.pickle_key == key
    both = error(bot={**MINIMAL["bot"], "pickle_key": key, "pickle_key_file": str(key_file)})
    assert both == "bot: pickle_key and pickle_key_file are both set; keep one"
    short = error(bot={**MINIMAL["bot"], "pickle_key": "short"})
    assert short.startswith("bot.pickle_key: too short") and "short'" not in short
    missing = error(bot={**MINIMAL["bot"], "pickle_key_file": str(tmp_path / "nope")})
    assert missing.startswith("bot.pickle_key_file: no such file")
    assert config(admin={**MINIMAL["admin"], "require_verified_device": True}).admin.require_verified_device


def test_recovery_key_from_config_or_file_checked_and_never_shown(tmp_path: Path) -> None:
    from mautrix.crypto.ssss.util import encode_base58_recovery_key

    key = encode_base58_recovery_key(bytes(range(32)))
    bot = {**MINIMAL["bot"], "pickle_key": "k" * 32}
    cfg = config(bot={**bot, "recovery_key": key})
    assert cfg.bot.recovery_key == key and key not in repr(cfg)
    key_file = tmp_path / "recovery"
    key_file.write_text(key.replace(" ", "") + "\n")
    assert config(bot={**bot, "recovery_key_file": str(key_file)}).bot.recovery_key == key
    typo = error(bot={**bot, "recovery_key": key[:-1] + ("a" if key[-1] != "a" else "b")})
    assert typo.startswith("bot.recovery_key: not a recovery key") and key[:8] not in typo
    both = error(bot={**bot, "recovery_key": key, "recovery_key_file": str(key_file)})
    assert both == "bot: recovery_key and recovery_key_file are both set; keep one"
    no_pickle = error(bot={**MINIMAL["bot"], "recovery_key": key})
    assert no_pickle.startswith("bot.recovery_key: needs bot.pickle_key")


def test_share_keys_with_defaults_to_cross_signed_devices() -> None:
    assert config().admin.share_keys_with is ShareKeysWith.CROSS_SIGNED
    assert config(admin={**MINIMAL["admin"], "share_keys_with": "all"}).admin.share_keys_with is ShareKeysWith.ALL
    assert error(admin={**MINIMAL["admin"], "share_keys_with": "verified"}).startswith("admin.share_keys_with:")


def test_policy_lists_per_space() -> None:
    cfg = config(
        spaces=[
            {"room": "!s:example.org", "policy_lists": ["!list:example.org", "#bans:example.org"]},
            {"room": "!t:x.org"},
        ]
    )
    first, second = cfg.spaces
    assert first.policy_lists == (RoomRef(room_id="!list:example.org"), RoomRef(alias="#bans:example.org"))
    assert second.policy_lists == () and second.to_policy("!t:x.org").policy_lists == ()
    policy = first.to_policy("!s:example.org", policy_lists_resolved=("!list:example.org", "!bans:example.org"))
    assert policy.policy_lists == ("!list:example.org", "!bans:example.org")
