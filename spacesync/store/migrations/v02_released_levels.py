"""Version 2: remember power-level entries changed by hand, so spacesync leaves them alone."""

from mautrix.util.async_db import Connection

from . import migration


@migration("owned_level.released")
async def upgrade_v2(conn: Connection) -> None:
    await conn.execute("ALTER TABLE owned_level ADD COLUMN released BOOLEAN NOT NULL DEFAULT false")
