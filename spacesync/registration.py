"""spacesync as an application service: its registration for the homeserver (`spacesync appservice
registration`) and the `appservice` config section, whose tokens come from that registration file, from the
config or from files."""

from __future__ import annotations

import io
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from .config import AppserviceConfig, WebConfig, _fail, _read_secret_file
from .model import UserID

TOKEN_BYTES = 48
"""Random bytes in each generated token (64 URL-safe characters)."""
_ID_CHARS = re.compile(r"^[A-Za-z0-9._~-]+$")


def localpart(user_id: str) -> str:
    return user_id[1:].partition(":")[0]


def sender_localpart(user_id: str) -> str:
    """The appservice's own user: the bot's localpart with `-appservice` (never the bot itself, see
    AppserviceConfig.sender_localpart)."""
    return f"{localpart(user_id)}-appservice"


def user_namespace(user_id: str) -> str:
    """The exclusive user namespace of the registration: the bot's own id, nothing else."""
    return f"^{re.escape(user_id)}$"


def listen_url(listen: WebConfig) -> str:
    """Where the homeserver reaches `listen` (an address listening on every interface: over loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{listen.port}"


def make_registration(user_id: UserID, appservice: AppserviceConfig, url: str | None = None) -> dict[str, Any]:
    """A registration: the bot is the one user of its exclusive namespace, and never rate limited; the sender is
    the appservice's own user. The tokens are the config's when it gives them, else fresh random ones."""
    return {
        "id": appservice.id,
        "url": url or listen_url(WebConfig(appservice.host, appservice.port)),
        "as_token": appservice.as_token or secrets.token_urlsafe(TOKEN_BYTES),
        "hs_token": appservice.hs_token or secrets.token_urlsafe(TOKEN_BYTES),
        "sender_localpart": appservice.sender_localpart or sender_localpart(user_id),
        "rate_limited": False,
        "namespaces": {
            "users": [{"exclusive": True, "regex": user_namespace(user_id)}],
            "aliases": [],
            "rooms": [],
        },
    }


def write_registration(path: Path, registration: Mapping[str, Any]) -> None:
    """Write the registration readable by its owner only (it holds both tokens); never over an existing file:
    the homeserver may already hold its tokens."""
    yaml = YAML()
    yaml.default_flow_style = False
    text = io.StringIO()
    yaml.dump(dict(registration), text)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text.getvalue())


def read_registration(file_name: str, path: str = "appservice.registration") -> dict[str, Any]:
    try:
        text = Path(file_name).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail(
            path,
            f"no such file {file_name!r}; write it with `spacesync appservice registration -o {file_name}` and "
            "list it in the homeserver's app_service_config_files",
        )
    except (OSError, UnicodeDecodeError) as exc:
        _fail(path, f"cannot read {file_name!r}: {getattr(exc, 'strerror', None) or type(exc).__name__}")
    try:
        data = YAML(typ="safe").load(text)
    except YAMLError as exc:
        _fail(path, f"{file_name!r} is not valid YAML: {str(exc).splitlines()[0]}")
    if not isinstance(data, dict):
        _fail(path, f"{file_name!r} is not a registration (a mapping with id, as_token, hs_token)")
    for key in ("as_token", "hs_token", "sender_localpart"):
        if not isinstance(data.get(key), str) or not data[key]:
            _fail(path, f"{file_name!r} has no {key}; write a new one with `spacesync appservice registration`")
    return data


def covers(registration: Mapping[str, Any], user_id: str) -> bool:
    """Whether the registration's exclusive user namespace holds the bot."""
    users = (registration.get("namespaces") or {}).get("users") or []
    for entry in users if isinstance(users, list) else []:
        regex = entry.get("regex") if isinstance(entry, dict) else None
        try:
            if isinstance(regex, str) and entry.get("exclusive") and re.match(regex, user_id):
                return True
        except re.error:
            continue
    return False


def _token(section: Mapping[str, Any], name: str) -> str | None:
    direct, file_name = section[name], section[f"{name}_file"]
    if direct is not None and file_name is not None:
        _fail("appservice", f"{name} and {name}_file are both set; keep one")
    if file_name is not None:
        return _read_secret_file(file_name, f"appservice.{name}_file")
    return direct


def appservice_config(section: Mapping[str, Any], user_id: UserID, read_registration_file: bool) -> AppserviceConfig:
    """The `appservice` section: where to listen, and the tokens (from the registration file or given)."""
    listen: WebConfig | None = section["listen"]
    if listen is None:
        _fail("appservice.listen", 'needed: where the homeserver sends transactions, e.g. "127.0.0.1:29317"')
    if not _ID_CHARS.match(section["id"]):
        _fail("appservice.id", f"{section['id']!r}: use letters, digits and ._~- only")
    tokens = {name: _token(section, name) for name in ("as_token", "hs_token")}
    registration = section["registration"]
    if registration is not None and any(tokens.values()):
        _fail("appservice", "registration and as_token/hs_token are both set; keep the registration file only")
    app_id, as_token, hs_token = section["id"], tokens["as_token"], tokens["hs_token"]
    sender = section["sender_localpart"] or sender_localpart(user_id)
    if registration is not None and read_registration_file:
        data = read_registration(registration)
        if not covers(data, user_id):
            _fail(
                "appservice.registration",
                f"its user namespace does not cover bot.user_id {user_id}; write a new registration for this bot",
            )
        if data["sender_localpart"] == localpart(user_id):
            _fail(
                "appservice.registration",
                "its sender_localpart is the bot's: Synapse refuses /sync to an appservice's sender, so the bot's "
                "encryption cannot work; write a new registration (`spacesync appservice registration`)",
            )
        app_id, as_token, hs_token = str(data.get("id") or app_id), data["as_token"], data["hs_token"]
        sender = data["sender_localpart"]
    elif registration is None:
        for name, value in tokens.items():
            if not value:
                _fail(f"appservice.{name}", "missing; set appservice.registration (the file) or both tokens")
        if as_token == hs_token:
            _fail("appservice", "as_token and hs_token are the same; they must differ (the registration's two)")
    return AppserviceConfig(
        listen.host,
        listen.port,
        as_token or "",
        hs_token or "",
        id=app_id,
        sender_localpart=sender,
        registration=Path(registration) if registration is not None else None,
    )
