"""Version 3: what spacesync has seen of each membership in a managed Space, and when it first saw it."""

from mautrix.util.async_db import Connection

from . import migration


@migration("member_history")
async def upgrade_v3(conn: Connection) -> None:
    # One row per (Space, user): the last membership event spacesync saw, whether a `leave` replaced a
    # `join` (NULL: nobody could tell yet), and when spacesync first saw that event (grace periods).
    await conn.execute("""
        CREATE TABLE member_history (
            room_id     TEXT NOT NULL,
            user_id     TEXT NOT NULL,
            event_id    TEXT NOT NULL,
            membership  TEXT NOT NULL,
            was_joined  BOOLEAN,
            seen_at     BIGINT NOT NULL,
            PRIMARY KEY (room_id, user_id)
        )
    """)
