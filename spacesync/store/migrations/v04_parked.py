"""Version 4: failing actions back off (`not_before`), then park with a fingerprint of the state that
made them fail; notices about them are sent once per action and reason."""

from mautrix.util.async_db import Connection

from . import migration


@migration("parked actions and backoff")
async def upgrade_v4(conn: Connection) -> None:
    await conn.execute("ALTER TABLE journal ADD COLUMN not_before BIGINT NOT NULL DEFAULT 0")
    await conn.execute("ALTER TABLE journal ADD COLUMN failures INTEGER NOT NULL DEFAULT 0")
    await conn.execute("ALTER TABLE journal ADD COLUMN fingerprint TEXT")
    await conn.execute("CREATE INDEX journal_key_idx ON journal (kind, room_id, target)")
    await conn.execute("""
        CREATE TABLE notice_sent (
            key TEXT PRIMARY KEY,
            ts  BIGINT NOT NULL
        )
    """)
