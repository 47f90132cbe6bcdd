"""The running service: wires the engine's parts (leadership, /sync, invites, the reconcile timer, the
command queue, announcements) and owns their lifecycle: start, lead, stand down, shut down."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import structlog
from aiohttp import ClientError
from mautrix.errors import MatrixConnectionError, MatrixRequestError

from .. import __version__
from ..commands import CommandHandler as AdminCommands
from ..commands.render import NoticeRenderer
from ..config import Config
from ..core.entitlement import user_level
from ..matrix import ConnectError, StateCache
from ..matrix.crypto import Crypto, CryptoError
from ..matrix.errors import StateUnknown
from ..matrix.ratelimit import Episode, lift_hint
from ..matrix.room_encryption import Encryption
from ..matrix.state import parse_room_state
from ..metrics import IS_LEADER
from ..model import RoomID, UserID
from ..store import Store
from ..store.journal import now_ms
from .announcer import Announcer
from .errors import FatalError
from .events import RateLimited
from .executor import Executor
from .health import DatabaseHealth
from .invites import Invites
from .leadership import STANDBY_POLL_S, Leadership
from .observer import Observer
from .queue import CommandHandler, CommandQueue
from .reconciler import Reconciler
from .sync import SyncLoop
from .timer import ReconcileTimer
from .transport import AppserviceTransport, adapter, appservice_error

log = structlog.get_logger("spacesync")

ADMIN_STATE_ATTEMPTS = 3
"""Reads of the admin room's state to decide whether a sender is an admin (1 s, then 2 s apart)."""

__all__ = ["App", "CommandHandler", "FatalError"]

CRYPTO_RETRY_S = (2.0, 5.0)
"""Waits between the attempts to load the bot's device and identity at login (then it is reported)."""


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until they end. Python 3.11's asyncio.wait_for swallows a cancellation
    that arrives as its inner future completes, so a task may survive one cancel(): repeat it."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1)


class App:
    """Wires store, adapter, observer, reconciler, executor and the loops, and runs them until stopped."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.database.url)
        self.matrix = adapter(config)
        self.device = adapter(config, device=True) if config.appservice else self.matrix
        """The bot's device (its keys, to-device messages): an appservice logs one in with its as_token."""
        self.crypto = Crypto(
            self.device,
            self.store.db,
            config.bot.pickle_key,
            recovery_key=config.bot.recovery_key,
            password=config.bot.password,
            share_keys_with=config.admin.share_keys_with,
        )
        self.matrix.crypto = self.device.crypto = self.crypto
        self.cache = StateCache()
        self.health = DatabaseHealth()
        self.leadership = Leadership(config, self.store)
        self.admin_room: RoomID | None = None
        self.announcer = Announcer(
            self.matrix, self.store, admin_room=lambda: self.admin_room, render=NoticeRenderer(self.cache)
        )
        self.observer = Observer(
            self.matrix,
            self.cache,
            self.store,
            max_seconds=config.walk.max_seconds,
            concurrency=config.walk.concurrency,
            on_full_state=lambda room_id: self.request_reconcile(full=True),
            reread_interval=config.reread_interval,
        )
        self.executor = Executor(
            self.store,
            self.matrix,
            self.cache,
            concurrency=config.executor.concurrency,
            max_attempts=config.executor.max_attempts,
            max_failures=config.executor.max_failures,
            on_batch_done=self._batch_done,
            on_parked=self.announcer.parked,
            may_act=self.confirm_leadership,
        )
        self.matrix.may_send = self.confirm_leadership
        self.matrix.on_rate_limited(self._rate_limited)
        self._reports: set[asyncio.Task[None]] = set()
        self.reconciler = Reconciler(config, self.store, self.matrix, self.observer, self.executor, self.announcer)
        self.executor.recheck = self.reconciler.still_wanted
        self.invites = Invites(
            self.matrix,
            self.store,
            self.observer,
            is_admin=self.is_admin,
            admin_room=lambda: self.admin_room,
            request_reconcile=self.request_reconcile,
        )
        self.commands = CommandQueue(self.store, self.health)
        self.timer = ReconcileTimer(config, self.store, self.reconciler, self.executor, self.invites, self.health)
        self.sync = SyncLoop(
            self.matrix,
            self.cache,
            self.store,
            self.observer,
            self.health,
            self.invites,
            self.commands,
            admin_room=lambda: self.admin_room,
            request_reconcile=self.request_reconcile,
            initial_sync_timeout=config.homeserver.initial_sync_timeout,
        )
        self.sync.handlers.append(lambda data: self.crypto.on_sync(data, self.admin_room))
        self.transport = (
            AppserviceTransport(
                config,
                self.sync,
                self.store,
                self.health,
                self.device,
                leading=lambda: self.leader,
                encrypted=lambda: config.bot.pickle_key is not None,
                saved_device=self.crypto.saved_device_id,
            )
            if config.appservice
            else None
        )
        """Appservice mode: transactions in, instead of following /sync."""
        self._admin_commands: AdminCommands | None = None
        self.logged_in = False
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._learning: asyncio.Task[None] | None = None
        """Reads the admin room's state again when the read at login failed."""
        self.started_at = time.time()

    # region public state (read by /ready, /metrics and the status command)
    @property
    def leader(self) -> bool:
        return self.leadership.leader

    @property
    def standby_reason(self) -> str:
        return self.leadership.standby_reason

    @property
    def database_up(self) -> bool:
        return self.health.up

    @property
    def homeserver_up(self) -> bool:
        return self.sync.homeserver_up

    @property
    def synced(self) -> bool:
        return self.sync.synced

    @property
    def last_sync_at(self) -> float | None:
        return self.sync.last_sync_at

    @property
    def command_handler(self) -> CommandHandler | None:
        return self.commands.handler

    @command_handler.setter
    def command_handler(self, handler: CommandHandler | None) -> None:
        self.commands.handler = handler

    # endregion

    # region lifecycle
    async def start_store(self) -> None:
        await self.store.start()

    async def run(self) -> None:
        """Run until stop(): wait to lead, connect, reconcile, and follow /sync. An instance that loses the
        leadership lock stands by and leads again once it takes the lock back."""
        await self.start_store()
        try:
            if self.transport is not None:
                await self.transport.listen()
            while not self._stopping.is_set():
                if not await self.leadership.become_leader(self._stopping):
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

    async def _log_in(self) -> None:
        saved = await self.health.call(
            "read the access token", lambda: self.store.get(f"access_token:{self.config.bot.user_id}")
        )
        if self.config.bot.password and not self.config.bot.device_id:
            # A new login keeps the device the crypto store belongs to.
            device = await self.health.call("read the bot's device", self.crypto.saved_device_id)
            if device:
                self.matrix.set_device_id(device)
        try:
            if self.transport is not None:
                await self.transport.log_in()
            token = await self.matrix.connect(saved_token=saved)
        except ConnectError as e:
            raise FatalError(appservice_error(str(e)) if self.transport else str(e)) from e
        if self.config.bot.password and token != saved:
            await self.health.call(
                "save the access token", lambda: self.store.put(f"access_token:{self.config.bot.user_id}", token)
            )
        self.logged_in = self.sync.homeserver_up = True
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
        await self._start_crypto()
        self.admin_room = await self.reconciler.resolve(self.config.admin.room)
        if self.admin_room is None:
            log.warning("admin room unknown: the alias does not resolve", admin_room=str(self.config.admin.room))
        else:
            await self._admin_room_encryption(self.admin_room)

    async def _start_crypto(self) -> None:
        """Load the bot's device and identity; a homeserver that does not answer is asked a few times more."""
        for attempt, delay in enumerate((*CRYPTO_RETRY_S, None)):
            try:
                await self.crypto.start()
                return
            except CryptoError as e:
                log.error(str(e))
                return
            except (TimeoutError, MatrixRequestError, MatrixConnectionError, ClientError) as e:
                error = f"{type(e).__name__}: {e}"
                if delay is None:
                    self.crypto.problem = f"encryption: could not upload the bot's keys ({error}); restart"
                    log.error(self.crypto.problem)
                    return
                log.warning("could not upload the bot's keys; trying again", attempt=attempt + 1, error=error)
                await asyncio.sleep(delay)

    async def _admin_room_encryption(self, room_id: RoomID) -> None:
        """Learn whether the admin room is encrypted (in the background, with bounded retries, when the first
        read fails: nothing is posted there meanwhile); then say once what the operator has to fix."""
        try:
            await self.crypto.load_room(room_id, await self.matrix.room_state(room_id))
        except (TimeoutError, MatrixRequestError, MatrixConnectionError, ClientError, ValueError) as e:
            log.warning(
                "could not read the admin room's state: nothing is posted there until it is known whether it is "
                "encrypted; reading it again",
                admin_room=str(room_id),
                error=f"{type(e).__name__}: {e}",
            )
            self._learning = asyncio.create_task(self._encryption_notice(room_id), name="admin-room-encryption")
            return
        await self._encryption_notice(room_id)

    async def _encryption_notice(self, room_id: RoomID) -> None:
        """One notice when the bot cannot talk in the admin room as it should: an encrypted room and no
        working encryption (said in clear, the only way), or a device the bot could not cross-sign."""
        encryption = await self.crypto.encryption(room_id)
        if encryption is Encryption.UNKNOWN:
            return
        device = self.matrix.client.device_id if self.matrix.client else ""
        if encryption is Encryption.ENCRYPTED and not self.crypto.ready:
            why = self.crypto.problem or "encryption: off; set bot.pickle_key (see docs/deployment.md)"
            self.crypto.problem = why
            log.error(
                "the admin room is encrypted and the bot cannot read or answer there", admin_room=str(room_id), why=why
            )
            text = (
                "⚠ This room is encrypted and I cannot use encryption, so I cannot read or answer commands here. "
                "The operator finds why in my log; docs/deployment.md says how to set encryption up."
            )
            txn = f"spacesync-crypto-{device}"
        elif self.crypto.identity_problem:
            text = (
                "⚠ I could not cross-sign my device, so clients that exclude unverified devices (Element) ignore "
                "what I say here. The operator finds why in my log and on /ready; docs/deployment.md says how "
                "to restore or replace my identity."
            )
            txn = f"spacesync-identity-{device}"
        else:
            return
        try:
            await self.matrix.send_notice(room_id, text, plaintext_ok=True, txn=txn)
        except Exception as e:
            log.warning("could not post to the admin room", error=f"{type(e).__name__}: {e}")

    async def _lead(self) -> bool:
        """Act until stop() (False) or until the lock can no longer be confirmed (True)."""
        self.leadership.lost.clear()
        # Journal entries older than this, left by a crash or by the previous leader, are re-planned against
        # a state cache filled by this leader's first full reconcile before they run.
        self.executor.leader_since_ms = now_ms()
        self.executor.ready.clear()
        if not self.logged_in:
            await self._log_in()
        else:
            await self.health.call("read the bot's encryption keys", self.crypto.reload)
        await self.health.call("read pending invites", self.invites.load)
        if self.commands.handler is None:
            self._admin_commands = AdminCommands(self)
            self.commands.handler = self._admin_commands.handle
        if self._admin_commands is not None:
            await self.health.call("restore settings", self._admin_commands.restore)
        self.executor.resume()
        self._tasks = [
            asyncio.create_task(self.executor.run_forever(), name="executor"),
            asyncio.create_task(self.transport.run() if self.transport else self.sync.run(), name="sync"),
            asyncio.create_task(self.timer.run(), name="reconcile"),
            asyncio.create_task(self.commands.run(), name="commands"),
            asyncio.create_task(self.leadership.keep(), name="leadership"),
        ]
        self.executor.wake()
        self.timer.request(full=True)
        stop = asyncio.create_task(self._stopping.wait())
        lost = asyncio.create_task(self.leadership.lost.wait())
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
        self.leadership.stand_down()
        self.executor.stop()
        log.warning("lost the leadership lock: standing by, no longer acting", database=self.config.database.safe_url)
        await self._stop_tasks()
        await self.leadership.release()
        self.sync.synced = False
        self.timer.clear()

    async def _stop_tasks(self) -> None:
        """Cancel the loops, letting in-flight actions finish (bounded). Unfinished entries stay journaled."""
        self.executor.stop()
        await _cancel([t for t in self._tasks if t.get_name() != "executor"])
        await self.observer.close()
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
        if self.transport is not None:  # first: the homeserver's next transaction goes to another instance
            await self.transport.stop()
        await self._stop_tasks()
        if self._learning is not None:
            await _cancel([self._learning])
        await self.crypto.close()  # a key upload under way is finished and saved while homeserver and store are up
        if self.device is not self.matrix:
            await self.device.close()
        await self.matrix.close()
        await self.store.stop()
        IS_LEADER.set(0)

    async def confirm_leadership(self) -> bool:
        """Whether this instance still holds the lock, asked before every action."""
        return await self.leadership.confirm()

    # endregion

    # region services for the commands
    def request_reconcile(self, *, full: bool) -> None:
        self.timer.request(full=full)

    async def notify(self, text: str, html: str | None = None) -> None:
        """One notice in the admin room; never lets a failure to announce stop the work."""
        await self.announcer.notify(text, html)

    async def is_admin(self, user_id: UserID) -> bool:
        """Listed in admin.users, or at least admin.min_power_level in the admin room's current state.

        In room version 12 the admin room's creators (the m.room.create sender and `additional_creators`)
        have unlimited power without a `users` entry: the whole state is read, not only the power levels.
        """
        if user_id in self.config.admin.users:
            return True
        if self.admin_room is None:
            return False
        events = await self._admin_room_state()
        state = {
            (e["type"], e["state_key"]): e
            for e in events
            if isinstance(e.get("type"), str) and isinstance(e.get("state_key"), str)
        }
        room = parse_room_state(self.admin_room, state)
        return user_level(room, user_id) >= self.config.admin.min_power_level

    async def _admin_room_state(self) -> list[dict[str, Any]]:
        """The admin room's current state, read a few times over a few seconds; StateUnknown when it cannot be
        read: whether someone is an admin is then unknown, and never taken for "no"."""
        for attempt in range(ADMIN_STATE_ATTEMPTS):
            try:
                return await self.matrix.room_state(cast(RoomID, self.admin_room))
            except (TimeoutError, MatrixRequestError, MatrixConnectionError, ClientError, ValueError) as e:
                if attempt + 1 == ADMIN_STATE_ATTEMPTS:
                    raise StateUnknown(f"the admin room's state could not be read ({type(e).__name__}: {e})") from e
                await asyncio.sleep(2**attempt)
        raise AssertionError("unreachable")

    def room_name(self, room_id: RoomID) -> str:
        room = self.cache.get(room_id)
        return room.name if room is not None and room.name else str(room_id)

    async def rate_limit(self) -> RateLimited | None:
        """The rate-limit episode in which writes keep meeting 429s, as the operator is told about it; None
        when the homeserver does not hold the bot's writes back."""
        gate = self.matrix.gate
        episode = gate.episode
        if not gate.limiting() or episode is None or not episode.reported:
            return None
        depth = await self.store.journal.depth()
        queued = depth.get("pending", 0) + depth.get("running", 0)
        estimate = self.executor.estimate(queued)
        kind = await self.matrix.detect_server()
        return RateLimited(
            since=episode.started_wall,
            refusals=episode.refusals,
            granted_rate=episode.granted_rate,
            queued=queued,
            seconds=estimate.seconds if estimate is not None else None,
            lift=lift_hint(kind, self.matrix.base_url, self.matrix.user_id),
        )

    def _rate_limited(self, episode: Episode) -> None:
        """Writes keep meeting 429s: one log line and one admin-room notice for the episode."""
        task = asyncio.get_running_loop().create_task(self._report_rate_limit(), name=f"ratelimit-{episode.number}")
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report_rate_limit(self) -> None:
        try:
            event = await self.rate_limit()
        except Exception as e:  # the database is away: the status command still tells
            log.warning("rate limited: could not compose the report", error=f"{type(e).__name__}: {e}")
            return
        if event is None:
            return
        log.warning("the homeserver rate-limits the bot's writes", **event.details())
        await self.announcer(event)

    async def _batch_done(self, batch: str) -> None:
        info = await self.store.journal.batch(batch)
        if info is None:
            return
        entries = await self.store.journal.batch_entries(batch)
        log.info("batch finished", batch=batch, trigger=info.trigger, **info.counts)
        # Its own echoes do not re-plan (OWN_ECHOES): look once more now that the batch is in the cache,
        # for what waited behind it (a newer level for the same room, the effects of an undo).
        self.request_reconcile(full=False)
        await self.announcer.batch_finished(batch, info.trigger, entries)

    # endregion
