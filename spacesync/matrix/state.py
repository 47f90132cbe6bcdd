"""Raw room state (as /state and /sync return it) kept per room and read into model.RoomState."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..model import EventID, Membership, MemberState, PowerLevels, RoomID, RoomState, UserID

StateKey = tuple[str, str]

_MEMBERSHIPS = {m.value: m for m in Membership}


def _via(content: Mapping[str, Any]) -> tuple[str, ...]:
    via = content.get("via")
    if not isinstance(via, list):
        return ()
    return tuple(v for v in via if isinstance(v, str) and v)


POLICY_TYPES = ("m.room.policy", "org.matrix.msc4284.policy")
"""MSC4284's policy server state, under its stable and unstable names."""
REDACT_EVENTS_UNSTABLE = "org.matrix.msc4293.redact_events"
"""MSC4293's flag as Synapse 1.163 still names it (behind experimental_features: msc4293_enabled)."""


def _member(event: Mapping[str, Any]) -> MemberState | None:
    """One m.room.member event, or None when it is not one spacesync can read."""
    content = event.get("content")
    if not isinstance(content, dict):
        return None
    raw = content.get("membership")
    membership = _MEMBERSHIPS.get(raw) if isinstance(raw, str) else None
    if membership is None:
        return None
    event_id, sender, ts = event.get("event_id"), event.get("sender"), event.get("origin_server_ts")
    if (event_id is not None and not isinstance(event_id, str)) or (sender is not None and not isinstance(sender, str)):
        raise ValueError("member event whose event_id or sender is not a string")
    if isinstance(ts, bool) or not isinstance(ts, int):
        ts = 0  # informational only: a malformed timestamp costs nothing but the display
    was_joined: bool | None = None
    replaces: str | None = None
    if membership is Membership.LEAVE:
        unsigned = event.get("unsigned")
        unsigned = unsigned if isinstance(unsigned, dict) else {}
        prev = unsigned.get("prev_content")
        if isinstance(prev, dict) and isinstance(prev.get("membership"), str):
            was_joined = prev["membership"] == "join"
        if isinstance(unsigned.get("replaces_state"), str):
            replaces = unsigned["replaces_state"]
    reason = content.get("reason")
    return MemberState(
        membership=membership,
        event_id=EventID(event_id) if event_id else None,
        sender=UserID(sender) if sender else None,
        ts=ts,
        was_joined=was_joined,
        replaces=EventID(replaces) if replaces else None,
        reason=reason if isinstance(reason, str) else None,
        redact_events=membership is Membership.BAN
        and any(content.get(key) is True for key in ("redact_events", REDACT_EVENTS_UNSTABLE)),
    )


def parse_room_state(room_id: RoomID, state: Mapping[StateKey, Mapping[str, Any]]) -> RoomState:
    """Read the state events of one room into a RoomState.

    Each event is read on its own: one with malformed content (wrong types, a list where an object
    belongs) is skipped and counted in `malformed`, and the rest of the room is read as usual.
    """
    malformed = 0

    def content(event_type: str, key: str = "") -> Mapping[str, Any]:
        event = state.get((event_type, key))
        value = event.get("content") if isinstance(event, Mapping) else None
        return value if isinstance(value, dict) else {}

    create = state.get(("m.room.create", "")) or {}
    create_content = content("m.room.create")
    version = create_content.get("room_version")
    extra = create_content.get("additional_creators")
    join_rules = content("m.room.join_rules")
    allow_raw = join_rules.get("allow")
    allow = tuple(
        RoomID(entry["room_id"])
        for entry in (allow_raw if isinstance(allow_raw, list) else [])
        if isinstance(entry, dict)
        and entry.get("type") == "m.room_membership"
        and isinstance(entry.get("room_id"), str)
    )
    children: dict[RoomID, tuple[str, ...]] = {}
    child_senders: dict[RoomID, UserID] = {}
    child_content: dict[RoomID, Mapping[str, Any]] = {}
    parents: dict[RoomID, UserID] = {}
    members: dict[UserID, MemberState] = {}
    for (event_type, key), event in state.items():
        try:
            if event_type == "m.space.child":
                via = _via(event.get("content") or {})
                if via and key.startswith("!"):
                    children[RoomID(key)] = via
                    child_senders[RoomID(key)] = UserID(str(event.get("sender", "")))
                    child_content[RoomID(key)] = dict(event.get("content") or {})
            elif event_type == "m.space.parent":
                if _via(event.get("content") or {}) and key.startswith("!"):
                    parents[RoomID(key)] = UserID(str(event.get("sender", "")))
            elif event_type == "m.room.member" and key.startswith("@"):
                member = _member(event)
                if member is not None:
                    members[UserID(key)] = member
        except (AttributeError, TypeError, ValueError, KeyError):
            malformed += 1
    tombstone = content("m.room.tombstone").get("replacement_room")
    predecessor = create_content.get("predecessor")
    predecessor_id = predecessor.get("room_id") if isinstance(predecessor, dict) else None
    name = content("m.room.name").get("name")
    return RoomState(
        room_id=room_id,
        room_version=str(version) if isinstance(version, (str, int)) and not isinstance(version, bool) else None,
        create_sender=UserID(create["sender"]) if isinstance(create.get("sender"), str) else None,
        additional_creators=frozenset(UserID(u) for u in extra if isinstance(u, str))
        if isinstance(extra, list)
        else frozenset(),
        is_space=create_content.get("type") == "m.space",
        join_rule=join_rules.get("join_rule") if isinstance(join_rules.get("join_rule"), str) else None,
        allow=allow,
        join_rules_content=dict(join_rules),
        children=children,
        child_senders=child_senders,
        child_content=child_content,
        parents=parents,
        members=members,
        power_levels=PowerLevels.from_content(content("m.room.power_levels") or _default_levels(create)),
        tombstone=RoomID(tombstone) if isinstance(tombstone, str) and tombstone.startswith("!") else None,
        predecessor=RoomID(predecessor_id) if isinstance(predecessor_id, str) else None,
        name=name if isinstance(name, str) else None,
        server_acl=dict(content("m.room.server_acl")) if ("m.room.server_acl", "") in state else None,
        policy_servers={t: dict(content(t)) for t in POLICY_TYPES if content(t)},
        malformed=malformed,
    )


def _default_levels(create: Mapping[str, Any]) -> dict[str, Any]:
    """Without m.room.power_levels, the creator has 100 and everyone else 0 (the spec's defaults)."""
    sender = create.get("sender")
    return {"users": {sender: 100}, "state_default": 0, "kick": 50, "ban": 50} if isinstance(sender, str) else {}


class StateCache:
    """The latest known state of each room, updated by /state reads and /sync deltas.

    A /state read and the /sync stream race: a delta that arrives while a read is in flight may or
    may not be in the read's answer. So every delta seen during a read (`begin_read`) is kept, and
    applied again over the read's answer when it lands (`replace`). Re-applying a delta the answer
    already holds changes nothing, and a newer event than the delta reaches /sync after it, so the
    cache ends at the newest state either way: no update is lost, even for a room read the first time.
    """

    def __init__(self) -> None:
        self._state: dict[RoomID, dict[StateKey, dict[str, Any]]] = {}
        self._parsed: dict[RoomID, RoomState] = {}
        self._during_read: dict[RoomID, list[Mapping[str, Any]]] = {}

    def begin_read(self, room_id: RoomID) -> None:
        """A /state read of the room starts now: keep the deltas that arrive until `replace`."""
        self._during_read[room_id] = []

    def end_read(self, room_id: RoomID) -> None:
        """The read failed: stop keeping deltas (the cached state, if any, already has them)."""
        self._during_read.pop(room_id, None)

    def replace(self, room_id: RoomID, events: Iterable[Mapping[str, Any]]) -> RoomState:
        """The room's full state from a /state read, with the deltas that arrived during the read on top."""
        during = self._during_read.pop(room_id, [])
        self._state[room_id] = {}
        self._apply(room_id, events)
        self._apply(room_id, during)
        return self.get(room_id)  # type: ignore[return-value]

    def update(self, room_id: RoomID, events: Iterable[Mapping[str, Any]]) -> bool:
        """Apply state events (a /sync delta, the bot's own change); False when the room is not cached."""
        events = [e for e in events if isinstance(e, Mapping)]
        pending = self._during_read.get(room_id)
        if pending is not None:
            pending.extend(events)
        if room_id not in self._state:
            return False
        self._apply(room_id, events)
        return True

    def _apply(self, room_id: RoomID, events: Iterable[Mapping[str, Any]]) -> None:
        room = self._state[room_id]
        for event in events:
            key = event.get("state_key")
            if isinstance(key, str) and isinstance(event.get("type"), str):
                room[(event["type"], key)] = dict(event)
        self._parsed.pop(room_id, None)

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
