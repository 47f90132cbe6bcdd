"""Leadership: only one instance acts. On PostgreSQL a second one stands by and takes over when the lock is
free; on SQLite a second one refuses to start."""

from __future__ import annotations

import asyncio

import structlog

from ..config import Config
from ..metrics import DATABASE_UP, IS_LEADER
from ..store import Store
from .errors import FatalError

log = structlog.get_logger("spacesync")
STANDBY_POLL_S = 2.0
LEADERSHIP_CHECK_S = 1.0


class Leadership:
    """Takes, confirms and gives up the store's leadership lock."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.leader = False
        self.stood_down = False
        """Once led and stood down: taking the lock again is a takeover."""
        self.lost = asyncio.Event()
        """Set once the leadership lock can no longer be confirmed: the instance stands down."""

    async def _try(self) -> bool:
        taken = await self.store.try_leadership()
        DATABASE_UP.set(0 if self.store.lock_error is not None else 1)  # the store logs the outage once
        return taken

    def _lead(self) -> bool:
        self.leader = True
        IS_LEADER.set(1)
        return True

    async def become_leader(self, stopping: asyncio.Event) -> bool:
        """Take the lock, standing by until it is free; False when stopped first."""
        if await self._try():
            if self.stood_down:
                log.info("taking over: the leadership lock is free again")
            return self._lead()
        if not self.store.is_postgres:
            raise FatalError(
                f"database.url: {self.config.database.safe_url} is in use by another spacesync "
                "instance; stop it first (standby needs PostgreSQL)"
            )
        log.info(
            "standing by: another instance is active"
            if self.store.lock_error is None
            else "standing by: the database is unreachable"
        )
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), STANDBY_POLL_S)
                return False
            except TimeoutError:
                pass
            if await self._try():
                log.info("taking over: no other instance holds the lock")
                return self._lead()
        return False

    @property
    def standby_reason(self) -> str:
        if self.store.lock_error is not None:
            return "standing by: the database is unreachable, cannot take the leadership lock"
        return "standing by: another instance is active"

    async def confirm(self) -> bool:
        """Whether this instance still holds the lock, asked before every action. Unconfirmed counts as lost:
        PostgreSQL frees an advisory lock with its connection, and a standby may hold it by now."""
        if not self.lost.is_set() and await self.store.holds_leadership():
            return True
        if not self.lost.is_set():
            self.leader = False
            IS_LEADER.set(0)
            self.lost.set()
        return False

    async def keep(self) -> None:
        """Notice a lost lock within LEADERSHIP_CHECK_S even when nothing is being done."""
        while await self.confirm():
            await asyncio.sleep(LEADERSHIP_CHECK_S)

    def stand_down(self) -> None:
        """Stop counting as leader at once (the caller stops the loops, then calls release())."""
        self.leader = False
        self.stood_down = True
        IS_LEADER.set(0)

    async def release(self) -> None:
        await self.store.release_leadership()
