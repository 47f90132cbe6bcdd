"""Lockdown from the admin room: every managed room of a Space to invite (or knock) during a raid, and back."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import attrs

from ..core.entitlement import user_level
from ..core.lockdown import lock_content, narrows
from ..core.versions import features
from ..model import Action, ActionKind, Cause, Lockdown, RoomID, Snapshot
from .format import Reply, code, compose, esc, held_reply, line, listing, plural
from .registry import CommandError, Context, UsageError, command, expect
from .world import label, resolve, view

if TYPE_CHECKING:
    from .services import Services as App

FAMILY = "moderation"


async def _space(app: App, args: list[str], snapshot: Snapshot, roots: list[RoomID]) -> RoomID:
    """The Space named, or the only managed one; CommandError when none or several could be meant."""
    if args:
        space = await resolve(app, args[0])
        room = snapshot.rooms.get(space)
        if space not in roots and not (room is not None and room.is_space and space in snapshot.rooms):
            raise CommandError(f"{args[0]} is not a managed Space or a Space below one (see '!spacesync spaces list')")
        return space
    if len(roots) == 1:
        return roots[0]
    if not roots:
        raise CommandError("No Space is managed yet: add one with '!spacesync spaces add <space>'")
    names = ", ".join(label(app, r, snapshot)[0] for r in roots)
    raise CommandError(f"Several Spaces are managed ({names}): name the one to act on")


@command(
    "lockdown",
    usage="lockdown [space] [--knock]",
    family=FAMILY,
    summary="switch every managed room of a Space to invite-only (or knock) during a raid",
    help="Switches the join rule of every managed room below the Space (not the Space itself) to invite, or to "
    "knock with --knock, and remembers each room's join rules from before. '!spacesync unlock' restores exactly "
    "them. A lockdown only ever narrows: rooms already invite-only are left as they are (also under --knock), and "
    "so are knock rooms under --knock. While a room is locked down, spacesync "
    "leaves its join rules alone (join_rules: enforce does not undo the lockdown) and keeps treating it as "
    "part of its Space. A lockdown of more rooms than the Space's max_evictions_without_confirmation is held: "
    "review it with 'batch', run it with 'confirm'. One notice reports the result; 'undo' of the batch "
    "unlocks it too. Without a Space, the only managed Space.",
)
async def lockdown(ctx: Context, args: list[str]) -> Reply:
    knock = "--knock" in [a.lower() for a in args]
    rest = [a for a in args if a.lower() != "--knock"]
    if any(a.startswith("--") for a in rest):
        raise UsageError(f"Unknown option '{next(a for a in rest if a.startswith('--'))[:40]}'.")
    expect(rest, 0, 1)
    app = ctx.app
    v = await view(app)
    roots = [s.room_id for s in v.policy.spaces if s.room_id in v.graph.managed or s.room_id in v.snapshot.rooms]
    space = await _space(app, rest, v.snapshot, roots)
    rule = "knock" if knock else "invite"
    space_t, space_h = label(app, space, v.snapshot)
    space_name = (v.snapshot.rooms[space].name if space in v.snapshot.rooms else None) or space_t
    actions: list[Action] = []
    skipped: list[str] = []
    for room_id in sorted(v.graph.governed_by(space) - {space}):
        room = v.snapshot.rooms.get(room_id)
        room_t = label(app, room_id, v.snapshot)[0]
        if room is None or not v.snapshot.known(room_id):
            skipped.append(f"{room_t}: cannot be read now")
            continue
        if room.tombstone:
            continue
        lock = v.snapshot.lockdowns.get(room_id)
        locked = lock is not None and room.join_rule == lock.written
        if not narrows(room.join_rule, rule):  # knock never opens an invite-only room
            skipped.append(f"{room_t}: already {room.join_rule}" + (" (locked down)" if locked else ""))
            continue
        feats = features(room.room_version)
        if rule == "knock" and (feats is None or not feats.knock):
            skipped.append(f"{room_t}: room version {room.room_version} has no knock")
            continue
        needed = room.power_levels.event_level("m.room.join_rules")
        if user_level(room, v.policy.bot) < needed:
            skipped.append(f"{room_t}: the bot lacks the power to change join rules (needs {needed})")
            continue
        # A room still as an earlier lockdown left it keeps that one's "before"; any other is recorded afresh (a
        # rule changed by hand since is what unlock must restore).
        previous = dict(lock.previous) if lock is not None and locked else dict(room.join_rules_content)
        content = lock_content(room, rule)
        actions.append(
            Action(
                ActionKind.SET_JOIN_RULES,
                room_id,
                reason=f"lockdown of {space_name} by {ctx.sender}: {room.join_rule} -> {rule}",
                space_id=space,
                cause=Cause.LOCKDOWN.value,
                content=content,
                changes={"join_rules": (previous, content)},
            )
        )
    not_done = listing("Left as they are:", [line(s) for s in skipped]) if skipped else None
    if not actions:
        parts: list[Reply | str] = [Reply(f"Nothing to lock down in {space_t}.", f"Nothing to lock down in {space_h}.")]
        return compose(parts + ([not_done] if not_done else []))
    space_policy = v.policy.space(space)
    limit = (
        space_policy.max_evictions_without_confirmation
        if space_policy is not None
        else app.config.max_evictions_without_confirmation
    )
    held = len(actions) > limit
    batch = await app.reconciler.enqueue(actions, trigger=f"lockdown {space}", held=held)
    rooms = plural(len(actions), "room")
    if held:
        head = held_reply(
            batch,
            f"lockdown of {rooms} of {space_t} to {rule}",
            f"lockdown of {rooms} of {space_h} to {esc(rule)}",
            limit,
        )
    else:
        head = Reply(
            f"Lockdown of {space_t}: {rooms} switching to {rule} as batch {batch}. "
            f"Restore them with !spacesync unlock {space}.",
            f"<p>Lockdown of {space_h}: {rooms} switching to {esc(rule)} as batch {code(str(batch))}. "
            f"Restore them with {code(f'!spacesync unlock {space}')}.</p>",
        )
    return compose([head] + ([not_done] if not_done else []))


@attrs.frozen
class Unlocks:
    """What an unlock does: the restores to send, the rooms changed by hand since (their rule now), and the rooms
    that cannot be read now (their records kept: unknown is not a change by hand)."""

    actions: list[Action]
    changed: list[tuple[Lockdown, str]]
    unknown: list[Lockdown]


def unlock_actions(app: App, locks: list[Lockdown], reason: str) -> Unlocks:
    """Restores of the join rules of rooms still as the lockdown left them, the rooms changed since, and those
    the bot cannot see now."""
    out = Unlocks([], [], [])
    for lock in locks:
        room = app.cache.get(lock.room_id)
        if room is None:
            out.unknown.append(lock)
            continue
        if room.join_rule != lock.written:
            out.changed.append((lock, room.join_rule or "no join rule"))
            continue
        out.actions.append(
            Action(
                ActionKind.SET_JOIN_RULES,
                lock.room_id,
                reason=f"{reason}: {lock.written} -> {lock.previous.get('join_rule')}",
                space_id=lock.space_id,
                cause=Cause.UNLOCK.value,
                content=dict(lock.previous),
                changes={"join_rules": ({"join_rule": lock.written}, dict(lock.previous))},
            )
        )
    return out


FIRST_READ_WAIT_S = 60.0
"""How long an unlock or undo right after a start waits for the first full read of the rooms."""


async def after_first_read(app: App, locks: list[Lockdown]) -> str | None:
    """Waits for the first full read when a locked room is not in the state cache yet (right after a start).
    A line for the reply when it waited (or could not), None when nothing had to wait."""
    if app.executor.ready.is_set() or all(app.cache.get(lock.room_id) is not None for lock in locks):
        return None
    started = time.monotonic()
    try:
        await asyncio.wait_for(app.executor.ready.wait(), FIRST_READ_WAIT_S)
    except TimeoutError:
        return (
            f"The rooms have not been read since the start ({FIRST_READ_WAIT_S:.0f} s waited): nothing was changed "
            "and every lockdown record is kept. Try again once the first full read is done (!spacesync status)."
        )
    return f"Waited {time.monotonic() - started:.0f} s for the first full read of the rooms since the start."


def unknown_lines(app: App, unknown: list[Lockdown]) -> list[str]:
    return [
        f"{label(app, lock.room_id)[0]}: cannot be read now; its lockdown record is kept, unlock it again later"
        for lock in unknown
    ]


@command(
    "unlock",
    usage="unlock [space]",
    family=FAMILY,
    summary="restore the join rules a lockdown replaced",
    help="Restores, in every room the lockdown of the Space switched, exactly the join rules it had before. A "
    "room whose join rule was changed by hand since is left alone and reported. Right after a start it first "
    "waits for the rooms to be read; a room that cannot be read keeps its lockdown record. Without a Space, every "
    "locked-down room.",
)
async def unlock(ctx: Context, args: list[str]) -> Reply:
    expect(args, 0, 1)
    app = ctx.app
    locks = sorted((await app.store.lockdowns()).values(), key=lambda lock: lock.room_id)
    space: RoomID | None = None
    if args:
        space = await resolve(app, args[0])
        locks = [lock for lock in locks if lock.space_id == space]
    where_t, where_h = label(app, space) if space else ("any Space", "any Space")
    if not locks:
        return Reply(f"Nothing is locked down in {where_t}.", f"Nothing is locked down in {where_h}.")
    waited = await after_first_read(app, locks)
    if waited is not None and not app.executor.ready.is_set():
        return Reply.plain(waited)
    todo = unlock_actions(app, locks, f"unlock by {ctx.sender}")
    for lock, _ in todo.changed:
        await app.store.set_lockdown(lock.room_id, None)
    parts: list[Reply | str] = [Reply.plain(waited)] if waited else []
    if todo.actions:
        batch = await app.reconciler.enqueue(todo.actions, trigger=f"unlock {space or ''}".strip())
        rooms = plural(len(todo.actions), "room")
        parts.append(
            Reply(
                f"Unlock of {where_t}: restoring the join rules of {rooms} as batch {batch}.",
                f"Unlock of {where_h}: restoring the join rules of {rooms} as batch {code(str(batch))}.",
            )
        )
    else:
        parts.append(Reply.plain(f"Unlock of {where_t}: no room is still as the lockdown left it."))
    if todo.changed:
        lines = [
            line(f"{label(app, lock.room_id)[0]}: join rule changed by hand since (now {now}), left alone")
            for lock, now in todo.changed
        ]
        parts.append(listing("Left alone:", lines))
    if todo.unknown:
        parts.append(listing("Not read:", [line(t) for t in unknown_lines(app, todo.unknown)]))
    return compose(parts)
