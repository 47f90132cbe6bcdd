"""What commands read of the world: the policy, a snapshot and its Space graph, room labels, power."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from mautrix.errors import MatrixRequestError

from ..core.entitlement import user_level
from ..core.graph import SpaceGraph, build_graph
from ..matrix.state import parse_room_state
from ..model import Membership, Plan, Policy, PowerLevels, RoomID, RoomState, Snapshot, UserID
from ..refs import RefError, parse_room_ref, room_label
from .format import code, esc
from .registry import CommandError

if TYPE_CHECKING:
    from .services import Services as App


@attrs.frozen
class View:
    policy: Policy
    snapshot: Snapshot
    graph: SpaceGraph


async def view(app: App) -> View:
    """The policy now and the graph over a snapshot from the state cache (no full re-read)."""
    policy = await app.reconciler.policy()
    snapshot = await app.observer.observe(policy, refresh=False)
    return View(policy, snapshot, build_graph(snapshot, policy))


def room_name(app: App, room_id: RoomID, snapshot: Snapshot | None = None) -> str | None:
    room = (snapshot.rooms.get(room_id) if snapshot is not None else None) or app.cache.get(room_id)
    return room.name if room is not None and room.name else None


def label(app: App, room_id: RoomID, snapshot: Snapshot | None = None) -> tuple[str, str]:
    """A room as people read it: 'Name (!id:server)', in plain text and HTML."""
    name = room_name(app, room_id, snapshot)
    return room_label(room_id, name), f"{esc(name)} {code(room_id)}" if name else code(room_id)


async def resolve(app: App, text: str) -> RoomID:
    """A room argument (id, alias, URI, link, pill) as a room id; CommandError naming it otherwise."""
    try:
        ref = parse_room_ref(text)
    except RefError as e:
        raise CommandError(str(e)) from None
    room_id = await app.reconciler.resolve(ref)
    if room_id is None:
        raise CommandError(f"{ref} does not resolve to a room: check the alias")
    return room_id


def scope(graph: SpaceGraph, space: RoomID | None) -> frozenset[RoomID] | None:
    """The rooms at and below a Space; None for no filter."""
    if space is None:
        return None
    return graph.descendants(space) | {space}


async def space_filter(app: App, args: list[str], graph: SpaceGraph, snapshot: Snapshot) -> RoomID | None:
    """The optional [space] argument: a Space walked from a managed root, or CommandError."""
    if not args:
        return None
    space = await resolve(app, args[0])
    room = snapshot.rooms.get(space)
    if space not in graph.rooms() or not (space in graph.roots or (room is not None and room.is_space)):
        raise CommandError(f"{args[0]} is not a managed Space or a Space below one (see '!spacesync spaces list')")
    return space


def filter_plan(plan: Plan, rooms: frozenset[RoomID] | None, space: RoomID | None) -> Plan:
    if rooms is None:
        return plan
    return attrs.evolve(
        plan,
        actions=tuple(a for a in plan.actions if a.room_id in rooms or (space is not None and a.space_id == space)),
        findings=tuple(f for f in plan.findings if f.room_id in rooms),
        managed=tuple(r for r in plan.managed if r in rooms),
    )


async def room_state(app: App, room_id: RoomID) -> RoomState:
    """A room's state with fresh power levels; CommandError when the bot cannot read the room."""
    try:
        cached = app.cache.get(room_id)
        if cached is None:
            events = await app.matrix.room_state(room_id)
            state = {
                (e["type"], e["state_key"]): e
                for e in events
                if isinstance(e.get("type"), str) and isinstance(e.get("state_key"), str)
            }
            return parse_room_state(room_id, state)
        levels = await app.matrix.state_event(room_id, "m.room.power_levels")
    except MatrixRequestError as e:
        raise CommandError(
            f"the bot cannot read {room_id} ({e.http_status} {getattr(e, 'errcode', '')}): "
            "invite it to the room first (it accepts invites from admins)"
        ) from None
    return attrs.evolve(cached, power_levels=PowerLevels.from_content(levels)) if levels else cached


def bans_above(v: View, room_id: RoomID, user_id: UserID, lifted: set[RoomID] | frozenset[RoomID]) -> list[RoomID]:
    """The Spaces with a say over the room that ban the user and whose ban is not being lifted (`lifted`): a ban
    carried down from one of them would only be placed again if lifted in the room."""
    above = v.graph.authority.get(room_id, frozenset()) - {room_id}
    return sorted(
        s
        for s in above
        if s not in lifted
        and (space := v.snapshot.rooms.get(s)) is not None
        and space.membership(user_id) is Membership.BAN
    )


def level(room: RoomState, user_id: UserID) -> float:
    return user_level(room, user_id)


def show_level(value: float) -> str:
    return "creator (unlimited)" if value == float("inf") else str(int(value))
