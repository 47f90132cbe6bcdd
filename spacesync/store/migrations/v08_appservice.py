"""Version 8: the appservice transactions already applied, so a transaction the homeserver sends again (its
answer was lost, the bot died before answering) is applied once."""

from mautrix.util.async_db import Connection

from . import migration


@migration("appservice_txn")
async def upgrade_v8(conn: Connection) -> None:
    await conn.execute(
        """
        CREATE TABLE appservice_txn (
            txn_id TEXT PRIMARY KEY,
            applied_at BIGINT NOT NULL
        )
        """
    )
