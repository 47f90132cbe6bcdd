"""Which servers to name (`via`) when joining, reading or pointing at a room on another homeserver.

A room id's server part is only a hint (the creating server may have left) and room version 12 ids
have none, so `via` comes from what the Space itself says (the `via` of its `m.space.child` entry
and of the hierarchy answer) and from the servers of the room's current members."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..model import Membership, RoomID, RoomState
from ..refs import server_name

MAX_VIA = 5
"""Servers named per request: enough to survive a few being down, few enough to keep URLs short."""


def member_servers(room: RoomState | None) -> list[str]:
    """Servers of the room's joined members, the most populated first (ties by name)."""
    if room is None:
        return []
    counts = Counter(
        server
        for user_id, member in room.members.items()
        if member.membership is Membership.JOIN and (server := server_name(user_id))
    )
    return [server for server, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def declared_via(room_id: RoomID, parents: Iterable[RoomState | None]) -> list[str]:
    """The `via` of every `m.space.child` entry for `room_id` in the given (parent) rooms."""
    servers: list[str] = []
    for parent in parents:
        if parent is not None:
            servers.extend(parent.children.get(room_id) or ())
    return servers


def hierarchy_via(room_id: RoomID, entries: Iterable[dict[str, Any]]) -> list[str]:
    """The `via` of `m.space.child` entries for `room_id` in a hierarchy answer's `children_state`."""
    servers: list[str] = []
    for entry in entries:
        for child in entry.get("children_state") or ():
            if not isinstance(child, dict) or child.get("state_key") != room_id:
                continue
            via = (child.get("content") or {}).get("via")
            if isinstance(via, list):
                servers.extend(s for s in via if isinstance(s, str) and s)
    return servers


def via_servers(
    room_id: RoomID, *sources: Iterable[str], fallback: Iterable[str] = (), limit: int = MAX_VIA
) -> list[str]:
    """Servers to route a request for `room_id` through, de-duplicated in the order of the sources, then
    the room id's own server part (absent in v12), then `fallback` (say, the bot's own server)."""
    ordered: list[str] = []
    own = server_name(room_id)
    for source in (*sources, [own] if own else [], fallback):
        for server in source:
            if server and server not in ordered:
                ordered.append(server)
    return ordered[:limit]
