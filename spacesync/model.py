"""Plain data shared by every layer: room snapshots, policies and the actions the planner emits."""

from __future__ import annotations

import json
from collections.abc import ItemsView, Iterator, Mapping, ValuesView
from enum import Enum
from typing import Any, TypeVar, overload

import attrs
from mautrix.types import EventID, RoomID, UserID

__all__ = [
    "Action",
    "ActionKind",
    "EventID",
    "Finding",
    "LeftBehind",
    "Lockdown",
    "MemberState",
    "Members",
    "Membership",
    "OnLeave",
    "OwnedLevel",
    "PlacedBan",
    "Plan",
    "Policy",
    "PolicyRule",
    "PowerLevels",
    "RoomID",
    "RoomState",
    "RuleKind",
    "Snapshot",
    "SpacePolicy",
    "UserID",
    "canonical",
    "canonical_tag",
]


class Membership(str, Enum):
    JOIN = "join"
    LEAVE = "leave"
    BAN = "ban"
    INVITE = "invite"
    KNOCK = "knock"


@attrs.frozen
class MemberState:
    """One user's current membership in one room, with when and how it was reached."""

    membership: Membership
    event_id: EventID | None = None
    sender: UserID | None = None
    ts: int = 0
    """origin_server_ts of the membership event, in milliseconds: set by the sender's server, so it is
    shown to people but never used to time anything."""
    was_joined: bool | None = None
    """For any membership but `join`: whether the user departed, i.e. had joined and has not joined since (they
    left or were kicked, then maybe knocked, were invited, were refused): a departure is sticky until a new join.
    False for a declined or withdrawn invite, a rejected knock or an unban of someone never seen joined; None when
    nobody can tell. Only a leave, knock or invite with was_joined True is a departure (a ban always is)."""
    seen_ms: int | None = None
    """When spacesync first saw this membership, on its own clock (grace periods run from it)."""
    replaces: EventID | None = None
    """For a `leave`: the membership event it replaced (`unsigned.replaces_state`), when the homeserver said."""
    reason: str | None = None
    """The event's `reason`: how a homeserver's copy of a ban (a room upgrade) is told from a new ban."""
    redact_events: bool = False
    """For a ban: MSC4293's `redact_events: true` (remove the user's messages along with them)."""


JOINED = MemberState(Membership.JOIN)
"""What a compact join reads as: only its membership is kept (see `Members`)."""


def canonical(state: MemberState) -> MemberState:
    """A membership outside Spaces and roots as decisions read it: its membership, sender and, but for a join,
    `was_joined`; for a ban also its reason and `redact_events`. The event id, `ts` (display only), `replaces`
    and `seen_ms` (read by the membership history, for Spaces and roots only) are dropped."""
    ban = state.membership is Membership.BAN
    return MemberState(
        state.membership,
        sender=state.sender,
        was_joined=state.was_joined if state.membership is not Membership.JOIN else None,
        reason=state.reason if ban else None,
        redact_events=ban and state.redact_events,
    )


def canonical_tag(state: MemberState) -> str:
    """Names a canonical entry by its fields, stable across restarts. It stands in for the event id in a parked
    action's fingerprint: a new event with the same fields (a second leave after a rejoin, a ban sent again
    alike) leaves it as it was, so the action is not planned again for it; no decision could change then."""
    return json.dumps([state.membership.value, state.sender, state.was_joined, state.reason, state.redact_events])


_T = TypeVar("_T")


class Members(Mapping[UserID, MemberState]):
    """A room's members, compact: one dict per room whose values are either a MemberState or, for a join
    whose details no decision reads, an int: a stable CRC-32 of the join's event id (-1 without one).

    A compact join reads as the shared `JOINED` (its membership only). In a compact room (`compact`: neither a
    Space nor a configured root) a leave, ban, invite or knock is *canonical*: only the fields decisions read
    there (`canonical`), the event id, timestamp and `replaces` dropped, one object shared by every equal entry.
    A room kept in detail holds every member as the full MemberState. The dict is never changed once handed to
    a Members: the state cache copies it before it changes a room someone may still hold.
    """

    __slots__ = ("_compact", "_entries", "_servers")

    def __init__(self, entries: Mapping[UserID, int | MemberState], *, compact: bool = False) -> None:
        self._entries = entries
        self._compact = compact
        self._servers: frozenset[str] | None = None

    def __getitem__(self, user_id: UserID) -> MemberState:
        entry = self._entries[user_id]
        return JOINED if isinstance(entry, int) else entry

    @overload
    def get(self, user_id: UserID, /) -> MemberState | None: ...
    @overload
    def get(self, user_id: UserID, /, default: MemberState | _T) -> MemberState | _T: ...
    def get(self, user_id: UserID, /, default: Any = None) -> Any:
        entry = self._entries.get(user_id)
        if entry is None:
            return default
        return JOINED if isinstance(entry, int) else entry

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._entries

    def __iter__(self) -> Iterator[UserID]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> ItemsView[UserID, MemberState]:
        return _MemberItems(self)

    def values(self) -> ValuesView[MemberState]:
        return _MemberValues(self)

    def __repr__(self) -> str:
        return f"Members({len(self._entries)} entries)"

    def membership(self, user_id: UserID) -> Membership | None:
        entry = self._entries.get(user_id)
        if entry is None:
            return None
        return Membership.JOIN if isinstance(entry, int) else entry.membership

    def joined(self) -> frozenset[UserID]:
        join = Membership.JOIN
        return frozenset([u for u, e in self._entries.items() if isinstance(e, int) or e.membership is join])

    def joined_servers(self) -> frozenset[str]:
        """The server names of the joined users (after the first colon): worked out once, as the entries never
        change, so a plan over rooms that did not change does not walk their members again."""
        if self._servers is None:
            self._servers = frozenset(s for u in self.joined() if (s := u.partition(":")[2]))
        return self._servers

    def tag(self, user_id: UserID) -> str | None:
        """Names the user's current membership event: its id; for a compact join `crc32:` and the CRC-32 of its
        id; for a canonical entry its canonical fields (`canonical_tag`). Stable across restarts, so fit for
        fingerprints that are stored."""
        entry = self._entries.get(user_id)
        if entry is None:
            return None
        if isinstance(entry, int):
            return None if entry < 0 else f"crc32:{entry:08x}"
        return canonical_tag(entry) if self._compact else entry.event_id

    def _pairs(self) -> Iterator[tuple[UserID, MemberState]]:
        for user_id, entry in self._entries.items():
            yield user_id, (JOINED if isinstance(entry, int) else entry)


class _MemberItems(ItemsView[UserID, MemberState]):
    _mapping: Members

    def __iter__(self) -> Iterator[tuple[UserID, MemberState]]:
        return self._mapping._pairs()


class _MemberValues(ValuesView[MemberState]):
    _mapping: Members

    def __iter__(self) -> Iterator[MemberState]:
        return (state for _, state in self._mapping._pairs())


def parse_level(value: Any) -> int | None:
    """Read a power level: integers, and the legacy strings ("50") older room versions allow; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _to_int(value: Any, default: int) -> int:
    level = parse_level(value)
    return default if level is None else level


@attrs.frozen
class PowerLevels:
    """The parts of m.room.power_levels spacesync reasons about, plus the raw content to write back."""

    users: Mapping[UserID, int] = attrs.field(factory=dict)
    users_default: int = 0
    kick: int = 50
    ban: int = 50
    invite: int = 0
    state_default: int = 50
    events: Mapping[str, int] = attrs.field(factory=dict)
    raw: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_content(cls, content: Mapping[str, Any] | None) -> PowerLevels:
        content = dict(content or {})
        users_raw = content.get("users")
        users_raw = users_raw if isinstance(users_raw, dict) else {}
        events_raw = content.get("events")
        events_raw = events_raw if isinstance(events_raw, dict) else {}
        return cls(
            users={UserID(k): _to_int(v, 0) for k, v in users_raw.items()},
            users_default=_to_int(content.get("users_default"), 0),
            kick=_to_int(content.get("kick"), 50),
            ban=_to_int(content.get("ban"), 50),
            invite=_to_int(content.get("invite"), 0),
            state_default=_to_int(content.get("state_default"), 50),
            events={str(k): _to_int(v, 50) for k, v in events_raw.items()},
            raw=content,
        )

    def event_level(self, event_type: str) -> int:
        return self.events.get(event_type, self.state_default)


class RuleKind(str, Enum):
    """What a policy list rule (MSC2313) is about."""

    USER = "user"
    SERVER = "server"
    ROOM = "room"


RULE_TYPES: Mapping[str, RuleKind] = {
    **{f"m.policy.rule.{k.value}": k for k in RuleKind},
    **{f"m.room.rule.{k.value}": k for k in RuleKind},
    **{f"org.matrix.mjolnir.rule.{k.value}": k for k in RuleKind},
}
"""Policy rule state event types, the stable names and the legacy ones lists still hold, by what they are about."""


@attrs.frozen
class PolicyRule:
    """One rule of a policy list room: a state event whose content names an entity and a recommendation."""

    kind: RuleKind
    event_type: str
    state_key: str
    entity: str
    recommendation: str
    sender: UserID
    reason: str = ""


@attrs.frozen
class RoomState:
    """What the bot could read of one room: the inputs to every decision about it."""

    room_id: RoomID
    room_version: str | None = None
    create_sender: UserID | None = None
    additional_creators: frozenset[UserID] = frozenset()
    is_space: bool = False
    join_rule: str | None = None
    allow: tuple[RoomID, ...] = ()
    """Room ids named by `m.room_membership` entries of a restricted join rule."""
    join_rules_content: Mapping[str, Any] = attrs.field(factory=dict)
    children: Mapping[RoomID, tuple[str, ...]] = attrs.field(factory=dict)
    """m.space.child state with a non-empty `via`: child room id -> via servers."""
    child_senders: Mapping[RoomID, UserID] = attrs.field(factory=dict)
    child_content: Mapping[RoomID, Mapping[str, Any]] = attrs.field(factory=dict)
    """The full m.space.child content per child (order, suggested), to rewrite `via` and keep the rest."""
    parents: Mapping[RoomID, UserID] = attrs.field(factory=dict)
    """m.space.parent state with a non-empty `via`: parent room id -> sender."""
    members: Mapping[UserID, MemberState] = attrs.field(factory=dict)
    power_levels: PowerLevels = attrs.field(factory=PowerLevels)
    tombstone: RoomID | None = None
    """The replacement room named by m.room.tombstone, if the room was upgraded."""
    predecessor: RoomID | None = None
    """The room this one replaced (m.room.create `predecessor`): how an upgrade is verified."""
    name: str | None = None
    server_acl: Mapping[str, Any] | None = None
    """m.room.server_acl content, or None when the room has none."""
    policy_servers: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    """Policy server state (MSC4284) by event type (m.room.policy, and the unstable name), non-empty only."""
    malformed: int = 0
    """State events skipped because their content could not be read (wrong types, missing fields)."""
    policy_rules: tuple[PolicyRule, ...] = ()
    """Policy rules (MSC2313) with an entity and a recommendation, whoever sent them: a list room's content."""

    def membership(self, user_id: UserID) -> Membership:
        state = self.members.get(user_id)
        return state.membership if state else Membership.LEAVE

    def joined(self) -> frozenset[UserID]:
        if isinstance(self.members, Members):
            return self.members.joined()
        return frozenset(u for u, m in self.members.items() if m.membership is Membership.JOIN)

    def joined_servers(self) -> frozenset[str]:
        """The servers of the joined members (`refs.server_name` of each)."""
        if isinstance(self.members, Members):
            return self.members.joined_servers()
        return frozenset(s for u in self.joined() if (s := u.partition(":")[2]))

    def member_tag(self, user_id: UserID) -> str | None:
        """Names the user's current membership event (`Members.tag`): what a parked action's fingerprint holds."""
        if isinstance(self.members, Members):
            return self.members.tag(user_id)
        state = self.members.get(user_id)
        return state.event_id if state else None

    @property
    def creators(self) -> frozenset[UserID]:
        """Room creators. In room version 12 they hold unlimited power."""
        if self.create_sender is None:
            return self.additional_creators
        return self.additional_creators | {self.create_sender}


@attrs.frozen
class Snapshot:
    """The world as read at one moment. Rooms the bot could not read are listed in `unreachable`.

    A room that could not be read this time but was read before is in both `rooms` (its last known
    state) and `unreachable`: it is *stale*. Its last known state keeps the Space graph whole (its
    children, its allow lists), but nothing is done in it or on its account until it reads again.
    """

    rooms: Mapping[RoomID, RoomState] = attrs.field(factory=dict)
    unreachable: Mapping[RoomID, str] = attrs.field(factory=dict)
    """Room id -> why it could not be read (not joined, forbidden, 5xx, timeout, walk cap)."""
    placed_bans: frozenset[PlacedBan] = frozenset()
    owned_levels: Mapping[tuple[RoomID, UserID], OwnedLevel] = attrs.field(factory=dict)
    now_ms: int = 0
    lockdowns: Mapping[RoomID, Lockdown] = attrs.field(factory=dict)
    owned_acl: Mapping[RoomID, frozenset[str]] = attrs.field(factory=dict)
    owned_policy: Mapping[tuple[RoomID, str], Mapping[str, Any]] = attrs.field(factory=dict)
    """Policy server state spacesync wrote, by (room, event type): what it wrote."""
    """Server ACL deny entries spacesync added to each room (the rest of each ACL is the room's own)."""
    """Rooms spacesync locked down and that still hold the rule it wrote: their join rules are left alone."""

    def known(self, room_id: RoomID) -> bool:
        """Read in this snapshot: neither missing nor stale."""
        return room_id in self.rooms and room_id not in self.unreachable

    def stale(self, room_id: RoomID) -> bool:
        return room_id in self.rooms and room_id in self.unreachable


class OnLeave(str, Enum):
    KICK = "kick"
    BAN = "ban"
    NONE = "none"


_ON_LEAVE_SEVERITY = {OnLeave.NONE: 0, OnLeave.KICK: 1, OnLeave.BAN: 2}


@attrs.frozen
class SpacePolicy:
    """How one managed root Space governs its descendants."""

    room_id: RoomID
    on_leave: OnLeave = OnLeave.KICK
    propagate_bans: bool = True
    propagate_unbans: bool = True
    exempt: frozenset[UserID] = frozenset()
    extra_rooms: frozenset[RoomID] = frozenset()
    grace_period_s: float = 0.0
    power_levels: bool = True
    power_level_map: Mapping[int, int] = attrs.field(factory=dict)
    max_power_level: int | None = None
    creator_level: int = 100
    enforce_join_rules: bool = False
    restrict_invite_rooms: bool = False
    """With `enforce_join_rules`, also turn invite-only rooms into restricted ones (which opens them to every
    member of the Space): a separate choice, never implied by enforcing."""
    invite_members: bool = False
    max_evictions_without_confirmation: int = 25
    guard_window_s: float = 600.0
    server_acl: bool = False
    """Merge the Space's m.room.server_acl deny entries into its managed rooms."""
    redact_on_ban: int = 0
    """With each ban carried down from the Space, also redact the user's last N messages in the room."""
    policy_server: bool = False
    """Mirror the Space's policy server (MSC4284) into managed rooms that have none of their own."""
    refresh_via: bool = False
    """Rewrite m.space.child `via` lists whose servers have no joined member left in the child."""
    policy_lists: tuple[RoomID, ...] = ()
    """Policy list rooms whose user ban rules ban in this Space (and server rules feed the server ACL)."""
    """The mass-action guard counts the users evicted from this Space within this window."""

    def milder_on_leave(self, other: OnLeave) -> OnLeave:
        return min(self.on_leave, other, key=_ON_LEAVE_SEVERITY.__getitem__)


@attrs.frozen
class Policy:
    """Everything the planner needs to know about who and what it may act on."""

    bot: UserID
    spaces: tuple[SpacePolicy, ...] = ()
    admins: frozenset[UserID] = frozenset()
    exempt: frozenset[UserID] = frozenset()
    """Users exempt in every Space (added from the admin room)."""
    max_depth: int = 10
    max_rooms: int = 2000
    reason_template: str = "{event} {space}"
    """How kick and ban reasons read in users' clients: `{event}` (left, kicked from, banned in, removed from),
    `{space}` (the Space's name, or "Space <room id>" when it has none) and `{space_id}`."""

    def space(self, room_id: RoomID) -> SpacePolicy | None:
        return next((s for s in self.spaces if s.room_id == room_id), None)


REASON_FIELDS = ("event", "space", "space_id")
"""The placeholders a reason template may use."""


def render_reason(template: str, event: str, space_id: RoomID, space_name: str | None) -> str:
    """A kick or ban reason a person can read: the Space by its name, never only by its room id."""
    return template.format(event=event, space=space_name or f"Space {space_id}", space_id=space_id)


class ActionKind(str, Enum):
    KICK = "kick"
    BAN = "ban"
    UNBAN = "unban"
    INVITE = "invite"
    SET_POWER_LEVELS = "set_power_levels"
    SET_JOIN_RULES = "set_join_rules"
    SET_SPACE_CHILD = "set_space_child"
    SET_SERVER_ACL = "set_server_acl"
    SET_POLICY_SERVER = "set_policy_server"
    """state_key holds the event type (m.room.policy or its unstable name); the state key sent is empty."""
    REDACT = "redact"
    """Redact the user's messages in the room, newest first: `content` holds `last` (at most that many) and
    optionally `since_ms` (none older), and `run`, which names the count kept for the batch notice."""


EVICTIONS = frozenset({ActionKind.KICK, ActionKind.BAN})


@attrs.frozen
class Action:
    """One change to make in one room, with the reason a moderator will read."""

    kind: ActionKind
    room_id: RoomID
    user_id: UserID | None = None
    reason: str = ""
    state_key: str | None = None
    """For state actions whose key is not empty (m.space.child)."""
    space_id: RoomID | None = None
    """The managed root Space on whose behalf the action runs (for the mass-action guard)."""
    cause: str = ""
    """Machine-readable origin: 'space_ban', 'on_leave', 'unban', 'power_levels', ..."""
    content: Mapping[str, Any] | None = None
    """Full state content to send, for state-writing actions."""
    changes: Mapping[Any, tuple[Any, Any]] = attrs.field(factory=dict)
    """Per-key before/after, shown in `plan`: user id -> (level before, after) for set_power_levels,
    "child" -> (room before, after) for m.space.child. Keyed by UserID or str, hence Any."""
    ownership: Mapping[UserID, OwnedLevel | None] = attrs.field(factory=dict)
    """For set_power_levels: the ownership records to store (or drop, None) once it succeeds."""

    @property
    def key(self) -> str:
        """Identifies the action for de-duplication: same kind, room and target."""
        return f"{self.kind.value}|{self.room_id}|{self.user_id or self.state_key or ''}"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "action": self.kind.value,
            "room_id": self.room_id,
            "user_id": self.user_id,
            "reason": self.reason,
        }
        if self.space_id:
            data["space_id"] = self.space_id
        if self.changes:
            data["changes"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.changes.items()}
        return data


@attrs.frozen
class PlacedBan:
    """A ban spacesync placed, remembered so that it lifts only its own bans."""

    room_id: RoomID
    user_id: UserID
    cause: str
    """'space_ban' (carried from a Space ban) or 'on_leave' (on_leave: ban)."""


@attrs.frozen
class OwnedLevel:
    """A users entry spacesync wrote into a room's power levels, and what stood before it."""

    room_id: RoomID
    user_id: UserID
    written: int
    previous: int | None
    """The entry before spacesync wrote, or None when there was none."""
    released: bool = False
    """Someone changed the entry by hand since spacesync wrote it: it is the room's now, left alone (and reported)
    whatever the Space asks, until the room's moderators set it back (to `written` or to what the Space asks) or
    `!spacesync powerlevels release` drops the record. When the Space asks nothing any more, the record goes."""


class FindingArea(str, Enum):
    """Which part of the planner a finding comes from, and so which view (`joinrules`, `powerlevels`) shows it."""

    MEMBERSHIP = "membership"
    JOIN_RULES = "joinrules"
    POWER_LEVELS = "powerlevels"


@attrs.frozen
class Lockdown:
    """A room spacesync locked down, and the join rules it had before: unlock restores exactly them."""

    room_id: RoomID
    space_id: RoomID
    previous: Mapping[str, Any]
    """The m.room.join_rules content before the lockdown."""
    written: str
    """The join rule spacesync wrote (invite or knock): a room that no longer has it was changed by hand."""


@attrs.frozen
class Finding:
    """Something a moderator should know about a room, which the planner will not act on."""

    room_id: RoomID
    code: str
    message: str
    area: FindingArea = FindingArea.MEMBERSHIP

    def __str__(self) -> str:
        return f"{self.room_id}: {self.message}"


@attrs.frozen
class LeftBehind:
    """A user the plan would evict from a room but must not or cannot (protected, no power): the batch's
    notice names them next to the rooms where the eviction worked."""

    room_id: RoomID
    user_id: UserID
    kind: ActionKind
    """The eviction that did not happen: kick or ban."""
    why: str

    def to_json(self) -> list[str]:
        return [self.room_id, self.user_id, self.kind.value, self.why]

    @classmethod
    def from_json(cls, data: Any) -> LeftBehind:
        room_id, user_id, kind, why = data
        return cls(RoomID(room_id), UserID(user_id), ActionKind(kind), str(why))


@attrs.frozen
class Plan:
    """The planner's answer: actions to take now, rechecks to schedule, and findings."""

    actions: tuple[Action, ...] = ()
    findings: tuple[Finding, ...] = ()
    managed: tuple[RoomID, ...] = ()
    recheck_at_ms: int | None = None
    """Earliest time a grace period ends; the engine reconciles again then."""
    stale_bans: tuple[PlacedBan, ...] = ()
    """Remembered bans that no longer stand (lifted by hand): forget them."""
    stale_levels: tuple[tuple[RoomID, UserID], ...] = ()
    """Ownership records to forget (the entry changed by hand and the Space no longer asks, or a
    released entry whose Space level changed)."""
    released_levels: tuple[OwnedLevel, ...] = ()
    """Entries changed by hand while the Space still asks for a level: left alone from now on."""
    upgrades: tuple[tuple[RoomID, RoomID], ...] = ()
    """Managed rooms replaced by an upgrade (old, new): spacesync's records move to the new room."""
    left_behind: tuple[LeftBehind, ...] = ()
    """Evictions that could not be planned, one per (room, user): who stays where, and why."""
    users: frozenset[UserID] | None = None
    """An incremental plan's users: only their bans, evictions, unbans and invites were planned (None: everyone)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "actions": [a.to_json() for a in self.actions],
            "rooms": list(self.managed),
            "warnings": [str(f) for f in self.findings],
        }


class Cause(str, Enum):
    """Why an action was planned; stored with journal entries and placed bans, so the values never change."""

    SPACE_BAN = "space_ban"
    ON_LEAVE = "on_leave"
    UNBAN = "unban"
    POWER_LEVELS = "power_levels"
    JOIN_RULES = "join_rules"
    INVITE_MEMBERS = "invite_members"
    UNDO = "undo"
    LOCKDOWN = "lockdown"
    UNLOCK = "unlock"
    SERVER_ACL = "server_acl"
    REFRESH_VIA = "refresh_via"
    POLICY_SERVER = "policy_server"
    COMMAND_BAN = "command_ban"
    """`!spacesync ban`: placed in the Space and every managed room below it; lifted only by `unban` (or undo)."""
    COMMAND_UNBAN = "command_unban"
    COMMAND_KICK = "command_kick"
    COMMAND_REDACT = "command_redact"
    POLICY_LIST = "policy_list"
    """A user rule (m.ban) of a policy list the Space follows: lifted when no rule of its lists asks any more."""


MODERATOR_CAUSES = frozenset(
    {
        Cause.UNDO.value,
        Cause.LOCKDOWN.value,
        Cause.UNLOCK.value,
        Cause.COMMAND_BAN.value,
        Cause.COMMAND_UNBAN.value,
        Cause.COMMAND_KICK.value,
        Cause.COMMAND_REDACT.value,
    }
)
"""Actions a moderator asked for from the admin room: run as asked, never re-checked against the plan."""


class FindingFamily(str, Enum):
    """What a moderator can do about a finding: findings are counted and announced by family."""

    CANNOT_SEE = "cannot see"
    CANNOT_ACT = "cannot act"
    NOT_OPTED_IN = "not opted in"
    VERSION = "version"
    LIMITS = "limits"
    JOIN_RULES = "join rules"
    POWER_LEVELS = "power levels"
    STRUCTURE = "structure"
    EXEMPT = "exempt"


class FindingCode(str, Enum):
    """The codes `Finding.code` takes (the value is what Finding holds)."""

    UNREACHABLE = "unreachable"
    UNCHECKED_ENTITLEMENT = "unchecked_entitlement"
    HISTORY_UNKNOWN = "history_unknown"
    NO_POWER = "no_power"
    PROTECTED = "protected"
    NOT_OPTED_IN = "not_opted_in"
    VERSION = "version"
    UNKNOWN_VERSION = "unknown_version"
    UPGRADED = "upgraded"
    UPGRADE_UNVERIFIED = "upgrade_unverified"
    CAP_ROOMS = "cap_rooms"
    CAP_DEPTH = "cap_depth"
    CYCLE = "cycle"
    MALFORMED = "malformed"
    EXEMPT = "exempt"
    ALLOW_MISSING = "allow_missing"
    NOT_RESTRICTED = "not_restricted"
    INVITE_KEPT = "invite_kept"
    JOIN_RULE = "join_rule"
    INVALID_USER = "invalid_user"
    CHANGED_BY_HAND = "changed_by_hand"
    ABOVE_BOT = "above_bot"
    RESTRICTED_LOCALLY = "restricted_locally"
    PARTIAL_STATE = "partial_state"
    """Joined over federation, its full state still on the way: not read, not acted in, waited for."""
    LOCKED_DOWN = "locked_down"
    ACL_REFUSED = "acl_refused"
    UNROUTABLE_CHILD = "unroutable_child"
    POLICY_RULES_IGNORED = "policy_rules_ignored"
    """A policy list's room rules, unknown recommendations, or rules from senders without the power to send them."""

    @property
    def family(self) -> FindingFamily:
        return _FINDING_FAMILIES[self]


_FINDING_FAMILIES = {
    FindingCode.UNREACHABLE: FindingFamily.CANNOT_SEE,
    FindingCode.PARTIAL_STATE: FindingFamily.CANNOT_SEE,
    FindingCode.UNCHECKED_ENTITLEMENT: FindingFamily.CANNOT_SEE,
    FindingCode.HISTORY_UNKNOWN: FindingFamily.CANNOT_SEE,
    FindingCode.NO_POWER: FindingFamily.CANNOT_ACT,
    FindingCode.PROTECTED: FindingFamily.CANNOT_ACT,
    FindingCode.NOT_OPTED_IN: FindingFamily.NOT_OPTED_IN,
    FindingCode.VERSION: FindingFamily.VERSION,
    FindingCode.UNKNOWN_VERSION: FindingFamily.VERSION,
    FindingCode.UPGRADED: FindingFamily.STRUCTURE,
    FindingCode.UPGRADE_UNVERIFIED: FindingFamily.STRUCTURE,
    FindingCode.CAP_ROOMS: FindingFamily.LIMITS,
    FindingCode.CAP_DEPTH: FindingFamily.LIMITS,
    FindingCode.CYCLE: FindingFamily.STRUCTURE,
    FindingCode.MALFORMED: FindingFamily.STRUCTURE,
    FindingCode.EXEMPT: FindingFamily.EXEMPT,
    FindingCode.ALLOW_MISSING: FindingFamily.JOIN_RULES,
    FindingCode.NOT_RESTRICTED: FindingFamily.JOIN_RULES,
    FindingCode.INVITE_KEPT: FindingFamily.JOIN_RULES,
    FindingCode.JOIN_RULE: FindingFamily.JOIN_RULES,
    FindingCode.INVALID_USER: FindingFamily.POWER_LEVELS,
    FindingCode.CHANGED_BY_HAND: FindingFamily.POWER_LEVELS,
    FindingCode.ABOVE_BOT: FindingFamily.POWER_LEVELS,
    FindingCode.RESTRICTED_LOCALLY: FindingFamily.POWER_LEVELS,
    FindingCode.LOCKED_DOWN: FindingFamily.JOIN_RULES,
    FindingCode.ACL_REFUSED: FindingFamily.CANNOT_ACT,
    FindingCode.UNROUTABLE_CHILD: FindingFamily.STRUCTURE,
    FindingCode.POLICY_RULES_IGNORED: FindingFamily.LIMITS,
}


def finding_family(code: str) -> FindingFamily | None:
    """The family of a finding's code; None for a code this version does not know."""
    try:
        return FindingCode(code).family
    except ValueError:
        return None
