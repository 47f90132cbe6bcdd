"""`trust`: pin a user's current cross-signing master key again, after they reset their identity."""

from __future__ import annotations

from ..matrix.crypto import CryptoError
from .format import Reply, code
from .registry import CommandError, Context, command, expect
from .settings import _user


@command(
    "trust",
    usage="trust <@user>",
    family="settings",
    summary="trust a user's new cross-signing identity (after they reset it)",
    help="The bot pins each user's cross-signing master key when it first sees it, and trusts only devices "
    "signed under that key: it shares room keys with them and, with admin.require_verified_device, takes "
    "their commands. When a user resets their identity (a new master key), the bot stops trusting their "
    "devices until an admin checks with them and pins the new key with 'trust <@user>'.",
)
async def trust(ctx: Context, args: list[str]) -> Reply:
    expect(args, 1)
    user = _user(args[0])
    try:
        key = await ctx.app.crypto.trust(user)
    except CryptoError as e:
        raise CommandError(str(e)) from e
    return Reply(
        f"Pinned {user}'s master key {key}: their devices cross-signed with it are trusted from now on.",
        f"Pinned {user}'s master key {code(key)}: their devices cross-signed with it are trusted from now on.",
    )
