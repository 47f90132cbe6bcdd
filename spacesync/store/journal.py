"""The durable action journal: every planned action is written here before it runs."""

from __future__ import annotations

import json
import secrets
import time
from enum import Enum
from typing import Any, Callable, Iterable

import attrs
from mautrix.util.async_db import Database

from ..model import Action, ActionKind, OwnedLevel, RoomID, UserID


class Status(str, Enum):
    PENDING = "pending"
    HELD = "held"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


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
    return json.dumps({
        "kind": action.kind.value,
        "room_id": action.room_id,
        "user_id": action.user_id,
        "state_key": action.state_key,
        "reason": action.reason,
        "space_id": action.space_id,
        "cause": action.cause,
        "content": action.content,
        "changes": {k: list(v) if isinstance(v, tuple) else v for k, v in action.changes.items()},
        "ownership": {
            u: None if o is None else [o.written, o.previous] for u, o in action.ownership.items()
        },
    })


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

    @classmethod
    def from_row(cls, row: Any) -> Entry:
        return cls(
            id=row["id"], batch=row["batch"], action=decode_action(row["body"]), status=Status(row["status"]),
            attempts=row["attempts"], error=row["error"], created_at=row["created_at"],
        )


@attrs.frozen
class Batch:
    id: str
    trigger: str
    space_id: str | None
    status: str
    created_at: int
    counts: dict[str, int] = attrs.field(factory=dict)


_COLUMNS = "id, batch, body, status, attempts, error, created_at"


class Journal:
    """Action entries and the batches that group them (one batch per trigger or reconcile)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.new_id: Callable[[], str] = new_batch_id

    async def add_new_batch(self, trigger: str, space_id: str | None, actions: Iterable[Action],
                            status: Status) -> str:
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

    async def add_batch(self, batch_id: str, trigger: str, space_id: str | None, actions: Iterable[Action],
                        status: Status, *, claim: bool = False) -> int:
        """Journal actions as a batch; with `claim`, an id already taken writes nothing and returns 0."""
        rows = [
            (batch_id, a.kind.value, a.room_id, a.user_id or a.state_key or "", a.space_id, a.cause, a.reason,
             encode_action(a), status.value, now_ms(), now_ms())
            for a in actions
        ]
        if not rows:
            return 0
        async with self.db.acquire() as conn, conn.transaction():
            conflict = " ON CONFLICT (id) DO NOTHING RETURNING id" if claim else " RETURNING id"
            claimed = await conn.fetchval(
                "INSERT INTO batch (id, trigger, space_id, status, created_at) VALUES ($1, $2, $3, $4, $5)"
                + conflict, batch_id, trigger, space_id, "held" if status is Status.HELD else "open", now_ms(),
            )
            if claimed is None:
                return 0
            await conn.executemany(
                "INSERT INTO journal (batch, kind, room_id, target, space_id, cause, reason, body, status,"
                " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                rows,
            )
        return len(rows)

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
            Status.DONE.value, since_ms,
        )
        return {f"{r['kind']}|{r['room_id']}|{r['target']}" for r in rows}

    async def runnable(self, limit: int = 500) -> list[Entry]:
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM journal WHERE status IN ($1, $2) ORDER BY id LIMIT $3",
            Status.PENDING.value, Status.RUNNING.value, limit,
        )
        return [Entry.from_row(r) for r in rows]

    async def by_status(self, *statuses: Status, limit: int = 1000) -> list[Entry]:
        marks = ", ".join(f"${i + 1}" for i in range(len(statuses)))
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM journal WHERE status IN ({marks}) ORDER BY id LIMIT ${len(statuses) + 1}",
            *[s.value for s in statuses], limit,
        )
        return [Entry.from_row(r) for r in rows]

    async def batch_entries(self, batch_id: str) -> list[Entry]:
        rows = await self.db.fetch(f"SELECT {_COLUMNS} FROM journal WHERE batch=$1 ORDER BY id", batch_id)
        return [Entry.from_row(r) for r in rows]

    async def set_status(self, entry_id: int, status: Status, error: str | None = None,
                         attempt: bool = False) -> None:
        await self.db.execute(
            "UPDATE journal SET status=$1, error=$2, updated_at=$3, attempts=attempts + $4 WHERE id=$5",
            status.value, error, now_ms(), 1 if attempt else 0, entry_id,
        )

    async def set_batch_status(self, batch_id: str, status: str, from_status: Status, to_status: Status) -> int:
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE batch SET status=$1 WHERE id=$2", status, batch_id)
            count = await conn.fetchval(
                "SELECT COUNT(*) FROM journal WHERE batch=$1 AND status=$2", batch_id, from_status.value
            )
            await conn.execute(
                "UPDATE journal SET status=$1, updated_at=$2 WHERE batch=$3 AND status=$4",
                to_status.value, now_ms(), batch_id, from_status.value,
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
            *args, Status.CANCELLED.value, now_ms(),
        )
        return int(count or 0)

    async def batch(self, batch_id: str) -> Batch | None:
        row = await self.db.fetchrow("SELECT * FROM batch WHERE id=$1", batch_id)
        if row is None:
            return None
        counts = await self.db.fetch(
            "SELECT status, COUNT(*) AS n FROM journal WHERE batch=$1 GROUP BY status", batch_id
        )
        return Batch(row["id"], row["trigger"], row["space_id"], row["status"], row["created_at"],
                     {r["status"]: int(r["n"]) for r in counts})

    async def batch_ids_like(self, text: str, limit: int = 6) -> list[str]:
        """The batch `text` names: its exact id, else the ids it is a prefix of (newest first)."""
        if await self.db.fetchval("SELECT id FROM batch WHERE id=$1", text) is not None:
            return [text]
        if len(text) < MIN_BATCH_PREFIX:
            return []
        rows = await self.db.fetch(
            "SELECT id FROM batch WHERE substr(id, 1, $1) = $2 ORDER BY created_at DESC LIMIT $3",
            len(text), text, limit,
        )
        return [r["id"] for r in rows]

    async def batches(self, status: str | None = None, limit: int = 20) -> list[Batch]:
        if status:
            rows = await self.db.fetch(
                "SELECT id FROM batch WHERE status=$1 ORDER BY created_at DESC LIMIT $2", status, limit
            )
        else:
            rows = await self.db.fetch("SELECT id FROM batch ORDER BY created_at DESC LIMIT $1", limit)
        return [b for r in rows if (b := await self.batch(r["id"])) is not None]

    async def depth(self) -> dict[str, int]:
        rows = await self.db.fetch(
            "SELECT status, COUNT(*) AS n FROM journal WHERE status IN ($1, $2, $3) GROUP BY status",
            *[s.value for s in OPEN],
        )
        return {r["status"]: int(r["n"]) for r in rows}
