"""The running service: leadership, the /sync loop, triggers, the reconcile timer and graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import structlog
from aiohttp import ClientError
from mautrix.errors import MatrixConnectionError, MatrixRequestError, MUnknownToken

from .. import __version__
from ..commands import CommandHandler as AdminCommands
from ..commands.notices import batch_summary, parked_notice
from ..config import Config
from ..core.entitlement import user_level
from ..matrix import ConnectError, MatrixAdapter, StateCache
from ..matrix.state import parse_room_state
from ..metrics import DATABASE_UP, IS_LEADER, JOURNAL_DEPTH, LAST_SYNC, SYNC_LAG
from ..model import RoomID, UserID
from ..store import Store, unreachable
from ..store.journal import Entry, now_ms
from .executor import Executor, refusal_reason
from .observer import Observer
from .reconciler import CLOCK_MARGIN_MS, Reconciler

log = structlog.get_logger("spacesync")
T = TypeVar("T")

SYNC_FILTER = json.dumps(
    {
        "presence": {"types": []},
        "account_data": {"types": []},
        "room": {
            "timeline": {"limit": 50},
            "state": {"lazy_load_members": False},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
    }
)
TRIGGER_TYPES = frozenset(
    {
        "m.room.member",
        "m.space.child",
        "m.space.parent",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.tombstone",
        "m.room.create",
    }
)
OWN_ECHOES = frozenset({"m.room.member", "m.room.power_levels", "m.room.join_rules"})
"""The bot's own changes of these kinds come back through /sync already applied to the cache."""
STANDBY_POLL_S = 2.0
NOTICE_ATTEMPTS = 4
LEADERSHIP_CHECK_S = 1.0


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until they end. Python 3.11's asyncio.wait_for swallows a cancellation
    that arrives as its inner future completes, so a task may survive one cancel(): repeat it."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1)


class FatalError(Exception):
    """Stops the service with one line for the operator and a non-zero exit."""


CommandHandler = Callable[[RoomID, dict[str, Any]], Awaitable[None]]


class App:
    """Wires store, adapter, observer, reconciler and executor, and runs them until stopped."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.database.url)
        self.matrix = MatrixAdapter(
            config.homeserver.url,
            config.bot.user_id,
            access_token=config.bot.access_token,
            password=config.bot.password,
            device_id=config.bot.device_id,
            request_timeout=config.homeserver.request_timeout,
        )
        self.cache = StateCache()
        self.observer = Observer(
            self.matrix,
            self.cache,
            self.store,
            max_seconds=config.walk.max_seconds,
            concurrency=config.executor.concurrency,
        )
        self.executor = Executor(
            self.store,
            self.matrix,
            self.cache,
            concurrency=config.executor.concurrency,
            max_attempts=config.executor.max_attempts,
            max_failures=config.executor.max_failures,
            on_batch_done=self._batch_done,
            on_parked=self._parked,
            may_act=self.confirm_leadership,
        )
        self.matrix.may_send = self.confirm_leadership
        self.reconciler = Reconciler(config, self.store, self.matrix, self.observer, self.executor, self.notify)
        self.executor.recheck = self.reconciler.still_wanted
        self.admin_room: RoomID | None = None
        self.command_handler: CommandHandler | None = None
        self._admin_commands: AdminCommands | None = None
        self._pending_invites: dict[RoomID, UserID] = {}
        self._commands_waiting = asyncio.Event()
        self.leader = False
        self.database_up = True
        self.logged_in = False
        self.synced = False
        self.homeserver_up = False
        self.last_sync_at: float | None = None
        self._stopping = asyncio.Event()
        self._trigger = asyncio.Event()
        self._full = asyncio.Event()
        self._stood_down = False
        self._lost = asyncio.Event()
        """Set once the leadership lock can no longer be confirmed: the instance stands down."""
        self._tasks: list[asyncio.Task[Any]] = []
        self._started_at = time.time()

    # region lifecycle
    async def start_store(self) -> None:
        await self.store.start()

    async def run(self) -> None:
        """Run until stop(): wait to lead, connect, reconcile, and follow /sync. An instance that loses the
        leadership lock stands by and leads again once it takes the lock back."""
        await self.start_store()
        try:
            while not self._stopping.is_set():
                if not await self._become_leader():
                    return
                if not await self._lead():
                    return
                await self._stand_down()
                # A healthy standby goes first: it polls every STANDBY_POLL_S, this instance waits longer.
                try:
                    await asyncio.wait_for(self._stopping.wait(), 2 * STANDBY_POLL_S + 0.5)
                    return
                except TimeoutError:
                    pass
        finally:
            await self.shutdown()

    async def _lead(self) -> bool:
        """Act until stop() (False) or until the lock can no longer be confirmed (True)."""
        self._lost.clear()
        # Journal entries older than this, left by a crash or by the previous leader, are re-planned against
        # a state cache filled by this leader's first full reconcile before they run.
        self.executor.leader_since_ms = now_ms()
        self.executor.ready.clear()
        if not self.logged_in:
            saved = await self._db(
                "read the access token", lambda: self.store.get(f"access_token:{self.config.bot.user_id}")
            )
            try:
                token = await self.matrix.connect(saved_token=saved)
            except ConnectError as e:
                raise FatalError(str(e)) from e
            if self.config.bot.password and token != saved:
                await self._db(
                    "save the access token", lambda: self.store.put(f"access_token:{self.config.bot.user_id}", token)
                )
            self.logged_in = self.homeserver_up = True
            self.observer.auto_join = True
            log.info(
                "logged in",
                user=self.matrix.user_id,
                homeserver=self.config.homeserver.url,
                version=__version__,
                database=self.config.database.safe_url,
                spaces=[str(s.room) for s in self.config.spaces],
                dry_run=self.config.dry_run,
            )
            self.admin_room = await self.reconciler.resolve(self.config.admin.room)
            if self.admin_room is None:
                log.warning("admin room unknown: the alias does not resolve", admin_room=str(self.config.admin.room))
        invites = await self._db("read pending invites", lambda: self.store.get("pending_invites"))
        self._pending_invites = {RoomID(r): UserID(u) for r, u in json.loads(invites or "{}").items()}
        if self.command_handler is None:
            self._admin_commands = AdminCommands(self)
            self.command_handler = self._admin_commands.handle
        if self._admin_commands is not None:
            await self._db("restore settings", self._admin_commands.restore)
        self.executor.resume()
        self._tasks = [
            asyncio.create_task(self.executor.run_forever(), name="executor"),
            asyncio.create_task(self._sync_loop(), name="sync"),
            asyncio.create_task(self._reconcile_loop(), name="reconcile"),
            asyncio.create_task(self._command_loop(), name="commands"),
            asyncio.create_task(self._keep_leadership(), name="leadership"),
        ]
        self.executor.wake()
        self._full.set()
        stop = asyncio.create_task(self._stopping.wait())
        lost = asyncio.create_task(self._lost.wait())
        try:
            done, _ = await asyncio.wait([stop, lost, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel([stop, lost])
        for task in done:
            if task not in (stop, lost) and task.exception():
                raise task.exception()  # type: ignore[misc]
        return not self._stopping.is_set()

    async def _stand_down(self) -> None:
        """Stop acting at once: no new journal entries, no new actions (those in flight finish), no
        reconciles, no commands; give the lock up and go back to standing by."""
        self.leader = False
        self._stood_down = True
        IS_LEADER.set(0)
        self.executor.stop()
        log.warning("lost the leadership lock: standing by, no longer acting", database=self.config.database.safe_url)
        await self._stop_tasks()
        await self.store.release_leadership()
        self.synced = False
        self._trigger.clear()
        self._full.clear()

    async def _stop_tasks(self) -> None:
        """Cancel the loops, letting in-flight actions finish (bounded). Unfinished entries stay journaled."""
        self.executor.stop()
        await _cancel([t for t in self._tasks if t.get_name() != "executor"])
        executor = next((t for t in self._tasks if t.get_name() == "executor"), None)
        if executor is not None:
            try:
                await asyncio.wait_for(self.executor.wait_idle(), 5)
            except TimeoutError:
                log.warning("stopping with actions in flight: they resume from the journal at the next start")
            await _cancel([executor])
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def stop(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> None:
        """Let in-flight actions finish (bounded), then close connections. Unfinished entries stay journaled."""
        await self._stop_tasks()
        await self.matrix.close()
        await self.store.stop()
        IS_LEADER.set(0)

    async def _try_leadership(self) -> bool:
        taken = await self.store.try_leadership()
        DATABASE_UP.set(0 if self.store.lock_error is not None else 1)  # the store logs the outage once
        return taken

    async def _become_leader(self) -> bool:
        """Only one instance acts; on PostgreSQL a second one stands by and takes over, on SQLite it refuses."""
        if await self._try_leadership():
            if self._stood_down:
                log.info("taking over: the leadership lock is free again")
            self.leader = True
            IS_LEADER.set(1)
            return True
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
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), STANDBY_POLL_S)
                return False
            except TimeoutError:
                pass
            if await self._try_leadership():
                log.info("taking over: no other instance holds the lock")
                self.leader = True
                IS_LEADER.set(1)
                return True
        return False

    @property
    def standby_reason(self) -> str:
        if self.store.lock_error is not None:
            return "standing by: the database is unreachable, cannot take the leadership lock"
        return "standing by: another instance is active"

    async def confirm_leadership(self) -> bool:
        """Whether this instance still holds the lock, asked before every action. Unconfirmed counts as lost:
        PostgreSQL frees an advisory lock with its connection, and a standby may hold it by now."""
        if not self._lost.is_set() and await self.store.holds_leadership():
            return True
        if not self._lost.is_set():
            self.leader = False
            IS_LEADER.set(0)
            self._lost.set()
        return False

    async def _keep_leadership(self) -> None:
        """Notice a lost lock within LEADERSHIP_CHECK_S even when nothing is being done."""
        while await self.confirm_leadership():
            await asyncio.sleep(LEADERSHIP_CHECK_S)

    async def _db(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """A database call retried with backoff while the database is out of reach, so that an outage
        pauses a loop instead of ending it; one warning per outage, one line when it is back."""
        failures = 0
        while True:
            try:
                result = await call()
            except Exception as e:
                if not unreachable(e):
                    raise
                failures += 1
                self._database_down(what, e)
                await asyncio.sleep(min(10.0, 0.5 * 2 ** min(failures - 1, 5)))
                continue
            self._database_up()
            return result

    def _database_down(self, what: str, error: BaseException) -> None:
        if self.database_up:
            log.warning(
                "database unreachable: retrying with backoff", during=what, error=f"{type(error).__name__}: {error}"
            )
        self.database_up = False
        DATABASE_UP.set(0)

    def _database_up(self) -> None:
        if not self.database_up:
            log.info("database reachable again")
        self.database_up = True
        DATABASE_UP.set(1)

    # endregion

    # region reconciling
    def request_reconcile(self, *, full: bool) -> None:
        (self._full if full else self._trigger).set()

    async def _reconcile_loop(self) -> None:
        """Full reconciles at start and every interval; quick ones (from the cache) on triggers."""
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
                plan, _ = await self.reconciler.reconcile("reconcile" if full else "sync", refresh=full)
                if full and not self.executor.ready.is_set():
                    self.executor.ready.set()  # the state cache is filled: journaled entries can be re-checked
                    self.executor.wake()
                if full and self._pending_invites:
                    await self._accept_invites()
                if self.reconciler.recheck_soon:
                    asyncio.get_running_loop().call_later(CLOCK_MARGIN_MS / 1000 + 0.5, self._trigger.set)
            except (TimeoutError, MatrixRequestError, MatrixConnectionError, ClientError, OSError) as e:
                log.warning("reconcile failed: retrying soon", error=f"{type(e).__name__}: {e}")
                next_full = time.monotonic() + 10
                continue
            except Exception as e:
                if unreachable(e):
                    self._database_down("reconcile", e)
                    next_full = time.monotonic() + 5
                    continue
                log.error(
                    "reconcile failed unexpectedly: retrying soon", error=f"{type(e).__name__}: {e}", exc_info=True
                )
                next_full = time.monotonic() + 30
                continue
            if full:
                next_full = time.monotonic() + self.config.reconcile_interval
            if plan.recheck_at_ms is not None:
                next_full = min(next_full, time.monotonic() + max(0.5, plan.recheck_at_ms / 1000 - time.time()))
            await self._update_depth()

    async def _update_depth(self) -> None:
        try:
            depth = await self.store.journal.depth()
        except Exception as e:
            if not unreachable(e):
                raise
            self._database_down("journal depth", e)
            return
        for status in ("pending", "running", "held"):
            JOURNAL_DEPTH.labels(status=status).set(depth.get(status, 0))

    # endregion

    # region /sync
    async def _sync_loop(self) -> None:
        since = await self._db("read the sync position", lambda: self.store.get("next_batch"))
        failures = 0
        while True:
            try:
                # No long-poll while recovering, nor on the first request after a start or a takeover: a
                # homeserver back up, or a new leader, is ready at once, not after a quiet 30 s long-poll.
                long_poll = since and not failures and self.synced
                data = await self.matrix.sync(since, 30000 if long_poll else 0, SYNC_FILTER)
            except MUnknownToken as e:
                raise FatalError("bot.access_token: the homeserver no longer accepts the token; log in again") from e
            except (TimeoutError, MatrixRequestError, MatrixConnectionError, ClientError, OSError) as e:
                failures += 1
                self.homeserver_up = False
                wait = min(30.0, 0.5 * 2 ** min(failures, 6))
                if failures == 1:
                    log.warning("homeserver unreachable: retrying with backoff", error=f"{type(e).__name__}: {e}")
                else:
                    log.debug("sync still failing", attempt=failures, wait_s=wait)
                await asyncio.sleep(wait)
                continue
            if failures:
                log.info("homeserver reachable again", after_failures=failures)
                self.request_reconcile(full=True)
                failures = 0
            self.homeserver_up = True
            first = since is None
            try:
                await self._handle_sync(data, first=first)
            except Exception as e:  # a malformed answer must not stop the bot; the next reconcile repairs
                log.warning("could not handle a /sync answer", error=f"{type(e).__name__}: {e}", exc_info=True)
                self.request_reconcile(full=True)
            # Commands are in the database before the position moves past them: a crash loses none.
            commands = [] if first else self.admin_commands_in(data)
            for room_id, event in commands:
                if await self._db("queue a command", partial(self.store.queue_command, room_id, event)):
                    self._commands_waiting.set()
            since = data.get("next_batch") or since
            if since:
                await self._db("save the sync position", partial(self.store.put, "next_batch", since))
            self.synced = True
            self.last_sync_at = time.time()
            LAST_SYNC.set(self.last_sync_at)
            SYNC_LAG.set(0)

    async def _handle_sync(self, data: dict[str, Any], *, first: bool) -> None:
        rooms = data.get("rooms") or {}
        trigger = full = False
        for room_id, room in (rooms.get("invite") or {}).items():
            await self._on_invite(RoomID(room_id), room)
        for room_id, room in (rooms.get("join") or {}).items():
            room_id = RoomID(room_id)
            state = list(((room.get("state") or {}).get("events")) or [])
            timeline = room.get("timeline") or {}
            events = list(timeline.get("events") or [])
            state_events = state + [e for e in events if isinstance(e, dict) and "state_key" in e]
            # Also for a room whose first /state read is in flight: the cache keeps the delta for it.
            if self.cache.update(room_id, state_events) and timeline.get("limited"):
                full = True
            # The bot's own changes are already in the cache (the executor applies them as it goes) and
            # were planned together: they need no new plan. Everyone else's do.
            relevant = [
                e
                for e in state_events
                if e.get("type") in TRIGGER_TYPES
                and not (e.get("sender") == self.matrix.user_id and e.get("type") in OWN_ECHOES)
            ]
            if relevant and room_id in self.cache:
                trigger = True
                if any(e.get("type") in ("m.space.child", "m.room.tombstone") for e in relevant):
                    full = True
        for room_id in rooms.get("leave") or {}:
            self.cache.forget(RoomID(room_id))
            self.observer.joined.discard(RoomID(room_id))
        if full:
            self.request_reconcile(full=True)
        elif trigger:
            self.request_reconcile(full=False)

    def admin_commands_in(self, data: dict[str, Any]) -> list[tuple[RoomID, dict[str, Any]]]:
        """Messages from others in the admin room, in timeline order: candidate commands."""
        if self.admin_room is None:
            return []
        room = ((data.get("rooms") or {}).get("join") or {}).get(self.admin_room)
        if not isinstance(room, dict):
            return []
        events = (room.get("timeline") or {}).get("events") or []
        return [
            (self.admin_room, e)
            for e in events
            if isinstance(e, dict)
            and e.get("type") == "m.room.message"
            and isinstance(e.get("event_id"), str)
            and e.get("sender") != self.matrix.user_id
        ]

    async def _on_invite(self, room_id: RoomID, room: dict[str, Any]) -> None:
        """Invites from admins only, and only to the admin room or to rooms listed under a managed Space.

        An admin's invite to a room the walk has not reached yet stays pending (not declined) and is
        looked at again after each full reconcile.
        """
        inviter = None
        for event in (room.get("invite_state") or {}).get("events") or []:
            if event.get("type") == "m.room.member" and event.get("state_key") == self.matrix.user_id:
                inviter = event.get("sender")
        if inviter is None or not await self.is_admin(UserID(inviter)):
            log.info("invite declined: not from an admin", room=room_id, inviter=inviter)
            try:
                await self.matrix.leave(room_id)
            except (MatrixRequestError, MatrixConnectionError, ClientError):
                pass
            return
        self._pending_invites[room_id] = UserID(inviter)
        await self._accept_invites()

    async def _save_invites(self) -> None:
        """Pending invites survive a restart: /sync does not deliver an invite again."""
        await self.store.put("pending_invites", json.dumps(self._pending_invites))

    async def _accept_invites(self) -> None:
        for room_id, inviter in list(self._pending_invites.items()):
            if room_id != self.admin_room and room_id not in self.observer.seen:
                log.info("invite pending: the room is not listed under a managed Space", room=room_id, inviter=inviter)
                await self._save_invites()
                continue
            del self._pending_invites[room_id]
            await self._save_invites()
            try:
                await self.matrix.join(room_id)
            except MatrixRequestError as e:
                log.warning("could not join after invite", room=room_id, error=getattr(e, "message", str(e)))
                continue
            log.info("joined after an admin's invite", room=room_id, inviter=inviter)
            self.observer.joined.add(room_id)
            self.request_reconcile(full=True)

    # endregion

    # region admin room
    async def _command_loop(self) -> None:
        """Admin-room commands, one at a time and in order, off the /sync loop (a long `sync` must not stall
        triggers). They come from the database: those left by a crash or by the previous leader run first."""
        while True:
            self._commands_waiting.clear()
            pending = await self._db("read queued commands", self.store.pending_commands)
            for command in pending:
                if self.command_handler is not None:
                    await self._db("handle a command", partial(self.command_handler, command.room_id, command.event))
                await self._db("finish a command", partial(self.store.command_done, command.event_id))
            if not pending:
                await self._commands_waiting.wait()

    async def is_admin(self, user_id: UserID) -> bool:
        """Listed in admin.users, or at least admin.min_power_level in the admin room's current state.

        In room version 12 the admin room's creators (the m.room.create sender and `additional_creators`)
        have unlimited power without a `users` entry: the whole state is read, not only the power levels.
        """
        if user_id in self.config.admin.users:
            return True
        if self.admin_room is None:
            return False
        try:
            events = await self.matrix.room_state(self.admin_room)
        except (TimeoutError, MatrixRequestError, MatrixConnectionError, ClientError, ValueError):
            return False
        state = {
            (e["type"], e["state_key"]): e
            for e in events
            if isinstance(e.get("type"), str) and isinstance(e.get("state_key"), str)
        }
        room = parse_room_state(self.admin_room, state)
        return user_level(room, user_id) >= self.config.admin.min_power_level

    async def notify(self, text: str, html: str | None = None) -> None:
        """One notice in the admin room; never lets a failure to announce stop the work.

        Rate limits are waited out by the adapter; a timeout or a 5xx is tried again a few times with the
        same transaction id, so the notice is posted once."""
        if self.admin_room is None:
            return
        txn = self.matrix.api.get_txn_id()
        for attempt in range(1, NOTICE_ATTEMPTS + 1):
            try:
                await self.matrix.send_notice(self.admin_room, text, html, txn=txn)
                return
            except (TimeoutError, MatrixRequestError, MatrixConnectionError, ClientError, OSError) as e:
                transient = not isinstance(e, MatrixRequestError) or e.http_status >= 500 or e.http_status == 429
                if not transient or attempt == NOTICE_ATTEMPTS:
                    log.warning("could not post to the admin room", error=f"{type(e).__name__}: {e}")
                    return
                await asyncio.sleep(attempt)

    async def _parked(self, entry: Entry, error: str) -> None:
        """One notice per action and reason when an action is parked."""
        action = entry.action
        if not await self.store.journal.first_notice(f"{action.key}|{refusal_reason(error)}"):
            return
        notice = parked_notice(entry, error, self.room_name)
        await self.notify(notice.text, notice.html)

    def room_name(self, room_id: RoomID) -> str:
        room = self.cache.get(room_id)
        return room.name if room is not None and room.name else str(room_id)

    async def _batch_done(self, batch: str) -> None:
        """One notice per finished batch: what was done to whom, where, what failed, how to undo."""
        info = await self.store.journal.batch(batch)
        if info is None:
            return
        entries = await self.store.journal.batch_entries(batch)
        log.info("batch finished", batch=batch, trigger=info.trigger, **info.counts)
        # Its own echoes do not re-plan (OWN_ECHOES): look once more now that the batch is in the cache,
        # for what waited behind it (a newer level for the same room, the effects of an undo).
        self.request_reconcile(full=False)
        if await self.store.db.fetchval("SELECT announced FROM batch WHERE id=$1", batch):
            return
        await self.store.db.execute("UPDATE batch SET announced=true WHERE id=$1", batch)
        left = await self.store.journal.left_behind(batch)
        summary = batch_summary(batch, info.trigger, entries, self.room_name, left)
        await self.notify(summary.text, summary.html)

    # endregion
