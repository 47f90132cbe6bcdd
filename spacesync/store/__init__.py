"""The database: schema migrations, the journal, the audit log, the bot's own records and settings."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Mapping
from typing import Any

import attrs
import structlog
from mautrix.util.async_db import Database, Scheme
from mautrix.util.logging import TraceLogger

from ..model import Action, RoomID, UserID
from .journal import Journal, Status, now_ms
from .migrations import upgrade_table
from .records import Records, SeenMembership

__all__ = ["AuditRecord", "Journal", "QueuedCommand", "SeenMembership", "Status", "Store", "StoreError", "unreachable"]

log = structlog.get_logger("spacesync.store")
LEADER_LOCK_KEY = 0x5350_4353  # "SPCS": the PostgreSQL advisory lock that elects the acting instance
LOCK_QUERY_TIMEOUT_S = 5.0
"""A lock check that takes longer is treated as a lost lock: never act on an unconfirmed leadership."""


def unreachable(error: BaseException) -> bool:
    """Whether an error means the database is out of reach for now (a restart, a cut, refused connections):
    worth waiting and retrying, unlike a bug in a query."""
    if isinstance(error, (OSError, asyncio.TimeoutError, sqlite3.OperationalError)):
        return True
    import asyncpg

    return isinstance(
        error, (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.exceptions.OperatorInterventionError)
    )


def _db_logger() -> logging.Logger:
    """mautrix's database layer needs a TraceLogger, whatever logger class structlog installed since."""
    previous = logging.getLoggerClass()
    logging.setLoggerClass(TraceLogger)
    try:
        return logging.getLogger("spacesync.db")
    finally:
        logging.setLoggerClass(previous)


class StoreError(Exception):
    """A database problem worth one clear line to the operator."""


@attrs.frozen
class QueuedCommand:
    """An admin-room message received from /sync, kept until its reply is sent (survives a crash)."""

    seq: int
    event_id: str
    room_id: RoomID
    sender: UserID
    event: dict[str, Any]


@attrs.frozen
class AuditRecord:
    id: int
    ts: int
    batch: str | None
    kind: str
    room_id: str
    target: str
    reason: str
    trigger: str
    outcome: str
    detail: str | None


class Store(Records):
    """One database, SQLite or PostgreSQL, behind typed methods (the bot's own records: `Records`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.db = Database.create(
            url,
            upgrade_table=upgrade_table,
            log=_db_logger(),
            db_args={"min_size": 1, "max_size": 5} if not url.startswith("sqlite") else {},
        )
        self.journal = Journal(self.db)
        self._lock_fd: int | None = None
        self._lock_conn: Any = None
        self._lock_use = asyncio.Lock()
        """One asyncpg connection runs one query at a time: the lock checks take turns."""
        self.lock_error: str | None = None
        """Why the last attempt to take the lock failed for want of a database, or None."""

    @property
    def is_postgres(self) -> bool:
        return self.db.scheme != Scheme.SQLITE

    async def start(self) -> None:
        try:
            await self.db.start()
        except (OSError, ConnectionError) as e:
            raise StoreError(f"database: cannot connect ({e}); check database.url and that the server is up") from e
        except Exception as e:
            if type(e).__module__.startswith(("asyncpg", "sqlite3")):
                raise StoreError(f"database: {type(e).__name__}: {e}") from e
            raise

    async def stop(self) -> None:
        await self.release_leadership()
        await self.db.stop()

    async def ping(self) -> bool:
        try:
            return await asyncio.wait_for(self.db.fetchval("SELECT 1"), LOCK_QUERY_TIMEOUT_S) == 1
        except Exception:
            return False

    # region leadership
    async def try_leadership(self) -> bool:
        """Become the one acting instance: an advisory lock on PostgreSQL, a file lock on SQLite."""
        if self.is_postgres:
            import asyncpg

            async with self._lock_use:
                try:
                    if self._lock_conn is None or self._lock_conn.is_closed():
                        self._lock_conn = await asyncpg.connect(self.url, timeout=LOCK_QUERY_TIMEOUT_S)
                    got = bool(
                        await asyncio.wait_for(
                            self._lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK_KEY),
                            LOCK_QUERY_TIMEOUT_S,
                        )
                    )
                except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                    if self.lock_error is None:
                        log.warning(
                            "database unreachable while standing by: retrying", error=f"{type(e).__name__}: {e}"
                        )
                    self.lock_error = f"{type(e).__name__}: {e}"
                    await self._drop_lock_conn()
                    return False
            if self.lock_error is not None:
                log.info("database reachable again", lock_taken=got)
            self.lock_error = None
            return got
        path = self.db.url.path + ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def holds_leadership(self) -> bool:
        """Whether this instance still holds the lock. PostgreSQL frees an advisory lock when its connection
        drops (a server restart, a network cut, pg_terminate_backend): then a standby may hold it."""
        if not self.is_postgres:
            return self._lock_fd is not None
        async with self._lock_use:
            conn = self._lock_conn
            if conn is None or conn.is_closed():
                return False
            try:
                return bool(
                    await asyncio.wait_for(
                        conn.fetchval(
                            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                            " AND pid = pg_backend_pid() AND classid = 0 AND objid = $1 AND objsubid = 1)",
                            LEADER_LOCK_KEY,
                        ),
                        LOCK_QUERY_TIMEOUT_S,
                    )
                )
            except Exception:  # unconfirmed is not held: never risk two acting instances
                return False

    async def release_leadership(self) -> None:
        """Give the lock up (closing its connection frees it), so that another instance may take it."""
        async with self._lock_use:
            await self._drop_lock_conn()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _drop_lock_conn(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), LOCK_QUERY_TIMEOUT_S)
        except Exception:
            conn.terminate()

    # endregion

    # region key-value state
    async def get(self, key: str) -> str | None:
        return await self.db.fetchval("SELECT value FROM kv WHERE key=$1", key)

    async def put(self, key: str, value: str) -> None:
        await self.db.execute(
            "INSERT INTO kv (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
            key,
            value,
        )

    # endregion

    # region audit log
    async def audit(
        self,
        action: Action,
        outcome: str,
        *,
        journal_id: int | None = None,
        batch: str | None = None,
        trigger: str = "",
        detail: Any = None,
    ) -> None:
        await self.db.execute(
            "INSERT INTO audit (ts, journal_id, batch, kind, room_id, target, reason, trigger, outcome, detail)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            now_ms(),
            journal_id,
            batch,
            action.kind.value,
            action.room_id,
            action.user_id or action.state_key or "",
            action.reason,
            trigger,
            outcome,
            None if detail is None else json.dumps(detail),
        )

    async def audit_log(self, limit: int = 20, target: str | None = None) -> list[AuditRecord]:
        query = "SELECT * FROM audit"
        args: list[Any] = []
        if target:
            query += " WHERE target=$1"
            args.append(target)
        query += f" ORDER BY id DESC LIMIT ${len(args) + 1}"
        rows = await self.db.fetch(query, *args, limit)
        return [AuditRecord(**{f.name: r[f.name] for f in attrs.fields(AuditRecord)}) for r in rows]

    # endregion

    # region settings changed from the admin room
    async def managed_spaces(self) -> list[RoomID]:
        rows = await self.db.fetch("SELECT room_id FROM managed_space ORDER BY added_at")
        return [RoomID(r["room_id"]) for r in rows]

    async def add_space(self, room_id: RoomID, added_by: UserID) -> bool:
        result = await self.db.fetchval(
            "INSERT INTO managed_space (room_id, added_by, added_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (room_id) DO NOTHING RETURNING room_id",
            room_id,
            added_by,
            now_ms(),
        )
        return result is not None

    async def remove_space(self, room_id: RoomID) -> bool:
        found = await self.db.fetchval("SELECT room_id FROM managed_space WHERE room_id=$1", room_id)
        await self.db.execute("DELETE FROM managed_space WHERE room_id=$1", room_id)
        return found is not None

    async def extra_rooms(self) -> dict[RoomID, set[RoomID]]:
        rows = await self.db.fetch("SELECT space_id, room_id FROM extra_room")
        out: dict[RoomID, set[RoomID]] = {}
        for r in rows:
            out.setdefault(RoomID(r["space_id"]), set()).add(RoomID(r["room_id"]))
        return out

    async def add_extra_room(self, space_id: RoomID, room_id: RoomID, added_by: UserID) -> None:
        await self.db.execute(
            "INSERT INTO extra_room (space_id, room_id, added_by) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            space_id,
            room_id,
            added_by,
        )

    async def remove_extra_room(self, room_id: RoomID) -> bool:
        found = await self.db.fetchval("SELECT room_id FROM extra_room WHERE room_id=$1", room_id)
        await self.db.execute("DELETE FROM extra_room WHERE room_id=$1", room_id)
        return found is not None

    async def exempt_users(self) -> frozenset[UserID]:
        rows = await self.db.fetch("SELECT user_id FROM exempt_user")
        return frozenset(UserID(r["user_id"]) for r in rows)

    async def add_exempt(self, user_id: UserID, added_by: UserID) -> bool:
        result = await self.db.fetchval(
            "INSERT INTO exempt_user (user_id, added_by, added_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (user_id) DO NOTHING RETURNING user_id",
            user_id,
            added_by,
            now_ms(),
        )
        return result is not None

    async def remove_exempt(self, user_id: UserID) -> bool:
        found = await self.db.fetchval("SELECT user_id FROM exempt_user WHERE user_id=$1", user_id)
        await self.db.execute("DELETE FROM exempt_user WHERE user_id=$1", user_id)
        return found is not None

    async def mark_handled(self, event_id: str) -> bool:
        """Record an event as handled; False when it already was (handle each command once)."""
        result = await self.db.fetchval(
            "INSERT INTO handled_event (event_id, ts) VALUES ($1, $2) ON CONFLICT (event_id) DO NOTHING"
            " RETURNING event_id",
            event_id,
            now_ms(),
        )
        return result is not None

    # endregion

    # region admin-room commands waiting for their reply
    async def queue_command(self, room_id: RoomID, event: Mapping[str, Any]) -> bool:
        """Keep a command event until its reply is sent; False when it was queued before (a replayed /sync)."""
        result = await self.db.fetchval(
            "INSERT INTO command_queue (event_id, room_id, sender, event, received_at) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            event["event_id"],
            room_id,
            str(event.get("sender") or ""),
            json.dumps(dict(event)),
            now_ms(),
        )
        return result is not None

    async def pending_commands(self, limit: int = 100) -> list[QueuedCommand]:
        """Commands not answered yet, oldest first."""
        rows = await self.db.fetch(
            "SELECT seq, event_id, room_id, sender, event FROM command_queue WHERE done_at IS NULL"
            " ORDER BY seq LIMIT $1",
            limit,
        )
        return [
            QueuedCommand(r["seq"], r["event_id"], RoomID(r["room_id"]), UserID(r["sender"]), json.loads(r["event"]))
            for r in rows
        ]

    async def command_done(self, event_id: str) -> None:
        await self.db.execute("UPDATE command_queue SET done_at=$1 WHERE event_id=$2", now_ms(), event_id)

    async def command_waiting(self, event_id: str) -> bool:
        """Whether a queued command still waits for its reply (true of one cut short by a crash)."""
        return (
            await self.db.fetchval("SELECT event_id FROM command_queue WHERE event_id=$1 AND done_at IS NULL", event_id)
            is not None
        )

    # endregion

    # region appservice transactions
    async def transaction_applied(self, txn_id: str) -> bool:
        """Whether an appservice transaction was applied before (the homeserver sends it again when its answer
        was lost)."""
        return await self.db.fetchval("SELECT txn_id FROM appservice_txn WHERE txn_id=$1", txn_id) is not None

    async def mark_transaction(self, txn_id: str, keep_ms: int = 7 * 86400 * 1000) -> None:
        """Remember an applied transaction; those older than `keep_ms` are forgotten (the homeserver only ever
        sends again the oldest one it has no answer for)."""
        await self.db.execute("DELETE FROM appservice_txn WHERE applied_at < $1", now_ms() - keep_ms)
        await self.db.execute(
            "INSERT INTO appservice_txn (txn_id, applied_at) VALUES ($1, $2) ON CONFLICT (txn_id) DO NOTHING",
            txn_id,
            now_ms(),
        )

    # endregion
