"""Parse the room and user references people paste (ids, aliases, matrix: URIs, matrix.to links, pills)."""

from __future__ import annotations

import ipaddress
import re
from html.parser import HTMLParser
from typing import NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from mautrix.types import RoomAlias, RoomID, UserID

__all__ = [
    "RefError",
    "RoomRef",
    "is_server_name",
    "parse_room_ref",
    "parse_user_ref",
    "refs_in_html",
    "room_label",
    "server_name",
    "split_server_name",
]

ROOM_EXPECTED = "expected !id:server, #alias:server, a matrix: URI or a matrix.to link"
USER_EXPECTED = "expected @user:server, a matrix:u/ URI, a matrix.to link or a pill"

_MAX_ID_LENGTH = 255
_LEADING = "<([{'\"\u201c\u2018"
_TRAILING = ">)]}.,;:!?'\"\u201d\u2019"
_HOST_RE = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_SERVER_RE = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::(\d{1,5}))?")
# MSC2312 path segment types -> sigils.
_URI_TYPES = {"r": "#", "roomid": "!", "u": "@"}
_SIGIL_NAMES = {"!": "a room ID", "#": "a room alias", "@": "a user ID", "$": "an event ID"}


class RefError(ValueError):
    """A reference that could not be understood; the message is one line for the user."""


@attrs.frozen
class RoomRef:
    """A room named either by id or by alias, with the servers to try joining through."""

    room_id: RoomID | None = None
    alias: RoomAlias | None = None
    via: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        if (self.room_id is None) == (self.alias is None):
            raise ValueError("RoomRef needs exactly one of room_id and alias")

    def __str__(self) -> str:
        return str(self.room_id or self.alias)


def split_server_name(text: str) -> tuple[str, int | None]:
    """Split a server name into host (IPv6 without brackets) and port; RefError if it is not one."""
    match = _SERVER_RE.fullmatch(text)
    if match is not None:
        host, port = match.group(1), match.group(2)
        port_ok = port is None or 0 < int(port) < 65536
        if host.startswith("["):
            try:
                host = str(ipaddress.IPv6Address(host[1:-1]))
            except ValueError:
                host = ""
        elif not (_HOST_RE.fullmatch(host) and len(host) <= 255):
            host = ""
        if host and port_ok:
            return host, int(port) if port else None
    raise RefError(f"{_show(text)} is not a server name: expected host, IPv4 or [IPv6], optionally with :port")


def is_server_name(text: str) -> bool:
    try:
        split_server_name(text)
    except RefError:
        return False
    return True


def refs_in_html(html: str) -> list[str]:
    """Every href target in an HTML fragment (a formatted message body), in order."""
    collector = _HrefCollector()
    collector.feed(html)
    collector.close()
    return collector.hrefs


def parse_room_ref(text: str) -> RoomRef:
    """Read a room id, alias, matrix: URI, matrix.to link or room pill; RefError otherwise."""
    sigil, ident, via = _split(text, "room", ROOM_EXPECTED)
    if sigil not in ("!", "#"):
        _fail(text, "room", ROOM_EXPECTED, f"that is {_SIGIL_NAMES[sigil]}")
    localpart, has_server, server = ident[1:].partition(":")
    if not localpart or (sigil == "#" and not has_server):
        _fail(text, "room", ROOM_EXPECTED, "missing the :server part" if localpart else "empty name")
    problem = _check_id(ident, server if has_server else None)
    if problem:
        _fail(text, "room", ROOM_EXPECTED, problem)
    for server_name in via:
        if not is_server_name(server_name):
            _fail(text, "room", ROOM_EXPECTED, f"via {_show(server_name)} is not a server name")
    if sigil == "!":
        return RoomRef(room_id=RoomID(ident), via=via)
    return RoomRef(alias=RoomAlias(ident), via=via)


def parse_user_ref(text: str) -> UserID:
    """Read a user id, matrix:u/ URI, matrix.to link or user pill; RefError otherwise."""
    sigil, ident, _ = _split(text, "user", USER_EXPECTED)
    if sigil != "@":
        _fail(text, "user", USER_EXPECTED, f"that is {_SIGIL_NAMES[sigil]}")
    localpart, has_server, server = ident[1:].partition(":")
    if not localpart or not has_server:
        _fail(text, "user", USER_EXPECTED, "missing the :server part" if localpart else "empty localpart")
    problem = _check_id(ident, server)
    if problem:
        _fail(text, "user", USER_EXPECTED, problem)
    return UserID(ident)


class _HrefCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs.extend(value for name, value in attrs if name == "href" and value)


def _show(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _fail(text: str, kind: str, expected: str, problem: str | None = None) -> NoReturn:
    detail = f"{problem}; {expected}" if problem else expected
    raise RefError(f"{_show(text)} is not a {kind}: {detail}")


def _check_id(ident: str, server: str | None) -> str | None:
    """The problem with a sigil-prefixed identifier, or None when it is well formed."""
    if any(c.isspace() or ord(c) < 32 for c in ident):
        return "it contains whitespace"
    if len(ident.encode()) > _MAX_ID_LENGTH:
        return f"longer than {_MAX_ID_LENGTH} bytes"
    if server is not None and not is_server_name(server):
        return f"{_show(server)} is not a valid server name"
    return None


def _split(text: str, kind: str, expected: str) -> tuple[str, str, tuple[str, ...]]:
    """Reduce any accepted form to (sigil, identifier with sigil, via servers)."""
    if not isinstance(text, str):
        raise RefError(f"{text!r} is not a {kind}: {expected}")
    cleaned = text.strip()
    if "href" in cleaned.lower() and "<" in cleaned:
        hrefs = refs_in_html(cleaned)
        if len(hrefs) != 1:
            _fail(text, kind, expected, f"it contains {len(hrefs)} links, expected one")
        cleaned = hrefs[0].strip()
    cleaned = cleaned.lstrip(_LEADING).rstrip(_TRAILING)
    lowered = cleaned.lower()
    if lowered.startswith("matrix:"):
        result = _from_matrix_uri(cleaned)
    elif lowered.startswith(("https://", "http://")):
        result = _from_matrix_to(cleaned)
    else:
        result = (cleaned, ())
    if result is None or not result[0] or result[0][0] not in _SIGIL_NAMES:
        _fail(text, kind, expected)
    ident, via = result
    return ident[0], ident, via


def _from_matrix_uri(uri: str) -> tuple[str, tuple[str, ...]] | None:
    """MSC2312: matrix:r/alias:server, matrix:roomid/id:server[/e/event], matrix:u/user:server, ?via=."""
    parts = urlsplit(uri)
    segments = parts.path.lstrip("/").split("/")
    if len(segments) not in (2, 4) or (len(segments) == 4 and segments[2] != "e"):
        return None
    sigil = _URI_TYPES.get(segments[0])
    if sigil is None or not segments[1]:
        return None
    return sigil + unquote(segments[1]), _via(parts.query)


def _from_matrix_to(url: str) -> tuple[str, tuple[str, ...]] | None:
    """https://matrix.to/#/<id or alias>[/<event>][?via=...], sigils possibly percent-encoded."""
    parts = urlsplit(url)
    if (parts.hostname or "") != "matrix.to" or not parts.fragment.startswith("/"):
        return None
    target, _, query = parts.fragment[1:].partition("?")
    return unquote(target.split("/")[0]), _via(query)


def _via(query: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in parse_qs(query).get("via", []) if v.strip())


def room_label(room_id: str, name: str | None) -> str:
    """A room as people read it: 'Name (!id:server)', or the bare id when it has no name."""
    return f"{name} ({room_id})" if name else str(room_id)


def server_name(matrix_id: str) -> str | None:
    """The server part of a Matrix id (after the first colon); None for ids without one (v12 room ids)."""
    _, has_server, server = matrix_id.partition(":")
    return server if has_server else None
