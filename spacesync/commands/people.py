"""Acting on one person across a whole Space from the admin room: ban (also pre-emptively), unban, kick, redact.

Each command builds one `Action` per room, refuses people the bot must never act on (with the reason), names the
rooms it leaves alone, and journals the rest as one batch through the reconciler (held for `confirm` when it
touches more rooms than the Space's max_evictions_without_confirmation). `undo` reverts ban, unban and kick
batches (`commands/batches.py`); redactions are final.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ..core.entitlement import protection, user_level
from ..model import Action, ActionKind, Cause, Membership, RoomID, RoomState, UserID, parse_level
from ..refs import RefError, room_label
from ..store import Status
from .format import Line, Reply, code, compose, esc, held_reply, line, listing, plural
from .parser import count_arg, duration_arg, user_arg
from .registry import CommandError, Context, UsageError, command
from .world import View, bans_above, label, resolve, view

if TYPE_CHECKING:
    from .services import Services as App

FAMILY = "moderation"
REDACT_DEFAULT = 100
"""Messages `redact` removes per room when neither a count nor --since is given."""
REDACT_MAX = 1000
"""At most this many messages per room, whatever was asked (`--since` included)."""
REDACTION_LEVEL_DEFAULT = 50


@attrs.frozen
class Request:
    """A parsed people command: whom, where (None: every managed Space), why, and for redact how much."""

    user: UserID
    space: RoomID | None
    reason: str
    last: int | None = None
    since_ms: int | None = None


async def _parse(ctx: Context, args: list[str], *, counted: bool = False) -> Request:
    """`@user [--space <space>] [N | --since <duration>] [reason…]`: options anywhere after the user."""
    if not args:
        raise UsageError("Missing the user.")
    try:
        user = user_arg(args[0])
    except RefError as e:
        raise CommandError(str(e)) from None
    rest = list(args[1:])
    space: RoomID | None = None
    last: int | None = None
    since_ms: int | None = None
    words: list[str] = []
    while rest:
        word = rest.pop(0)
        option = word.lower()
        if option in ("--space", "--since"):
            if not rest:
                raise UsageError(f"{word} needs a value.")
            value = rest.pop(0)
            if option == "--space":
                space = await resolve(ctx.app, value)
            elif not counted:
                raise UsageError("--since is for redact only.")
            else:
                try:
                    since_ms = int(time.time() * 1000) - int(duration_arg(value) * 1000)
                except ValueError as e:
                    raise CommandError(str(e)) from None
        elif option.startswith("--"):
            raise UsageError(f"Unknown option '{word[:40]}'.")
        elif counted and not words and last is None and word.isdigit():
            try:
                last = count_arg(word, high=REDACT_MAX)
            except ValueError as e:
                raise CommandError(str(e)) from None
        else:
            words.append(word)
    if counted and last is not None and since_ms is not None:
        raise UsageError("Give either a count or --since, not both.")
    return Request(user, space, " ".join(words).strip()[:300], last, since_ms)


def _rooms(v: View, space: RoomID | None, arg: str) -> list[RoomID]:
    """The managed rooms acted in: the Space named and every managed room below it, or every managed room."""
    if space is None:
        return sorted(v.graph.managed, key=lambda r: (v.graph.depth.get(r, 0), r))
    room = v.snapshot.rooms.get(space)
    if space not in v.graph.managed or not (space in v.graph.roots or (room is not None and room.is_space)):
        raise CommandError(f"{arg} is not a managed Space (see '!spacesync spaces list')")
    below = v.graph.descendants(space) & v.graph.managed
    return [space] + sorted(below, key=lambda r: (v.graph.depth.get(r, 0), r))


def _refuse(v: View, user: UserID, rooms: list[RoomID]) -> None:
    """CommandError naming why the bot must leave this person alone: the bot, an admin, exempt, or protected in
    a Space acted in (a creator, at or above the bot's level)."""
    policy = v.policy
    if user == policy.bot:
        raise CommandError(f"Refused: {user} is the bot itself.")
    if user in policy.admins:
        raise CommandError(f"Refused: {user} is a spacesync admin.")
    if user in policy.exempt:
        raise CommandError(f"Refused: {user} is exempt (remove with '!spacesync exempt remove {user}' first).")
    for room_id in rooms:
        room = v.snapshot.rooms.get(room_id)
        if room is not None and (room.is_space or room_id in v.graph.roots):
            why = protection(room, user, policy, v.graph)
            if why:
                raise CommandError(f"Refused: {user} is {why} in the Space {room_label(room_id, room.name)}.")


def _needed(room: RoomState, kind: ActionKind) -> int:
    pl = room.power_levels
    if kind is ActionKind.KICK:
        return pl.kick
    if kind is ActionKind.UNBAN:
        return max(pl.ban, pl.kick)
    if kind is ActionKind.REDACT:
        value = parse_level(pl.raw.get("redact", REDACTION_LEVEL_DEFAULT))
        return REDACTION_LEVEL_DEFAULT if value is None else value
    return pl.ban


Select = Callable[[RoomState], bool | str]
"""Per room: True to act, False to pass over silently, or a note why the room is left alone."""


def _actions(
    app: App,
    v: View,
    req: Request,
    rooms: list[RoomID],
    kind: ActionKind,
    cause: Cause,
    select: Select,
    content: Mapping[str, Any] | None = None,
) -> tuple[list[Action], list[str]]:
    """One action per room the bot can act in; the rooms left alone, each with why."""
    actions: list[Action] = []
    skipped: list[str] = []
    for room_id in rooms:
        room = v.snapshot.rooms.get(room_id)
        room_t = label(app, room_id, v.snapshot)[0]
        if room is None or not v.snapshot.known(room_id):
            skipped.append(f"{room_t}: cannot be read now")
            continue
        if room.tombstone:
            continue
        chosen = select(room)
        if chosen is False:
            continue
        if isinstance(chosen, str):
            skipped.append(f"{room_t}: {chosen}")
            continue
        why = protection(room, req.user, v.policy, v.graph)
        if why:
            skipped.append(f"{room_t}: {req.user} is {why} here")
            continue
        needed = _needed(room, kind)
        if user_level(room, v.policy.bot) < needed:
            skipped.append(f"{room_t}: the bot lacks the power to {kind.value} (needs {needed})")
            continue
        actions.append(
            Action(
                kind,
                room_id,
                req.user,
                reason=req.reason,
                space_id=_root(v, room_id),
                cause=cause.value,
                content=content,
            )
        )
    return actions, skipped


def _root(v: View, room_id: RoomID) -> RoomID | None:
    roots = sorted(r for r in v.graph.roots if r == room_id or room_id in v.graph.descendants(r))
    return roots[0] if roots else None


def _limit(app: App, v: View, space: RoomID | None) -> int:
    """The Space's max_evictions_without_confirmation (its root's, for a sub-Space); the lowest of all without."""
    root = _root(v, space) if space is not None else None
    limits = [s.max_evictions_without_confirmation for s in v.policy.spaces if root is None or s.room_id == root]
    return min(limits, default=app.config.max_evictions_without_confirmation)


async def _queue(
    ctx: Context, v: View, req: Request, what: str, actions: list[Action], skipped: list[str], undo: bool = True
) -> Reply:
    """Journal the actions as one batch (held over the limit) and answer with it and the rooms left alone."""
    app = ctx.app
    not_done = listing("Left alone:", [line(s) for s in skipped]) if skipped else None
    user_t, user_h = str(req.user), code(req.user)
    if not actions:
        head = Reply(f"Nothing to {what} for {user_t}.", f"Nothing to {esc(what)} for {user_h}.")
        return compose([head, not_done])
    limit = _limit(app, v, req.space)
    held = len(actions) > limit
    batch = await app.reconciler.enqueue(actions, trigger=f"{what} {req.user}", held=held)
    rooms = plural(len(actions), "room")
    if held:
        head = held_reply(batch, f"{what} {user_t} in {rooms}", f"{esc(what)} {user_h} in {rooms}", limit)
    else:
        after_t = f" Undo with !spacesync undo {batch}." if undo else " Redactions cannot be undone."
        after_h = f" Undo with {code(f'!spacesync undo {batch}')}." if undo else " Redactions cannot be undone."
        head = Reply(
            f"{what.capitalize()} {user_t} in {rooms} as batch {batch}.{after_t}",
            f"{esc(what.capitalize())} {user_h} in {rooms} as batch {code(str(batch))}.{after_h}",
        )
    return compose([head, not_done])


def _usage_help(extra: str) -> str:
    return (
        "The user may be an id, a matrix.to link or a pill. Without --space, every managed Space and room; "
        "with it, that Space and the managed rooms below it. Refused for the bot, spacesync admins, exempt users, "
        "and anyone who is a creator of a Space acted in or at or above the bot's level there; a room where that "
        "holds, or where the bot lacks the power, is left alone and named. More rooms than the Space's "
        "max_evictions_without_confirmation are held: review with 'batch', run with 'confirm'. " + extra
    )


@command(
    "ban",
    usage="ban <@user> [--space <space>] [reason]",
    family=FAMILY,
    summary="ban someone in the Space and every managed room below it, member or not",
    help=_usage_help(
        "The ban is placed in the Space and in each managed room directly, so it works whatever propagate_bans "
        "says and before the person ever joins (pre-emptive). Rooms where they are already banned are left as "
        "they are. spacesync keeps these bans until '!spacesync unban' or 'undo' lifts them."
    ),
)
async def ban(ctx: Context, args: list[str]) -> Reply:
    req = await _parse(ctx, args)
    v = await view(ctx.app)
    rooms = _rooms(v, req.space, args[0])
    _refuse(v, req.user, rooms)
    req = attrs.evolve(req, reason=req.reason or f"banned by {ctx.sender}")

    def select(room: RoomState) -> bool | str:
        state = room.members.get(req.user)
        if state is None or state.membership is not Membership.BAN:
            return True
        return "already banned" + ("" if state.sender == v.policy.bot else f" by {state.sender or 'someone'}")

    actions, skipped = _actions(ctx.app, v, req, rooms, ActionKind.BAN, Cause.COMMAND_BAN, select)
    return await _queue(ctx, v, req, "ban", actions, skipped)


@command(
    "unban",
    usage="unban <@user> [--space <space>] [reason]",
    family=FAMILY,
    summary="lift the bans spacesync placed on someone",
    help=_usage_help(
        "Lifts only bans spacesync placed itself (its records, and the room's ban event still being the bot's): "
        "a ban a moderator placed by hand is never lifted, nor one a policy list asks for (remove the rule "
        "from the list instead)."
    ),
)
async def unban(ctx: Context, args: list[str]) -> Reply:
    req = await _parse(ctx, args)
    v = await view(ctx.app)
    rooms = _rooms(v, req.space, args[0])
    _refuse(v, req.user, rooms)
    req = attrs.evolve(req, reason=req.reason or f"unbanned by {ctx.sender}")
    placed = {b.room_id: b.cause for b in v.snapshot.placed_bans if b.user_id == req.user}

    def own(room: RoomState) -> bool | str:
        state = room.members.get(req.user)
        if state is None or state.membership is not Membership.BAN:
            return False
        if state.sender != v.policy.bot or room.room_id not in placed:
            return f"banned by {state.sender or 'someone'}, not by spacesync: lift it by hand"
        if placed[room.room_id] == Cause.POLICY_LIST:
            return "banned by a policy list rule: remove the rule from the list ('!spacesync lists')"
        return True

    lifted = {r for r in rooms if (room := v.snapshot.rooms.get(r)) is not None and own(room) is True}

    def select(room: RoomState) -> bool | str:
        # A ban carried down from a Space that keeps its own ban would only be placed again.
        kept = bans_above(v, room.room_id, req.user, lifted)
        if kept and placed.get(room.room_id) == Cause.SPACE_BAN:
            return f"carried down from the ban in {label(ctx.app, kept[0], v.snapshot)[0]}, which stays"
        return own(room)

    actions, skipped = _actions(ctx.app, v, req, rooms, ActionKind.UNBAN, Cause.COMMAND_UNBAN, select)
    return await _queue(ctx, v, req, "unban", actions, skipped)


@command(
    "kick",
    usage="kick <@user> [--space <space>] [reason]",
    family=FAMILY,
    summary="remove someone from the Space and every managed room where they are",
    help=_usage_help(
        "Kicks from each room where the person is joined, and withdraws an invite or a knock. A kick is no ban: "
        "they may join again where the join rules let them ('ban' keeps them out)."
    ),
)
async def kick(ctx: Context, args: list[str]) -> Reply:
    req = await _parse(ctx, args)
    v = await view(ctx.app)
    rooms = _rooms(v, req.space, args[0])
    _refuse(v, req.user, rooms)
    req = attrs.evolve(req, reason=req.reason or f"kicked by {ctx.sender}")
    present = (Membership.JOIN, Membership.INVITE, Membership.KNOCK)
    actions, skipped = _actions(
        ctx.app, v, req, rooms, ActionKind.KICK, Cause.COMMAND_KICK, lambda room: room.membership(req.user) in present
    )
    return await _queue(ctx, v, req, "kick", actions, skipped)


@command(
    "redact",
    usage="redact <@user> [N | --since <duration>] [--space <space>] [reason]",
    family=FAMILY,
    summary="remove someone's recent messages in every managed room",
    help=_usage_help(
        f"Redacts the person's messages in each room where they have a membership, newest first: the last N "
        f"(default {REDACT_DEFAULT}, at most {REDACT_MAX}), or those of the last duration (--since 2h; s, m, h, "
        "d). One request at a time per room, paced by the homeserver's rate limits; 'status' shows the rooms "
        "still open, and one notice counts the messages removed. Redactions cannot be undone."
    ),
)
async def redact(ctx: Context, args: list[str]) -> Reply:
    req = await _parse(ctx, args, counted=True)
    v = await view(ctx.app)
    rooms = _rooms(v, req.space, args[0])
    _refuse(v, req.user, rooms)
    req = attrs.evolve(req, reason=req.reason or f"redacted by {ctx.sender}")
    content: dict[str, Any] = {
        "last": req.last or (REDACT_MAX if req.since_ms is not None else REDACT_DEFAULT),
        "run": secrets.token_hex(8),
    }
    if req.since_ms is not None:
        content["since_ms"] = req.since_ms
    actions, skipped = _actions(
        ctx.app,
        v,
        req,
        rooms,
        ActionKind.REDACT,
        Cause.COMMAND_REDACT,
        lambda room: req.user in room.members,
        content=content,
    )
    return await _queue(ctx, v, req, "redact", actions, skipped, undo=False)


async def redactions_open(app: App) -> Line | None:
    """'Redacting: @spam in 3 rooms (batch 1a2b3c4d)': the redact runs still going, for `status`."""
    entries = await app.store.journal.by_status(Status.PENDING, Status.RUNNING)
    open_runs: dict[tuple[str, str], int] = {}
    for entry in entries:
        if entry.action.kind is ActionKind.REDACT:
            key = (str(entry.action.user_id), entry.batch)
            open_runs[key] = open_runs.get(key, 0) + 1
    if not open_runs:
        return None
    shown = [f"{user} in {plural(n, 'room')} (batch {batch})" for (user, batch), n in sorted(open_runs.items())]
    return line("Redacting: " + "; ".join(shown[:5]) + (" …" if len(shown) > 5 else ""))
