"""The durable action journal: every planned action is written here before it runs."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

import attrs
from mautrix.util.async_db import Connection, Database

from ..model import Action, ActionKind, LeftBehind, OwnedLevel, RoomID, UserID


class BatchStatus(str, Enum):
    """A batch's own status (its entries have theirs, `Status`)."""

    OPEN = "open"
    HELD = "held"
    RELEASED = "released"
    """Held, then confirmed by a moderator."""
    CANCELLED = "cancelled"


class Status(str, Enum):
    PENDING = "pending"
    HELD = "held"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PARKED = "parked"
    """Failed too often (refused, or 5xx and timeouts): not tried again until its room's state changes or
    a moderator retries it."""
    SUPERSEDED = "superseded"
    """Re-checked just before it was sent: the world no longer called for it (the user rejoined, a moderator's
    ban, a lockdown, state changed since the plan). Never sent."""


OPEN = (Status.PENDING, Status.HELD, Status.RUNNING)


def now_ms() -> int:
    return int(time.time() * 1000)


BATCH_ID_CHARS = 8
"""Hex digits of a batch id: short enough to type, and a moderator may type a unique prefix instead.
Uniqueness does not rest on chance: an id already taken is drawn again (`Journal.add_new_batch`)."""
MIN_BATCH_PREFIX = 4


def new_batch_id() -> str:
    return secrets.token_hex(BATCH_ID_CHARS // 2)


class BatchIdExhausted(Exception):
    """No free batch id after many draws: the id source is broken (never happens with random ids)."""


def encode_action(action: Action) -> str:
    return json.dumps(
        {
            "kind": action.kind.value,
            "room_id": action.room_id,
            "user_id": action.user_id,
            "state_key": action.state_key,
            "reason": action.reason,
            "space_id": action.space_id,
            "cause": action.cause,
            "content": action.content,
            "changes": {k: list(v) if isinstance(v, tuple) else v for k, v in action.changes.items()},
            "ownership": {u: None if o is None else [o.written, o.previous] for u, o in action.ownership.items()},
        }
    )


def decode_action(body: str) -> Action:
    data = json.loads(body)
    room_id = RoomID(data["room_id"])
    return Action(
        kind=ActionKind(data["kind"]),
        room_id=room_id,
        user_id=UserID(data["user_id"]) if data.get("user_id") else None,
        state_key=data.get("state_key"),
        reason=data.get("reason", ""),
        space_id=RoomID(data["space_id"]) if data.get("space_id") else None,
        cause=data.get("cause", ""),
        content=data.get("content"),
        changes={k: tuple(v) if isinstance(v, list) else v for k, v in (data.get("changes") or {}).items()},
        ownership={
            UserID(u): None if o is None else OwnedLevel(room_id, UserID(u), o[0], o[1])
            for u, o in (data.get("ownership") or {}).items()
        },
    )


@attrs.frozen
class Entry:
    id: int
    batch: str
    action: Action
    status: Status
    attempts: int
    error: str | None
    created_at: int
    not_before: int = 0
    """Backing off after a failure: not started before this time (ms)."""
    failures: int = 0
    """Failures so far (refusals, 5xx, timeouts; not rate limits); at executor.max_failures the entry is parked."""
    fingerprint: str | None = None
    """For a parked entry: the room state it failed against."""

    @classmethod
    def from_row(cls, row: Any) -> Entry:
        return cls(
            id=row["id"],
            batch=row["batch"],
            action=decode_action(row["body"]),
            status=Status(row["status"]),
            attempts=row["attempts"],
            error=row["error"],
            created_at=row["created_at"],
            not_before=row["not_before"] or 0,
            failures=row["failures"] or 0,
            fingerprint=row["fingerprint"],
        )


@attrs.frozen
class Batch:
    id: str
    trigger: str
    space_id: str | None
    status: str
    created_at: int
    counts: dict[str, int] = attrs.field(factory=dict)


_COLUMNS = "id, batch, body, status, attempts, error, created_at, not_before, failures, fingerprint"
EVICTION_KINDS = ("kick", "ban")


_INSERT_JOURNAL = (
    "INSERT INTO journal (batch, kind, room_id, target, space_id, cause, reason, body, status,"
    " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
)


ROWS_PER_INSERT = 1000


def _journal_rows(batch_id: str, actions: Iterable[Action], status: Status) -> list[tuple[Any, ...]]:
    """The journal rows of actions joining a batch, in _INSERT_JOURNAL's column order."""
    return [
        (
            batch_id,
            a.kind.value,
            a.room_id,
            a.user_id or a.state_key or "",
            a.space_id,
            a.cause,
            a.reason,
            encode_action(a),
            status.value,
            now_ms(),
            now_ms(),
        )
        for a in actions
    ]


class Journal:
    """Action entries and the batches that group them (one batch per trigger or reconcile)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.new_id: Callable[[], str] = new_batch_id

    async def add_new_batch(self, trigger: str, space_id: str | None, actions: Iterable[Action], status: Status) -> str:
        """Journal actions as a batch under a fresh id, unique among all batches ever made: the id is
        claimed in the same transaction as the entries, and drawn again if taken."""
        actions = list(actions)
        if not actions:
            raise ValueError("a batch needs at least one action")
        for _ in range(100):
            batch_id = self.new_id()
            if await self.add_batch(batch_id, trigger, space_id, actions, status, claim=True):
                return batch_id
        raise BatchIdExhausted("no free batch id after 100 draws")

    async def add_batch(
        self,
        batch_id: str,
        trigger: str,
        space_id: str | None,
        actions: Iterable[Action],
        status: Status,
        *,
        claim: bool = False,
    ) -> int:
        """Journal actions as a batch; with `claim`, an id already taken writes nothing and returns 0."""
        actions = list(actions)
        if not actions:
            return 0
        conn: Connection
        async with self.db.acquire() as conn, conn.transaction():
            conflict = " ON CONFLICT (id) DO NOTHING RETURNING id" if claim else " RETURNING id"
            claimed = await conn.fetchval(
                "INSERT INTO batch (id, trigger, space_id, status, created_at) VALUES ($1, $2, $3, $4, $5)" + conflict,
                batch_id,
                trigger,
                space_id,
                (BatchStatus.HELD if status is Status.HELD else BatchStatus.OPEN).value,
                now_ms(),
            )
            if claimed is None:
                return 0
            # A held exodus can be 100,000 entries: encoded a chunk at a time, not all held at once.
            for start in range(0, len(actions), ROWS_PER_INSERT):
                chunk = actions[start : start + ROWS_PER_INSERT]
                await conn.executemany(_INSERT_JOURNAL, _journal_rows(batch_id, chunk, status))
        return len(actions)

    async def open_keys(self) -> set[str]:
        """Keys (kind|room|target) of every action not yet finished, to avoid enqueuing one twice."""
        rows = await self.db.fetch(
            "SELECT kind, room_id, target FROM journal WHERE status IN ($1, $2, $3)", *[s.value for s in OPEN]
        )
        return {f"{r['kind']}|{r['room_id']}|{r['target']}" for r in rows}

    async def done_keys_since(self, since_ms: int) -> set[str]:
        """Keys of actions done since `since_ms`: a plan made from state read before then may repeat them."""
        rows = await self.db.fetch(
            "SELECT kind, room_id, target FROM journal WHERE status = $1 AND updated_at >= $2",
            Status.DONE.value,
            since_ms,
        )
        return {f"{r['kind']}|{r['room_id']}|{r['target']}" for r in rows}

    async def runnable(self, limit: int = 500, now: int | None = None) -> list[Entry]:
        """Entries to run now: pending or interrupted, and not backing off."""
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM journal WHERE status IN ($1, $2) AND not_before <= $3 ORDER BY id LIMIT $4",
            Status.PENDING.value,
            Status.RUNNING.value,
            now_ms() if now is None else now,
            limit,
        )
        return [Entry.from_row(r) for r in rows]

    async def claim(self, entry_id: int, error: str | None) -> bool:
        """Mark a runnable entry running (one more attempt); False when it is no longer runnable (finished,
        cancelled or held since it was read), so it must not run."""
        claimed = await self.db.fetchval(
            "UPDATE journal SET status=$1, error=$2, updated_at=$3, attempts=attempts + 1"
            " WHERE id=$4 AND status IN ($1, $5) RETURNING id",
            Status.RUNNING.value,
            error,
            now_ms(),
            entry_id,
            Status.PENDING.value,
        )
        return claimed is not None

    async def next_due(self) -> int | None:
        """The earliest time (ms) a backing-off entry may run, if any is waiting."""
        value = await self.db.fetchval(
            "SELECT MIN(not_before) FROM journal WHERE status = $1 AND not_before > $2",
            Status.PENDING.value,
            now_ms(),
        )
        return int(value) if value is not None else None

    async def back_off(self, entry_id: int, error: str, not_before: int, *, refused: bool) -> None:
        """Back to pending, not before `not_before`; a refusal (4xx) counts toward parking."""
        await self.db.execute(
            "UPDATE journal SET status=$1, error=$2, not_before=$3, failures=failures + $4, updated_at=$5 WHERE id=$6",
            Status.PENDING.value,
            error,
            not_before,
            1 if refused else 0,
            now_ms(),
            entry_id,
        )

    async def park(self, entry_id: int, error: str, fingerprint: str) -> None:
        await self.db.execute(
            "UPDATE journal SET status=$1, error=$2, fingerprint=$3, failures=failures + 1, updated_at=$4 WHERE id=$5",
            Status.PARKED.value,
            error,
            fingerprint,
            now_ms(),
            entry_id,
        )

    async def parked(self, batch_id: str | None = None, limit: int = 1000) -> list[Entry]:
        if batch_id is None:
            rows = await self.db.fetch(
                f"SELECT {_COLUMNS} FROM journal WHERE status=$1 ORDER BY id LIMIT $2", Status.PARKED.value, limit
            )
        else:
            rows = await self.db.fetch(
                f"SELECT {_COLUMNS} FROM journal WHERE status=$1 AND batch=$2 ORDER BY id",
                Status.PARKED.value,
                batch_id,
            )
        return [Entry.from_row(r) for r in rows]

    async def parked_fingerprints(self) -> dict[str, str]:
        """Key -> fingerprint of every parked action: the plan lets one through only once its state changed."""
        rows = await self.db.fetch(
            "SELECT kind, room_id, target, fingerprint FROM journal WHERE status=$1 ORDER BY id",
            Status.PARKED.value,
        )
        return {f"{r['kind']}|{r['room_id']}|{r['target']}": r["fingerprint"] or "" for r in rows}

    async def close_parked(self, keys: Iterable[str]) -> None:
        """Parked entries superseded by a new attempt (their room's state changed): they end as failed."""
        rows = []
        for key in keys:
            kind, room_id, target = key.split("|", 2)
            rows.append((Status.FAILED.value, now_ms(), kind, room_id, target, Status.PARKED.value))
        if rows:
            await self.db.executemany(
                "UPDATE journal SET status=$1, updated_at=$2 WHERE kind=$3 AND room_id=$4 AND target=$5 AND status=$6",
                rows,
            )

    async def unpark(self, batch_id: str | None = None) -> list[Entry]:
        """Parked entries (of one batch, or all) back to pending with a fresh count of failures. They count
        as having waited (`not_before` set): the executor re-plans them before they run."""
        entries = await self.parked(batch_id)
        if entries:
            await self.db.executemany(
                "UPDATE journal SET status=$1, failures=0, not_before=$2, fingerprint=NULL, updated_at=$2"
                " WHERE id=$3 AND status=$4",
                [(Status.PENDING.value, now_ms(), e.id, Status.PARKED.value) for e in entries],
            )
        return entries

    async def first_notice(self, key: str) -> bool:
        """Record a notice about `key`; False when one was already sent (one notice per action and reason)."""
        result = await self.db.fetchval(
            "INSERT INTO notice_sent (key, ts) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING RETURNING key",
            key,
            now_ms(),
        )
        return result is not None

    async def forget_notices(self, prefixes: Iterable[str]) -> None:
        """Allow notices about these actions again (a moderator asked to retry them)."""
        for prefix in prefixes:
            await self.db.execute("DELETE FROM notice_sent WHERE key LIKE $1", prefix + "%")

    async def evicted_users_since(self, space_id: str, since_ms: int) -> set[str]:
        """Users with an eviction from the Space journaled since `since_ms` that is queued, running or done.
        Held ones are not evicted (yet); ones a moderator confirmed from a held batch were counted there."""
        rows = await self.db.fetch(
            "SELECT DISTINCT j.target FROM journal j JOIN batch b ON b.id = j.batch"
            " WHERE j.space_id=$1 AND j.kind IN ($2, $3) AND j.status IN ($4, $5, $6) AND j.created_at >= $7"
            " AND b.status <> $8",
            space_id,
            *EVICTION_KINDS,
            Status.PENDING.value,
            Status.RUNNING.value,
            Status.DONE.value,
            since_ms,
            BatchStatus.RELEASED.value,
        )
        return {r["target"] for r in rows}

    async def held_users(self, space_id: str) -> set[str]:
        """Users the Space's held evictions wait to evict: the guard counts them as evicted."""
        rows = await self.db.fetch(
            "SELECT DISTINCT target FROM journal WHERE space_id=$1 AND kind IN ($2, $3) AND status=$4",
            space_id,
            *EVICTION_KINDS,
            Status.HELD.value,
        )
        return {r["target"] for r in rows}

    async def open_held_batch(self, space_id: str | None) -> str | None:
        """The Space's newest held batch that still holds something: new held evictions join it."""
        where, args = ("b.space_id IS NULL", ()) if space_id is None else ("b.space_id = $2", (space_id,))
        row = await self.db.fetchrow(
            f"SELECT b.id FROM batch b WHERE b.status='held' AND {where}"
            " AND EXISTS (SELECT 1 FROM journal j WHERE j.batch=b.id AND j.status=$1)"
            " ORDER BY b.created_at DESC LIMIT 1",
            Status.HELD.value,
            *args,
        )
        return row["id"] if row is not None else None

    async def add_to_batch(self, batch_id: str, actions: Iterable[Action], status: Status) -> int:
        rows = _journal_rows(batch_id, actions, status)
        if rows:
            await self.db.executemany(
                _INSERT_JOURNAL,
                rows,
            )
        return len(rows)

    async def by_status(self, *statuses: Status, limit: int = 1000) -> list[Entry]:
        marks = ", ".join(f"${i + 1}" for i in range(len(statuses)))
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM journal WHERE status IN ({marks}) ORDER BY id LIMIT ${len(statuses) + 1}",
            *[s.value for s in statuses],
            limit,
        )
        return [Entry.from_row(r) for r in rows]

    async def batch_entries(self, batch_id: str) -> list[Entry]:
        rows = await self.db.fetch(f"SELECT {_COLUMNS} FROM journal WHERE batch=$1 ORDER BY id", batch_id)
        return [Entry.from_row(r) for r in rows]

    async def set_status(self, entry_id: int, status: Status, error: str | None = None, attempt: bool = False) -> None:
        await self.db.execute(
            "UPDATE journal SET status=$1, error=$2, updated_at=$3, attempts=attempts + $4 WHERE id=$5",
            status.value,
            error,
            now_ms(),
            1 if attempt else 0,
            entry_id,
        )

    async def set_batch_status(self, batch_id: str, status: BatchStatus, from_status: Status, to_status: Status) -> int:
        conn: Connection
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE batch SET status=$1 WHERE id=$2", status.value, batch_id)
            count = await conn.fetchval(
                "SELECT COUNT(*) FROM journal WHERE batch=$1 AND status=$2", batch_id, from_status.value
            )
            await conn.execute(
                "UPDATE journal SET status=$1, updated_at=$2 WHERE batch=$3 AND status=$4",
                to_status.value,
                now_ms(),
                batch_id,
                from_status.value,
            )
        return int(count or 0)

    async def set_statuses(self, entry_ids: list[int], status: Status) -> None:
        if entry_ids:
            await self.db.executemany(
                "UPDATE journal SET status=$1, updated_at=$2 WHERE id=$3",
                [(status.value, now_ms(), entry_id) for entry_id in entry_ids],
            )

    async def cancel_evictions_of(self, target: str) -> int:
        """Drop pending and held kicks and bans of one user (for instance, once they are exempt)."""
        where = "target=$1 AND status IN ($2, $3) AND kind IN ('kick', 'ban')"
        args = (target, Status.PENDING.value, Status.HELD.value)
        count = await self.db.fetchval(f"SELECT COUNT(*) FROM journal WHERE {where}", *args)
        await self.db.execute(
            f"UPDATE journal SET status=${len(args) + 1}, updated_at=${len(args) + 2} WHERE {where}",
            *args,
            Status.CANCELLED.value,
            now_ms(),
        )
        return int(count or 0)

    async def batch(self, batch_id: str) -> Batch | None:
        row = await self.db.fetchrow("SELECT * FROM batch WHERE id=$1", batch_id)
        if row is None:
            return None
        counts = await self.db.fetch(
            "SELECT status, COUNT(*) AS n FROM journal WHERE batch=$1 GROUP BY status", batch_id
        )
        return Batch(
            row["id"],
            row["trigger"],
            row["space_id"],
            row["status"],
            row["created_at"],
            {r["status"]: int(r["n"]) for r in counts},
        )

    async def batch_ids_like(self, text: str, limit: int = 6) -> list[str]:
        """The batch `text` names: its exact id, else the ids it is a prefix of (newest first)."""
        if await self.db.fetchval("SELECT id FROM batch WHERE id=$1", text) is not None:
            return [text]
        if len(text) < MIN_BATCH_PREFIX:
            return []
        rows = await self.db.fetch(
            "SELECT id FROM batch WHERE substr(id, 1, $1) = $2 ORDER BY created_at DESC LIMIT $3",
            len(text),
            text,
            limit,
        )
        return [r["id"] for r in rows]

    async def batches(self, status: BatchStatus | None = None, limit: int = 20) -> list[Batch]:
        if status is not None:
            rows = await self.db.fetch(
                "SELECT id FROM batch WHERE status=$1 ORDER BY created_at DESC LIMIT $2", status, limit
            )
        else:
            rows = await self.db.fetch("SELECT id FROM batch ORDER BY created_at DESC LIMIT $1", limit)
        return [b for r in rows if (b := await self.batch(r["id"])) is not None]

    async def set_left_behind(self, batch_id: str, left: Iterable[LeftBehind]) -> None:
        """Remember who the batch's evictions had to leave in place, for its notice."""
        data = [item.to_json() for item in left]
        if data:
            await self.db.execute("UPDATE batch SET left_behind=$1 WHERE id=$2", json.dumps(data), batch_id)

    async def left_behind(self, batch_id: str) -> list[LeftBehind]:
        raw = await self.db.fetchval("SELECT left_behind FROM batch WHERE id=$1", batch_id)
        return [LeftBehind.from_json(item) for item in json.loads(raw)] if raw else []

    async def mark_announced(self, batch_id: str) -> bool:
        """Mark the batch's notice as posted; False when it already was, so each batch is announced once."""
        if await self.db.fetchval("SELECT announced FROM batch WHERE id=$1", batch_id):
            return False
        await self.db.execute("UPDATE batch SET announced=true WHERE id=$1", batch_id)
        return True

    async def depth(self) -> dict[str, int]:
        rows = await self.db.fetch(
            "SELECT status, COUNT(*) AS n FROM journal WHERE status IN ($1, $2, $3, $4) GROUP BY status",
            *[s.value for s in OPEN],
            Status.PARKED.value,
        )
        return {r["status"]: int(r["n"]) for r in rows}
