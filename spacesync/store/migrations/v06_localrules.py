"""Version 6: remember, with each batch, the users its evictions had to leave behind (and why)."""

from mautrix.util.async_db import Connection

from . import migration


@migration("batch.left_behind")
async def upgrade_v6(conn: Connection) -> None:
    await conn.execute("ALTER TABLE batch ADD COLUMN left_behind TEXT")
