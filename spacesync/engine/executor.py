"""Runs journal entries against the homeserver: bounded concurrency, 429 pacing, retries, exactly once."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Awaitable, Callable

import structlog
from aiohttp import ClientError
from mautrix.errors import MatrixConnectionError, MatrixRequestError

from ..core.powerlevels import apply_user_changes, int_level
from ..matrix import MatrixAdapter, StateCache, retry_after_ms
from ..metrics import ACTIONS, RATELIMIT_WAIT
from ..model import Action, ActionKind, PlacedBan
from ..store import Status, Store, unreachable
from ..store.journal import Entry

log = structlog.get_logger("spacesync.executor")

_EXPECTED_MEMBERSHIP = {
    ActionKind.KICK: {"leave", "ban", None},
    ActionKind.BAN: {"ban"},
    ActionKind.UNBAN: {"leave", None},
    ActionKind.INVITE: {"invite", "join"},
}


class Transient(Exception):
    """Worth another attempt later (5xx, timeout, dropped connection)."""


class LostLeadership(Exception):
    """This instance can no longer confirm that it leads: it sends nothing more."""


class Executor:
    """Drains runnable journal entries; one 429 pauses every request until the homeserver's retry_after."""

    def __init__(self, store: Store, matrix: MatrixAdapter, cache: StateCache, *, concurrency: int = 8,
                 max_attempts: int = 8, on_batch_done: Callable[[str], Awaitable[None]] | None = None,
                 may_act: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.store = store
        self.matrix = matrix
        self.cache = cache
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.on_batch_done = on_batch_done
        self.may_act = may_act
        """Asked before each entry starts: an instance that cannot confirm it leads must send nothing."""
        self._wake = asyncio.Event()
        self._not_before = 0.0
        self.ratelimit_wait_s = 0.0
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._db_down = False

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Start no further entry: those in flight finish, the rest stay journaled for the next start."""
        self._stopping = True

    def resume(self) -> None:
        """Start entries again (after leadership came back)."""
        self._stopping = False
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.drain()
                self._db_down = False
            except Exception as e:  # the journal keeps every entry: retry the drain shortly
                if unreachable(e):
                    if not self._db_down:
                        log.warning("executor waiting: database unreachable, retrying",
                                    error=f"{type(e).__name__}: {e}")
                    self._db_down = True
                else:
                    log.error("executor drain failed: retrying", error=f"{type(e).__name__}: {e}", exc_info=True)
                await asyncio.sleep(5)
                self._wake.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def drain(self) -> None:
        """Run every runnable entry; entries added meanwhile are picked up in the next round."""
        self._idle.clear()
        try:
            while not self._stopping:
                entries = await self.store.journal.runnable()
                if not entries:
                    return
                batches = {e.batch for e in entries}
                queue: asyncio.Queue[Entry] = asyncio.Queue()
                for entry in entries:
                    queue.put_nowait(entry)
                workers = [asyncio.create_task(self._worker(queue)) for _ in range(min(self.concurrency, len(entries)))]
                try:
                    await asyncio.gather(*workers)
                finally:
                    for w in workers:
                        w.cancel()
                for batch in sorted(batches):
                    if self.on_batch_done is not None and not await self._batch_open(batch):
                        await self.on_batch_done(batch)
        finally:
            self._idle.set()

    async def _batch_open(self, batch: str) -> bool:
        info = await self.store.journal.batch(batch)
        return info is not None and any(info.counts.get(s.value) for s in (Status.PENDING, Status.RUNNING))

    async def _worker(self, queue: asyncio.Queue[Entry]) -> None:
        while not queue.empty() and not self._stopping:
            entry = queue.get_nowait()
            await self.run_entry(entry)

    async def run_entry(self, entry: Entry) -> None:
        action = entry.action
        recovered = entry.status is Status.RUNNING
        if self.may_act is not None and not await self.may_act():
            self.stop()  # the entry stays journaled for whichever instance leads
            return
        await self.store.journal.set_status(entry.id, Status.RUNNING, attempt=True)
        attempt = entry.attempts
        while True:
            attempt += 1
            if attempt > entry.attempts + 1 and self.may_act is not None and not await self.may_act():
                self.stop()  # left running: the next leader checks the homeserver before sending again
                return
            try:
                if recovered and await self._already_done(action):
                    outcome = "already_done"
                else:
                    outcome = await self._perform(action)
            except LostLeadership:
                self.stop()  # left running: the next leader checks the homeserver before sending again
                return
            except Transient as e:
                if attempt >= self.max_attempts:
                    await self._finish(entry, "failed", str(e))
                    return
                await asyncio.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random()))
                recovered = True
                continue
            except MatrixRequestError as e:
                if await self._already_done(action):
                    outcome = "already_done"
                else:
                    await self._finish(entry, "failed", f"{e.http_status} {getattr(e, 'errcode', '')}: "
                                                        f"{getattr(e, 'message', '') or e}")
                    return
            except Exception as e:  # a malformed answer: fail this entry, never wedge the journal
                if attempt >= self.max_attempts:
                    await self._finish(entry, "failed", f"{type(e).__name__}: {e}")
                    return
                log.warning("action errored: retrying", action=action.kind.value, room=action.room_id,
                            error=f"{type(e).__name__}: {e}")
                await asyncio.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)))
                recovered = True
                continue
            if outcome == "already_done" and action.kind is ActionKind.BAN and self._banned_by_other(action):
                outcome = "banned_by_someone_else"
            await self._finish(entry, outcome, None)
            return

    async def _finish(self, entry: Entry, outcome: str, error: str | None) -> None:
        action = entry.action
        status = Status.FAILED if outcome == "failed" else Status.DONE
        if outcome in ("done", "already_done"):
            await self._record(action, mirror=outcome == "done")
        # The audit first: a crash between the two leaves the entry running, and the next run records it
        # (as already done) instead of finishing it with no audit record.
        await self.store.audit(action, outcome, journal_id=entry.id, batch=entry.batch,
                               detail={"error": error} if error else None)
        await self.store.journal.set_status(entry.id, status, error)
        ACTIONS.labels(kind=action.kind.value, outcome=outcome).inc()
        context = {"error": error} if error else {}
        if action.changes and action.kind is ActionKind.SET_POWER_LEVELS:
            context["changes"] = {u: list(v) for u, v in action.changes.items()}
        (log.warning if error else log.info)(
            "action", action=action.kind.value, room=action.room_id, user=action.user_id or action.state_key,
            outcome=outcome, reason=action.reason, batch=entry.batch, **context,
        )

    async def _record(self, action: Action, *, mirror: bool) -> None:
        """Remember what spacesync owns now, and (`mirror`, when its own request did it) show the change in
        the cache until /sync confirms it. Something already done was done by someone else: /sync tells."""
        if action.kind is ActionKind.BAN and action.user_id:
            await self.store.add_placed_ban(PlacedBan(action.room_id, action.user_id, action.cause or "space_ban"))
        elif action.kind is ActionKind.UNBAN and action.user_id:
            await self.store.forget_ban(action.room_id, action.user_id)
        membership = {ActionKind.KICK: "leave", ActionKind.BAN: "ban", ActionKind.UNBAN: "leave",
                      ActionKind.INVITE: "invite"}.get(action.kind)
        if membership and action.user_id and mirror:
            self.cache.update(action.room_id, [{
                "type": "m.room.member", "state_key": action.user_id, "sender": self.matrix.user_id,
                "content": {"membership": membership}, "origin_server_ts": int(time.time() * 1000),
            }])

    async def _gate(self) -> None:
        """Wait out a rate limit announced to any request."""
        wait = self._not_before - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _call(self, fn: Callable[[], Awaitable[object]]) -> object:
        """One request with the 429 gate: honours retry_after_ms, then tries again; other errors pass."""
        again = False
        while True:
            await self._gate()
            if again and self.may_act is not None and not await self.may_act():
                raise LostLeadership()
            again = True
            try:
                return await fn()
            except MatrixRequestError as e:
                if e.http_status == 429:
                    wait = (retry_after_ms(e) or 1000) / 1000
                    self._not_before = max(self._not_before, time.monotonic() + wait)
                    self.ratelimit_wait_s += wait
                    RATELIMIT_WAIT.inc(wait)
                    log.debug("rate limited", wait_s=wait)
                    continue
                if e.http_status >= 500:
                    raise Transient(f"{e.http_status} from the homeserver") from e
                raise
            except (ClientError, MatrixConnectionError, asyncio.TimeoutError, OSError) as e:
                raise Transient(f"{type(e).__name__}: {e}") from e

    async def _perform(self, action: Action) -> str:
        m = self.matrix
        room, user = action.room_id, action.user_id
        if action.kind is ActionKind.KICK:
            await self._call(lambda: m.kick(room, user, action.reason))
        elif action.kind is ActionKind.BAN:
            if self._banned_by_other(action):
                # Banning again would replace a moderator's ban with one spacesync would later lift.
                return "banned_by_someone_else"
            await self._call(lambda: m.ban(room, user, action.reason))
        elif action.kind is ActionKind.UNBAN:
            await self._call(lambda: m.unban(room, user, action.reason))
        elif action.kind is ActionKind.INVITE:
            await self._call(lambda: m.invite(room, user, action.reason))
        elif action.kind is ActionKind.SET_POWER_LEVELS:
            return await self._set_power_levels(action)
        elif action.kind is ActionKind.SET_JOIN_RULES:
            content = dict(action.content or {})
            await self._call(lambda: m.put_state(room, "m.room.join_rules", content))
            self.cache.update(room, [{"type": "m.room.join_rules", "state_key": "", "content": content}])
        elif action.kind is ActionKind.SET_SPACE_CHILD:
            content = dict(action.content or {})
            key = action.state_key or ""
            await self._call(lambda: m.put_state(room, "m.space.child", content, key))
            self.cache.update(room, [{"type": "m.space.child", "state_key": key, "content": content}])
        return "done"

    async def _set_power_levels(self, action: Action) -> str:
        """Re-read the current levels and apply only this action's changes to them."""
        room = action.room_id
        current = await self._call(lambda: self.matrix.state_event(room, "m.room.power_levels")) or {}
        users = current.get("users") or {}  # type: ignore[union-attr]
        changes = {u: (b, a) for u, (b, a) in action.changes.items() if int_level(users.get(u)) == b}
        if changes:
            content = apply_user_changes(current, changes)  # type: ignore[arg-type]
            await self._call(lambda: self.matrix.put_state(room, "m.room.power_levels", content))
            self.cache.update(room, [{"type": "m.room.power_levels", "state_key": "", "content": content}])
        applied = {u for u, (_, a) in action.changes.items() if u in changes or int_level(users.get(u)) == a}
        for user_id in applied:
            await self.store.set_owned_level(room, user_id, action.ownership.get(user_id))
        if not applied:
            return "skipped"
        return "done" if changes else "already_done"

    def _banned_by_other(self, action: Action) -> bool:
        """Whether the state cache shows the target already banned, by someone other than spacesync."""
        room = self.cache.get(action.room_id)
        state = room.members.get(action.user_id) if room is not None and action.user_id else None
        return (state is not None and state.membership.value == "ban"
                and state.sender is not None and state.sender != self.matrix.user_id)

    async def _already_done(self, action: Action) -> bool:
        """Whether the homeserver already shows the action's effect (a retry after a crash or an error)."""
        expected = _EXPECTED_MEMBERSHIP.get(action.kind)
        if expected is None or action.user_id is None:
            return False
        try:
            membership = await self._call(lambda: self.matrix.membership(action.room_id, action.user_id))
        except (Transient, MatrixRequestError):
            return False
        return membership in expected
