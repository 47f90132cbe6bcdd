"""What the homeserver is and takes: Synapse or not (what lifts the bot's rate limit), whether `/versions`
names a spec version with `use_state_after` (MSC4222), and whether it takes a ban sent as member state."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import structlog
from mautrix.api import Method
from mautrix.errors import MatrixRequestError

from .errors import REQUEST_ERRORS, TRANSPORT_ERRORS
from .ratelimit import ServerKind

if TYPE_CHECKING:
    from .adapter import MatrixAdapter

log = structlog.get_logger("spacesync.matrix")


async def server_kind(matrix: MatrixAdapter) -> ServerKind:
    """Synapse answers `/_synapse/admin/v1/server_version` without a token; UNKNOWN when it cannot be told now."""
    try:
        data = await matrix.request(Method.GET, "/_synapse/admin/v1/server_version", timeout=10)
    except MatrixRequestError:
        return ServerKind.OTHER
    except TRANSPORT_ERRORS:
        return ServerKind.UNKNOWN
    synapse = isinstance(data, dict) and isinstance(data.get("server_version"), str)
    return ServerKind.SYNAPSE if synapse else ServerKind.OTHER


async def reads_state_after(matrix: MatrixAdapter) -> bool:
    """Whether `/versions` names spec v1.16 or later, or the unstable `org.matrix.msc4222` feature."""
    try:
        data = await matrix.request(Method.GET, "/_matrix/client/versions", timeout=15)
    except REQUEST_ERRORS as e:
        log.debug("could not read /versions", error=f"{type(e).__name__}: {e}")
        return False
    if not isinstance(data, dict):
        return False
    unstable = data.get("unstable_features") or {}
    return spec_at_least(data.get("versions"), (1, 16)) or (
        isinstance(unstable, dict) and unstable.get("org.matrix.msc4222") is True
    )


def spec_at_least(versions: Any, wanted: tuple[int, int]) -> bool:
    """Whether a `/versions` list names a spec version at least `wanted` ('v1.16')."""
    for version in versions if isinstance(versions, list) else []:
        match = re.fullmatch(r"v(\d+)\.(\d+)", version) if isinstance(version, str) else None
        if match and (int(match[1]), int(match[2])) >= wanted:
            return True
    return False


def refuses_state_ban(e: MatrixRequestError) -> bool:
    """Whether an answer to a ban sent as `m.room.member` state means the homeserver does not take that form."""
    return e.http_status in (404, 405, 501) or (e.http_status == 400 and e.errcode == "M_UNRECOGNIZED")
