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
"""Sent this long after the slot opens at first (the homeserver rounds `retry_after_ms` down, and looks at a
request a little after it was sent); each write refused although sent in its slot adds as much again ..."""
MAX_MARGIN_S: Final = 0.5
"""... up to this (a 429 costs Synapse's half-second hold anyway)."""
QUIET_S: Final = 30.0
"""An episode ends after this long (or three slots, if longer) without a write waiting or a 429."""
REPORT_AFTER: Final = 3
"""Refusals within one episode before it counts as 'writes keep meeting 429s' (one notice, one log line) ..."""
REPORT_AFTER_S: Final = 10.0
"""... or this long of an episode with writes still waiting for their slots."""
START_WINDOW: Final = 8
"""Outside an episode, writes in flight at first (below Synapse's burst of 10) ..."""
MAX_WINDOW: Final = 4096
"""... doubled each time that many went through without a 429 (so with the limits lifted, full concurrency
after a few dozen writes): a homeserver that rate-limits meets a small crowd, not the executor's whole
concurrency, before the first 429 answers (Synapse holds each one half a second)."""
LATE_S: Final = 0.1
"""A write that reaches the gate this long after its slot (and margin) anchors the next slot on itself."""
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
        self.margin = SLOT_MARGIN_S
        """How long after a slot opens a write is sent: grows with each write refused in its slot."""
        self._numbers = itertools.count(1)
        self._seq = itertools.count()
        self._waiting: list[tuple[int, int]] = []
        self._busy = False
        self._changed = asyncio.Condition()
        self._last_ok: float | None = None
        self._last_refused = 0.0
        self._in_slot = False
        """The 429 being handled met a write sent in its slot: it tells the phase, not the rate."""
        self.window = START_WINDOW
        self._in_flight = 0
        self._clean = 0
        self._last_activity = 0.0

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
        """When (monotonic) the next write may start during an episode: the homeserver's next slot (`slot`),
        plus the margin."""
        return self.slot() + self.margin

    def slot(self) -> float:
        """The homeserver's next slot as spacesync knows it: after the last 429's wait, one interval after the
        last slot a write went through in."""
        slot = self.paused_until
        if self.episode is not None and self._last_ok is not None:
            slot = max(slot, self._last_ok + self.episode.interval)
        return slot

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
            slot: float | None = None
            if gated:
                ticket = ticket or self.new_ticket(priority)
                slot = await self.enter(ticket)
            elif not await self._admit():
                continue  # an episode began meanwhile: through the gate
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
                if gated:  # sent in its slot and still refused: spacesync's clock runs ahead of the homeserver's
                    self.margin = min(MAX_MARGIN_S, self.margin + SLOT_MARGIN_S)
                self._in_slot = gated  # then the 429 corrects the phase, not the rate
                on_refused(wait, sent)
                ticket = ticket or self.new_ticket(priority)
            else:
                self.succeeded(sent, slot)
                return result
            finally:
                await (self.leave() if gated else self._release())

    async def _admit(self) -> bool:
        """Outside an episode: wait for room in the window of writes in flight. False when an episode began
        meanwhile (the write then goes through the gate)."""
        async with self._changed:
            while self._in_flight >= self.window and not self.limiting():
                await self._changed.wait()
            if self.limiting():
                return False
            self._in_flight += 1
            return True

    async def _release(self) -> None:
        async with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    async def enter(self, ticket: tuple[int, int]) -> float:
        """Wait for this ticket's turn and the next granted slot; then the gate is the caller's until `leave`.
        Returns the slot it goes in (without the margin): the next write's slot is one interval after it."""
        async with self._changed:
            heapq.heappush(self._waiting, ticket)
            try:
                while True:
                    if not self._busy and self._waiting[0] == ticket:
                        now = time.monotonic()
                        wait = self.next_slot() - now
                        if wait <= 0:
                            heapq.heappop(self._waiting)
                            self._busy = True
                            self._maybe_report()
                            slot = self.slot()  # or now, for a write that came well after its slot
                            return now if now > slot + self.margin + LATE_S else slot
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

    def succeeded(self, sent_at: float, slot: float | None = None) -> None:
        """A write sent at `sent_at` (monotonic) went through. In an episode the next slot is one interval after
        the `slot` it was let through in, not after it was sent: spacesync's own delays (the leadership check
        before a retry) must not add up slot after slot."""
        self._last_ok = sent_at if slot is None else slot
        if self.episode is not None:
            self.episode.writes += 1
        elif slot is None:
            self._clean += 1
            if self._clean >= self.window:
                self.window, self._clean = min(MAX_WINDOW, 2 * self.window), 0

    def refused(self, wait_s: float, sent_at: float | None = None) -> None:
        """A write sent at `sent_at` met 429: hold writes until `wait_s` after it was sent (the homeserver counts
        from when it looked at it; Synapse holds a 429 answer half a second), learn the granted interval, start
        or continue the episode."""
        now = time.monotonic()
        sent_at = now if sent_at is None else sent_at
        self.refused_total += 1
        self._last_refused = now
        self.window, self._clean = START_WINDOW, 0
        self.paused_until = max(self.paused_until, sent_at + wait_s)
        sample = wait_s if self._last_ok is None else sent_at + wait_s - self._last_ok
        interval = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, sample))
        episode = self.episode if self.limiting() else None
        if episode is None:
            episode = self.episode = Episode(next(self._numbers), now, time.time(), interval)
        if not self._in_slot:
            episode.interval = interval
        self._in_slot = False
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
