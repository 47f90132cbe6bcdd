"""How events reach the engine in appservice mode: the homeserver pushes transactions, and each is fed to the
same function as a /sync answer (`SyncLoop.apply`: state into the cache, invites, admin commands queued), then
remembered by its id in the database, then answered. A transaction sent again (its answer lost, the bot killed
before answering) is answered without being applied again; one that could not be applied gets a 500 and comes
again. Only the leader takes transactions: a standby, or a leader still starting, answers 503 and the homeserver
sends the transaction again later (its backoff starts at 2 s).

A start or a takeover still reads every room (`reread_all`), as with /sync. The bot's encryption needs to-device
messages and device lists, which stock Synapse pushes to an appservice only behind experimental flags
(MSC2409, MSC3202): the bot's device (logged in with the as_token) follows a /sync of its own instead, with a
filter that leaves every room out, so it carries nothing but what the crypto machine needs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import quote

import structlog
from mautrix.api import Method
from mautrix.errors import MUnknownToken
from mautrix.types import UserID

from ..backoff import backoff
from ..config import Config
from ..matrix import ConnectError, MatrixAdapter
from ..matrix.appservice import TransactionServer, device_login, register_user, sync_answer
from ..matrix.errors import REQUEST_ERRORS
from ..metrics import APPSERVICE_TRANSACTIONS, LAST_SYNC
from ..store import Store
from .errors import FatalError
from .health import DatabaseHealth
from .sync import COMMAND_TYPES, STATE_TYPES, SyncLoop

log = structlog.get_logger("spacesync")

KEEP_TYPES = frozenset({*STATE_TYPES, *COMMAND_TYPES})
"""Of a transaction's events, those the /sync filter lets through."""
CRYPTO_FILTER = json.dumps(
    {
        "room": {"rooms": [], "account_data": {"types": []}},
        "presence": {"types": []},
        "account_data": {"types": []},
    }
)
"""The device's /sync: no room at all; to-device events, device lists and one-time key counts only."""
PING_EVERY_S = 60.0
"""How often the leader asks the homeserver to ping it (its health, both ways)."""
STANDBY = "standing by: another instance leads; the homeserver sends this transaction again"
STARTING = "starting: not taking transactions yet; the homeserver sends this transaction again"


def appservice_error(message: str) -> str:
    """A login failure in appservice mode, said in its terms: the as_token is the registration's."""
    if message.startswith(("bot.access_token", "bot.user_id")):
        return (
            "appservice: the homeserver does not accept the as_token; list the registration in its "
            "app_service_config_files and restart it (or write a new registration)"
        )
    return message


def adapter(config: Config, *, device: bool = False) -> MatrixAdapter:
    """The bot's adapter: with the as_token in appservice mode (the device's own token comes at login)."""
    token = config.bot.access_token
    if config.appservice is not None:
        token = None if device else config.appservice.as_token
    return MatrixAdapter(
        config.homeserver.url,
        config.bot.user_id,
        appservice_user=config.appservice is not None and not device,
        access_token=token,
        password=None if device else config.bot.password,
        device_id=config.bot.device_id,
        request_timeout=config.homeserver.request_timeout,
    )


class AppserviceTransport:
    """Transactions in, the bot's device /sync for encryption; replaces the /sync loop's run() while leading."""

    def __init__(
        self,
        config: Config,
        sync: SyncLoop,
        store: Store,
        health: DatabaseHealth,
        device: MatrixAdapter,
        *,
        leading: Callable[[], bool],
        encrypted: Callable[[], bool],
        saved_device: Callable[[], Awaitable[str | None]],
    ) -> None:
        assert config.appservice is not None
        self.config = config.appservice
        self.sync = sync
        self.store = store
        self.health = health
        self.device = device
        """The bot's device, logged in with the as_token: its keys, and the /sync that brings to-device events."""
        self.leading = leading
        self.encrypted = encrypted
        """Whether the bot uses encryption (then its device follows /sync)."""
        self.saved_device = saved_device
        """The device the crypto store belongs to: a new login keeps it."""
        self.device_id = config.bot.device_id
        self.taking = False
        """Set while this instance leads and the engine runs: transactions are applied."""
        self.server = TransactionServer(self.config.hs_token, self.on_transaction, self.refusal)
        self._apply = asyncio.Lock()

    def refusal(self) -> str | None:
        if not self.leading():
            return STANDBY
        return None if self.taking else STARTING

    async def listen(self) -> None:
        try:
            await self.server.start(self.config.host, self.config.port)
        except OSError as e:
            raise FatalError(
                f"appservice.listen: cannot listen on {self.config.host}:{self.config.port} ({e.strerror}); "
                "pick a free port (and the same in the registration's url)"
            ) from e
        log.info("appservice listening", listen=f"{self.config.host}:{self.config.port}", id=self.config.id)

    async def stop(self) -> None:
        self.taking = False
        await self.server.stop()

    async def on_transaction(self, txn_id: str, events: list[dict[str, Any]]) -> None:
        """Apply a transaction once: state, invites and commands as from /sync, then its id remembered."""
        async with self._apply:
            if await self.health.call("read applied transactions", partial(self.store.transaction_applied, txn_id)):
                APPSERVICE_TRANSACTIONS.labels(outcome="duplicate").inc()
                log.info("transaction applied before: answered again", txn_id=txn_id)
                return
            await self.sync.apply(sync_answer(events, self.sync.matrix.user_id, KEEP_TYPES))
            await self.health.call("remember a transaction", partial(self.store.mark_transaction, txn_id))
        APPSERVICE_TRANSACTIONS.labels(outcome="applied").inc()
        self._heard()

    def _heard(self) -> None:
        self.sync.last_sync_at = time.time()
        LAST_SYNC.set(self.sync.last_sync_at)

    async def log_in(self) -> None:
        """Before the bot's first request: its account made sure of (an appservice acts only as users that
        exist), and its device logged in when it encrypts. Both with the as_token, as the appservice's sender."""
        user_id = self.sync.matrix.user_id
        sender = MatrixAdapter(
            self.device.base_url,
            UserID(f"@{self.config.sender_localpart}:{user_id.partition(':')[2]}"),
            access_token=self.config.as_token,
            request_timeout=self.device.request_timeout,
        )
        try:
            await sender.connect()
            if await register_user(sender.request, user_id[1:].partition(":")[0]):
                log.info("registered the bot's account through the appservice", user=user_id)
            if self.encrypted():
                await self.log_in_device(sender)
        except ConnectError as e:
            raise ConnectError(appservice_error(str(e))) from e
        except REQUEST_ERRORS as e:
            raise ConnectError(
                f"appservice: the homeserver refused to set up {user_id} ({type(e).__name__}: "
                f"{getattr(e, 'message', None) or e}); check the registration's namespace"
            ) from e
        finally:
            await sender.close()

    async def log_in_device(self, sender: MatrixAdapter) -> None:
        """The bot's device for encryption: the saved device token, else a login with the as_token that keeps
        the device the crypto store belongs to (bot.device_id, else the store's)."""
        key = f"device_token:{self.sync.matrix.user_id}"
        saved = await self.health.call("read the device token", partial(self.store.get, key))
        if saved:
            try:
                await self.device.connect(saved_token=saved)
                return
            except ConnectError:  # logged out meanwhile: a new login below
                await self.device.close()
        device_id = self.device_id or await self.health.call("read the bot's device", self.saved_device)
        token, _ = await device_login(sender.request, self.sync.matrix.user_id, device_id)
        await self.health.call("save the device token", partial(self.store.put, key, token))
        await self.device.connect(saved_token=token)

    async def run(self) -> None:
        """While leading: every room read once, then transactions taken; the device's /sync for encryption."""
        self.sync.observer.reread_all()
        self.sync.observer.positioned = asyncio.Event()
        self.sync.observer.positioned.set()
        self.sync.synced = self.taking = True
        self._heard()
        pinging = asyncio.create_task(self.keep_pinging(), name="appservice-ping")
        try:
            if self.encrypted():
                await self.follow_device()
            else:
                await asyncio.Event().wait()
        finally:
            self.taking = False
            pinging.cancel()

    async def keep_pinging(self) -> None:
        """A ping now (see ping), then every PING_EVERY_S: what tells a homeserver back after an outage (then
        every room is read again, as after a /sync outage) when no device /sync runs."""
        up = await self.ping(log_success=True)
        while True:
            await asyncio.sleep(PING_EVERY_S)
            now_up = await self.ping(log_success=not up)
            if now_up and not up and not self.encrypted():
                self.sync.observer.reread_all()
                self.sync.request_reconcile(full=True)
            up = now_up

    async def ping(self, *, log_success: bool) -> bool:
        """Ask the homeserver to reach this instance (MSC2659, stable since Matrix 1.7): an answer proves the
        registration's url, and makes Synapse send what it holds for us now, not after its backoff (up to
        8.5 minutes after a takeover or an outage)."""
        path = f"/_matrix/client/v1/appservice/{quote(self.config.id)}/ping"
        try:
            await self.sync.matrix.request(Method.POST, path, {"transaction_id": f"spacesync-{time.time_ns()}"})
        except REQUEST_ERRORS as e:
            log.warning(
                "the homeserver cannot reach the appservice: check the registration's url and appservice.listen",
                id=self.config.id,
                error=f"{type(e).__name__}: {getattr(e, 'message', None) or e}",
            )
            return False
        if log_success:
            log.info("the homeserver reaches the appservice", id=self.config.id)
        return True

    async def follow_device(self) -> None:
        """The device's /sync (no rooms): to-device events and device lists, fed through the same function (an
        encrypted command whose room key arrives here is queued from here)."""
        key = f"device_next_batch:{self.sync.matrix.user_id}"
        since = await self.health.call("read the device's sync position", partial(self.store.get, key)) or None
        failures = 0
        while True:
            try:
                data = await self.device.sync(since, 0 if failures or not since else 30000, CRYPTO_FILTER)
            except MUnknownToken as e:
                raise FatalError("appservice: the bot's device was logged out; restart to log it in again") from e
            except REQUEST_ERRORS as e:
                failures += 1
                self.sync.homeserver_up = False
                if failures == 1:
                    log.warning("device /sync failing: retrying with backoff", error=f"{type(e).__name__}: {e}")
                await asyncio.sleep(backoff(failures))
                continue
            if failures:  # as after a /sync outage: what the homeserver did meanwhile is read again
                log.info("homeserver reachable again", after_failures=failures)
                self.sync.observer.reread_all()
                self.sync.request_reconcile(full=True)
            failures = 0
            self.sync.homeserver_up = True
            data["rooms"] = {}
            async with self._apply:
                await self.sync.apply(data)
            since = data.get("next_batch") or since
            if since:
                await self.health.call("save the device's sync position", partial(self.store.put, key, since))
