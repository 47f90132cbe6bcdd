"""Runs journal entries against the homeserver: bounded concurrency, backoff, parking, re-checks, exactly once."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Any, TypeVar, cast

import attrs
import structlog
from mautrix.errors import MatrixRequestError

from ..backoff import backoff
from ..core.lockdown import narrows
from ..core.planner import upgrade_copy
from ..core.powerlevels import apply_user_changes, int_level
from ..core.serveracl import apply_acl_changes, owned_after
from ..matrix import LostLeadership, MatrixAdapter, StateCache
from ..matrix.errors import TRANSPORT_ERRORS
from ..metrics import ACTIONS, REDACTIONS, SUPERSEDED
from ..model import MODERATOR_CAUSES, Action, ActionKind, Cause, Lockdown, PlacedBan, RoomID, RoomState, UserID
from ..store import Status, Store, unreachable
from ..store.journal import Entry, now_ms
from .recheck import MEMBERSHIP_KINDS, SendChecks, Superseded, why_unwanted

T = TypeVar("T")


class Outcome(str, Enum):
    """How an action ended; stored in the audit log and shown, so the values never change."""

    DONE = "done"
    ALREADY_DONE = "already_done"
    FAILED = "failed"
    PARKED = "parked"
    SKIPPED = "skipped"
    BANNED_BY_SOMEONE_ELSE = "banned_by_someone_else"
    NO_LONGER_NEEDED = "no longer needed"
    """Kept for audit records written before re-checks at send time ended such entries `superseded`."""
    SUPERSEDED = "superseded"
    """Re-checked just before it was sent, the world no longer called for it: never sent."""


log = structlog.get_logger("spacesync.executor")

_EXPECTED_MEMBERSHIP: dict[ActionKind, set[str | None]] = {
    ActionKind.KICK: {"leave", "ban", None},
    ActionKind.BAN: {"ban"},
    ActionKind.UNBAN: {"leave", None},
    ActionKind.INVITE: {"invite", "join"},
}


RECHECK_RETRY_S = 5.0
DISPATCH_WINDOW = 5000
"""Runnable entries read from the journal at once and put in order of impact; more wait for the next read."""
RATE_WINDOW_S = 60.0
"""Completions over this many seconds give the rate an expected finish time is computed from."""


class Transient(Exception):
    """Worth another attempt later (5xx, timeout, dropped connection, a rate limit beyond the wait budget)."""

    def __init__(self, message: str, *, rate_limited: bool = False) -> None:
        super().__init__(message)
        self.rate_limited = rate_limited
        """A 429 beyond the wait budget: the homeserver is busy, not failing; counts attempts, not failures."""


class _Stopped(Exception):
    """A run of redactions that failed part-way: the error, and how many were redacted before it."""

    def __init__(self, error: Exception, redacted: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.redacted = redacted


Recheck = Callable[[list[Action]], Awaitable[set[str]]]
"""Keys of the given actions a fresh plan (from the state cache) still wants."""
Parked = Callable[[Entry, str], Awaitable[None]]


def fingerprint(action: Action, room: RoomState | None) -> str:
    """The room state an action's success depends on: its power levels, join rules, version, upgrade and the
    target's membership event. A parked action is planned again only once this changes."""
    if room is None:
        return "unknown"
    member = room.members.get(action.user_id) if action.user_id else None
    parts = {
        "power_levels": dict(room.power_levels.raw),
        "join_rules": dict(room.join_rules_content),
        "version": room.room_version,
        "tombstone": room.tombstone,
        "member": [member.membership.value, room.member_tag(action.user_id)] if member and action.user_id else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _describe(e: MatrixRequestError) -> str:
    return f"{e.http_status} {getattr(e, 'errcode', '') or ''}: {getattr(e, 'message', '') or e}"


def _write_paused_until(matrix: MatrixAdapter) -> float:
    """Until when (monotonic) the adapter's last 429 on a write (kick, ban, state) held writes back; 0: never."""
    return matrix.paused_until("write")


def _paused_s(matrix: MatrixAdapter) -> float:
    """How much longer a 429 holds the adapter's writes back."""
    return max(0.0, _write_paused_until(matrix) - time.monotonic())


def redaction_key(run: str, room_id: str) -> str:
    """Where the count of messages a REDACT action removed in a room is kept (the store's key-value table)."""
    return f"redacted|{run}|{room_id}"


FINAL_REFUSALS = frozenset({"M_INVITE_BLOCKED"})
"""Refusals that asking again cannot change: the invitee blocks invites (MSC4380)."""


def final_refusal(error: str) -> bool:
    """Whether a refusal ('403 M_INVITE_BLOCKED: ...') is final: parked at once, never retried."""
    return refusal_reason(error).split(" ")[-1] in FINAL_REFUSALS


def refusal_reason(error: str) -> str:
    """The code part of an error ('403 M_FORBIDDEN'): one notice per action and reason."""
    return error.split(":", 1)[0].strip()


def _urgent(action: Action) -> bool:
    """Bans and lockdowns keep people out: they go before everything else when entries have to wait."""
    return action.kind is ActionKind.BAN or action.cause == Cause.LOCKDOWN.value


def impact_order(entries: Sequence[Entry], cache: StateCache) -> list[Entry]:
    """Entries in the order to start them when not all can run at once: bans and lockdowns first, then by
    room: Spaces before other rooms, then rooms with the most joined members first (from the state cache;
    rooms it does not hold last), ties by room id. Entries about the same room and target keep their
    journal order (an unban queued after a ban never overtakes it): such a group takes its place from its
    first entry. Deterministic for the same entries and cache."""
    first: dict[tuple[str, str], bool] = {}
    rank: dict[str, tuple[bool, int, str]] = {}
    for entry in sorted(entries, key=lambda e: e.id):
        action = entry.action
        first.setdefault((action.room_id, action.user_id or action.state_key or ""), _urgent(action))
        if action.room_id not in rank:
            room = cache.get(action.room_id)
            members = len(room.joined()) if room is not None else -1
            rank[action.room_id] = (not (room is not None and room.is_space), -members, action.room_id)

    def key(entry: Entry) -> tuple[bool, bool, int, str, int]:
        action = entry.action
        urgent = first[(action.room_id, action.user_id or action.state_key or "")]
        return (not urgent, *rank[action.room_id], entry.id)

    return sorted(entries, key=key)


@attrs.frozen
class Estimate:
    """When the queued actions are expected to be done, from the recent completion rate."""

    queued: int
    rate: float | None
    """Actions per second over the last minute; None before any completed."""
    seconds: float | None
    """None when there is no rate to go by yet."""
    paused_s: float = 0.0
    """The homeserver's rate limit holds requests back this much longer."""


class Executor:
    """Runs runnable journal entries, at most `concurrency` at once, each independently: a slow or
    backing-off entry never holds up the others. Rate limits are waited out by the Matrix adapter."""

    def __init__(
        self,
        store: Store,
        matrix: MatrixAdapter,
        cache: StateCache,
        *,
        concurrency: int = 32,
        max_attempts: int = 8,
        max_failures: int = 3,
        backoff_s: float = 2.0,
        on_batch_done: Callable[[str], Awaitable[None]] | None = None,
        on_parked: Parked | None = None,
        recheck: Recheck | None = None,
        may_act: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.store = store
        self.matrix = matrix
        self.cache = cache
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.max_failures = max_failures
        self.backoff_s = backoff_s
        self.on_batch_done = on_batch_done
        self.on_parked = on_parked
        self.recheck = recheck
        """Asks for a fresh plan just before entries start: membership actions always, other entries from before
        this instance led or that waited in backoff; each runs only if the plan still wants it."""
        self.checks = SendChecks(matrix, store, self._call)
        """Compare-and-set against state read fresh, for unbans and join-rule repairs."""
        self.ready = asyncio.Event()
        """Set once the first full reconcile filled the state cache: re-checks wait for it."""
        self.leader_since_ms = now_ms()
        self.may_act = may_act
        """Asked before each entry starts: an instance that cannot confirm it leads must send nothing."""
        self._wake = asyncio.Event()
        self._refill = True
        """Read the runnable entries from the journal again before starting more (new work, a backoff ended)."""
        self._queue: list[Entry] = []
        """Runnable entries read from the journal, in order of impact, not yet started."""
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._inflight_batches: dict[int, str] = {}
        self._completed: deque[float] = deque()
        """When entries finished (monotonic), over the last RATE_WINDOW_S: the rate the queue drains at."""
        self._busy_since: float | None = None
        self._rechecked: set[tuple[int, int]] = set()
        """(entry, its not_before) re-checked by this instance: checked again after its next backoff."""
        self._reported: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._db_down = False

    @property
    def ratelimit_wait_s(self) -> float:
        return self.matrix.ratelimit_wait_s

    def wake(self) -> None:
        """New or released entries in the journal: read it again."""
        self._refill = True
        self._wake.set()

    def stop(self) -> None:
        """Start no further entry: those in flight finish, the rest stay journaled for the next start."""
        self._stopping = True

    def resume(self) -> None:
        """Start entries again (after leadership came back)."""
        self._stopping = False
        self.wake()

    async def run_forever(self) -> None:
        due: int | None = None
        try:
            while True:
                self._wake.clear()
                try:
                    if await self.dispatch():
                        due = await self.store.journal.next_due()
                    self._db_down = False
                except Exception as e:  # the journal keeps every entry: look again shortly
                    if unreachable(e):
                        if not self._db_down:
                            log.warning(
                                "executor waiting: database unreachable, retrying", error=f"{type(e).__name__}: {e}"
                            )
                        self._db_down = True
                    else:
                        log.error("executor dispatch failed: retrying", error=f"{type(e).__name__}: {e}", exc_info=True)
                    self._refill = True
                    await asyncio.sleep(5)
                    continue
                timeout = None if due is None else max(0.05, (due - now_ms()) / 1000)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:  # a backoff ended
                    self._refill = True
        finally:
            # Stopping: entries still in flight stay journaled (running) and are re-checked at the next start.
            tasks = list(self._inflight.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def _needs_recheck(self, entry: Entry) -> bool:
        """Membership actions are planned again before every start; other planned entries when they are from
        before this instance led or waited in backoff (their state writes compare-and-set as they are sent)."""
        if self.recheck is None or entry.action.cause in MODERATOR_CAUSES:
            return False
        if entry.action.kind in MEMBERSHIP_KINDS and entry.action.user_id:
            return True
        if (entry.id, entry.not_before) in self._rechecked:
            return False
        return entry.created_at < self.leader_since_ms or entry.not_before > 0

    async def dispatch(self) -> bool:
        """Start runnable entries up to the concurrency limit, in order of impact; each wakes the loop when it
        ends. The journal is read again only when something new may be runnable (`wake`, a backoff ended, an
        entry backed off): True when it was."""
        if self._stopping:
            return False
        free = self.in_flight_limit() - len(self._inflight)
        if free <= 0:
            return False
        refilled = self._refill
        if refilled:
            self._refill = False
            try:
                self._queue = await self._runnable()
            except BaseException:
                self._refill = True
                raise
        while free > 0 and self._queue and not self._stopping:
            started, self._queue = self._queue[:free], self._queue[free:]
            for entry in await self._still_wanted(started):
                if self._stopping:
                    self._refill = True
                    break
                self._idle.clear()
                if self._busy_since is None:
                    self._busy_since = time.monotonic()
                self._inflight_batches[entry.id] = entry.batch
                self._inflight[entry.id] = asyncio.create_task(self._run(entry), name=f"entry-{entry.id}")
                free -= 1
        return refilled

    def in_flight_limit(self) -> int:
        """`concurrency`, or 1 during a rate-limit episode (the adapter's write gate): entries then go one at a
        time, in order of impact, at the pace the homeserver grants."""
        return 1 if self.matrix.gate.limiting() else self.concurrency

    async def _runnable(self) -> list[Entry]:
        """The journal's runnable entries not in flight, in order of impact."""
        entries = [e for e in await self.store.journal.runnable(limit=DISPATCH_WINDOW) if e.id not in self._inflight]
        return impact_order(entries, self.cache)

    async def _still_wanted(self, entries: list[Entry]) -> list[Entry]:
        """The entries about to start that a plan from the state cache, made now, still wants (one plan for all
        of them); the others end superseded (or already done). Entries that need that plan wait while the
        cache is not filled yet or no plan can be made (then asked again shortly)."""
        stale = [e for e in entries if self._needs_recheck(e)]
        if not stale:
            return entries
        skip = {e.id for e in stale}
        if not self.ready.is_set():  # the state cache is not filled yet: they wait for the first full reconcile
            return [e for e in entries if e.id not in skip]
        try:
            wanted = await self.recheck([e.action for e in stale])  # type: ignore[misc]
        except Exception as error:  # no fresh plan now (homeserver away): re-check them shortly
            log.warning(
                "could not re-check journaled actions: trying again shortly",
                entries=len(stale),
                error=f"{type(error).__name__}: {error}",
            )
            asyncio.get_running_loop().call_later(RECHECK_RETRY_S, self.wake)
            self._queue = []  # the rest of the queue waits for that wake too, instead of a plan asked per entry
            return [e for e in entries if e.id not in skip]
        for entry in stale:
            if entry.action.key in wanted:
                self._rechecked.add((entry.id, entry.not_before))
                skip.discard(entry.id)
            else:
                await self._drop(entry, why_unwanted(entry.action, self.cache))
        return [e for e in entries if e.id not in skip]

    async def _run(self, entry: Entry) -> None:
        try:
            await self.run_entry(entry)
            if not self._stopping and not self._batch_busy(entry):
                await self._report(entry.batch)
        except Exception as e:  # the entry stays journaled (running): tried again after a pause, never in a loop
            if unreachable(e):  # a database outage: one line, the runtime reports the outage itself
                log.warning("entry interrupted: database unreachable", entry=entry.id, error=f"{type(e).__name__}: {e}")
            else:
                log.error("entry errored", entry=entry.id, error=f"{type(e).__name__}: {e}", exc_info=True)
            await asyncio.sleep(RECHECK_RETRY_S)
            self._refill = True
        finally:
            self._inflight.pop(entry.id, None)
            self._inflight_batches.pop(entry.id, None)
            if not self._inflight:
                self._idle.set()
                if not self._queue:
                    self._busy_since = None
            self._wake.set()

    def _batch_busy(self, entry: Entry) -> bool:
        """Whether another entry of the batch is in flight: it asks about the batch when it ends, so the journal
        is not asked after every entry of a big batch."""
        return any(b == entry.batch for i, b in self._inflight_batches.items() if i != entry.id)

    def _completed_one(self) -> None:
        self._completed.append(time.monotonic())
        self._forget_old_completions()

    def _forget_old_completions(self) -> float:
        now = time.monotonic()
        while self._completed and self._completed[0] < now - RATE_WINDOW_S:
            self._completed.popleft()
        return now

    def estimate(self, queued: int) -> Estimate | None:
        """When `queued` open actions are expected to be done: at the rate entries completed over the last
        minute (or since the executor got busy, if later), after any rate-limit pause still running. None
        when nothing is queued."""
        if queued <= 0:
            return None
        now = self._forget_old_completions()
        paused = _paused_s(self.matrix)
        if self.matrix.gate.limiting():
            rate = self._granted_rate()
            return Estimate(queued, rate, paused + queued / rate, paused)
        since = max(self._busy_since if self._busy_since is not None else now, now - RATE_WINDOW_S)
        done = sum(1 for t in self._completed if t >= since)
        if not done:
            return Estimate(queued, None, None, paused)
        rate = done / max(1.0, now - since)
        return Estimate(queued, rate, paused + queued / rate, paused)

    def _granted_rate(self) -> float:
        """Actions per second during a rate-limit episode: the pace entries completed at since it began (from
        the second on), else the write rate the homeserver grants (`retry_after_ms`), never the burst before it."""
        episode = self.matrix.gate.episode
        assert episode is not None
        done = [t for t in self._completed if t >= episode.started]
        if len(done) >= 3 and done[-1] > done[0]:
            return (len(done) - 1) / (done[-1] - done[0])
        return episode.granted_rate

    async def _report(self, batch: str) -> None:
        if self.on_batch_done is None or batch in self._reported or await self._batch_open(batch):
            return
        self._reported.add(batch)
        try:
            await self.on_batch_done(batch)
        except Exception as e:
            log.warning("batch report failed", batch=batch, error=f"{type(e).__name__}: {e}")

    async def _batch_open(self, batch: str) -> bool:
        info = await self.store.journal.batch(batch)
        return info is not None and any(info.counts.get(s.value) for s in (Status.PENDING, Status.RUNNING))

    async def _drop(self, entry: Entry, why: str) -> None:
        """An entry a fresh plan no longer wants: its effect is there already, or it is superseded. One cancelled or
        held since it was read is left as it is."""
        if not await self.store.journal.claim(entry.id, entry.error):
            return
        action = entry.action
        expected = _EXPECTED_MEMBERSHIP.get(action.kind)
        room = self.cache.get(action.room_id)
        now = room.members.get(action.user_id) if room is not None and action.user_id else None
        if expected is not None and now is not None and now.membership.value in expected:
            await self._finish(entry, Outcome.ALREADY_DONE, None)
        else:
            await self._supersede(entry, why)
        await self._report(entry.batch)

    async def _supersede(self, entry: Entry, why: str) -> None:
        """The world no longer calls for the entry: it ends superseded, never sent, `why` kept for the notice."""
        action = entry.action
        await self.store.audit(
            action, Outcome.SUPERSEDED.value, journal_id=entry.id, batch=entry.batch, detail={"why": why}
        )
        await self.store.journal.set_status(entry.id, Status.SUPERSEDED, why)
        self._completed_one()
        ACTIONS.labels(kind=action.kind.value, outcome=Outcome.SUPERSEDED.value).inc()
        SUPERSEDED.labels(kind=action.kind.value).inc()
        log.info(
            "action superseded: not sent",
            action=action.kind.value,
            room=action.room_id,
            user=action.user_id or action.state_key,
            why=why,
            batch=entry.batch,
        )

    async def run_entry(self, entry: Entry) -> None:
        """One attempt. A failure backs off (`not_before`) instead of holding this worker; refusals (4xx), 5xx,
        timeouts and malformed answers park the entry after `max_failures`, a rate limit beyond the wait budget
        after `max_attempts`. An entry the world no longer calls for ends superseded, never sent."""
        action = entry.action
        recovered = entry.status is Status.RUNNING or entry.attempts > 0
        if self.may_act is not None and not await self.may_act():
            self.stop()  # the entry stays journaled for whichever instance leads
            return
        if not await self.store.journal.claim(entry.id, entry.error):
            return  # finished, cancelled or held since it was read
        attempt = entry.attempts + 1
        try:
            if recovered and await self._already_done(action):
                outcome = Outcome.ALREADY_DONE
            else:
                outcome = await self._perform(action)
        except LostLeadership:
            self.stop()  # left running: the next leader checks the homeserver before sending again
            return
        except Superseded as e:
            await self._supersede(entry, e.why)
            return
        except MatrixRequestError as e:
            if await self._already_done(action):
                outcome = Outcome.ALREADY_DONE
            elif 400 <= e.http_status < 500:
                await self._refused(entry, _describe(e))
                return
            else:  # an answer that is neither a refusal nor transient: parked at once, announced once
                await self._park(entry, _describe(e), failures=entry.failures + 1)
                return
        except Exception as e:  # transient, or a malformed answer: try again later, never wedge the journal
            error = str(e) if isinstance(e, Transient) else f"{type(e).__name__}: {e}"
            rate_limited = isinstance(e, Transient) and e.rate_limited
            if (entry.failures + 1 >= self.max_failures and not rate_limited) or attempt >= self.max_attempts:
                await self._park(entry, error, failures=entry.failures + 1)
                return
            wait = backoff(attempt - 1) * (0.5 + random.random())
            log.warning(
                "action failed: retrying later",
                action=action.kind.value,
                room=action.room_id,
                user=action.user_id,
                error=error,
                attempt=attempt,
                wait_s=round(wait, 2),
            )
            await self._back_off(entry, error, wait, refused=not rate_limited)
            return
        if outcome is Outcome.ALREADY_DONE and action.kind is ActionKind.BAN and self._banned_by_other(action):
            outcome = Outcome.BANNED_BY_SOMEONE_ELSE
        await self._finish(entry, outcome, None)

    async def _back_off(self, entry: Entry, error: str, wait: float, *, refused: bool) -> None:
        await self.store.journal.back_off(entry.id, error, now_ms() + int(wait * 1000), refused=refused)
        self._refill = True  # the next due time changed

    async def _refused(self, entry: Entry, error: str) -> None:
        """The homeserver refused (403, 400, 404, a module's veto): back off, then park. A final refusal (the
        invitee blocks invites) parks at once."""
        action = entry.action
        failures = entry.failures + 1
        if failures < self.max_failures and not final_refusal(error):
            wait = backoff(failures - 1, base=self.backoff_s, cap=300.0)
            log.warning(
                "action refused: retrying later",
                action=action.kind.value,
                room=action.room_id,
                user=action.user_id or action.state_key,
                error=error,
                failures=failures,
                wait_s=round(wait, 2),
            )
            await self._back_off(entry, error, wait, refused=True)
            return
        await self._park(entry, error, failures=failures)

    async def _park(self, entry: Entry, error: str, *, failures: int) -> None:
        """Failed too often: parked with the fingerprint of the room state it failed against, announced once.
        The planner's action is journaled again only when that state changes, or on `retry`."""
        action = entry.action
        await self.store.journal.park(entry.id, error, fingerprint(action, self.cache.get(action.room_id)))
        self._completed_one()
        await self.store.audit(
            action, Outcome.PARKED.value, journal_id=entry.id, batch=entry.batch, detail={"error": error}
        )
        ACTIONS.labels(kind=action.kind.value, outcome=Outcome.PARKED.value).inc()
        log.warning(
            "action parked",
            action=action.kind.value,
            room=action.room_id,
            user=action.user_id or action.state_key,
            error=error,
            failures=failures,
            batch=entry.batch,
            hint=f"!spacesync retry {entry.batch} once the cause is fixed",
        )
        if self.on_parked is not None:
            await self.on_parked(entry, error)

    async def _finish(self, entry: Entry, outcome: Outcome, error: str | None) -> None:
        action = entry.action
        status = Status.FAILED if outcome is Outcome.FAILED else Status.DONE
        if outcome in (Outcome.DONE, Outcome.ALREADY_DONE):
            await self._record(action, mirror=outcome is Outcome.DONE)
        # The audit first: a crash between the two leaves the entry running, and the next run records it
        # (as already done) instead of finishing it with no audit record.
        await self.store.audit(
            action, outcome.value, journal_id=entry.id, batch=entry.batch, detail={"error": error} if error else None
        )
        await self.store.journal.set_status(entry.id, status, error)
        self._completed_one()
        ACTIONS.labels(kind=action.kind.value, outcome=outcome.value).inc()
        context: dict[str, Any] = {"error": error} if error else {}
        if action.changes and action.kind is ActionKind.SET_POWER_LEVELS:
            context["changes"] = {u: list(v) for u, v in action.changes.items()}
        (log.warning if error else log.info)(
            "action",
            action=action.kind.value,
            room=action.room_id,
            user=action.user_id or action.state_key,
            outcome=outcome.value,
            reason=action.reason,
            batch=entry.batch,
            **context,
        )

    async def _record(self, action: Action, *, mirror: bool) -> None:
        """Remember what spacesync owns now, and (`mirror`, when its own request did it) show the change in
        the cache until /sync confirms it. Something already done was done by someone else: /sync tells."""
        if action.kind is ActionKind.BAN and action.user_id:
            await self.store.add_placed_ban(
                PlacedBan(action.room_id, action.user_id, action.cause or Cause.SPACE_BAN.value)
            )
        elif action.kind is ActionKind.UNBAN and action.user_id:
            await self.store.forget_ban(action.room_id, action.user_id)
        elif action.kind is ActionKind.SET_JOIN_RULES and action.cause == Cause.LOCKDOWN and action.space_id:
            previous, _ = action.changes["join_rules"]
            written = str((action.content or {}).get("join_rule"))
            await self.store.set_lockdown(
                action.room_id, Lockdown(action.room_id, action.space_id, dict(previous), written)
            )
        elif action.kind is ActionKind.SET_JOIN_RULES and action.cause == Cause.UNLOCK:
            await self.store.set_lockdown(action.room_id, None)
        membership = {
            ActionKind.KICK: "leave",
            ActionKind.BAN: "ban",
            ActionKind.UNBAN: "leave",
            ActionKind.INVITE: "invite",
        }.get(action.kind)
        if membership and action.user_id and mirror:
            content = {"membership": membership, **({"reason": action.reason} if action.reason else {})}
            self.cache.update(
                action.room_id,
                [
                    {
                        "type": "m.room.member",
                        "state_key": action.user_id,
                        "sender": self.matrix.user_id,
                        "content": content,
                        "origin_server_ts": int(time.time() * 1000),
                    }
                ],
            )

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One request: 5xx, a rate limit beyond the adapter's wait budget and dropped connections are
        transient; other refusals pass to the caller."""
        try:
            return await fn()
        except MatrixRequestError as e:
            if e.http_status >= 500 or e.http_status == 429:
                raise Transient(f"{e.http_status} from the homeserver", rate_limited=e.http_status == 429) from e
            raise
        except TRANSPORT_ERRORS as e:
            raise Transient(f"{type(e).__name__ or 'timeout'}: {e}") from e

    async def _perform(self, action: Action) -> Outcome:
        m = self.matrix
        room, user = action.room_id, cast(UserID, action.user_id)  # set for every membership action
        if action.kind is ActionKind.KICK:
            await self._call(lambda: m.kick(room, user, action.reason))
        elif action.kind is ActionKind.BAN:
            if self._banned_by_other(action):
                # Banning again would replace a moderator's ban with one spacesync would later lift.
                return Outcome.BANNED_BY_SOMEONE_ELSE
            extras = action.content or {}
            redact = extras.get("redact_events") is True
            await self._call(lambda: m.ban(room, user, action.reason, redact_events=redact))
            if isinstance(extras.get("redact_last"), int) and extras["redact_last"] > 0:
                await self._redact_recent(action, extras["redact_last"])
        elif action.kind is ActionKind.UNBAN:
            if not await self.checks.unban(action):  # a ban that is not spacesync's raises Superseded
                return Outcome.ALREADY_DONE
            await self._call(lambda: m.unban(room, user, action.reason))
        elif action.kind is ActionKind.INVITE:
            await self._call(lambda: m.invite(room, user, action.reason))
        elif action.kind is ActionKind.SET_POWER_LEVELS:
            return await self._set_power_levels(action)
        elif action.kind is ActionKind.SET_JOIN_RULES:
            content = dict(action.content or {})
            if action.cause == Cause.UNLOCK and not await self._still_locked(action):
                raise Superseded("the join rule was changed by hand since the lockdown: left alone")
            if action.cause == Cause.LOCKDOWN and not await self._still_narrows(action):
                return Outcome.SKIPPED
            if action.cause == Cause.JOIN_RULES and not await self.checks.join_rules(action):
                return Outcome.ALREADY_DONE
            await self._call(lambda: m.put_state(room, "m.room.join_rules", content))
            self.cache.update(room, [{"type": "m.room.join_rules", "state_key": "", "content": content}])
        elif action.kind is ActionKind.SET_SERVER_ACL:
            current = await self._call(lambda: m.state_event(room, "m.room.server_acl"))
            content = apply_acl_changes(current, action)
            if content != current:
                await self._call(lambda: m.put_state(room, "m.room.server_acl", content))
                self.cache.update(room, [{"type": "m.room.server_acl", "state_key": "", "content": content}])
            await self.store.set_owned_acl(room, owned_after(action))
        elif action.kind is ActionKind.SET_POLICY_SERVER:
            return await self._set_policy_server(action)
        elif action.kind is ActionKind.REDACT:
            return await self._redact_messages(action)
        elif action.kind is ActionKind.SET_SPACE_CHILD:
            content = dict(action.content or {})
            key = action.state_key or ""
            await self._call(lambda: m.put_state(room, "m.space.child", content, key))
            self.cache.update(room, [{"type": "m.space.child", "state_key": key, "content": content}])
        return Outcome.DONE

    async def _set_power_levels(self, action: Action) -> Outcome:
        """Re-read the current levels and apply only this action's changes to them."""
        room = action.room_id
        current = await self._call(lambda: self.matrix.state_event(room, "m.room.power_levels")) or {}
        users = current.get("users") or {}
        changes = {UserID(u): (b, a) for u, (b, a) in action.changes.items() if int_level(users.get(u)) == b}
        if changes:
            content = apply_user_changes(current, changes)
            await self._call(lambda: self.matrix.put_state(room, "m.room.power_levels", content))
            self.cache.update(room, [{"type": "m.room.power_levels", "state_key": "", "content": content}])
        applied = {UserID(u) for u, (_, a) in action.changes.items() if u in changes or int_level(users.get(u)) == a}
        for user_id in applied:
            await self.store.set_owned_level(room, user_id, action.ownership.get(user_id))
        if not applied:
            raise Superseded("the power levels changed since it was planned: left alone")
        return Outcome.DONE if changes else Outcome.ALREADY_DONE

    async def _set_policy_server(self, action: Action) -> Outcome:
        """Write the policy server state only over what the plan saw (nothing, or spacesync's own write): a
        room that set its own meanwhile keeps it."""
        room, event_type = action.room_id, action.state_key or ""
        before, after = action.changes["policy"]
        current = await self._call(lambda: self.matrix.state_event(room, event_type)) or {}
        if current == after:
            await self.store.set_owned_policy(room, event_type, after or None)
            return Outcome.ALREADY_DONE
        if current != before:
            await self.store.set_owned_policy(room, event_type, None)
            raise Superseded("the policy server changed since it was planned: left alone")
        content = dict(after)
        await self._call(lambda: self.matrix.put_state(room, event_type, content))
        self.cache.update(room, [{"type": event_type, "state_key": "", "content": content}])
        await self.store.set_owned_policy(room, event_type, after or None)
        return Outcome.DONE

    async def _redact_recent(self, action: Action, last: int) -> None:
        """The banned user's last messages in the room, redacted one by one after the ban. A failure stops the
        run; the ban stands either way."""
        try:
            redacted = await self._redact_events(action, last)
        except (Transient, MatrixRequestError, _Stopped) as e:
            log.warning("redaction with the ban stopped", room=action.room_id, user=action.user_id, error=str(e))
            return
        log.info("redacted with the ban", room=action.room_id, user=action.user_id, redacted=redacted)

    async def _redact_messages(self, action: Action) -> Outcome:
        """A REDACT action (`!spacesync redact`): the user's messages in the room, newest first, at most `last`
        and none older than `since_ms`. A failure raises, so the entry backs off (or is parked) like any other;
        a retry finds the messages already redacted gone from the history it reads and goes on from there. The
        count is kept (`redaction_key`) for the batch's notice."""
        extras = action.content or {}
        last = int(extras.get("last") or 0)
        since = int(extras["since_ms"]) if extras.get("since_ms") is not None else None
        run = str(extras.get("run") or "")
        redacted = 0
        try:
            redacted = await self._redact_events(action, last, since_ms=since, scan=max(500, 4 * last))
        except _Stopped as e:
            redacted = e.redacted
            raise e.error from None
        finally:
            if run and redacted:
                key = redaction_key(run, action.room_id)
                await self.store.put(key, str(int(await self.store.get(key) or 0) + redacted))
        return Outcome.DONE if redacted else Outcome.ALREADY_DONE

    async def _redact_events(self, action: Action, last: int, *, since_ms: int | None = None, scan: int = 500) -> int:
        """Redact the user's messages one request at a time (the adapter waits out each 429, so a long run is
        paced by the server's limits); how many were redacted. A failed read raises its error; a failed redaction
        `_Stopped`, with the count so far."""
        room, user = action.room_id, cast(UserID, action.user_id)
        try:
            events = await self._call(lambda: self.matrix.recent_messages_of(room, user, last, scan, since_ms))
        except (Transient, MatrixRequestError):
            REDACTIONS.labels(outcome="failed").inc()
            raise
        done = 0
        for event_id in events:
            try:
                await self._call(functools.partial(self.matrix.redact, room, event_id, action.reason))
            except (Transient, MatrixRequestError) as e:
                log.warning("redaction failed", room=room, user=user, event_id=event_id, error=str(e))
                REDACTIONS.labels(outcome="failed").inc()
                raise _Stopped(e, done) from e
            REDACTIONS.labels(outcome="done").inc()
            done += 1
        return done

    async def _still_locked(self, action: Action) -> bool:
        """Whether the room still holds the join rule the lockdown wrote; one changed by hand since is left alone
        (and its record forgotten)."""
        room = action.room_id
        current = await self._call(lambda: self.matrix.state_event(room, "m.room.join_rules")) or {}
        locked, _ = action.changes.get("join_rules", ({}, {}))
        if current.get("join_rule") == dict(locked).get("join_rule"):
            return True
        await self.store.set_lockdown(RoomID(room), None)
        return False

    async def _still_narrows(self, action: Action) -> bool:
        """Whether a lockdown's write still closes the room further: one made as closed meanwhile (invite by
        hand while a knock lockdown waited) is left as it is."""
        room = action.room_id
        current = await self._call(lambda: self.matrix.state_event(room, "m.room.join_rules")) or {}
        now = current.get("join_rule")
        return narrows(now if isinstance(now, str) else None, str((action.content or {}).get("join_rule")))

    def _banned_by_other(self, action: Action) -> bool:
        """Whether the state cache shows the target already banned, by someone other than spacesync.

        The homeserver's copy of spacesync's own ban, made as the room was upgraded, is not someone else's.
        """
        room = self.cache.get(action.room_id)
        state = room.members.get(action.user_id) if room is not None and action.user_id else None
        if not (
            state is not None
            and state.membership.value == "ban"
            and state.sender is not None
            and state.sender != self.matrix.user_id
        ):
            return False
        assert room is not None and action.user_id is not None
        old = self.cache.get(room.predecessor) if room.predecessor else None
        return not upgrade_copy(room, old, action.user_id, self.matrix.user_id)

    async def _already_done(self, action: Action) -> bool:
        """Whether the homeserver already shows the action's effect (a retry after a crash or an error)."""
        expected = _EXPECTED_MEMBERSHIP.get(action.kind)
        if expected is None or action.user_id is None:
            return False
        try:
            user_id = action.user_id
            membership = await self._call(lambda: self.matrix.membership(action.room_id, user_id))
        except (Transient, MatrixRequestError):
            return False
        return membership in expected
