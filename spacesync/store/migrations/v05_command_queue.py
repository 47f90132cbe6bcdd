"""Version 5: admin-room commands kept from their arrival until their reply is sent, so a crash loses none."""

from mautrix.util.async_db import Connection, Scheme

from . import migration


@migration("command_queue")
async def upgrade_v5(conn: Connection, scheme: Scheme) -> None:
    serial = "INTEGER PRIMARY KEY" if scheme == Scheme.SQLITE else "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    await conn.execute(f"""
        CREATE TABLE command_queue (
            seq         {serial},
            event_id    TEXT NOT NULL UNIQUE,
            room_id     TEXT NOT NULL,
            sender      TEXT NOT NULL,
            event       TEXT NOT NULL,
            received_at BIGINT NOT NULL,
            done_at     BIGINT
        )
    """)
    await conn.execute("CREATE INDEX command_queue_pending_idx ON command_queue (done_at, seq)")
