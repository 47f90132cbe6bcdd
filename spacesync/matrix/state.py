"""Raw room state (as /state and /sync return it) kept per room and read into model.RoomState."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..model import EventID, MemberState, Membership, PowerLevels, RoomID, RoomState, UserID

StateKey = tuple[str, str]

_MEMBERSHIPS = {m.value: m for m in Membership}


def _via(content: Mapping[str, Any]) -> tuple[str, ...]:
    via = content.get("via")
    if not isinstance(via, list):
        return ()
    return tuple(v for v in via if isinstance(v, str) and v)


def parse_room_state(room_id: RoomID, state: Mapping[StateKey, Mapping[str, Any]]) -> RoomState:
    """Read the state events of one room into a RoomState; malformed content is read as absent."""

    def content(event_type: str, key: str = "") -> Mapping[str, Any]:
        event = state.get((event_type, key))
        value = event.get("content") if event else None
        return value if isinstance(value, dict) else {}

    create = state.get(("m.room.create", "")) or {}
    create_content = content("m.room.create")
    version = create_content.get("room_version")
    extra = create_content.get("additional_creators")
    join_rules = content("m.room.join_rules")
    allow = tuple(
        RoomID(entry["room_id"])
        for entry in (join_rules.get("allow") if isinstance(join_rules.get("allow"), list) else [])
        if isinstance(entry, dict) and entry.get("type") == "m.room_membership" and isinstance(entry.get("room_id"), str)
    )
    children: dict[RoomID, tuple[str, ...]] = {}
    child_senders: dict[RoomID, UserID] = {}
    parents: dict[RoomID, UserID] = {}
    members: dict[UserID, MemberState] = {}
    for (event_type, key), event in state.items():
        if event_type == "m.space.child":
            via = _via(event.get("content") or {})
            if via and key.startswith("!"):
                children[RoomID(key)] = via
                child_senders[RoomID(key)] = UserID(event.get("sender", ""))
        elif event_type == "m.space.parent":
            if _via(event.get("content") or {}) and key.startswith("!"):
                parents[RoomID(key)] = UserID(event.get("sender", ""))
        elif event_type == "m.room.member":
            member_content = event.get("content") or {}
            membership = _MEMBERSHIPS.get(member_content.get("membership"))
            if membership is not None and key.startswith("@"):
                reason = member_content.get("reason")
                members[UserID(key)] = MemberState(
                    membership=membership,
                    event_id=EventID(event.get("event_id", "")),
                    sender=UserID(event.get("sender", "")),
                    ts=int(event.get("origin_server_ts") or 0),
                    reason=reason if isinstance(reason, str) else None,
                )
    tombstone = content("m.room.tombstone").get("replacement_room")
    predecessor = create_content.get("predecessor")
    predecessor_id = predecessor.get("room_id") if isinstance(predecessor, dict) else None
    name = content("m.room.name").get("name")
    return RoomState(
        room_id=room_id,
        room_version=str(version) if version is not None else None,
        create_sender=UserID(create["sender"]) if isinstance(create.get("sender"), str) else None,
        additional_creators=frozenset(UserID(u) for u in extra if isinstance(u, str)) if isinstance(extra, list) else frozenset(),
        is_space=create_content.get("type") == "m.space",
        join_rule=join_rules.get("join_rule") if isinstance(join_rules.get("join_rule"), str) else None,
        allow=allow,
        join_rules_content=dict(join_rules),
        children=children,
        child_senders=child_senders,
        parents=parents,
        members=members,
        power_levels=PowerLevels.from_content(content("m.room.power_levels") or _default_levels(create)),
        tombstone=RoomID(tombstone) if isinstance(tombstone, str) and tombstone.startswith("!") else None,
        predecessor=RoomID(predecessor_id) if isinstance(predecessor_id, str) else None,
        name=name if isinstance(name, str) else None,
    )


def _default_levels(create: Mapping[str, Any]) -> dict[str, Any]:
    """Without m.room.power_levels, the creator has 100 and everyone else 0 (the spec's defaults)."""
    sender = create.get("sender")
    return {"users": {sender: 100}, "state_default": 0, "kick": 50, "ban": 50} if isinstance(sender, str) else {}


class StateCache:
    """The latest known state of each room, updated by /state reads and /sync deltas."""

    def __init__(self) -> None:
        self._state: dict[RoomID, dict[StateKey, dict[str, Any]]] = {}
        self._parsed: dict[RoomID, RoomState] = {}
        self._generation: dict[RoomID, int] = {}

    def generation(self, room_id: RoomID) -> int:
        """Counts the updates of a room: a /state read that overlapped one must not overwrite it."""
        return self._generation.get(room_id, 0)

    def replace(self, room_id: RoomID, events: Iterable[Mapping[str, Any]]) -> RoomState:
        self._state[room_id] = {}
        self._parsed.pop(room_id, None)
        self.update(room_id, events)
        return self.get(room_id)  # type: ignore[return-value]

    def update(self, room_id: RoomID, events: Iterable[Mapping[str, Any]]) -> bool:
        """Apply state events to a cached room; False when the room is not cached."""
        room = self._state.get(room_id)
        if room is None:
            # Still counted: a first /state read in flight must notice it and read again.
            self._generation[room_id] = self._generation.get(room_id, 0) + 1
            return False
        for event in events:
            key = event.get("state_key")
            if isinstance(key, str) and isinstance(event.get("type"), str):
                room[(event["type"], key)] = dict(event)
        self._parsed.pop(room_id, None)
        self._generation[room_id] = self._generation.get(room_id, 0) + 1
        return True

    def forget(self, room_id: RoomID) -> None:
        self._state.pop(room_id, None)
        self._parsed.pop(room_id, None)

    def __contains__(self, room_id: object) -> bool:
        return room_id in self._state

    def get(self, room_id: RoomID) -> RoomState | None:
        if room_id not in self._state:
            return None
        parsed = self._parsed.get(room_id)
        if parsed is None:
            parsed = self._parsed[room_id] = parse_room_state(room_id, self._state[room_id])
        return parsed

    def rooms(self) -> list[RoomID]:
        return list(self._state)
