"""The bot's own records: bans it placed, levels it wrote, rooms it locked down, ACL entries and policy server state
it added, the memberships it saw; and their move with a verified room upgrade."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs
from mautrix.util.async_db import Connection, Database

from ..model import Lockdown, OwnedLevel, PlacedBan, RoomID, UserID
from .journal import now_ms


@attrs.frozen
class SeenMembership:
    """The last membership event spacesync saw for a user in a managed Space."""

    event_id: str
    membership: str
    was_joined: bool | None
    """For any membership but a join: whether the user departed (had joined and not joined since: sticky through
    knocks, invites and their refusal); None while nobody could tell."""
    seen_at: int
    """When spacesync first saw this event, in milliseconds on its own clock."""


_ROOM_RECORDS = (
    ("owned_level", "user_id, written, previous, released", "room_id, user_id"),
    ("lockdown", "space_id, previous, written, locked_at", "room_id"),
    ("owned_acl", "entry", "room_id, entry"),
    ("owned_policy", "event_type, written", "room_id, event_type"),
)
"""Per-room records that move with a verified upgrade: table, columns besides room_id, conflict key."""


class Records:
    """The record tables, over the store's database."""

    db: Database

    async def placed_bans(self) -> frozenset[PlacedBan]:
        rows = await self.db.fetch("SELECT room_id, user_id, cause FROM placed_ban")
        return frozenset(PlacedBan(RoomID(r["room_id"]), UserID(r["user_id"]), r["cause"]) for r in rows)

    async def add_placed_ban(self, ban: PlacedBan) -> None:
        await self.db.execute(
            "INSERT INTO placed_ban (room_id, user_id, cause) VALUES ($1, $2, $3)"
            " ON CONFLICT (room_id, user_id) DO UPDATE SET cause=excluded.cause",
            ban.room_id,
            ban.user_id,
            ban.cause,
        )

    async def forget_ban(self, room_id: RoomID, user_id: UserID) -> None:
        await self.db.execute("DELETE FROM placed_ban WHERE room_id=$1 AND user_id=$2", room_id, user_id)

    async def owned_levels(self) -> dict[tuple[RoomID, UserID], OwnedLevel]:
        rows = await self.db.fetch("SELECT room_id, user_id, written, previous, released FROM owned_level")
        return {
            (RoomID(r["room_id"]), UserID(r["user_id"])): OwnedLevel(
                RoomID(r["room_id"]), UserID(r["user_id"]), r["written"], r["previous"], bool(r["released"])
            )
            for r in rows
        }

    async def set_owned_level(self, room_id: RoomID, user_id: UserID, owned: OwnedLevel | None) -> None:
        if owned is None:
            await self.db.execute("DELETE FROM owned_level WHERE room_id=$1 AND user_id=$2", room_id, user_id)
            return
        await self.db.execute(
            "INSERT INTO owned_level (room_id, user_id, written, previous, released) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (room_id, user_id) DO UPDATE SET written=excluded.written, previous=excluded.previous,"
            " released=excluded.released",
            room_id,
            user_id,
            owned.written,
            owned.previous,
            owned.released,
        )

    async def lockdowns(self) -> dict[RoomID, Lockdown]:
        rows = await self.db.fetch("SELECT room_id, space_id, previous, written FROM lockdown")
        return {
            RoomID(r["room_id"]): Lockdown(
                RoomID(r["room_id"]), RoomID(r["space_id"]), json.loads(r["previous"]), r["written"]
            )
            for r in rows
        }

    async def set_lockdown(self, room_id: RoomID, lockdown: Lockdown | None) -> None:
        """Remember a room spacesync locked down (None: forget it, it was unlocked)."""
        if lockdown is None:
            await self.db.execute("DELETE FROM lockdown WHERE room_id=$1", room_id)
            return
        await self.db.execute(
            "INSERT INTO lockdown (room_id, space_id, previous, written, locked_at) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (room_id) DO UPDATE SET space_id=excluded.space_id, written=excluded.written,"
            " previous=excluded.previous, locked_at=excluded.locked_at",
            room_id,
            lockdown.space_id,
            json.dumps(dict(lockdown.previous)),
            lockdown.written,
            now_ms(),
        )

    async def owned_acl(self) -> dict[RoomID, frozenset[str]]:
        owned: dict[RoomID, set[str]] = {}
        for r in await self.db.fetch("SELECT room_id, entry FROM owned_acl"):
            owned.setdefault(RoomID(r["room_id"]), set()).add(r["entry"])
        return {room_id: frozenset(entries) for room_id, entries in owned.items()}

    async def set_owned_acl(self, room_id: RoomID, entries: frozenset[str]) -> None:
        """The server ACL deny entries spacesync added to a room, as they are now."""
        conn: Connection
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM owned_acl WHERE room_id=$1", room_id)
            for entry in sorted(entries):
                await conn.execute("INSERT INTO owned_acl (room_id, entry) VALUES ($1, $2)", room_id, entry)

    async def owned_policy(self) -> dict[tuple[RoomID, str], dict[str, Any]]:
        rows = await self.db.fetch("SELECT room_id, event_type, written FROM owned_policy")
        return {(RoomID(r["room_id"]), r["event_type"]): json.loads(r["written"]) for r in rows}

    async def set_owned_policy(self, room_id: RoomID, event_type: str, written: Mapping[str, Any] | None) -> None:
        """The policy server state spacesync wrote into a room (None: nothing of its own there any more)."""
        if written is None:
            await self.db.execute("DELETE FROM owned_policy WHERE room_id=$1 AND event_type=$2", room_id, event_type)
            return
        await self.db.execute(
            "INSERT INTO owned_policy (room_id, event_type, written) VALUES ($1, $2, $3)"
            " ON CONFLICT (room_id, event_type) DO UPDATE SET written=excluded.written",
            room_id,
            event_type,
            json.dumps(dict(written)),
        )

    async def member_history(self) -> dict[tuple[RoomID, UserID], SeenMembership]:
        rows = await self.db.fetch(
            "SELECT room_id, user_id, event_id, membership, was_joined, seen_at FROM member_history"
        )
        return {
            (RoomID(r["room_id"]), UserID(r["user_id"])): SeenMembership(
                r["event_id"],
                r["membership"],
                None if r["was_joined"] is None else bool(r["was_joined"]),
                int(r["seen_at"]),
            )
            for r in rows
        }

    async def save_member_history(self, rows: dict[tuple[RoomID, UserID], SeenMembership]) -> None:
        if not rows:
            return
        await self.db.executemany(
            "INSERT INTO member_history (room_id, user_id, event_id, membership, was_joined, seen_at)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (room_id, user_id) DO UPDATE SET"
            " event_id=excluded.event_id, membership=excluded.membership, was_joined=excluded.was_joined,"
            " seen_at=excluded.seen_at",
            [
                (room_id, user_id, s.event_id, s.membership, s.was_joined, s.seen_at)
                for (room_id, user_id), s in rows.items()
            ],
        )

    async def move_room_records(self, old: RoomID, new: RoomID) -> None:
        """After a verified room upgrade, what spacesync owns in the old room is its own in the new one: the levels
        it wrote, its lockdown (with the join rules from before), its server ACL entries and the policy server it
        wrote. The homeserver copies that state into the replacement; without its records nobody would remove it.
        A record the new room has already is kept."""
        conn: Connection
        async with self.db.acquire() as conn, conn.transaction():
            for table, columns, key in _ROOM_RECORDS:
                await conn.execute(
                    f"INSERT INTO {table} (room_id, {columns}) SELECT $1, {columns} FROM {table} WHERE room_id=$2"
                    f" ON CONFLICT ({key}) DO NOTHING",
                    new,
                    old,
                )
                await conn.execute(f"DELETE FROM {table} WHERE room_id=$1", old)
