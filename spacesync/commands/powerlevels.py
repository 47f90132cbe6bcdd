"""Handing power levels changed by hand back to spacesync: `powerlevels release <room|all> [@user]`."""

from __future__ import annotations

from ..model import RoomID, UserID
from ..refs import RefError
from .format import Reply, line, listing, plural
from .parser import user_arg
from .registry import Context, UsageError, expect
from .world import label, resolve

RELEASE_USAGE = "powerlevels release <room|all> [@user]"
RELEASE_HELP = (
    "'powerlevels release <room|all> [@user]' hands levels changed by hand back to spacesync: a users entry someone "
    "changed since spacesync wrote it is left alone (and reported) whatever the Space asks, until the room's "
    "moderators set it back or this command releases it; spacesync then mirrors the Space's level into it again "
    "(a user muted or demoted below the room's default level stays as the room set them)."
)


async def release(ctx: Context, args: list[str]) -> Reply:
    """Forget spacesync's hold on the hand-changed entries of a room (or all rooms), of one user or all."""
    expect(args, 1, 2)
    app = ctx.app
    room: RoomID | None = None if args[0].lower() == "all" else await resolve(app, args[0])
    user: UserID | None = None
    if len(args) == 2:
        try:
            user = user_arg(args[1])
        except RefError as e:
            raise UsageError(f"{e}. Usage: {RELEASE_USAGE}") from None
    held = [
        record
        for record in (await app.store.owned_levels()).values()
        if record.released and room in (None, record.room_id) and user in (None, record.user_id)
    ]
    where = label(app, room) if room is not None else ("any room", "any room")
    who = f" for {user}" if user else ""
    if not held:
        return Reply(
            f"No level changed by hand in {where[0]}{who}: nothing to release.",
            f"No level changed by hand in {where[1]}{who}: nothing to release.",
        )
    for record in held:
        await app.store.set_owned_level(record.room_id, record.user_id, None)
    app.request_reconcile(full=False)
    lines = [
        line(f"{record.user_id} in {label(app, record.room_id)[0]} (spacesync wrote {record.written})")
        for record in sorted(held, key=lambda r: (r.room_id, r.user_id))
    ]
    head = (
        f"Released {plural(len(held), 'level')} changed by hand in {where[0]}{who}: spacesync mirrors the Space's "
        "levels into them again from the next reconcile."
    )
    return listing(head, lines)
