"""Whom the bot trusts, as Element does: a device is trusted when its owner cross-signed it and the owner's
master key is the one the bot pinned when it first saw it (trust on first use, kept in the crypto store's
`first_seen_key`). A changed master key is not trusted until a moderator re-pins it (`!spacesync trust`)."""

from __future__ import annotations

from mautrix.types import TrustState
from mautrix.util.async_db import Database

from ..config import ShareKeysWith


def min_trust(share_keys_with: ShareKeysWith) -> TrustState:
    """The least trust a device needs to get the bot's room keys."""
    return TrustState.CROSS_SIGNED_TOFU if share_keys_with is ShareKeysWith.CROSS_SIGNED else TrustState.UNVERIFIED


TRUSTED = (TrustState.CROSS_SIGNED_TOFU, TrustState.CROSS_SIGNED_TRUSTED, TrustState.VERIFIED)
"""Trust levels of a device its owner cross-signed under the pinned master key (or verified outright)."""
IDENTITY_CHANGED = TrustState.CROSS_SIGNED_UNTRUSTED
"""Cross-signed by its owner, but under another master key than the one the bot pinned."""


async def master_key(db: Database, user_id: str) -> tuple[str, str] | None:
    """(current, pinned) master key of `user_id` as the crypto store has them; None when never seen."""
    row = await db.fetchrow(
        "SELECT key, first_seen_key FROM crypto_cross_signing_keys WHERE user_id=$1 AND usage='master'", user_id
    )
    return None if row is None else (str(row["key"]), str(row["first_seen_key"]))


async def repin(db: Database, user_id: str) -> str | None:
    """Pin `user_id`'s current master key; the key pinned, or None when the bot has never seen one."""
    keys = await master_key(db, user_id)
    if keys is None:
        return None
    await db.execute(
        "UPDATE crypto_cross_signing_keys SET first_seen_key=key WHERE user_id=$1 AND usage='master'", user_id
    )
    return keys[0]
