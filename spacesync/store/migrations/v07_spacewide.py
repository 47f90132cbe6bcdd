"""Version 7: the rooms spacesync locked down (with the join rules each had before), and the server ACL entries
it added."""

from mautrix.util.async_db import Connection

from . import migration


@migration("lockdown, owned_acl")
async def upgrade_v7(conn: Connection) -> None:
    await conn.execute(
        """
        CREATE TABLE lockdown (
            room_id TEXT PRIMARY KEY,
            space_id TEXT NOT NULL,
            previous TEXT NOT NULL,
            written TEXT NOT NULL,
            locked_at BIGINT NOT NULL
        )
        """
    )
    await conn.execute(
        """
        CREATE TABLE owned_acl (
            room_id TEXT NOT NULL,
            entry TEXT NOT NULL,
            PRIMARY KEY (room_id, entry)
        )
        """
    )
