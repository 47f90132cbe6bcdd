"""One writer's bucket: every write of the bot (kicks, bans, state, notices) draws on one homeserver budget
(Synapse's `rc_message`). Once the homeserver answers a write with 429, a rate-limit *episode* begins: from
then on writes pass one at a time through the `WriteGate`, each in the next slot the homeserver grants, notices
(command replies, held-batch notices) ahead of queued actions. The episode ends once no write has waited for a
while, so the homeserver's bucket has filled again."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import Enum, IntEnum
from typing import Final, TypeVar
from urllib.parse import quote

import attrs
import structlog
from mautrix.errors import MatrixRequestError

from .http import retry_after_ms

log = structlog.get_logger("spacesync.matrix")
T = TypeVar("T")

SLOT_MARGIN_S: Final = 0.05
"""Sent this long after the slot opens: the homeserver rounds `retry_after_ms` down."""
QUIET_S: Final = 30.0
"""An episode ends after this long (or three slots, if longer) without a write waiting or a 429."""
REPORT_AFTER: Final = 3
"""Refusals within one episode before it counts as 'writes keep meeting 429s' (one notice, one log line) ..."""
REPORT_AFTER_S: Final = 10.0
"""... or this long of an episode with writes still waiting for their slots."""
MIN_INTERVAL_S: Final = 0.01
MAX_INTERVAL_S: Final = 120.0


class LostLeadership(Exception):
    """This instance can no longer confirm that it leads: it sends nothing more."""


class WritePriority(IntEnum):
    """Who goes first through the gate during an episode (lower first)."""

    NOTICE = 0
    """Admin-room notices: command replies, held batches, reports."""
    ACTION = 1
    """Actions from the journal: kicks, bans, state writes, redactions."""


class ServerKind(str, Enum):
    """What lifts the bot's rate limit depends on the homeserver."""

    SYNAPSE = "synapse"
    OTHER = "other"
    UNKNOWN = "unknown"


@attrs.define
class Episode:
    """From a write's first 429 until the writes have been quiet for a while."""

    number: int
    started: float
    """Monotonic."""
    started_wall: float
    interval: float
    """Seconds between writes the homeserver grants, from its `retry_after_ms` and the last success."""
    refusals: int = 0
    writes: int = 0
    """Writes that went through during the episode."""
    reported: bool = False

    @property
    def granted_rate(self) -> float:
        """Writes per second the homeserver grants."""
        return 1.0 / self.interval


class WriteGate:
    """Serialises writes during a rate-limit episode, in priority order, one per granted slot."""

    def __init__(self, *, on_report: Callable[[Episode], None] | None = None) -> None:
        self.on_report = on_report
        """Called once per episode when writes keep meeting 429s (REPORT_AFTER refusals)."""
        self.paused_until = 0.0
        """Monotonic: no write starts before this (the last 429's `retry_after_ms`)."""
        self.episode: Episode | None = None
        self.last_episode: Episode | None = None
        self.refused_total = 0
        self._numbers = itertools.count(1)
        self._seq = itertools.count()
        self._waiting: list[tuple[int, int]] = []
        self._busy = False
        self._changed = asyncio.Condition()
        self._last_ok: float | None = None
        self._last_refused = 0.0
        self._last_activity = 0.0
        self.recent_ok: deque[float] = deque(maxlen=32)
        """When the last writes of the current episode went through (monotonic)."""

    # region state
    def limiting(self) -> bool:
        """Whether an episode is on (and so writes go one at a time); ends a quiet one."""
        episode = self.episode
        if episode is None:
            return False
        quiet = max(QUIET_S, 3 * episode.interval)
        now = time.monotonic()
        if not self._busy and not self._waiting and now - max(self._last_activity, self._last_refused) > quiet:
            self.last_episode, self.episode = episode, None
            return False
        return True

    def next_slot(self) -> float:
        """When (monotonic) the next write may start during an episode."""
        slot = self.paused_until
        if self.episode is not None and self._last_ok is not None:
            slot = max(slot, self._last_ok + self.episode.interval)
        return slot + SLOT_MARGIN_S

    def new_ticket(self, priority: WritePriority) -> tuple[int, int]:
        """A place in line, kept across the retries of one request."""
        return (int(priority), next(self._seq))

    # endregion

    # region passing
    async def write(
        self,
        send: Callable[[], Awaitable[T]],
        priority: WritePriority,
        *,
        budget: float,
        may_send: Callable[[], Awaitable[bool]] | None,
        on_refused: Callable[[float, float], None],
        what: str,
    ) -> T:
        """One room write. Outside an episode it goes at once; during one it waits for its turn (notices first,
        then in order of arrival; a retry keeps its place) and the next granted slot. A 429 is waited out until
        the time since this write's first refusal would pass `budget`; before sending again, `may_send` is asked
        (an instance that lost its leadership raises `LostLeadership` there)."""
        ticket: tuple[int, int] | None = None
        first_refusal: float | None = None
        while True:
            gated = self.limiting()
            if gated:
                ticket = ticket or self.new_ticket(priority)
                await self.enter(ticket)
            try:
                if first_refusal is not None and may_send is not None and not await may_send():
                    raise LostLeadership()
                sent = time.monotonic()
                result = await send()
            except MatrixRequestError as e:
                if e.http_status != 429:
                    raise
                wait = (retry_after_ms(e) or 1000) / 1000
                now = time.monotonic()
                first_refusal = first_refusal if first_refusal is not None else now
                if now - first_refusal + wait > budget:
                    log.warning("rate limited beyond the wait budget: giving up on this request", path=what)
                    raise
                on_refused(wait, sent)
                ticket = ticket or self.new_ticket(priority)
            else:
                self.succeeded(sent)
                return result
            finally:
                if gated:
                    await self.leave()

    async def enter(self, ticket: tuple[int, int]) -> None:
        """Wait for this ticket's turn and the next granted slot; then the gate is the caller's until `leave`."""
        async with self._changed:
            heapq.heappush(self._waiting, ticket)
            try:
                while True:
                    if not self._busy and self._waiting[0] == ticket:
                        wait = self.next_slot() - time.monotonic()
                        if wait <= 0:
                            heapq.heappop(self._waiting)
                            self._busy = True
                            self._maybe_report()
                            return
                        try:  # someone ahead may arrive meanwhile: look again when told
                            await asyncio.wait_for(self._changed.wait(), wait)
                        except TimeoutError:
                            pass
                        continue
                    await self._changed.wait()
            except BaseException:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    heapq.heapify(self._waiting)
                    self._changed.notify_all()
                raise

    async def leave(self) -> None:
        async with self._changed:
            self._busy = False
            self._last_activity = time.monotonic()
            self._changed.notify_all()

    def succeeded(self, sent_at: float) -> None:
        """A write sent at `sent_at` (monotonic) went through: the next slot is one interval after it."""
        self._last_ok = sent_at
        if self.episode is not None:
            self.episode.writes += 1
            self.recent_ok.append(time.monotonic())

    def refused(self, wait_s: float, sent_at: float | None = None) -> None:
        """A write sent at `sent_at` met 429: hold writes until `wait_s` after it was sent (the homeserver counts
        from when it looked at it; Synapse holds a 429 answer half a second), learn the granted interval, start
        or continue the episode."""
        now = time.monotonic()
        sent_at = now if sent_at is None else sent_at
        self.refused_total += 1
        self._last_refused = now
        self.paused_until = max(self.paused_until, sent_at + wait_s)
        sample = wait_s if self._last_ok is None else sent_at + wait_s - self._last_ok
        interval = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, sample))
        episode = self.episode if self.limiting() else None
        if episode is None:
            episode = self.episode = Episode(next(self._numbers), now, time.time(), interval)
            self.recent_ok.clear()
        episode.interval = interval
        episode.refusals += 1
        self._maybe_report()

    def _maybe_report(self) -> None:
        """Once per episode, when writes keep meeting 429s (or keep waiting for their slots): `on_report`."""
        episode = self.episode
        if episode is None or episode.reported:
            return
        if episode.refusals >= REPORT_AFTER or time.monotonic() - episode.started >= REPORT_AFTER_S:
            episode.reported = True
            if self.on_report is not None:
                self.on_report(episode)

    def observed_rate(self) -> float | None:
        """Writes per second that went through during the episode (None before two did)."""
        ok = self.recent_ok
        if len(ok) < 2 or ok[-1] <= ok[0]:
            return None
        return (len(ok) - 1) / (ok[-1] - ok[0])

    # endregion


def lift_hint(kind: ServerKind, base_url: str, user_id: str) -> str:
    """Exactly what lifts the bot's rate limit: Synapse's admin API call with the bot's id, or the general rule."""
    if kind is ServerKind.SYNAPSE:
        path = f"{base_url.rstrip('/')}/_synapse/admin/v1/users/{quote(user_id, safe='')}/override_ratelimit"
        return (
            f"curl -X POST -H 'Authorization: Bearer <admin access token>' "
            f"-d '{{\"messages_per_second\": 0, \"burst_count\": 0}}' '{path}'"
        )
    return "exempt the bot's account from rate limits (see the homeserver's documentation)"
