"""The reconcile timer: full reconciles at start and every interval, quick ones (from the cache) on triggers."""

from __future__ import annotations

import asyncio
import time

import structlog

from ..config import Config
from ..matrix.errors import REQUEST_ERRORS
from ..metrics import JOURNAL_DEPTH
from ..store import Store, unreachable
from .executor import Executor
from .health import DatabaseHealth
from .invites import Invites
from .reconciler import CLOCK_MARGIN_MS, Reconciler

log = structlog.get_logger("spacesync")


class ReconcileTimer:
    """Runs the reconciler when asked (request()) and on schedule, and acts on what each run returns."""

    def __init__(
        self,
        config: Config,
        store: Store,
        reconciler: Reconciler,
        executor: Executor,
        invites: Invites,
        health: DatabaseHealth,
    ) -> None:
        self.config = config
        self.store = store
        self.reconciler = reconciler
        self.executor = executor
        self.invites = invites
        self.health = health
        self._trigger = asyncio.Event()
        self._full = asyncio.Event()

    def request(self, *, full: bool) -> None:
        (self._full if full else self._trigger).set()

    def clear(self) -> None:
        self._trigger.clear()
        self._full.clear()

    async def run(self) -> None:
        next_full = time.monotonic()
        while True:
            timeout = max(0.0, next_full - time.monotonic())
            waiters = [asyncio.create_task(self._full.wait()), asyncio.create_task(self._trigger.wait())]
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            full = self._full.is_set() or time.monotonic() >= next_full
            self._full.clear()
            self._trigger.clear()
            try:
                # Full reconciles from here read only the rooms that need it and a rolling slice of the rest.
                result = await self.reconciler.reconcile(
                    "reconcile" if full else "sync", refresh=full, everything=False
                )
                if full and not self.executor.ready.is_set():
                    self.executor.ready.set()  # the state cache is filled: journaled entries can be re-checked
                    self.executor.wake()
                if full and self.invites.pending:
                    await self.invites.accept()
                if result.recheck_soon:
                    asyncio.get_running_loop().call_later(CLOCK_MARGIN_MS / 1000 + 0.5, self._trigger.set)
            except REQUEST_ERRORS as e:
                log.warning("reconcile failed: retrying soon", error=f"{type(e).__name__}: {e}")
                next_full = time.monotonic() + 10
                continue
            except Exception as e:
                if unreachable(e):
                    self.health.down("reconcile", e)
                    next_full = time.monotonic() + 5
                    continue
                log.error(
                    "reconcile failed unexpectedly: retrying soon", error=f"{type(e).__name__}: {e}", exc_info=True
                )
                next_full = time.monotonic() + 30
                continue
            if full:
                next_full = time.monotonic() + self.config.reconcile_interval
            if result.requeue_at_ms is not None:
                next_full = min(next_full, time.monotonic() + max(0.5, result.requeue_at_ms / 1000 - time.time()))
            await self._update_depth()

    async def _update_depth(self) -> None:
        try:
            depth = await self.store.journal.depth()
        except Exception as e:
            if not unreachable(e):
                raise
            self.health.down("journal depth", e)
            return
        for status in ("pending", "running", "held"):
            JOURNAL_DEPTH.labels(status=status).set(depth.get(status, 0))
