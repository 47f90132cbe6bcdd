"""Builders for snapshots and policies, and `apply_plan`: a pure model of what executing a plan does."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from spacesync.model import (
    Action,
    ActionKind,
    Membership,
    MemberState,
    OwnedLevel,
    PlacedBan,
    Plan,
    PowerLevels,
    RoomID,
    RoomState,
    Snapshot,
    UserID,
)

HS = "hs.test"
BOT = UserID(f"@bot:{HS}")


def rid(name: str) -> RoomID:
    return RoomID(name if name.startswith("!") else f"!{name}:{HS}")


def uid(name: str) -> UserID:
    return UserID(name if name.startswith("@") else f"@{name}:{HS}")


def member(
    membership: Membership | str, *, sender: str | None = None, ts: int = 0, was_joined: bool | None = True
) -> MemberState:
    """A membership reached at `ts` (also when spacesync first saw it). A leave is a real departure
    (it replaced a join) unless `was_joined` says otherwise (False: a declined invite; None: unknown)."""
    membership = Membership(membership)
    return MemberState(
        membership,
        sender=uid(sender) if sender else None,
        ts=ts,
        seen_ms=ts,
        was_joined=was_joined if membership is Membership.LEAVE else None,
    )


JOIN = Membership.JOIN
LEAVE = Membership.LEAVE
BAN = Membership.BAN
INVITE = Membership.INVITE
KNOCK = Membership.KNOCK


def pl_content(
    users: Mapping[str, Any] | None = None,
    *,
    bot_level: Any = 100,
    **top: Any,
) -> dict[str, Any]:
    """A power-levels content; the bot is in `users` at `bot_level` unless bot_level is None."""
    content: dict[str, Any] = {
        "users_default": 0,
        "events_default": 0,
        "state_default": 50,
        "kick": 50,
        "ban": 50,
        "invite": 0,
        "redact": 50,
        "events": {"m.room.power_levels": 100, "m.room.name": 50},
    }
    content.update(top)
    u: dict[str, Any] = {}
    if bot_level is not None:
        u[BOT] = bot_level
    for k, v in (users or {}).items():
        u[uid(k)] = v
    content["users"] = u
    return content


def room(
    name: str,
    *,
    space: bool = False,
    version: str | None = "10",
    join_rule: str | None = "invite",
    allow: Iterable[str] = (),
    children: Iterable[str] = (),
    parents: Iterable[str] = (),
    members: Mapping[str, MemberState | Membership | str] | None = None,
    levels: Mapping[str, Any] | None = None,
    bot_level: Any = 100,
    pl: Mapping[str, Any] | None = None,
    creator: str | None = None,
    additional_creators: Iterable[str] = (),
    tombstone: str | None = None,
    predecessor: str | None = None,
    bot_joined: bool = True,
) -> RoomState:
    """A room the bot can read. `levels` are users entries besides the bot's; `pl` overrides the whole content."""
    mem: dict[UserID, MemberState] = {}
    if bot_joined:
        mem[BOT] = MemberState(Membership.JOIN, sender=BOT)
    for user, state in (members or {}).items():
        if not isinstance(state, MemberState):
            state = member(state, sender=user)
        mem[uid(user)] = state
    content = dict(pl) if pl is not None else pl_content(levels, bot_level=bot_level)
    allow_ids = tuple(rid(a) for a in allow)
    jr_content: dict[str, Any] = {"join_rule": join_rule} if join_rule else {}
    if allow_ids:
        jr_content["allow"] = [{"type": "m.room_membership", "room_id": a} for a in allow_ids]
    return RoomState(
        room_id=rid(name),
        room_version=version,
        create_sender=uid(creator) if creator else None,
        additional_creators=frozenset(uid(c) for c in additional_creators),
        is_space=space,
        join_rule=join_rule,
        allow=allow_ids,
        join_rules_content=jr_content,
        children={rid(c): (HS,) for c in children},
        parents={rid(p): BOT for p in parents},
        members=mem,
        power_levels=PowerLevels.from_content(content),
        tombstone=rid(tombstone) if tombstone else None,
        predecessor=rid(predecessor) if predecessor else None,
    )


def space(name: str, **kw: Any) -> RoomState:
    kw.setdefault("join_rule", "invite")
    return room(name, space=True, **kw)


def snapshot(
    *rooms: RoomState,
    unreachable: Mapping[str, str] | None = None,
    placed_bans: Iterable[PlacedBan] = (),
    owned: Iterable[OwnedLevel] = (),
    now_ms: int = 0,
) -> Snapshot:
    placed_bans = frozenset(placed_bans)
    by_room: dict[RoomID, RoomState] = {r.room_id: r for r in rooms}
    for ban in placed_bans:  # a ban spacesync placed is the bot's own membership event
        room_state = by_room.get(ban.room_id)
        state = room_state.members.get(ban.user_id) if room_state else None
        if room_state is not None and state is not None and state.membership is Membership.BAN:
            members = {**room_state.members, ban.user_id: attrs.evolve(state, sender=BOT)}
            by_room[ban.room_id] = attrs.evolve(room_state, members=members)
    return Snapshot(
        rooms=by_room,
        unreachable={rid(k): v for k, v in (unreachable or {}).items()},
        placed_bans=placed_bans,
        owned_levels={(o.room_id, o.user_id): o for o in owned},
        now_ms=now_ms,
    )


def kinds(plan: Plan) -> list[tuple[str, str, str | None]]:
    """(kind, room, user) of every action, for compact assertions."""
    return [(a.kind.value, a.room_id, a.user_id) for a in plan.actions]


def actions_of(plan: Plan, kind: ActionKind) -> list[Action]:
    return [a for a in plan.actions if a.kind is kind]


def codes(plan_or_findings: Any) -> set[tuple[str, str]]:
    findings = getattr(plan_or_findings, "findings", plan_or_findings)
    return {(f.room_id, f.code) for f in findings}


_MEMBERSHIP_AFTER = {
    ActionKind.KICK: Membership.LEAVE,
    ActionKind.BAN: Membership.BAN,
    ActionKind.UNBAN: Membership.LEAVE,
    ActionKind.INVITE: Membership.INVITE,
}


def apply_plan(snapshot: Snapshot, plan: Plan, *, bot: UserID = BOT, now_ms: int | None = None) -> Snapshot:
    """The snapshot as it would read after every action of `plan` succeeded, and the engine stored its records.

    Kicks/unbans leave, bans ban, invites invite (sent by the bot); power-level and join-rule
    content replaces the old; m.space.child content with `via` adds a child, empty content removes it.
    Placed bans and owned levels are recorded or forgotten as the engine would.
    """
    now = snapshot.now_ms if now_ms is None else now_ms
    rooms = dict(snapshot.rooms)
    placed = set(snapshot.placed_bans) - set(plan.stale_bans)
    stale_levels = set(plan.stale_levels)
    owned = {k: v for k, v in snapshot.owned_levels.items() if k not in stale_levels}
    owned.update({(r.room_id, r.user_id): r for r in plan.released_levels})
    for action in plan.actions:
        current = rooms[action.room_id]
        if action.kind in _MEMBERSHIP_AFTER:
            assert action.user_id is not None
            members = dict(current.members)
            after = _MEMBERSHIP_AFTER[action.kind]
            members[action.user_id] = MemberState(
                after,
                sender=bot,
                ts=now,
                seen_ms=now,
                # A kick removes a joined user (a departure); an unban only lifts a ban (none).
                was_joined=(action.kind is ActionKind.KICK) if after is Membership.LEAVE else None,
            )
            rooms[action.room_id] = attrs.evolve(current, members=members)
            if action.kind in (ActionKind.BAN, ActionKind.UNBAN, ActionKind.KICK):
                placed = {b for b in placed if (b.room_id, b.user_id) != (action.room_id, action.user_id)}
            if action.kind is ActionKind.BAN:
                placed.add(PlacedBan(action.room_id, action.user_id, action.cause))
        elif action.kind is ActionKind.SET_POWER_LEVELS:
            assert action.content is not None
            rooms[action.room_id] = attrs.evolve(current, power_levels=PowerLevels.from_content(action.content))
            for user_id, record in action.ownership.items():
                if record is None:
                    owned.pop((action.room_id, user_id), None)
                else:
                    owned[(action.room_id, user_id)] = record
        elif action.kind is ActionKind.SET_JOIN_RULES:
            assert action.content is not None
            content = dict(action.content)
            allow = tuple(
                RoomID(e["room_id"])
                for e in content.get("allow") or ()
                if isinstance(e, dict) and e.get("type") == "m.room_membership"
            )
            rooms[action.room_id] = attrs.evolve(
                current, join_rule=content.get("join_rule"), allow=allow, join_rules_content=content
            )
        elif action.kind is ActionKind.SET_SPACE_CHILD:
            assert action.state_key is not None
            children = dict(current.children)
            child_senders = dict(current.child_senders)
            via = (action.content or {}).get("via")
            if via:
                children[RoomID(action.state_key)] = tuple(via)
                child_senders[RoomID(action.state_key)] = bot
            else:
                children.pop(RoomID(action.state_key), None)
                child_senders.pop(RoomID(action.state_key), None)
            rooms[action.room_id] = attrs.evolve(current, children=children, child_senders=child_senders)
        else:  # pragma: no cover - a new action kind needs a model here
            raise AssertionError(f"apply_plan does not model {action.kind}")
    return attrs.evolve(snapshot, rooms=rooms, placed_bans=frozenset(placed), owned_levels=owned)
