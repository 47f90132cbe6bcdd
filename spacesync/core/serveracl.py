"""Server ACL mirroring: the Space's deny entries merged into its rooms, and only spacesync's own entries removed."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..model import Action, ActionKind, Cause, Finding, FindingCode, Policy, RoomID, RoomState, Snapshot
from .entitlement import user_level
from .graph import SpaceGraph, policies_for


def _glob(pattern: str) -> re.Pattern[str]:
    """A server ACL pattern (`*` and `?` wildcards only) as a regular expression, matching case-insensitively
    (MSC4436: a deny `LOCALHOST` keeps `localhost` out)."""
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.S | re.IGNORECASE
    )


def same_entry(pattern: str, entries: Iterable[str]) -> bool:
    """Whether an ACL entry is already among `entries`, compared as they match: without regard to case."""
    folded = pattern.casefold()
    return any(e.casefold() == folded for e in entries)


def host(server: str) -> str:
    """The server name without its port: what ACL entries are matched against."""
    if server.startswith("["):
        return server[: server.find("]") + 1] if "]" in server else server
    return server.rsplit(":", 1)[0] if server.count(":") == 1 else server


def server_of(user_id: str) -> str:
    return host(user_id.split(":", 1)[1]) if ":" in user_id else ""


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def denies(content: Mapping[str, Any], server: str) -> bool:
    """Whether an ACL with this content keeps `server` out (the spec's order: IP literals, deny, then allow)."""
    name = host(server)
    if _is_ip(name) and not content.get("allow_ip_literals", True):
        return True
    if any(_glob(p).fullmatch(name) for p in _strings(content.get("deny"))):
        return True
    return not any(_glob(p).fullmatch(name) for p in _strings(content.get("allow")))


def _protected(pattern: str, servers: Iterable[str]) -> str | None:
    """Why a deny entry must never be written: it would shut out every server, or one spacesync needs."""
    if _glob(pattern).fullmatch("*") or pattern.strip("*") == "":
        return "it denies every server"
    for server in servers:
        if server and _glob(pattern).fullmatch(server):
            return f"it denies {server}"
    return None


def space_denies(snapshot: Snapshot, spaces: Iterable[RoomID]) -> tuple[list[str], bool | None]:
    """The deny entries of the Spaces' ACLs, in order, and their allow_ip_literals (None when none has an ACL)."""
    deny: list[str] = []
    ip_literals: bool | None = None
    for space_id in spaces:
        acl = snapshot.rooms[space_id].server_acl if space_id in snapshot.rooms else None
        if acl is None:
            continue
        for d in _strings(acl.get("deny")):
            if not same_entry(d, deny):
                deny.append(d)
        if ip_literals is None or not acl.get("allow_ip_literals", True):
            ip_literals = bool(acl.get("allow_ip_literals", True))
    return deny, ip_literals


def plan_server_acl(snapshot: Snapshot, policy: Policy, graph: SpaceGraph) -> tuple[list[Action], list[Finding]]:
    """For each managed room whose Spaces mirror their ACL: add the Space's deny entries, remove those spacesync
    added that the Space dropped, and keep every entry of the room's own. Refuses (and reports) an entry that
    would deny the bot's server, the room creator's server or every server, and any ACL that would shut out
    every current member."""
    actions: list[Action] = []
    findings: list[Finding] = []
    bot_server = server_of(policy.bot)
    for room_id in sorted(graph.managed):
        room = snapshot.rooms.get(room_id)
        if room is None or room.tombstone or not snapshot.known(room_id):
            continue
        governing = [p for p in policies_for(graph, policy, room_id) if p.server_acl and p.room_id != room_id]
        if not governing:
            continue
        spaces = [p.room_id for p in governing if snapshot.known(p.room_id)]
        if len(spaces) != len(governing):
            continue  # a Space not read this time: its entries are unknown, not absent
        action = _plan_room(snapshot, policy, room, spaces, bot_server, findings)
        if action is not None:
            actions.append(action)
    return actions, findings


def _plan_room(
    snapshot: Snapshot,
    policy: Policy,
    room: RoomState,
    spaces: list[RoomID],
    bot_server: str,
    findings: list[Finding],
) -> Action | None:
    wanted, ip_literals = space_denies(snapshot, spaces)
    owned = snapshot.owned_acl.get(room.room_id, frozenset())
    current = dict(room.server_acl) if room.server_acl is not None else None
    current_deny = _strings(current.get("deny")) if current is not None else []
    keep_out = [bot_server] + [server_of(c) for c in sorted(room.creators)]
    refused = []
    add = []
    for pattern in wanted:
        why = _protected(pattern, keep_out)
        if why:
            refused.append(f"{pattern} ({why})")
        elif not same_entry(pattern, current_deny):
            add.append(pattern)
    for item in refused:
        findings.append(
            Finding(room.room_id, FindingCode.ACL_REFUSED.value, f"server ACL entry {item} not mirrored into this room")
        )
    remove = [p for p in current_deny if p in owned and not same_entry(p, wanted)]
    new_owned = (owned & set(current_deny) | set(add)) - set(remove)
    if not add and not remove:
        return None
    deny = [p for p in current_deny if p not in remove] + add
    if current is None:
        content: dict[str, Any] = {"allow": ["*"], "deny": deny}
        if ip_literals is not None:
            content["allow_ip_literals"] = ip_literals
    else:
        content = {**current, "deny": deny}
    members = {server_of(u) for u in room.joined()}
    if members and all(denies(content, s) for s in members):
        findings.append(
            Finding(
                room.room_id,
                FindingCode.ACL_REFUSED.value,
                "server ACL not written: it would deny the server of every current member",
            )
        )
        return None
    needed = room.power_levels.event_level("m.room.server_acl")
    if user_level(room, policy.bot) < needed:
        findings.append(
            Finding(room.room_id, "no_power", f"the bot lacks the power to change the server ACL (needs {needed})")
        )
        return None
    listed = ", ".join([f"+{p}" for p in add] + [f"-{p}" for p in remove])
    return Action(
        ActionKind.SET_SERVER_ACL,
        room.room_id,
        reason=f"server ACL from the Space: {listed}",
        space_id=spaces[0],
        cause=Cause.SERVER_ACL.value,
        content=content,
        changes={"deny": (add, remove), "owned": (sorted(owned), sorted(new_owned))},
    )


def apply_acl_changes(current: Mapping[str, Any] | None, action: Action) -> dict[str, Any]:
    """The room's ACL now with only this action's additions and removals: a change made meanwhile stays."""
    if current is None or not current:
        return dict(action.content or {})
    add, remove = action.changes["deny"]
    deny = [p for p in _strings(current.get("deny")) if p not in remove]
    deny += [p for p in add if p not in deny]
    return {**current, "deny": deny}


def owned_after(action: Action) -> frozenset[str]:
    return frozenset(action.changes["owned"][1])
