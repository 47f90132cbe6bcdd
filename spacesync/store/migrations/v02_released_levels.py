"""Version 2: remember power-level entries changed by hand, so spacesync leaves them alone."""

from mautrix.util.async_db import Connection

from . import upgrade_table


@upgrade_table.register(description="owned_level.released")
async def upgrade_v2(conn: Connection) -> None:
    await conn.execute("ALTER TABLE owned_level ADD COLUMN released BOOLEAN NOT NULL DEFAULT false")
