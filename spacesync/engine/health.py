"""The database as the loops see it: a call retried through an outage, one line when it goes and comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from ..backoff import backoff
from ..metrics import DATABASE_UP
from ..store import unreachable

log = structlog.get_logger("spacesync")
T = TypeVar("T")


class DatabaseHealth:
    """Tracks whether the database answers, so that an outage pauses a loop instead of ending it."""

    def __init__(self) -> None:
        self.up = True

    async def call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """A database call retried with backoff while the database is out of reach; one warning per outage,
        one line when it is back."""
        failures = 0
        while True:
            try:
                result = await call()
            except Exception as e:
                if not unreachable(e):
                    raise
                failures += 1
                self.down(what, e)
                await asyncio.sleep(backoff(failures - 1, cap=10.0))
                continue
            self.back()
            return result

    def down(self, what: str, error: BaseException) -> None:
        if self.up:
            log.warning(
                "database unreachable: retrying with backoff", during=what, error=f"{type(error).__name__}: {error}"
            )
        self.up = False
        DATABASE_UP.set(0)

    def back(self) -> None:
        if not self.up:
            log.info("database reachable again")
        self.up = True
        DATABASE_UP.set(1)
