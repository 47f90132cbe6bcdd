"""Room state (as /state and /sync return it) kept per room, compact, and read into model.RoomState."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from ..metrics import STATE_MEMBER_ENTRIES, STATE_ROOMS
from ..model import (
    RULE_TYPES,
    EventID,
    Members,
    Membership,
    MemberState,
    PolicyRule,
    PowerLevels,
    RoomID,
    RoomState,
    UserID,
    canonical,
)
from .replay import newer_than_answer

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


def _member(event: Mapping[str, Any], user: Callable[[str], str] = str) -> MemberState | None:
    """One m.room.member event, or None when it is not one spacesync can read. `user` gives the sender's id
    (the state cache's shared copy of it)."""
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
    if membership is not Membership.JOIN:  # how a leave, knock, invite or ban came about: its history
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
        sender=UserID(user(sender)) if sender else None,
        ts=ts,
        was_joined=was_joined,
        replaces=EventID(replaces) if replaces else None,
        reason=reason if isinstance(reason, str) else None,
        redact_events=membership is Membership.BAN
        and any(content.get(key) is True for key in ("redact_events", REDACT_EVENTS_UNSTABLE)),
    )


_MALFORMED = (AttributeError, TypeError, ValueError, KeyError)
"""What reading one event with malformed content raises: the event is skipped and counted."""


def parse_room_state(room_id: RoomID, state: Mapping[StateKey, Mapping[str, Any]]) -> RoomState:
    """Read the state events of one room into a RoomState, every member in full detail.

    Each event is read on its own: one with malformed content (wrong types, a list where an object
    belongs) is skipped and counted in `malformed`, and the rest of the room is read as usual.
    (StateCache keeps members compact instead, and reads the rest of the room with the same code.)
    """
    members: dict[UserID, MemberState] = {}
    malformed = 0
    for (event_type, key), event in state.items():
        if event_type == "m.room.member" and key.startswith("@"):
            try:
                member = _member(event)
            except _MALFORMED:
                malformed += 1
                continue
            if member is not None:
                members[UserID(key)] = member
    return _room_state(room_id, state, members, malformed)


def _room_state(
    room_id: RoomID,
    state: Mapping[StateKey, Mapping[str, Any]],
    members: Mapping[UserID, MemberState],
    malformed: int,
) -> RoomState:
    """Everything but the members read from the room's state; `members` and their `malformed` count as given."""

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
    for (event_type, key), event in state.items():
        try:
            if event_type == "m.space.child":
                via = _via(event.get("content") or {})
                if via and key.startswith("!"):
                    children[RoomID(key)] = via
                    child_senders[RoomID(key)] = UserID(str(event.get("sender", "")))
                    child_content[RoomID(key)] = dict(event.get("content") or {})
            elif event_type == "m.space.parent" and _via(event.get("content") or {}) and key.startswith("!"):
                parents[RoomID(key)] = UserID(str(event.get("sender", "")))
        except _MALFORMED:
            malformed += 1
    rules: list[PolicyRule] = []
    for (event_type, key), event in state.items():
        if event_type in RULE_TYPES:
            rule = _rule(event_type, key, event)
            if rule is not None:
                rules.append(rule)
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
        is_space=_is_space(create_content),
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
        policy_rules=tuple(sorted(rules, key=lambda r: (r.event_type, r.state_key))),
    )


def _rule(event_type: str, key: str, event: Mapping[str, Any]) -> PolicyRule | None:
    """A policy rule with an entity and a recommendation; None for a removed rule (empty content) or one that
    names neither."""
    content, sender = event.get("content"), event.get("sender")
    if not isinstance(content, Mapping) or not isinstance(sender, str):
        return None
    entity, recommendation, reason = content.get("entity"), content.get("recommendation"), content.get("reason")
    if not isinstance(entity, str) or not entity or not isinstance(recommendation, str):
        return None
    return PolicyRule(
        RULE_TYPES[event_type],
        event_type,
        key,
        entity,
        recommendation,
        UserID(sender),
        reason if isinstance(reason, str) else "",
    )


def _is_space(create_content: Mapping[str, Any]) -> bool:
    return create_content.get("type") == "m.space"


def _default_levels(create: Mapping[str, Any]) -> dict[str, Any]:
    """Without m.room.power_levels, the creator has 100 and everyone else 0 (the spec's defaults)."""
    sender = create.get("sender")
    return {"users": {sender: 100}, "state_default": 0, "kick": 50, "ban": 50} if isinstance(sender, str) else {}


READ_TYPES = frozenset(
    {
        "m.room.create",
        "m.room.join_rules",
        "m.room.power_levels",
        "m.room.tombstone",
        "m.room.name",
        "m.room.server_acl",
        "m.space.child",
        "m.space.parent",
        *POLICY_TYPES,
        *RULE_TYPES,
    }
)
"""The state besides memberships that `_room_state` reads: the only other state events the cache keeps."""

_KEPT_FIELDS = ("type", "state_key", "sender", "content")
PRUNE_USERS_AT = 4096
"""The cache's tables (user ids, canonical memberships) are first pruned at this size, then whenever one doubles."""


class _Room:
    """One cached room: the state events it reads besides memberships, and its members compact (`Members`)."""

    __slots__ = ("bad", "base", "detail", "members", "shared", "state", "states", "users", "view")

    def __init__(self, users: dict[str, str], states: dict[MemberState, MemberState]) -> None:
        self.users = users
        """The cache's one copy of each user id, shared by every room."""
        self.states = states
        """The cache's one copy of each canonical membership (`model.canonical`), shared by every compact room."""
        self.state: dict[StateKey, dict[str, Any]] = {}
        self.members: dict[UserID, int | MemberState] = {}
        self.bad: set[UserID] = set()
        """Users whose current membership event is malformed (counted in `malformed`, as parse_room_state does)."""
        self.detail = False
        """Every member kept as a full MemberState: a Space, or a room the cache was told needs detail."""
        self.shared = False
        """`members` is held by a RoomState handed out: copy it before changing it."""
        self.base: RoomState | None = None
        """The room read without its members, until its other state changes."""
        self.view: RoomState | None = None
        """The RoomState `get` hands out, until the room changes."""

    def is_space(self) -> bool:
        create = self.state.get(("m.room.create", ""))
        content = create.get("content") if create is not None else None
        return isinstance(content, dict) and _is_space(content)

    def apply(self, event: Mapping[str, Any]) -> None:
        key, event_type = event.get("state_key"), event.get("type")
        if not isinstance(key, str) or not isinstance(event_type, str):
            return
        if event_type == "m.room.member":
            if key.startswith("@"):  # parse_room_state reads no other member key
                self.set_member(key, event)
        elif event_type in READ_TYPES:
            self.state[(event_type, key)] = {k: event[k] for k in _KEPT_FIELDS if k in event}
            self.base = self.view = None

    def set_member(self, key: str, event: Mapping[str, Any]) -> None:
        user_id = UserID(self.user(key))
        if not self.detail and (join := _compact_join(event)) is not None:  # the common case, read directly
            self.own_members()
            self.bad.discard(user_id)
            self.members[user_id] = join
            self.view = None
            return
        try:
            member = _member(event, self.user)
        except _MALFORMED:
            member, malformed = None, True
        else:
            malformed = False
        self.own_members()
        if malformed:
            self.bad.add(user_id)
        else:
            self.bad.discard(user_id)
        if member is None:
            self.members.pop(user_id, None)
        elif self.detail:
            self.members[user_id] = member
        elif member.membership is Membership.JOIN:
            self.members[user_id] = _crc(member.event_id) if member.event_id else -1
        else:
            member = canonical(member)
            self.members[user_id] = self.states.setdefault(member, member)
        self.view = None

    def own_members(self) -> None:
        """Copy-on-write: a RoomState handed out earlier never changes under its holder."""
        if self.shared:
            self.members = dict(self.members)
            self.shared = False

    def user(self, user_id: str) -> str:
        """One string per user, however many rooms they are in."""
        return self.users.setdefault(user_id, user_id)

    def get(self, room_id: RoomID) -> RoomState:
        if self.view is None:
            if self.base is None:
                self.base = _room_state(room_id, self.state, {}, 0)
            self.shared = True
            self.view = attrs.evolve(
                self.base,
                members=Members(self.members, compact=not self.detail),
                malformed=self.base.malformed + len(self.bad),
            )
        return self.view


def _compact_join(event: Mapping[str, Any]) -> int | None:
    """A well-formed join as a compact room keeps it (what `_member` then `_crc` give), without building a
    MemberState; None for anything else, which takes the full route."""
    content = event.get("content")
    if not isinstance(content, dict) or content.get("membership") != "join":
        return None
    event_id, sender = event.get("event_id"), event.get("sender")
    if not (event_id is None or isinstance(event_id, str)) or not (sender is None or isinstance(sender, str)):
        return None
    return _crc(event_id) if event_id else -1


def _crc(event_id: str) -> int:
    """A compact join's stand-in for its event id: stable across restarts (unlike hash())."""
    return zlib.crc32(event_id.encode("utf-8", "surrogatepass"))


class StateCache:
    """The latest known state of each room, updated by /state reads and /sync deltas.

    A /state read and the /sync stream race: a delta that arrives while a read is in flight may or
    may not be in the read's answer. So every delta seen during a read (`begin_read`) is kept, and
    applied again over the read's answer when it lands (`replace`), unless the answer is newer: it holds
    the delta's event, or an event that came after it for the same state key (a later delta, or one whose
    `unsigned.replaces_state` names it). Replays never go backwards. Where the answer and a delta name
    different events and neither is known to be newer, the delta is applied and the room is `uncertain`
    until a read answers without such a doubt: read it again, act on nothing in it meanwhile.

    Kept compact (big communities hold a million memberships): no raw membership event is kept, each
    is read as it is applied; outside Spaces and roots a join keeps only its membership and a hash of its event
    id, and any other membership only the fields decisions read there, one shared object per distinct value
    (`Members`); other state is kept only for the event types the planner reads (`READ_TYPES`).
    """

    def __init__(self) -> None:
        self._rooms: dict[RoomID, _Room] = {}
        self._during_read: dict[RoomID, list[Mapping[str, Any]]] = {}
        self.uncertain: set[RoomID] = set()
        """Rooms whose last read answer and a delta that arrived during it could not be ordered: read again."""
        self._detailed: frozenset[RoomID] = frozenset()
        self._entries = 0
        self._users: dict[str, str] = {}
        self._states: dict[MemberState, MemberState] = {}
        self._prune_at = PRUNE_USERS_AT
        self._prune_states_at = PRUNE_USERS_AT
        self._changed_users: set[UserID] = set()
        self._changed_other = True
        """Since the last `take_changes`: users whose membership changed, and whether anything else did."""

    def keep_detail(self, room_ids: Iterable[RoomID]) -> None:
        """These rooms (the configured roots) keep every member in full, like Spaces do: the membership history
        records their join event ids. One cached without that detail is dropped, so it is read again in full."""
        wanted = frozenset(room_ids)
        for room_id in wanted - self._detailed:
            room = self._rooms.get(room_id)
            if room is not None and not room.detail:
                self.forget(room_id)
        self._detailed = wanted

    def take_changes(self) -> frozenset[UserID] | None:
        """The users whose membership changed (a /sync delta, the bot's own change) since the last call, and no
        other state: what an incremental plan looks at. None when anything else changed too (a room's other state,
        a room read, dropped or cached for the first time): then only a full plan will do. Starts again empty."""
        users = None if self._changed_other else frozenset(self._changed_users)
        self._changed_users = set()
        self._changed_other = False
        return users

    def begin_read(self, room_id: RoomID) -> None:
        """A /state read of the room starts now: keep the deltas that arrive until `replace`."""
        self._during_read[room_id] = []

    def end_read(self, room_id: RoomID) -> None:
        """The read failed: stop keeping deltas (the cached state, if any, already has them)."""
        self._during_read.pop(room_id, None)

    def replace(self, room_id: RoomID, events: Iterable[Mapping[str, Any]]) -> RoomState:
        """The room's full state from a /state read, with the deltas that arrived during the read on top."""
        during = self._during_read.pop(room_id, [])
        events = list(events)
        room = _Room(self._users, self._states)
        old = self._rooms.get(room_id)
        self._rooms[room_id] = room
        self._entries -= len(old.members) if old is not None else 0
        # The room's other state first: whether it is a Space decides how its members are kept.
        for event in events:
            if event.get("type") != "m.room.member":
                room.apply(event)
        room.detail = room.is_space() or room_id in self._detailed
        for event in events:
            if event.get("type") == "m.room.member":
                room.apply(event)
        self._entries += len(room.members)
        self._note_read(old, room)
        replay, doubt = newer_than_answer(events, during)
        self._apply(room_id, room, replay)
        if doubt:
            self.uncertain.add(room_id)
        else:
            self.uncertain.discard(room_id)
        self._count()
        return room.get(room_id)

    def _note_read(self, old: _Room | None, new: _Room) -> None:
        """What a read changed, for `take_changes`: the users whose membership differs; anything else (a room
        cached for the first time, other state) is a change of its own."""
        if old is None or old.state != new.state or old.detail != new.detail:
            self._changed_other = True
        elif old.members != new.members:
            self._changed_users.update(
                u for u in old.members.keys() | new.members.keys() if old.members.get(u) != new.members.get(u)
            )

    def update(self, room_id: RoomID, events: Iterable[Mapping[str, Any]]) -> bool:
        """Apply state events (a /sync delta, the bot's own change); False when the room is not cached."""
        events = [e for e in events if isinstance(e, Mapping)]
        pending = self._during_read.get(room_id)
        if pending is not None:
            pending.extend(events)
        room = self._rooms.get(room_id)
        if room is None:
            return False
        for event in events:
            key, event_type = event.get("state_key"), event.get("type")
            if event_type == "m.room.member" and isinstance(key, str):
                self._changed_users.add(UserID(key))
            elif event_type in READ_TYPES:
                self._changed_other = True
        self._apply(room_id, room, events)
        self._count()
        return True

    def _apply(self, room_id: RoomID, room: _Room, events: Iterable[Mapping[str, Any]]) -> None:
        before = len(room.members)
        for event in events:
            room.apply(event)
            if event.get("type") == "m.room.create":
                room.detail = room.is_space() or room_id in self._detailed
        self._entries += len(room.members) - before

    def _count(self) -> None:
        if len(self._users) > self._prune_at or len(self._states) > self._prune_states_at:
            self._prune()
        STATE_ROOMS.set(len(self._rooms))
        STATE_MEMBER_ENTRIES.set(self._entries)

    def _prune(self) -> None:
        """Drop the user ids and canonical memberships no cached room holds any more: each table keeps at most
        twice as many as in use."""
        live: dict[str, str] = {}
        states: dict[MemberState, MemberState] = {}
        for room in self._rooms.values():
            for user_id, entry in room.members.items():
                live[user_id] = user_id
                if isinstance(entry, MemberState):
                    if entry.sender:
                        live.setdefault(entry.sender, entry.sender)
                    if not room.detail:
                        states.setdefault(entry, entry)
        self._users.clear()  # in place: every room holds these tables
        self._users.update(live)
        self._states.clear()
        self._states.update(states)
        self._prune_at = max(PRUNE_USERS_AT, 2 * len(live))
        self._prune_states_at = max(PRUNE_USERS_AT, 2 * len(states))

    def forget(self, room_id: RoomID) -> None:
        self.uncertain.discard(room_id)
        room = self._rooms.pop(room_id, None)
        if room is not None:
            self._changed_other = True
            self._entries -= len(room.members)
            self._count()

    def __contains__(self, room_id: object) -> bool:
        return room_id in self._rooms

    def get(self, room_id: RoomID) -> RoomState | None:
        room = self._rooms.get(room_id)
        return room.get(room_id) if room is not None else None

    def rooms(self) -> list[RoomID]:
        return list(self._rooms)

    @property
    def member_entries(self) -> int:
        """Memberships held, over every cached room."""
        return self._entries
