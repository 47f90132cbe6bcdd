"""Version 1: key-value state, the action journal, the audit log and the bot's own records."""

from mautrix.util.async_db import Connection, Scheme

from . import migration


@migration("Initial schema")
async def upgrade_v1(conn: Connection, scheme: Scheme) -> None:
    serial = "INTEGER PRIMARY KEY" if scheme == Scheme.SQLITE else "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    await conn.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    await conn.execute(f"""
        CREATE TABLE journal (
            id          {serial},
            batch       TEXT NOT NULL,
            kind        TEXT NOT NULL,
            room_id     TEXT NOT NULL,
            target      TEXT NOT NULL DEFAULT '',
            space_id    TEXT,
            cause       TEXT NOT NULL DEFAULT '',
            reason      TEXT NOT NULL DEFAULT '',
            body        TEXT NOT NULL,
            status      TEXT NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            error       TEXT,
            created_at  BIGINT NOT NULL,
            updated_at  BIGINT NOT NULL
        )
    """)
    await conn.execute("CREATE INDEX journal_status_idx ON journal (status, id)")
    await conn.execute("CREATE INDEX journal_batch_idx ON journal (batch)")
    await conn.execute("""
        CREATE TABLE batch (
            id          TEXT PRIMARY KEY,
            trigger     TEXT NOT NULL,
            space_id    TEXT,
            status      TEXT NOT NULL,
            created_at  BIGINT NOT NULL,
            announced   BOOLEAN NOT NULL DEFAULT false
        )
    """)
    await conn.execute(f"""
        CREATE TABLE audit (
            id          {serial},
            ts          BIGINT NOT NULL,
            journal_id  BIGINT,
            batch       TEXT,
            kind        TEXT NOT NULL,
            room_id     TEXT NOT NULL,
            target      TEXT NOT NULL DEFAULT '',
            reason      TEXT NOT NULL DEFAULT '',
            trigger     TEXT NOT NULL DEFAULT '',
            outcome     TEXT NOT NULL,
            detail      TEXT
        )
    """)
    await conn.execute("CREATE INDEX audit_target_idx ON audit (target, id)")
    await conn.execute("""
        CREATE TABLE placed_ban (
            room_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            cause   TEXT NOT NULL,
            PRIMARY KEY (room_id, user_id)
        )
    """)
    await conn.execute("""
        CREATE TABLE owned_level (
            room_id  TEXT NOT NULL,
            user_id  TEXT NOT NULL,
            written  INTEGER NOT NULL,
            previous INTEGER,
            PRIMARY KEY (room_id, user_id)
        )
    """)
    await conn.execute("""
        CREATE TABLE managed_space (
            room_id  TEXT PRIMARY KEY,
            added_by TEXT NOT NULL,
            added_at BIGINT NOT NULL
        )
    """)
    await conn.execute("""
        CREATE TABLE extra_room (
            space_id TEXT NOT NULL,
            room_id  TEXT NOT NULL,
            added_by TEXT NOT NULL,
            PRIMARY KEY (space_id, room_id)
        )
    """)
    await conn.execute("""
        CREATE TABLE exempt_user (
            user_id  TEXT PRIMARY KEY,
            added_by TEXT NOT NULL,
            added_at BIGINT NOT NULL
        )
    """)
    await conn.execute("""
        CREATE TABLE handled_event (
            event_id TEXT PRIMARY KEY,
            ts       BIGINT NOT NULL
        )
    """)
