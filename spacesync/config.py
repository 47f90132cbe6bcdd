"""Read the YAML configuration file into typed, validated, immutable settings."""

from __future__ import annotations

import difflib
import math
import os
import re
import string
from collections.abc import Callable, Collection, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from .model import REASON_FIELDS, OnLeave, RoomID, SpacePolicy, UserID, render_reason
from .refs import RefError, RoomRef, parse_room_ref, parse_user_ref, split_server_name

__all__ = [
    "ENV_ACCESS_TOKEN",
    "ENV_CONFIG",
    "ENV_DATABASE_URL",
    "ENV_PASSWORD",
    "AdminConfig",
    "AppserviceConfig",
    "BotConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "ExecutorConfig",
    "HomeserverConfig",
    "LoggingConfig",
    "SpaceConfig",
    "WalkConfig",
    "WebConfig",
    "default_config_path",
    "load_config",
    "parse_config",
    "parse_duration",
]

ENV_CONFIG = "SPACESYNC_CONFIG"
ENV_ACCESS_TOKEN = "SPACESYNC_ACCESS_TOKEN"
ENV_PASSWORD = "SPACESYNC_PASSWORD"
ENV_DATABASE_URL = "SPACESYNC_DATABASE_URL"

_CREDENTIALS = ("access_token", "access_token_file", "password", "password_file")
_DB_EXPECTED = "use sqlite:PATH or postgresql://…"
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+|\d+(?:\.\d+)?")


class ConfigError(ValueError):
    """A configuration problem, as one line: `<key.path>: <what is wrong>; <what to do>`."""


def _redacted(value: str | None) -> str:
    return "None" if value is None else "'<redacted>'"


def _mask_url(url: str) -> str:
    """The URL with any password (in the userinfo or a password= parameter) replaced by ***."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostport = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*/:")
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<unparseable URL>"


@attrs.frozen
class HomeserverConfig:
    url: str
    request_timeout: float = 30.0
    """Every request but the /sync long-poll gives up after this long (and is retried where it matters)."""
    initial_sync_timeout: float = 600.0
    """The first /sync after a start (or a recovery) may build a large answer: it is waited for this long."""


@attrs.frozen
class BotConfig:
    user_id: UserID
    access_token: str | None = attrs.field(default=None, repr=_redacted)
    password: str | None = attrs.field(default=None, repr=_redacted)
    device_id: str | None = None
    pickle_key: str | None = attrs.field(default=None, repr=_redacted)
    """Encrypts the crypto store's keys at rest; without it the bot cannot use encrypted rooms."""
    recovery_key: str | None = attrs.field(default=None, repr=_redacted)
    """Opens the account's secret storage: a new database restores the bot's cross-signing identity with it."""


@attrs.frozen
class DatabaseConfig:
    url: str = attrs.field(repr=lambda url: repr(_mask_url(url)))

    @property
    def safe_url(self) -> str:
        """The URL for logs and messages: the password masked."""
        return _mask_url(self.url)

    @property
    def is_sqlite(self) -> bool:
        return self.url.lower().startswith("sqlite:")

    @property
    def sqlite_path(self) -> Path | None:
        """The database file (relative paths are relative to the working directory), or None for PostgreSQL."""
        if not self.is_sqlite:
            return None
        rest = self.url[len("sqlite:") :]
        return Path(rest[2:] if rest.startswith("///") else rest)


class ShareKeysWith(str, Enum):
    """Which devices in the admin room get the bot's room keys (`admin.share_keys_with`)."""

    CROSS_SIGNED = "cross-signed"
    """Only devices their owner cross-signed, under the master key the bot pinned (as Element does)."""
    ALL = "all"
    """Every device of every member, signed or not (for clients without cross-signing)."""


@attrs.frozen
class AdminConfig:
    room: RoomRef
    users: frozenset[UserID] = frozenset()
    min_power_level: int = 50
    require_verified_device: bool = False
    """Refuse commands but those from devices their owner cross-signed (under the master key the bot pinned)."""
    share_keys_with: ShareKeysWith = ShareKeysWith.CROSS_SIGNED


@attrs.frozen
class SpaceConfig:
    """One managed Space as configured; aliases (room, extra_rooms) are resolved at run time."""

    room: RoomRef
    on_leave: OnLeave = OnLeave.KICK
    propagate_bans: bool = True
    propagate_unbans: bool = True
    exempt: frozenset[UserID] = frozenset()
    extra_rooms: tuple[RoomRef, ...] = ()
    grace_period: float = 0.0
    power_levels: bool = True
    power_level_map: Mapping[int, int] = attrs.field(factory=dict)
    max_power_level: int | None = None
    creator_level: int = 100
    join_rules_enforce: bool = False
    restrict_invite_rooms: bool = False
    invite_members: bool = False
    max_evictions_without_confirmation: int = 25
    guard_window: float = 600.0
    server_acl: bool = False
    redact_on_ban: int = 0
    refresh_via: bool = False
    policy_server: bool = False
    policy_lists: tuple[RoomRef, ...] = ()

    def to_policy(
        self,
        room_id: RoomID,
        exempt_extra: frozenset[UserID] = frozenset(),
        extra_rooms_resolved: frozenset[RoomID] | None = None,
        policy_lists_resolved: tuple[RoomID, ...] | None = None,
    ) -> SpacePolicy:
        """The planner's policy for this Space, given its resolved room id (and resolved extra rooms).

        Without `extra_rooms_resolved`, the extra rooms must all be given as room ids.
        """
        if extra_rooms_resolved is None:
            aliases = [str(ref) for ref in self.extra_rooms if ref.room_id is None]
            if aliases:
                raise ValueError(f"extra_rooms {', '.join(aliases)} must be resolved to room ids first")
            extra_rooms_resolved = frozenset(ref.room_id for ref in self.extra_rooms if ref.room_id)
        if policy_lists_resolved is None:
            policy_lists_resolved = tuple(ref.room_id for ref in self.policy_lists if ref.room_id)
        return SpacePolicy(
            room_id=room_id,
            on_leave=self.on_leave,
            propagate_bans=self.propagate_bans,
            propagate_unbans=self.propagate_unbans,
            exempt=self.exempt | exempt_extra,
            extra_rooms=frozenset(extra_rooms_resolved),
            grace_period_s=self.grace_period,
            power_levels=self.power_levels,
            power_level_map=dict(self.power_level_map),
            max_power_level=self.max_power_level,
            creator_level=self.creator_level,
            enforce_join_rules=self.join_rules_enforce,
            restrict_invite_rooms=self.restrict_invite_rooms,
            invite_members=self.invite_members,
            max_evictions_without_confirmation=self.max_evictions_without_confirmation,
            guard_window_s=self.guard_window,
            server_acl=self.server_acl,
            redact_on_ban=self.redact_on_ban,
            refresh_via=self.refresh_via,
            policy_server=self.policy_server,
            policy_lists=tuple(dict.fromkeys(policy_lists_resolved)),
        )


DEFAULT_CONCURRENCY = 32
"""Actions in flight at once: near a homeserver's own floor when the bot's rate limits are lifted; while the
homeserver answers 429, the executor sends one at a time whatever this says."""


@attrs.frozen
class ExecutorConfig:
    concurrency: int = DEFAULT_CONCURRENCY
    max_attempts: int = 8
    max_failures: int = 3


@attrs.frozen
class WalkConfig:
    max_depth: int = 10
    max_rooms: int = 2000
    max_seconds: float = 120.0
    concurrency: int = 8
    """Room states read at once: each answer is parsed whole, so this bounds the walk's peak memory."""


@attrs.frozen
class WebConfig:
    host: str
    port: int


@attrs.frozen
class AppserviceConfig:
    """spacesync as an application service: the homeserver pushes transactions to `host:port`."""

    host: str
    port: int
    as_token: str = attrs.field(repr=_redacted)
    """spacesync's token towards the homeserver (its requests as the bot)."""
    hs_token: str = attrs.field(repr=_redacted)
    """The homeserver's token towards spacesync (its transactions)."""
    id: str = "spacesync"
    sender_localpart: str = ""
    """The appservice's own user (not the bot: Synapse refuses /sync to an appservice's sender, and the bot's
    device needs it for encryption); the bot is the one user of its namespace."""
    registration: Path | None = None
    """The registration file the tokens were read from (written by `spacesync appservice registration`)."""


@attrs.frozen
class LoggingConfig:
    level: str = "INFO"
    format: str = "auto"


@attrs.frozen
class Config:
    homeserver: HomeserverConfig
    bot: BotConfig
    database: DatabaseConfig
    admin: AdminConfig
    spaces: tuple[SpaceConfig, ...] = ()
    dry_run: bool = False
    reconcile_interval: float = 3600.0
    reread_interval: float = 86400.0
    """Every room's full state is read again at least this often (a slice at each periodic reconcile)."""
    max_evictions_without_confirmation: int = 25
    guard_window: float = 600.0
    executor: ExecutorConfig = ExecutorConfig()
    walk: WalkConfig = WalkConfig()
    web: WebConfig | None = WebConfig("127.0.0.1", 9090)
    logging: LoggingConfig = LoggingConfig()
    reason_template: str = "{event} {space}"
    appservice: AppserviceConfig | None = None
    """Set: spacesync runs as an application service (no bot.access_token, events pushed, no rate limits)."""


# --- value readers: each takes (value, key path) and returns the typed value or raises ConfigError ---

Reader = Callable[[Any, str], Any]


def _fail(path: str, message: str) -> NoReturn:
    raise ConfigError(f"{path}: {message}")


def _show(value: Any) -> str:
    """A value as the user wrote it, short enough for a one-line message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:59] + "…")
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def _expected(path: str, what: str, value: Any, secret: bool = False) -> NoReturn:
    got = f"a {type(value).__name__}" if secret and value is not None else _show(value)
    _fail(path, f"expected {what}, got {got}")


def _string(secret: bool = False) -> Reader:
    def read(value: Any, path: str) -> str:
        if not isinstance(value, str):
            _expected(path, "a string", value, secret)
        if not value.strip():
            _fail(path, "empty; set a value or remove the key")
        return value.strip()

    return read


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        _expected(path, "true or false", value)
    return value


def _integer(low: int | None = None, high: int | None = None) -> Reader:
    def read(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            _expected(path, "a whole number", value)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"a number between {low} and {high}" if high is not None else f"{low} or more"
            _fail(path, f"{value} is out of range; use {bounds}")
        return value

    return read


def _choice(choices: Mapping[str, Any], upper: bool = False) -> Reader:
    def read(value: Any, path: str) -> Any:
        key = value.upper() if upper and isinstance(value, str) else value
        if isinstance(key, str) and key in choices:
            return choices[key]
        listed = ", ".join(choices)
        if not isinstance(value, str):
            _expected(path, f"one of {listed}", value)
        _fail(path, f"{_show(value)} is not one of {listed}")

    return read


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like "30s", "10m", "1h", "1d" or "1h30m"; ValueError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.fullmatch(value.strip().lower()):
        text = value.strip().lower()
        pieces = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", text)
        seconds = sum(float(n) * _DURATION_UNITS[u or "s"] for n, u in pieces)
    else:
        raise ValueError(f"{_show(value)} is not a duration")
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"{_show(value)} is not a duration")
    return seconds


def _duration(minimum: float = 0.0) -> Reader:
    def read(value: Any, path: str) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            _fail(path, f'{exc}; use seconds or a number with s, m, h or d, e.g. "30s", "10m", "1h"')
        if seconds < minimum:
            _fail(path, f"{_show(value)} is below the minimum of {minimum:g}s")
        return seconds

    return read


def _reason_template(value: Any, path: str) -> str:
    template = _string()(value, path)
    fields = ", ".join("{" + f + "}" for f in REASON_FIELDS)
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        _fail(path, f"{exc}; write placeholders as {fields} and a literal brace as {{{{ or }}}}")
    unknown = sorted(used - set(REASON_FIELDS))
    if unknown:
        _fail(path, f"unknown placeholder {{{unknown[0]}}}; use {fields}")
    if "space" not in used and "space_id" not in used:
        _fail(path, "names no Space; include {space} (its name) or {space_id}")
    try:
        render_reason(template, "left", RoomID("!x:example.org"), "Example")
    except (IndexError, KeyError, ValueError, AttributeError) as exc:
        _fail(path, f"cannot be filled in ({exc}); use plain placeholders {fields}")
    return template


def _nullable(reader: Reader) -> Reader:
    return lambda value, path: None if value is None else reader(value, path)


def _list_of(reader: Reader) -> Reader:
    def read(value: Any, path: str) -> tuple[Any, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            _expected(path, "a list", value)
        return tuple(reader(item, f"{path}[{i}]") for i, item in enumerate(value))

    return read


def _ref(parse: Callable[[str], Any]) -> Reader:
    def read(value: Any, path: str) -> Any:
        if not isinstance(value, str):
            _expected(path, "a string", value)
        try:
            return parse(value)
        except RefError as exc:
            _fail(path, str(exc))

    return read


def _user_set(value: Any, path: str) -> frozenset[UserID]:
    return frozenset(_list_of(_ref(parse_user_ref))(value, path))


def _level_map(value: Any, path: str) -> Mapping[int, int]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _expected(path, "a mapping of power level to power level, e.g. {100: 50}", value)
    levels = {}
    for key, level in value.items():
        if isinstance(key, bool) or not isinstance(key, int):
            _fail(path, f"key {_show(key)} is not a power level; use whole numbers, e.g. {{100: 50}}")
        levels[key] = _integer()(level, f"{path}.{key}")
    return levels


def _http_url(value: Any, path: str) -> str:
    url = _string()(value, path)
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        ok = False
    if not ok or parts.query or parts.fragment:
        _fail(
            path,
            f'{_show(url)} is not an http(s) URL; use your homeserver\'s client URL, e.g. "https://matrix.example.org"',
        )
    if "/_matrix" in parts.path:
        base = url[: url.index("/_matrix")]
        _fail(path, f'{_show(url)} includes an API path; use the base URL, e.g. "{base}"')
    return url.rstrip("/")


def _database_url(value: Any, path: str) -> str:
    if not isinstance(value, str):
        _expected(path, "a string like sqlite:spacesync.db or postgresql://user@host/db", value, secret=True)
    url = value.strip()
    scheme, has_scheme, rest = url.partition(":")
    scheme = scheme.lower()
    if not has_scheme or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        _fail(path, f"no scheme; {_DB_EXPECTED}")
    if scheme == "sqlite":
        if not rest or (rest.startswith("//") and not rest.startswith("///")) or rest == "///":
            _fail(path, "not a valid SQLite URL; expected sqlite:relative/path.db or sqlite:///absolute/path.db")
        return url
    if scheme in ("postgres", "postgresql"):
        try:
            ok = rest.startswith("//") and urlsplit(url).port != 0
        except ValueError:
            ok = False
        if not ok:
            _fail(path, "not a valid PostgreSQL URL; expected postgresql://user:password@host:port/database")
        return url
    _fail(path, f"unsupported scheme {scheme!r}; {_DB_EXPECTED}")


def _listen(value: Any, path: str) -> WebConfig | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        host, _, port = value.strip().rpartition(":")
        try:
            host_only, no_port = split_server_name(host)
            if no_port is None and port.isdigit() and 0 < int(port) < 65536:
                return WebConfig(host_only, int(port))
        except RefError:
            pass
    _fail(path, f'expected "host:port", got {_show(value)}; e.g. "127.0.0.1:9090" or "[::1]:9090", or null to disable')


# --- sections: tables of key -> (reader, default) ---

_REQUIRED = object()


@attrs.frozen
class _Key:
    read: Reader
    default: Any = _REQUIRED
    """The value used when the key is absent, as it would be written in YAML (it is read too)."""
    hint: str = ""
    """What to do when a required key is missing."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_keys(section: Mapping[Any, Any], allowed: Collection[str], path: str) -> None:
    for key in section:
        name = str(key)
        if name in allowed:
            continue
        close = difflib.get_close_matches(name, list(allowed), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(allowed)}"
        _fail(_join(path, name), f"unknown key; {hint}")


def _section(keys: Mapping[str, _Key], build: Callable[..., Any] | None = None) -> Reader:
    """A reader for a mapping whose keys are read by `keys`; null or absent means all defaults."""

    def read(value: Any, path: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            _expected(path or "config", "a mapping of settings", value)
        _check_keys(value, keys, path)
        values = {}
        for name, key in keys.items():
            key_path = _join(path, name)
            if name in value:
                values[name] = key.read(value[name], key_path)
            elif key.default is _REQUIRED:
                _fail(key_path, f"missing; {key.hint}")
            else:
                values[name] = key.read(key.default, key_path)
        return build(**values) if build else values

    return read


_optional_string = _Key(_nullable(_string()), None)
_optional_secret = _Key(_nullable(_string(secret=True)), None)
_max_evictions = _integer(0)
_guard_window = _duration(minimum=1)

_SPACE = _section(
    {
        "room": _Key(
            _ref(parse_room_ref), hint='set it to the Space\'s room id or alias, e.g. "#community:example.org"'
        ),
        "on_leave": _Key(_choice({m.value: m for m in OnLeave}), "kick"),
        "propagate_bans": _Key(_boolean, True),
        "propagate_unbans": _Key(_boolean, True),
        "exempt": _Key(_user_set, []),
        "extra_rooms": _Key(_list_of(_ref(parse_room_ref)), []),
        "grace_period": _Key(_duration(), 0),
        "power_levels": _Key(_choice({"sync": True, "off": False}), "sync"),
        "power_level_map": _Key(_level_map, {}),
        "max_power_level": _Key(_nullable(_integer()), None),
        "creator_level": _Key(_integer(), 100),
        "join_rules": _Key(_choice({"audit": False, "enforce": True}), "audit"),
        "restrict_invite_rooms": _Key(_boolean, False),
        "invite_members": _Key(_boolean, False),
        "max_evictions_without_confirmation": _Key(_nullable(_max_evictions), None),
        "guard_window": _Key(_nullable(_guard_window), None),
        "server_acl": _Key(_choice({"sync": True, "off": False}), "off"),
        "redact_on_ban": _Key(_integer(0, 1000), 0),
        "refresh_via": _Key(_boolean, False),
        "policy_server": _Key(_choice({"sync": True, "off": False}), "off"),
        "policy_lists": _Key(_list_of(_ref(parse_room_ref)), []),
    }
)

_TOP = _section(
    {
        "homeserver": _Key(
            _section(
                {
                    "url": _Key(
                        _http_url, hint='set it to your homeserver\'s client URL, e.g. "https://matrix.example.org"'
                    ),
                    "request_timeout": _Key(_duration(minimum=1), "30s"),
                    "initial_sync_timeout": _Key(_duration(minimum=1), "10m"),
                },
                HomeserverConfig,
            ),
            {},
        ),
        "bot": _Key(
            _section(
                {
                    "user_id": _Key(
                        _ref(parse_user_ref), hint='set it to the bot\'s Matrix ID, e.g. "@spacesync:example.org"'
                    ),
                    "access_token": _optional_secret,
                    "access_token_file": _optional_string,
                    "password": _optional_secret,
                    "password_file": _optional_string,
                    "device_id": _optional_string,
                    "pickle_key": _optional_secret,
                    "pickle_key_file": _optional_string,
                    "recovery_key": _optional_secret,
                    "recovery_key_file": _optional_string,
                }
            ),
            {},
        ),
        "database": _Key(_section({"url": _Key(_database_url, "sqlite:spacesync.db")}, DatabaseConfig), {}),
        "admin": _Key(
            _section(
                {
                    "room": _Key(
                        _ref(parse_room_ref),
                        hint='set it to the room moderators command the bot from, e.g. "!abc:example.org"',
                    ),
                    "users": _Key(_user_set, []),
                    "min_power_level": _Key(_integer(), 50),
                    "require_verified_device": _Key(_boolean, False),
                    "share_keys_with": _Key(_choice({m.value: m for m in ShareKeysWith}), "cross-signed"),
                },
                AdminConfig,
            ),
            {},
        ),
        "spaces": _Key(_list_of(_SPACE), []),
        "dry_run": _Key(_boolean, False),
        "reconcile_interval": _Key(_duration(minimum=10), "1h"),
        "reread_interval": _Key(_duration(minimum=10), "24h"),
        "max_evictions_without_confirmation": _Key(_max_evictions, 25),
        "guard_window": _Key(_guard_window, "10m"),
        "reason_template": _Key(_reason_template, "{event} {space}"),
        "executor": _Key(
            _section(
                {
                    "concurrency": _Key(_integer(1, 64), DEFAULT_CONCURRENCY),
                    "max_attempts": _Key(_integer(1, 100), 8),
                    "max_failures": _Key(_integer(1, 100), 3),
                },
                ExecutorConfig,
            ),
            {},
        ),
        "walk": _Key(
            _section(
                {
                    "max_depth": _Key(_integer(1, 100), 10),
                    "max_rooms": _Key(_integer(1), 2000),
                    "max_seconds": _Key(_duration(minimum=1), 120),
                    "concurrency": _Key(_integer(1, 64), 8),
                },
                WalkConfig,
            ),
            {},
        ),
        "web": _Key(_section({"listen": _Key(_listen, "127.0.0.1:9090")}), {}),
        "appservice": _Key(
            _nullable(
                _section(
                    {
                        "listen": _Key(_listen, "127.0.0.1:29317"),
                        "registration": _optional_string,
                        "id": _Key(_string(), "spacesync"),
                        "sender_localpart": _optional_string,
                        "as_token": _optional_secret,
                        "as_token_file": _optional_string,
                        "hs_token": _optional_secret,
                        "hs_token_file": _optional_string,
                    }
                )
            ),
            None,
        ),
        "logging": _Key(
            _section(
                {
                    "level": _Key(_choice({n: n for n in ("DEBUG", "INFO", "WARNING", "ERROR")}, upper=True), "INFO"),
                    "format": _Key(_choice({n: n for n in ("auto", "json", "console")}), "auto"),
                },
                LoggingConfig,
            ),
            {},
        ),
    }
)


# --- secrets and assembly ---


def _read_secret_file(file_name: str, path: str) -> str:
    try:
        secret = Path(file_name).expanduser().read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        _fail(path, f"no such file {file_name!r}; create it or fix the path")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(path, f"cannot read {file_name!r}: {getattr(exc, 'strerror', None) or type(exc).__name__}")
    if not secret:
        _fail(path, f"file {file_name!r} is empty; put the secret in it")
    return secret


def _credentials(
    bot: Mapping[str, Any], env: Mapping[str, str], appservice: bool = False
) -> tuple[str | None, str | None]:
    """(access_token, password): exactly one is set. The environment overrides the file. An appservice needs
    no credential (its as_token is the bot's), and an access token would be ambiguous."""
    configured = [key for key in _CREDENTIALS if bot[key] is not None]
    if appservice:
        token_keys = [key for key in configured if key.startswith("access_token")]
        if token_keys or env.get(ENV_ACCESS_TOKEN):
            where = f"bot.{token_keys[0]}" if token_keys else ENV_ACCESS_TOKEN
            _fail(where, "not used by an appservice (its as_token acts as the bot); remove it")
        if not configured and not env.get(ENV_PASSWORD):
            return None, None
    if len(configured) > 1:
        _fail("bot", f"{configured[0]} and {configured[1]} are both set; keep exactly one of {', '.join(_CREDENTIALS)}")
    token, password = env.get(ENV_ACCESS_TOKEN) or None, env.get(ENV_PASSWORD) or None
    if token and password:
        _fail("bot", f"{ENV_ACCESS_TOKEN} and {ENV_PASSWORD} are both set; unset one")
    if token or password:
        return token, password
    if not configured:
        _fail(
            "bot",
            f"no credential; set one of {', '.join(_CREDENTIALS[:-1])} or {_CREDENTIALS[-1]} "
            f"(or the {ENV_ACCESS_TOKEN} / {ENV_PASSWORD} environment variable)",
        )
    key = configured[0]
    secret = _read_secret_file(bot[key], f"bot.{key}") if key.endswith("_file") else bot[key]
    return (secret, None) if key.startswith("access_token") else (None, secret)


def _pickle_key(bot: Mapping[str, Any]) -> str | None:
    """The crypto store's pickle key, from bot.pickle_key or bot.pickle_key_file (not both)."""
    if bot["pickle_key"] is not None and bot["pickle_key_file"] is not None:
        _fail("bot", "pickle_key and pickle_key_file are both set; keep one")
    if bot["pickle_key_file"] is not None:
        return _read_secret_file(bot["pickle_key_file"], "bot.pickle_key_file")
    key = bot["pickle_key"]
    if key is not None and len(key) < 16:
        _fail(
            "bot.pickle_key", "too short; use a random string of at least 16 characters (e.g. `openssl rand -hex 32`)"
        )
    return key


def _recovery_key(bot: Mapping[str, Any]) -> str | None:
    """The recovery key of the bot's secret storage, from bot.recovery_key or bot.recovery_key_file."""
    if bot["recovery_key"] is not None and bot["recovery_key_file"] is not None:
        _fail("bot", "recovery_key and recovery_key_file are both set; keep one")
    name = "recovery_key_file" if bot["recovery_key_file"] is not None else "recovery_key"
    key = _read_secret_file(bot[name], f"bot.{name}") if name.endswith("_file") else bot[name]
    if key is None:
        return None
    # the crypto stack, only when it is used
    from mautrix.crypto.ssss.util import decode_base58_recovery_key, encode_base58_recovery_key

    try:
        raw = decode_base58_recovery_key("".join(key.split()))
    except ValueError:
        raw = None
    if raw is None:
        _fail(f"bot.{name}", "not a recovery key; use the key `spacesync crypto recovery-key` printed (12 groups of 4)")
    if bot["pickle_key"] is None and bot["pickle_key_file"] is None:
        _fail(f"bot.{name}", "needs bot.pickle_key (or bot.pickle_key_file) too: without it the bot has no encryption")
    return encode_base58_recovery_key(raw)


def _space(values: Mapping[str, Any], max_evictions: int, guard_window: float = 600.0) -> SpaceConfig:
    fields = dict(values)
    fields["join_rules_enforce"] = fields.pop("join_rules")
    fields["policy_lists"] = tuple(fields["policy_lists"])
    if fields["max_evictions_without_confirmation"] is None:
        fields["max_evictions_without_confirmation"] = max_evictions
    if fields["guard_window"] is None:
        fields["guard_window"] = guard_window
    return SpaceConfig(**fields)


def parse_config(data: Any, env: Mapping[str, str] | None = None, *, read_registration: bool = True) -> Config:
    """Validate already-loaded YAML data (plus secrets from `env`, default os.environ) into a Config.

    `read_registration=False` leaves an appservice's tokens empty (for writing its registration)."""
    env = os.environ if env is None else env
    top = dict(_TOP(data, ""))
    if env.get(ENV_DATABASE_URL):
        top["database"] = DatabaseConfig(_database_url(env[ENV_DATABASE_URL], ENV_DATABASE_URL))
    bot = top["bot"]
    if top["appservice"] is not None:
        from .registration import appservice_config

        top["appservice"] = appservice_config(top["appservice"], bot["user_id"], read_registration)
    access_token, password = _credentials(bot, env, appservice=top["appservice"] is not None)
    top["bot"] = BotConfig(
        bot["user_id"], access_token, password, bot["device_id"], _pickle_key(bot), _recovery_key(bot)
    )
    top["web"] = top["web"]["listen"]
    top["spaces"] = tuple(
        _space(s, top["max_evictions_without_confirmation"], top["guard_window"]) for s in top["spaces"]
    )
    seen: set[str] = set()
    for i, space in enumerate(top["spaces"]):
        if str(space.room) in seen:
            _fail(f"spaces[{i}].room", f"{str(space.room)!r} is listed twice; keep one entry per Space")
        seen.add(str(space.room))
    return Config(**top)


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    """$SPACESYNC_CONFIG, else config.yaml in the working directory."""
    env = os.environ if env is None else env
    return Path(env.get(ENV_CONFIG) or "config.yaml")


def load_config(path: str | Path, env: Mapping[str, str] | None = None, *, read_registration: bool = True) -> Config:
    """Read and validate a YAML configuration file; any problem raises a one-line ConfigError."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file; copy config.example.yaml and fill it in") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{name}: cannot read: {reason}") from None
    try:
        data = YAML(typ="safe").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = (exc.problem or exc.context or "invalid YAML").splitlines()[0]
        problem = re.sub(r' with value ".*', "", problem)  # duplicate-key messages quote values (secrets)
        raise ConfigError(f"{name}{where}: {problem}") from None
    except YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        raise ConfigError(f"{name}: the file is empty; copy config.example.yaml and fill it in")
    return parse_config(data, env, read_registration=read_registration)
