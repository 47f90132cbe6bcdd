"""Version 7: the rooms spacesync locked down (with the join rules each had before), the server ACL entries it
added and the policy server state it wrote."""

from mautrix.util.async_db import Connection

from . import migration


@migration("lockdown, owned_acl, owned_policy")
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
    await conn.execute(
        """
        CREATE TABLE owned_policy (
            room_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            written TEXT NOT NULL,
            PRIMARY KEY (room_id, event_type)
        )
        """
    )
