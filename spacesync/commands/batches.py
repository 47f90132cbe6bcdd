"""Batches from the admin room: confirm or cancel a held mass eviction, undo a finished batch."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from ..core.powerlevels import record_before
from ..model import Action, ActionKind, Cause, Membership, RoomID, RoomState, UserID
from ..store import Status
from ..store.journal import Batch, BatchStatus
from .format import Reply, code, compose, esc, line, listing, plural
from .lockdown import after_first_read, unknown_lines, unlock_actions
from .parser import batch_arg
from .registry import CommandError, Context, command, expect
from .world import bans_above, label, level, room_state, show_level, view

if TYPE_CHECKING:
    from .services import Services as App

FAMILY = "batches"


async def _batch_id(app: App, text: str) -> str:
    """The batch a moderator named: its full id, or a unique prefix of at least MIN_BATCH_PREFIX characters."""
    try:
        typed = batch_arg(text)
    except ValueError as e:
        raise CommandError(str(e)) from None
    found = await app.store.journal.batch_ids_like(typed)
    if len(found) > 1:
        more = "…" if len(found) >= 6 else ""
        raise CommandError(
            f"'{typed}' is the start of several batches ({', '.join(found[:5])}{more}): type more of the id"
        )
    return found[0] if found else typed


async def _held_ids(app: App) -> list[str]:
    return [b.id for b in await app.store.journal.batches(status=BatchStatus.HELD, limit=20) if b.counts.get("held")]


async def _known_batch(app: App, batch: str) -> Batch:
    info = await app.store.journal.batch(batch)
    if info is None:
        held = await _held_ids(app)
        hint = f" Held batches: {', '.join(held)}." if held else " No batch is held."
        raise CommandError(f"Unknown batch '{batch}'.{hint}")
    return info


async def _held_batch(app: App, batch: str, verb: str) -> Batch:
    info = await _known_batch(app, batch)
    if info.status != BatchStatus.HELD or not info.counts.get("held"):
        raise CommandError(f"Batch {batch} is not held (it is {info.status}): nothing to {verb}")
    return info


@command(
    "batch",
    usage="batch <batch>",
    family=FAMILY,
    summary="what one batch holds or did",
    help="Shows a batch: why it was made, its state, and each action with its status (a parked action "
    "with the refusal that parked it) — the way to review a held mass eviction before 'confirm' or "
    "'cancel', a finished batch before 'undo', or parked actions before 'retry'.",
)
async def batch(ctx: Context, args: list[str]) -> Reply:
    expect(args, 1)
    batch_id = await _batch_id(ctx.app, args[0])
    app = ctx.app
    info = await _known_batch(app, batch_id)
    entries = await app.store.journal.batch_entries(batch_id)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(info.counts.items()))
    lines = []
    for entry in entries:
        action = entry.action
        room_t, room_h = label(app, action.room_id)
        target = action.user_id or action.state_key or ""
        error = f" ({entry.error})" if entry.error else ""
        lines.append(
            line(
                f"{action.kind.value} {target} in {room_t}: {entry.status.value}{error} — {action.reason}",
                f"{action.kind.value} {code(target)} in {room_h}: <b>{entry.status.value}</b>"
                f"{esc(error)} — {esc(action.reason)}",
            )
        )
    next_step = {
        BatchStatus.HELD.value: f" Decide with '!spacesync confirm {batch_id}' or '!spacesync cancel {batch_id}'."
    }
    parked = info.counts.get(Status.PARKED.value, 0)
    retry_hint = (
        (
            f" {plural(parked, 'action')} parked after repeated refusals: fix the cause, then "
            f"'!spacesync retry {batch_id}'."
        )
        if parked
        else ""
    )
    title = f"Batch {batch_id} ({info.trigger}, {info.status}): {counts}.{next_step.get(info.status, '')}{retry_hint}"
    return listing(title, lines, hint="!spacesync audit shows the outcomes")


@command(
    "confirm",
    usage="confirm <batch>",
    family=FAMILY,
    summary="run a held mass eviction",
    help="When more users would be evicted from a Space within its guard_window (default 10 minutes) "
    "than its max_evictions_without_confirmation, however they leave, the new evictions are held as "
    "one batch and announced here once. Review them with 'batch', then confirm the batch to run it.",
)
async def confirm(ctx: Context, args: list[str]) -> Reply:
    expect(args, 1)
    batch = await _batch_id(ctx.app, args[0])
    app = ctx.app
    info = await _held_batch(app, batch, "confirm")
    count = await app.reconciler.release(batch)
    space_t, space_h = label(app, RoomID(info.space_id)) if info.space_id else ("", "")
    where_t, where_h = (f" in Space {space_t}", f" in Space {space_h}") if info.space_id else ("", "")
    what = plural(count, "eviction")
    return Reply(
        f"Confirmed batch {batch}: {what}{where_t} running now.",
        f"Confirmed batch {code(batch)}: {what}{where_h} running now.",
    )


@command(
    "cancel",
    usage="cancel <batch>",
    family=FAMILY,
    summary="drop a held mass eviction",
    help="Drops the held evictions of a batch. The users stay where they are for now, but as long as "
    "they are not entitled the next reconcile plans (and holds) the same evictions again: exempt "
    "them with 'exempt add', or 'pause' the bot while you sort it out.",
)
async def cancel(ctx: Context, args: list[str]) -> Reply:
    expect(args, 1)
    batch = await _batch_id(ctx.app, args[0])
    app = ctx.app
    await _held_batch(app, batch, "cancel")
    count = await app.reconciler.cancel(batch)
    return Reply.rich(
        f"Cancelled batch {batch}: {plural(count, 'eviction')} dropped. Users who are still not entitled will be "
        "planned (and held) again at the next reconcile: exempt them with `!spacesync exempt add <@user>` or "
        "pause with `!spacesync pause`."
    )


def _effective(room: RoomState, value: int | None) -> int:
    return room.power_levels.users_default if value is None else value


@command(
    "undo",
    usage="undo <batch>",
    family=FAMILY,
    summary="revert what a finished batch did",
    help="Re-invites the users the batch kicked, unbans the users it banned, bans again the users an 'unban' "
    "lifted, and restores the power levels it changed (only entries nobody changed since, and never above your "
    "own level in the room), and unlocks the rooms a lockdown switched (those nobody changed since). The reverse "
    "actions run as a new batch. Other join-rule and m.space.child changes are not undone, nor redactions (they "
    "are final). Users who are still not entitled are evicted again by the next reconcile once they rejoin, "
    "unless you exempt them ('exempt add'); levels a Space still grants are written again. The bot's records of "
    "the levels it wrote go back to what they were before the batch.",
)
async def undo(ctx: Context, args: list[str]) -> Reply:
    expect(args, 1)
    batch = await _batch_id(ctx.app, args[0])
    app = ctx.app
    info = await _known_batch(app, batch)
    entries = await app.store.journal.batch_entries(batch)
    done = [e for e in entries if e.status is Status.DONE]
    if not done:
        hint = f" (it is held: '!spacesync cancel {batch}' drops it)" if info.status == BatchStatus.HELD else ""
        raise CommandError(f"Batch {batch} has no completed actions to undo{hint}")
    for other in await app.store.journal.batches(limit=500):
        if other.trigger == f"undo {batch}":
            raise CommandError(f"Batch {batch} was already undone by batch {other.id}")
    reason = f"undo of batch {batch} (by {ctx.sender})"
    inverse: list[Action] = []
    skipped: list[str] = []
    rooms: dict[RoomID, RoomState | None] = {}
    carried: set[tuple[RoomID, UserID]] = set()
    for entry in done:
        action = entry.action
        user = action.user_id
        room_t = label(app, action.room_id)[0]
        if action.kind is ActionKind.BAN and action.cause == Cause.POLICY_LIST:
            skipped.append(f"{user} in {room_t}: banned by a policy list rule: remove the rule from the list")
        elif action.kind in (ActionKind.KICK, ActionKind.BAN) and user:
            cached = app.cache.get(action.room_id)
            now = cached.membership(user) if cached else None
            needed = "invite" if action.kind is ActionKind.KICK else "ban"
            if cached is None or level(cached, ctx.sender) < getattr(cached.power_levels, needed):
                skipped.append(f"{user} in {room_t}: you lack the power to {needed} there yourself")
                continue
            if action.kind is ActionKind.KICK:
                if now in (Membership.JOIN, Membership.INVITE, Membership.BAN):
                    skipped.append(f"{user} is {now.value} in {room_t} now: not re-invited")
                    continue
                inverse.append(Action(ActionKind.INVITE, action.room_id, user, reason=reason, cause="undo"))
            else:
                if cached is not None and now is not Membership.BAN:
                    skipped.append(f"{user} is no longer banned in {room_t}")
                    continue
                if action.cause == Cause.SPACE_BAN:
                    carried.add((action.room_id, user))
                inverse.append(Action(ActionKind.UNBAN, action.room_id, user, reason=reason, cause="undo"))
        elif action.kind is ActionKind.SET_POWER_LEVELS:
            changes = await _restore_levels(ctx, action, rooms, skipped)
            if changes:
                listed = ", ".join(f"{u} → {'-' if b is None else b}" for u, (_, b) in sorted(changes.items()))
                # The records go back to what they were before the batch, as the entries do: a later change
                # of the Space's level then restores the room from the right value.
                ownership = {
                    u: record_before(action.room_id, u, action.changes[u], action.ownership.get(u)) for u in changes
                }
                inverse.append(
                    Action(
                        ActionKind.SET_POWER_LEVELS,
                        action.room_id,
                        reason=f"{reason}: {listed}",
                        cause="undo",
                        changes=changes,
                        ownership=ownership,
                    )
                )
        elif action.kind is ActionKind.SET_JOIN_RULES and action.cause == Cause.LOCKDOWN:
            lock = (await app.store.lockdowns()).get(action.room_id)
            if lock is None:
                skipped.append(f"{room_t} is no longer locked down")
                continue
            waited = await after_first_read(app, [lock])
            if waited is not None and not app.executor.ready.is_set():
                skipped.append(f"{room_t}: {waited}")
                continue
            todo = unlock_actions(app, [lock], reason)
            inverse.extend(todo.actions)
            for _, rule_now in todo.changed:
                await app.store.set_lockdown(action.room_id, None)
                skipped.append(f"join rule in {room_t} changed by hand since (now {rule_now}), left alone")
            skipped.extend(unknown_lines(app, todo.unknown))
        elif action.kind is ActionKind.UNBAN and action.cause == Cause.COMMAND_UNBAN and user:
            again = _ban_again(app, ctx, action, reason, skipped)
            if again is not None:
                inverse.append(again)
        elif action.kind is ActionKind.REDACT:
            skipped.append(f"redactions in {room_t} cannot be undone: a redacted message is gone for good")
        else:
            skipped.append(f"{action.kind.value} in {room_t} is not undone (change it by hand)")
    if carried:
        inverse = await _without_carried(app, inverse, carried, skipped)
    if not inverse:
        return listing(f"Nothing to undo in batch {batch}:", [line(s) for s in skipped])
    new_batch = await app.reconciler.enqueue(inverse, trigger=f"undo {batch}")
    kinds = Counter(a.kind for a in inverse)
    names = {
        ActionKind.INVITE: "re-invite",
        ActionKind.UNBAN: "unban",
        ActionKind.SET_POWER_LEVELS: "power-level restore",
        ActionKind.SET_JOIN_RULES: "join-rule restore",
        ActionKind.BAN: "ban",
    }
    summary = ", ".join(plural(n, names[k]) for k, n in kinds.items())
    parts: list[Reply | str] = [
        Reply(
            f"Undo of batch {batch} queued as batch {new_batch}: {summary}.",
            f"Undo of batch {code(batch)} queued as batch {code(new_batch)}: {summary}.",
        )
    ]
    if kinds[ActionKind.INVITE] or kinds[ActionKind.UNBAN]:
        parts.append(
            Reply.rich(
                "Users who are still not entitled (not joined to an entitling Space) will be evicted again by the next "
                "reconcile once they rejoin, unless you exempt them: `!spacesync exempt add <@user>`."
            )
        )
    if kinds[ActionKind.SET_POWER_LEVELS]:
        parts.append(Reply.plain("Levels a managed Space still grants will be written again by the next reconcile."))
    if skipped:
        parts.append(listing("Not undone:", [line(s) for s in skipped]))
    return compose(parts)


async def _without_carried(
    app: App, inverse: list[Action], carried: set[tuple[RoomID, UserID]], skipped: list[str]
) -> list[Action]:
    """The inverse actions but the unbans of bans carried down from a Space ban that stays (a moderator's, or a
    policy list's): the next plan would only place them again."""
    v = await view(app)
    lifted: dict[UserID, set[RoomID]] = {}
    for action in inverse:
        if action.kind is ActionKind.UNBAN and action.user_id:
            lifted.setdefault(action.user_id, set()).add(action.room_id)
    kept: list[Action] = []
    for action in inverse:
        user = action.user_id
        if action.kind is ActionKind.UNBAN and user and (action.room_id, user) in carried:
            above = bans_above(v, action.room_id, user, lifted.get(user, set()))
            if above:
                skipped.append(
                    f"{user} in {label(app, action.room_id)[0]}: carried down from the ban in "
                    f"{label(app, above[0])[0]}, which stays"
                )
                continue
        kept.append(action)
    return kept


def _ban_again(app: App, ctx: Context, action: Action, reason: str, skipped: list[str]) -> Action | None:
    """The ban an `unban` command lifted, placed again (spacesync's, so `unban` lifts it later): only where the
    user is not banned or back in the room meanwhile, and the issuer could ban there."""
    user = action.user_id
    assert user is not None
    room_t = label(app, action.room_id)[0]
    cached = app.cache.get(action.room_id)
    if cached is None or level(cached, ctx.sender) < cached.power_levels.ban:
        skipped.append(f"{user} in {room_t}: you lack the power to ban there yourself")
        return None
    now = cached.membership(user)
    if now is not Membership.LEAVE:
        skipped.append(f"{user} is {now.value} in {room_t} now: not banned again")
        return None
    return Action(
        ActionKind.BAN, action.room_id, user, reason=reason, space_id=action.space_id, cause=Cause.COMMAND_BAN.value
    )


async def _restore_levels(
    ctx: Context, action: Action, rooms: dict[RoomID, RoomState | None], skipped: list[str]
) -> dict[UserID, tuple[int | None, int | None]]:
    """The inverse level changes the issuer may make: unchanged since, and not above their own level."""
    room_id = action.room_id
    room_t = label(ctx.app, room_id)[0]
    if room_id not in rooms:
        try:
            rooms[room_id] = await room_state(ctx.app, room_id)
        except CommandError:
            rooms[room_id] = None
    room = rooms[room_id]
    if room is None:
        skipped.append(f"power levels in {room_t}: the bot cannot read the room")
        return {}
    mine = level(room, ctx.sender)
    changes: dict[UserID, tuple[int | None, int | None]] = {}
    for user, (before, after) in sorted(action.changes.items()):
        current = room.power_levels.users.get(user)
        if current != after:
            skipped.append(f"{user} in {room_t}: level changed since (now {_effective(room, current)}), left alone")
            continue
        old, new = _effective(room, after), _effective(room, before)
        if (user != ctx.sender and mine <= old) or mine < new:
            skipped.append(f"{user} in {room_t}: restoring {old} → {new} is above your own level ({show_level(mine)})")
            continue
        changes[user] = (after, before)
    return changes


@command(
    "retry",
    usage="retry <batch>|all",
    family=FAMILY,
    summary="run parked actions again",
    help="An action the homeserver keeps refusing (403, 400, 404: the bot lacks power, a server module "
    "refuses) is tried again with backoff up to executor.max_failures times, then parked and "
    "announced once. A parked action is planned again by itself only when its room's state changes "
    "(power levels, join rules, the target's membership). Once you fixed the cause, retry puts the "
    "parked actions of one batch (or all of them) back in the queue; each is re-checked against a "
    "fresh plan before it runs.",
)
async def retry(ctx: Context, args: list[str]) -> Reply:
    expect(args, 1)
    app = ctx.app
    if args[0].strip().lower() == "all":
        batch_id = None
    else:
        batch_id = await _batch_id(app, args[0])
        await _known_batch(app, batch_id)
    parked = await app.store.journal.parked(batch_id)
    if not parked:
        where = f"in batch {batch_id}" if batch_id else "anywhere"
        raise CommandError(f"No parked action {where}: nothing to retry ('!spacesync status' shows parked actions)")
    count = await app.reconciler.retry(batch_id)
    batches = sorted({e.batch for e in parked})
    where_t = f"batch {batch_id}" if batch_id else plural(len(batches), "batch", "batches")
    where_h = f"batch {code(batch_id)}" if batch_id else esc(where_t)
    return Reply(
        f"Retrying {plural(count, 'parked action')} of {where_t}: queued again.",
        f"Retrying {plural(count, 'parked action')} of {where_h}: queued again.",
    )
