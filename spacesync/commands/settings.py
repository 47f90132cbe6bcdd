"""Settings changed from the admin room: managed Spaces, explicit rooms, exemptions, pause and resume.

No command grants power. Commands that widen what the bot governs (`spaces add`, `rooms add`) require the
issuer to hold, in that Space or room, the power the bot would use there: nobody can act through the bot
above their own level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..model import RoomID, UserID
from ..refs import RefError
from .format import Line, Reply, code, line, listing, plural
from .parser import user_arg
from .registry import CommandError, Context, UsageError, command, expect, subcommand
from .world import label, level, resolve, room_state, show_level

if TYPE_CHECKING:
    from .services import Services as App

FAMILY = "settings"
PAUSED_KEY = "commands:paused"


async def restore_paused(app: App) -> None:
    """Pause survives a restart: read it back before the first reconcile."""
    if await app.store.get(PAUSED_KEY) == "1":
        app.reconciler.paused = True


async def _configured_spaces(app: App) -> dict[RoomID, str]:
    """Spaces from the config file, resolved: room id -> the reference as written."""
    out: dict[RoomID, str] = {}
    for space in app.config.spaces:
        room_id = await app.reconciler.resolve(space.room)
        if room_id is not None:
            out[room_id] = str(space.room)
    return out


async def _require_power(ctx: Context, room_id: RoomID, why: str, *, space: bool = False) -> None:
    """CommandError unless the issuer could make, by hand, the kind of changes the bot will make there."""
    room = await room_state(ctx.app, room_id)
    if space and not room.is_space and room_id not in await _configured_spaces(ctx.app):
        raise CommandError(f"{room_id} is not a Space (its m.room.create has no type m.space)")
    pl = room.power_levels
    needed = max(pl.kick, pl.ban, pl.event_level("m.room.power_levels"))
    mine = level(room, ctx.sender)
    if mine < needed:
        raise CommandError(
            f"you have power level {show_level(mine)} in {room_id}, but {why} needs {needed} there "
            "(kick, ban and power levels): commands never let anyone act above their own level"
        )


def _user(text: str) -> UserID:
    try:
        return user_arg(text)
    except RefError as e:
        raise CommandError(str(e)) from None


# region spaces


@command(
    "spaces",
    usage="spaces add|remove|list [space]",
    family=FAMILY,
    summary="manage which Spaces the bot governs",
    help="spaces list — the managed Spaces: those in the config file (marked config) and those added here.\n"
    "spaces add <space> — govern a Space (id, alias, link or pill). The bot must be in it (invite it: it "
    "accepts invites from admins) and you need the power to kick, ban and change power levels in the "
    "Space yourself. Rooms below it are managed only once they opt in.\n"
    "spaces remove <space> — stop governing a Space added here (config Spaces are removed in the "
    "config file). Nothing the bot did is reverted.",
)
async def spaces(ctx: Context, args: list[str]) -> Reply:
    sub, rest = subcommand(args, ("add", "remove", "list"))
    app = ctx.app
    configured = await _configured_spaces(app)
    if sub == "list":
        expect(rest, 0)
        lines = []
        for room_id in configured:
            room_t, room_h = label(app, room_id)
            lines.append(line(f"{room_t} — config", f"{room_h} — config"))
        for room_id in await app.store.managed_spaces():
            if room_id not in configured:
                room_t, room_h = label(app, room_id)
                lines.append(line(f"{room_t} — added in the admin room", f"{room_h} — added in the admin room"))
        return listing(
            plural(len(lines), "managed Space"), lines, empty="None. Add one with '!spacesync spaces add <space>'."
        )
    expect(rest, 1)
    room_id = await resolve(app, rest[0])
    room_t, room_h = label(app, room_id)
    if sub == "add":
        if room_id in configured:
            return Reply.plain(f"{room_t} is already managed (config).")
        await _require_power(ctx, room_id, "governing this Space", space=True)
        if not await app.store.add_space(room_id, ctx.sender):
            return Reply.plain(f"{room_t} is already managed (added in the admin room).")
        app.request_reconcile(full=True)
        return Reply.rich(
            f"Now managing Space {room_t}. Rooms below it are managed once they opt in (restricted to the Space, "
            "m.space.parent, or `!spacesync rooms add`). See `!spacesync tree` in a moment."
        )
    if room_id in configured:
        raise CommandError(f"{room_t} is configured in the config file (spaces): remove it there and restart")
    if not await app.store.remove_space(room_id):
        raise CommandError(f"{room_t} is not a managed Space (see '!spacesync spaces list')")
    app.request_reconcile(full=True)
    return Reply(
        f"No longer managing Space {room_t}. Nothing the bot did there is reverted.",
        f"No longer managing Space {room_h}. Nothing the bot did there is reverted.",
    )


# endregion


# region rooms


@command(
    "rooms",
    usage="rooms add|remove|list [room] [space]",
    family=FAMILY,
    summary="opt a room in (or out) explicitly",
    help="rooms list — the rooms opted in explicitly, here and in the config's extra_rooms.\n"
    "rooms add <room> [space] — manage a room listed under a managed Space even though it does not "
    "opt in by its join rule or m.space.parent. Name the Space when several are managed. The bot must "
    "be in the room, and you need the power to kick, ban and change power levels there yourself.\n"
    "rooms remove <room> — undo 'rooms add'. A room that opts in by its join rule or m.space.parent "
    "stays managed.",
)
async def rooms(ctx: Context, args: list[str]) -> Reply:
    sub, rest = subcommand(args, ("add", "remove", "list"))
    app = ctx.app
    if sub == "list":
        expect(rest, 0)
        lines: list[Line] = []
        for space_id, extra in sorted((await app.store.extra_rooms()).items()):
            space_t = label(app, space_id)[0]
            lines.extend(line(f"{label(app, r)[0]} — under {space_t}, added here") for r in sorted(extra))
        for configured in app.config.spaces:
            lines.extend(line(f"{ref} — under {configured.room}, in the config") for ref in configured.extra_rooms)
        return listing(
            plural(len(lines), "room opted in explicitly", "rooms opted in explicitly"),
            lines,
            empty="None. Rooms opt in by their join rule or m.space.parent; 'rooms add' adds one.",
        )
    if sub == "remove":
        expect(rest, 1)
        room_id = await resolve(app, rest[0])
        room_t, _ = label(app, room_id)
        if not await app.store.remove_extra_room(room_id):
            raise CommandError(
                f"{room_t} was not added with 'rooms add' (rooms in the config's extra_rooms are "
                "removed there; rooms that opt in by join rule or m.space.parent stay managed)"
            )
        app.request_reconcile(full=True)
        return Reply.plain(
            f"{room_t} is no longer explicitly opted in. It stays managed only if it opts in "
            "by its join rule or m.space.parent."
        )
    expect(rest, 1, 2)
    room_id = await resolve(app, rest[0])
    policy = await app.reconciler.policy()
    roots = [s.room_id for s in policy.spaces]
    if len(rest) == 2:
        space = await resolve(app, rest[1])
        if space not in roots:
            raise CommandError(f"{rest[1]} is not a managed Space (see '!spacesync spaces list')")
    elif len(roots) == 1:
        space = roots[0]
    elif not roots:
        raise CommandError("no Space is managed yet: add one with '!spacesync spaces add <space>'")
    else:
        raise UsageError(f"Several Spaces are managed: name one ({', '.join(roots[:5])}).")
    if room_id == space:
        raise CommandError(f"{room_id} is the Space itself")
    await _require_power(ctx, room_id, "managing this room")
    space_policy = policy.space(space)
    if space_policy is not None and room_id in space_policy.extra_rooms:  # added here, or in the config
        return Reply.plain(f"{label(app, room_id)[0]} is already opted in under {label(app, space)[0]}.")
    await app.store.add_extra_room(space, room_id, ctx.sender)
    app.request_reconcile(full=True)
    room_t, room_h = label(app, room_id)
    space_t, space_h = label(app, space)
    return Reply(
        f"{room_t} is now managed under {space_t} (explicit opt-in).",
        f"{room_h} is now managed under {space_h} (explicit opt-in).",
    )


# endregion


# region exemptions


@command(
    "exempt",
    usage="exempt add|remove|list [@user]",
    family=FAMILY,
    summary="users the bot never evicts or bans",
    help="exempt add <@user> — the bot never evicts or bans this user in any managed room.\n"
    "exempt remove <@user> — lift that; the next reconcile may evict them where they are not "
    "entitled.\n"
    "exempt list — exemptions added here, in the config, and the admins (always protected).\n"
    "An exemption protects; it grants no power.",
)
async def exempt(ctx: Context, args: list[str]) -> Reply:
    sub, rest = subcommand(args, ("add", "remove", "list"))
    app = ctx.app
    if sub == "list":
        expect(rest, 0)
        lines = [
            line(f"{u} — added in the admin room", f"{code(u)} — added in the admin room")
            for u in sorted(await app.store.exempt_users())
        ]
        for space in app.config.spaces:
            for u in sorted(space.exempt):
                lines.append(line(f"{u} — config, in {space.room}", f"{code(u)} — config, in {code(space.room)}"))
        for u in sorted(app.config.admin.users):
            lines.append(line(f"{u} — admin (config)", f"{code(u)} — admin (config)"))
        return listing(plural(len(lines), "exempt user"), lines, empty="None.")
    expect(rest, 1)
    user = _user(rest[0])
    if sub == "add":
        if not await app.store.add_exempt(user, ctx.sender):
            return Reply.plain(f"{user} is already exempt.")
        dropped = await app.store.journal.cancel_evictions_of(user)
        note = f" {plural(dropped, 'queued or held eviction')} against them dropped." if dropped else ""
        return Reply(
            f"{user} is exempt: the bot will not evict or ban them in any managed room.{note}",
            f"{code(user)} is exempt: the bot will not evict or ban them in any managed room.{note}",
        )
    if not await app.store.remove_exempt(user):
        in_config = [str(s.room) for s in app.config.spaces if user in s.exempt]
        where = f" (exempt in the config for {', '.join(in_config)}: change it there)" if in_config else ""
        raise CommandError(f"{user} was not exempted here{where}")
    app.request_reconcile(full=True)
    return Reply(
        f"{user} is no longer exempt; the next reconcile may evict them where they are not entitled.",
        f"{code(user)} is no longer exempt; the next reconcile may evict them where they are not entitled.",
    )


# endregion


# region pause and resume


@command(
    "pause",
    family=FAMILY,
    summary="stop queuing new actions (survives a restart)",
    help="The bot keeps planning (see 'plan') but queues nothing new until 'resume'. Actions already "
    "queued still run; held batches stay held. Pausing survives a restart.",
)
async def pause(ctx: Context, args: list[str]) -> Reply:
    expect(args, 0)
    app = ctx.app
    was = app.reconciler.paused
    app.reconciler.paused = True
    await app.store.put(PAUSED_KEY, "1")
    depth = await app.store.journal.depth()
    queued = depth.get("pending", 0) + depth.get("running", 0)
    text = "Already paused." if was else "Paused: nothing new will be queued until `!spacesync resume`."
    if queued:
        text += f" {plural(queued, 'action')} already queued still run."
    return Reply.rich(text)


@command(
    "resume",
    family=FAMILY,
    summary="queue actions again after 'pause'",
    help="Ends a pause and starts a full reconcile at once.",
)
async def resume(ctx: Context, args: list[str]) -> Reply:
    expect(args, 0)
    app = ctx.app
    was = app.reconciler.paused
    app.reconciler.paused = False
    await app.store.put(PAUSED_KEY, "0")
    app.request_reconcile(full=True)
    return Reply.plain("Resumed: reconciling now." if was else "Not paused; reconciling now.")


# endregion


__all__ = ["PAUSED_KEY", "restore_paused"]
