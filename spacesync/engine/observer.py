"""Reads the world into a Snapshot: walks the Spaces the bot is in, one /state request per room."""

from __future__ import annotations

import asyncio
import time

import structlog
from mautrix.errors import MatrixRequestError

from ..core.graph import RESTRICTED_RULES
from ..matrix import MatrixAdapter, StateCache
from ..model import Policy, RoomID, Snapshot
from ..store import Store

log = structlog.get_logger("spacesync.observer")


class Observer:
    """Breadth-first from the roots: read each joined room's state, follow Space children and allow lists."""

    def __init__(self, matrix: MatrixAdapter, cache: StateCache, store: Store, *, max_seconds: float = 120,
                 concurrency: int = 8) -> None:
        self.matrix = matrix
        self.cache = cache
        self.store = store
        self.max_seconds = max_seconds
        self._sem = asyncio.Semaphore(concurrency)
        self.joined: set[RoomID] = set()
        self.seen: set[RoomID] = set()
        """Every room the last walk reached: the roots, their descendants and allow-list rooms."""
        self.requests = 0
        self._join_attempted: set[RoomID] = set()

    async def observe(self, policy: Policy, *, refresh: bool) -> Snapshot:
        """A snapshot of every room reachable from the roots. `refresh` re-reads state; else the cache serves."""
        deadline = time.monotonic() + self.max_seconds
        if refresh or not self.joined:
            self.joined = await self.matrix.joined_rooms()
            self.requests += 1
        unreachable: dict[RoomID, str] = {}
        visited: set[RoomID] = set()
        frontier = [s.room_id for s in policy.spaces]
        depth = 0
        while frontier and len(visited) < policy.max_rooms:
            level = [r for r in dict.fromkeys(frontier) if r not in visited][: policy.max_rooms - len(visited)]
            visited.update(level)
            if time.monotonic() > deadline:
                for room_id in level:
                    unreachable[room_id] = f"walk time cap {self.max_seconds:.0f}s reached"
                break
            await self._auto_join(policy, [r for r in level if r not in self.joined])
            await asyncio.gather(*(self._load(r, refresh, unreachable) for r in level))
            frontier = []
            if depth >= policy.max_depth:
                break
            for room_id in level:
                room = self.cache.get(room_id)
                if room is None:
                    continue
                if room.is_space or room_id in frontier or any(s.room_id == room_id for s in policy.spaces):
                    frontier.extend(room.children)
                frontier.extend(room.allow)
                space = policy.space(room_id)
                if space is not None:
                    frontier.extend(space.extra_rooms)
                if room.tombstone:
                    frontier.append(room.tombstone)
            depth += 1
        self.seen = visited
        rooms = {r: self.cache.get(r) for r in visited if r in self.cache and r not in unreachable}
        return Snapshot(
            rooms={r: s for r, s in rooms.items() if s is not None},
            unreachable=unreachable,
            placed_bans=await self.store.placed_bans(),
            owned_levels=await self.store.owned_levels(),
            now_ms=int(time.time() * 1000),
        )

    async def _load(self, room_id: RoomID, refresh: bool, unreachable: dict[RoomID, str]) -> None:
        if room_id not in self.joined:
            self.cache.forget(room_id)
            unreachable[room_id] = "the bot is not joined: invite it or make the room restricted to the Space"
            return
        if not refresh and room_id in self.cache:
            return
        async with self._sem:
            try:
                events = await self.matrix.room_state(room_id)
                self.requests += 1
            except MatrixRequestError as e:
                unreachable[room_id] = f"state unreadable: {e.http_status} {getattr(e, 'errcode', '')}"
                self.cache.forget(room_id)
                return
            except (ValueError, asyncio.TimeoutError) as e:
                unreachable[room_id] = f"state unreadable: {e}"
                return
        self.cache.replace(room_id, events)

    async def _auto_join(self, policy: Policy, rooms: list[RoomID]) -> None:
        """Join children that opted in by their join rule (the hierarchy API shows their allow list)."""
        pending = [r for r in rooms if r not in self._join_attempted]
        if not pending:
            return
        managed_spaces = {s.room_id for s in policy.spaces}
        extra = {r for s in policy.spaces for r in s.extra_rooms}
        for root in sorted(managed_spaces & self.joined):
            try:
                entries = await self.matrix.hierarchy(root, policy.max_depth, policy.max_rooms)
                self.requests += 1
            except (MatrixRequestError, asyncio.TimeoutError) as e:
                log.warning("hierarchy unreadable", room=root, error=str(e))
                continue
            spaces_seen = {e["room_id"] for e in entries if e.get("room_type") == "m.space"} | managed_spaces
            for entry in entries:
                room_id = RoomID(entry["room_id"])
                if room_id not in pending or room_id in self._join_attempted:
                    continue
                allowed = set(entry.get("allowed_room_ids") or ())
                opted = room_id in extra or (entry.get("join_rule") in RESTRICTED_RULES and allowed & spaces_seen)
                if not opted:
                    continue
                self._join_attempted.add(room_id)
                try:
                    await self.matrix.join(room_id, [root.split(":", 1)[-1]] if ":" in root else None)
                    self.joined.add(room_id)
                    log.info("joined opted-in room", room=room_id)
                except MatrixRequestError as e:
                    log.warning("could not join opted-in room", room=room_id, error=getattr(e, "message", str(e)))
