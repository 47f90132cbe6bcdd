"""Policy lists (MSC2313) a Space follows: which users their ban rules ban in the Space, and which servers their
server rules add to the Space's server ACL.

Only rules whose sender may send that event type in the list room (its power levels now) count. User rules match
a user id literally, or as a glob (`*`, `?`) only against users spacesync sees in the Space's rooms: a pattern
never bans the world. Room rules and unknown recommendations are ignored and reported. A list that cannot be read
now is unknown, not empty: while it is, no ban placed for the Space's lists is lifted and no server entry dropped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import attrs

from ..model import Finding, FindingCode, PolicyRule, RoomID, RoomState, RuleKind, Snapshot, SpacePolicy, UserID
from .entitlement import user_level, valid_user_id

BAN_RECOMMENDATIONS = frozenset({"m.ban", "org.matrix.mjolnir.ban"})
"""The recommendation spacesync acts on, and the name older lists (Mjolnir) wrote it under."""


def matches(entity: str, user_id: str) -> bool:
    """Whether a rule's entity glob (`*` any run, `?` one character, anything else literal, case included)
    names the user id."""
    return fnmatch.fnmatchcase(user_id, entity.replace("[", "[[]"))


def is_glob(entity: str) -> bool:
    return "*" in entity or "?" in entity


@attrs.frozen
class ListRules:
    """What one list room says, as spacesync reads it."""

    list_id: RoomID
    users: tuple[PolicyRule, ...] = ()
    """Ban rules for users, from senders with the power to send them."""
    servers: tuple[PolicyRule, ...] = ()
    """Ban rules for servers, likewise."""
    room_rules: int = 0
    unknown: int = 0
    """Rules whose recommendation is not a ban."""
    unpowered: int = 0
    """Rules sent by someone without the power to send that event type in the list room."""

    def ignored(self) -> list[tuple[int, str]]:
        """The rules spacesync ignores, counted by why: (count, why) for each reason that has any."""
        reasons = (
            (self.room_rules, "room rule(s)"),
            (self.unknown, "rule(s) with a recommendation other than m.ban"),
            (self.unpowered, "rule(s) from senders without the power to send them"),
        )
        return [(n, why) for n, why in reasons if n]


def read_list(room: RoomState) -> ListRules:
    """The rules of a list room that count, and how many were ignored and why."""
    users: list[PolicyRule] = []
    servers: list[PolicyRule] = []
    room_rules = unknown = unpowered = 0
    for rule in room.policy_rules:
        if user_level(room, rule.sender) < room.power_levels.event_level(rule.event_type):
            unpowered += 1
        elif rule.kind is RuleKind.ROOM:
            room_rules += 1
        elif rule.recommendation not in BAN_RECOMMENDATIONS:
            unknown += 1
        elif rule.kind is RuleKind.USER:
            users.append(rule)
        else:
            servers.append(rule)
    return ListRules(room.room_id, tuple(users), tuple(servers), room_rules, unknown, unpowered)


def lists_of(snapshot: Snapshot, space: SpacePolicy) -> tuple[list[ListRules], bool]:
    """The Space's lists that read now, and whether that is all of them. A list that cannot be read says nothing:
    its rules are unknown, not absent (the others still ban, but nothing is lifted, nor its servers dropped)."""
    readable = [read_list(snapshot.rooms[r]) for r in space.policy_lists if snapshot.known(r)]
    return readable, len(readable) == len(space.policy_lists)


def seen_users(
    snapshot: Snapshot, rooms: Iterable[RoomID], among: frozenset[UserID] | None = None
) -> frozenset[UserID]:
    """Users (`among` these, when given) with a membership in any of these rooms: the only ones a glob rule is
    matched against."""
    seen: set[UserID] = set()
    for room_id in rooms:
        room = snapshot.rooms.get(room_id)
        if room is not None:
            seen.update(room.members if among is None else [u for u in among if u in room.members])
    return frozenset(seen)


def banned_users(lists: Iterable[ListRules], seen: frozenset[UserID]) -> dict[UserID, PolicyRule]:
    """Each user a ban rule names (literally, or by a glob among `seen`), with the first rule that does."""
    banned: dict[UserID, PolicyRule] = {}
    for rules in lists:
        for rule in rules.users:
            if is_glob(rule.entity):
                for user in sorted(seen):
                    if matches(rule.entity, user):
                        banned.setdefault(user, rule)
            elif valid_user_id(rule.entity):
                banned.setdefault(UserID(rule.entity), rule)
    return banned


def denied_servers(lists: Iterable[ListRules]) -> list[str]:
    """The server entities of the lists' ban rules, in order, each once."""
    return list(dict.fromkeys(rule.entity for rules in lists for rule in rules.servers))


def with_list_servers(snapshot: Snapshot, spaces: Iterable[SpacePolicy]) -> Snapshot:
    """The snapshot as server ACL mirroring reads it: each Space that mirrors its ACL and follows lists denies
    the lists' servers too (after its own entries). Mirroring then applies its safety rules to them as to any
    entry of the Space: never the bot's server, a creator's, every server, nor an ACL shutting out every member.
    While one of its lists cannot be read, the Space reads as not read either: mirroring changes nothing below it
    (an entry of the unread list would otherwise look dropped)."""
    rooms = dict(snapshot.rooms)
    unreachable = dict(snapshot.unreachable)
    for space in spaces:
        room = rooms.get(space.room_id)
        if room is None or not (space.server_acl and space.policy_lists):
            continue
        lists, complete = lists_of(snapshot, space)
        if not complete:
            unreachable.setdefault(space.room_id, "a policy list it follows cannot be read now")
            continue
        extra = denied_servers(lists)
        if not extra:
            continue
        acl = dict(room.server_acl) if room.server_acl is not None else {"allow": ["*"]}
        own = [d for d in acl.get("deny") or [] if isinstance(d, str)]
        acl["deny"] = own + [d for d in extra if d not in own]
        rooms[space.room_id] = attrs.evolve(room, server_acl=acl)
    return attrs.evolve(snapshot, rooms=rooms, unreachable=unreachable)


def list_findings(snapshot: Snapshot, spaces: Iterable[SpacePolicy]) -> list[Finding]:
    """One finding per list room that holds rules spacesync ignores (room rules, other recommendations, rules
    from senders without the power to send them)."""
    findings: list[Finding] = []
    for list_id in dict.fromkeys(list_id for space in spaces for list_id in space.policy_lists):
        if not snapshot.known(list_id):
            continue
        rules = read_list(snapshot.rooms[list_id])
        parts = [f"{n} {why}" for n, why in rules.ignored()]
        if parts:
            findings.append(
                Finding(list_id, FindingCode.POLICY_RULES_IGNORED.value, "policy list: ignored " + ", ".join(parts))
            )
    return findings


@attrs.frozen
class ListBans:
    """What a Space's lists ban now: each user with the first rule that does, and whether every list was read
    (only then may a ban they placed be lifted)."""

    banned: Mapping[UserID, PolicyRule]
    complete: bool


def policy_bans(
    snapshot: Snapshot,
    spaces: Iterable[SpacePolicy],
    rooms_of: Mapping[RoomID, Iterable[RoomID]],
    among: frozenset[UserID] | None = None,
) -> dict[RoomID, ListBans]:
    """Per Space that follows lists: the users its readable lists ban there. `rooms_of` gives the rooms whose
    members a glob is matched against; `among`, when given, the only users globs are matched against (an
    incremental plan: a literal rule still names its user)."""
    out: dict[RoomID, ListBans] = {}
    for space in spaces:
        if space.policy_lists:
            lists, complete = lists_of(snapshot, space)
            seen = seen_users(snapshot, rooms_of.get(space.room_id, ()), among)
            out[space.room_id] = ListBans(banned_users(lists, seen), complete)
    return out
