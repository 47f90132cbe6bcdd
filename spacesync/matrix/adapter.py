"""The only code that talks to the homeserver: login, /sync, state reads, the hierarchy and actions.

Every request has a timeout, and every 429 is waited out here (bounded by a total wait budget), so
every caller gets the same rate-limit handling: the executor, the observer, /sync, joins, notices."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import quote

import structlog
from aiohttp import ClientSession, ClientTimeout
from mautrix.api import Method, Path
from mautrix.client import ClientAPI
from mautrix.errors import MatrixRequestError, MForbidden, MUnknownToken
from mautrix.types import DeviceID, RoomAlias, RoomID, UserID
from mautrix.util.logging import TraceLogger

from ..metrics import RATELIMIT_WAIT
from .crypto import Crypto, CryptoError
from .errors import TRANSPORT_ERRORS
from .http import METER, ReadMeter, SpacesyncHTTPAPI, retry_after_ms
from .ratelimit import Episode, LostLeadership, ServerKind, WriteGate, WritePriority
from .room_encryption import Encryption
from .server import reads_state_after, refuses_state_ban, server_kind
from .state import REDACT_EVENTS_UNSTABLE

log = structlog.get_logger("spacesync.matrix")

USE_STATE_AFTER_UNSTABLE = "org.matrix.msc4222.use_state_after"
"""Synapse 1.163 reads only this name, for accounts with the msc4222 feature on (it advertises neither it nor
spec v1.16); other servers ignore a query parameter they do not know, so it is always asked."""
HIERARCHY_MIN_INTERVAL = 0.21
"""Synapse answers at most 5 hierarchy requests per second, whatever its configured limits."""
DEFAULT_TIMEOUT = 30.0
RATELIMIT_BUDGET = 600.0
"""The longest one request waits out 429 answers in total before its caller sees the 429."""


def _limit_class(method: Method, path: Any) -> str:
    """Which of the homeserver's rate limits a request counts against: a 429 pauses that class only."""
    text = str(path)
    if "/hierarchy" in text:
        return "hierarchy"
    if method == Method.POST and re.search(r"/join(/|$)", text):
        return "join"
    if method == Method.GET:
        return "read"
    # Room writes (kicks, bans, state, messages, redactions) share Synapse's rc_message; keys and to-device do not.
    return "write" if "/rooms/" in text else "other"


class ConnectError(Exception):
    """Login or the first request failed: one line for the operator."""


class MatrixAdapter:
    """A thin layer over mautrix's ClientAPI returning raw JSON where spacesync reads state itself."""

    def __init__(
        self,
        base_url: str,
        user_id: UserID,
        *,
        access_token: str | None = None,
        password: str | None = None,
        device_id: str | None = None,
        request_timeout: float = DEFAULT_TIMEOUT,
        ratelimit_budget: float = RATELIMIT_BUDGET,
        appservice_user: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_timeout = request_timeout
        self.ratelimit_budget = ratelimit_budget
        self._paused_until: dict[str, float] = {}
        """Per rate-limit class but writes: no request of that class starts before this (monotonic) time."""
        self.gate = WriteGate()
        """Room writes, one at a time in the slots the homeserver grants once it answers one with 429."""
        self.server_kind = ServerKind.UNKNOWN
        self.sync_options: dict[str, str] = {USE_STATE_AFTER_UNSTABLE: "true"}
        """Asked of every /sync: MSC4222's `use_state_after` (`probe_versions` adds the stable name)."""
        self.may_send: Callable[[], Awaitable[bool]] | None = None
        """Asked before a write is sent again after a rate-limit wait: an instance that lost its
        leadership lock meanwhile must not send it (LostLeadership is raised instead)."""
        self.ratelimit_wait_s = 0.0
        """Seconds the homeserver's 429 answers held requests back (wall time, overlapping waits once)."""
        self.user_id = user_id
        self._as_user = user_id if appservice_user else None
        """With an appservice's as_token: every request acts as this user (the spec's identity assertion)."""
        self._token = access_token
        self._password = password
        self._device_id = device_id or ""
        self.session: ClientSession | None = None
        self.client: ClientAPI | None = None
        self._hierarchy_lock = asyncio.Lock()
        self._last_hierarchy = 0.0
        self.crypto: Crypto | None = None
        """Encrypts what is posted into encrypted rooms; without it nothing is posted there."""

    def set_device_id(self, device_id: str) -> None:
        """The device a password login asks for (the one the crypto store belongs to)."""
        self._device_id = device_id

    @property
    def api(self) -> SpacesyncHTTPAPI:
        assert self.client is not None, "connect() first"
        return self.client.api  # type: ignore[return-value]

    async def connect(self, saved_token: str | None = None) -> str:
        """Log in (token or password) and confirm with whoami. Returns the access token in use."""
        self.session = ClientSession(timeout=ClientTimeout(total=None, sock_connect=10))
        api = SpacesyncHTTPAPI(
            self.base_url,
            self._token or saved_token or "",
            client_session=self.session,
            default_retry_count=0,
            log=cast(TraceLogger, logging.getLogger("spacesync.http")),
            as_user_id=self._as_user,
        )
        self.client = ClientAPI(self.user_id, DeviceID(self._device_id), api=api)
        try:
            if api.token:
                try:
                    return await self._whoami()
                except MUnknownToken as e:
                    if self._token or not self._password:
                        raise ConnectError(
                            "bot.access_token: the homeserver does not accept this token; "
                            "create a new one (log in as the bot) and update the config"
                        ) from e
            if self._password:
                resp = await asyncio.wait_for(
                    self.client.login(
                        identifier=self.user_id,
                        password=self._password,
                        device_id=self._device_id or None,
                        device_name="spacesync",
                    ),
                    self.request_timeout,
                )
                self.client.device_id = resp.device_id
                return await self._whoami()
            raise ConnectError("bot: no credential; set bot.access_token or bot.password")
        except TRANSPORT_ERRORS as e:
            raise ConnectError(
                f"homeserver.url: cannot reach {self.base_url} ({type(e).__name__}: {e}); "
                "check the URL and that the homeserver is up"
            ) from e
        except MForbidden as e:
            raise ConnectError(f"bot: login refused for {self.user_id} ({e.message}); check the password") from e
        except MatrixRequestError as e:
            raise ConnectError(
                f"homeserver.url: {self.base_url} answered {e.http_status} "
                f"({getattr(e, 'errcode', '')}: {getattr(e, 'message', '')})"
            ) from e

    async def _whoami(self) -> str:
        assert self.client is not None
        who = await self.request(Method.GET, Path.v3.account.whoami)
        if who.get("user_id") != self.user_id:
            raise ConnectError(f"bot.user_id: the token belongs to {who.get('user_id')}, not {self.user_id}")
        if isinstance(who.get("device_id"), str):
            self.client.device_id = DeviceID(who["device_id"])
        return self.api.token

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def request(
        self,
        method: Method,
        path: Any,
        content: Any = None,
        query: dict[str, Any] | None = None,
        timeout: float | None = None,
        priority: WritePriority = WritePriority.ACTION,
    ) -> Any:
        """One request, bounded by `timeout` (default: the configured request timeout), with 429 answers
        waited out: the wait pauses every request of the same rate-limit class, then this one is sent
        again, until the total wait would pass the budget (then the 429 is raised). Room writes go through
        the write gate instead (`WriteGate.write`)."""
        kind = _limit_class(method, path)
        if kind == "write":
            return await self.gate.write(
                lambda: asyncio.wait_for(
                    self.api.request(method, path, content=content, query_params=query or {}, retry_count=0),
                    timeout or self.request_timeout,
                ),
                priority,
                budget=self.ratelimit_budget,
                may_send=self.may_send,
                on_refused=lambda wait, sent: self._pause("write", wait, sent),
                what=str(path),
            )
        waited = 0.0
        again = False
        while True:
            pause = self._paused_until.get(kind, 0.0) - time.monotonic()
            if pause > 0:
                waited += pause
                await asyncio.sleep(pause)
            if again and kind != "read" and self.may_send is not None and not await self.may_send():
                raise LostLeadership()
            again = True
            try:
                return await asyncio.wait_for(
                    self.api.request(method, path, content=content, query_params=query or {}, retry_count=0),
                    timeout or self.request_timeout,
                )
            except MatrixRequestError as e:
                if e.http_status != 429:
                    raise
                wait = (retry_after_ms(e) or 1000) / 1000
                if waited + wait > self.ratelimit_budget:
                    log.warning("rate limited beyond the wait budget: giving up on this request", path=str(path))
                    raise
                self._pause(kind, wait)

    def paused_until(self, kind: str) -> float:
        """Until when (monotonic) the last 429 of a rate-limit class held that class back; 0.0: never."""
        if kind == "write":
            return self.gate.paused_until
        return self._paused_until.get(kind, 0.0)

    def _pause(self, kind: str, wait: float, sent_at: float | None = None) -> None:
        """Hold requests of one class for `wait` seconds (writes: from when the refused one was sent); count only
        time not already paused."""
        now = time.monotonic()
        current = max(self.paused_until(kind), now)
        until = (now if sent_at is None else sent_at) + wait
        if until > current:
            self.ratelimit_wait_s += until - current
            RATELIMIT_WAIT.inc(until - current)
        if kind == "write":
            self.gate.refused(wait, sent_at)
        elif until > current:
            self._paused_until[kind] = until
        log.debug("rate limited: pausing requests", kind=kind, wait_s=round(wait, 2))

    async def detect_server(self) -> ServerKind:
        """Synapse or another homeserver (what lifts the bot's rate limit depends on it); asked once."""
        if self.server_kind is ServerKind.UNKNOWN:
            self.server_kind = await server_kind(self)
        return self.server_kind

    async def probe_versions(self) -> None:
        """What `/versions` says the homeserver takes: from spec v1.16, `use_state_after` (MSC4222)."""
        if await reads_state_after(self):
            self.sync_options["use_state_after"] = "true"

    def on_rate_limited(self, report: Callable[[Episode], None]) -> None:
        """`report` is called once per rate-limit episode in which writes keep meeting 429s."""
        self.gate.on_report = report

    @staticmethod
    @contextmanager
    def metered() -> Iterator[ReadMeter]:
        """Counts the bytes and requests of every answer read inside the block (and by tasks it starts)."""
        meter = ReadMeter()
        token = METER.set(meter)
        try:
            yield meter
        finally:
            METER.reset(token)

    # region reading
    async def sync(
        self, since: str | None, timeout_ms: int, filter_json: str | None, *, wait: float | None = None
    ) -> dict[str, Any]:
        """One /sync; the request gives up after `wait` seconds (default: the long-poll plus the request timeout)."""
        query: dict[str, Any] = {"timeout": str(timeout_ms), **self.sync_options}
        if since:
            query["since"] = since
        if filter_json:
            query["filter"] = filter_json
        return await self.request(
            Method.GET, Path.v3.sync, query=query, timeout=wait or timeout_ms / 1000 + self.request_timeout
        )

    async def joined_rooms(self) -> set[RoomID]:
        data = await self.request(Method.GET, Path.v3.joined_rooms, timeout=30)
        return {RoomID(r) for r in data.get("joined_rooms", []) if isinstance(r, str)}

    async def room_state(self, room_id: RoomID, *, timeout: float = 60) -> list[dict[str, Any]]:
        data = await self.request(Method.GET, Path.v3.rooms[room_id].state, timeout=timeout)
        if not isinstance(data, list):
            raise ValueError(f"{room_id}: the homeserver's /state answer is not a list")
        return [e for e in data if isinstance(e, dict)]

    async def state_event(self, room_id: RoomID, event_type: str, state_key: str = "") -> dict[str, Any] | None:
        try:
            return await self.request(Method.GET, Path.v3.rooms[room_id].state[event_type][state_key], timeout=30)
        except MatrixRequestError as e:
            if e.http_status == 404:
                return None
            raise

    async def event(self, room_id: RoomID, event_id: str) -> dict[str, Any]:
        """One event of a room by id (`GET /rooms/{roomId}/event/{eventId}`)."""
        data = await self.request(Method.GET, Path.v3.rooms[room_id].event[event_id], timeout=15)
        if not isinstance(data, dict):
            raise ValueError(f"{room_id}: the homeserver's answer for event {event_id} is not an object")
        return data

    async def membership(self, room_id: RoomID, user_id: UserID) -> str | None:
        content = await self.state_event(room_id, "m.room.member", user_id)
        return content.get("membership") if content else None

    async def hierarchy(self, root: RoomID, max_depth: int, max_rooms: int) -> list[dict[str, Any]]:
        """Every room the hierarchy API shows below `root`, de-duplicated, paced to 5 requests/s."""
        rooms: dict[str, dict[str, Any]] = {}
        token: str | None = None
        while len(rooms) < max_rooms:
            query = {"limit": "50", "max_depth": str(max_depth)}
            if token:
                query["from"] = token
            async with self._hierarchy_lock:
                wait = self._last_hierarchy + HIERARCHY_MIN_INTERVAL - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._last_hierarchy = time.monotonic()
                data = await self.request(
                    Method.GET, f"/_matrix/client/v1/rooms/{quote(root, safe='')}/hierarchy", query=query, timeout=60
                )
            for room in data.get("rooms") or []:
                if isinstance(room, dict) and isinstance(room.get("room_id"), str):
                    rooms.setdefault(room["room_id"], room)
            token = data.get("next_batch")
            if not token:
                break
        return list(rooms.values())

    async def resolve_alias(self, alias: str) -> RoomID:
        data = await self.request(Method.GET, Path.v3.directory.room[RoomAlias(alias)])
        return RoomID(data["room_id"])

    # endregion

    # region acting
    async def join(self, room: str, via: list[str] | None = None) -> RoomID:
        query = {"server_name": list(via)} if via else None
        data = await self.request(Method.POST, Path.v3.join[room], content={}, query=query)
        joined = data.get("room_id") if isinstance(data, dict) else None
        return RoomID(joined if isinstance(joined, str) else room)

    async def leave(self, room_id: RoomID) -> None:
        await self.request(Method.POST, Path.v3.rooms[room_id].leave, content={})

    async def kick(self, room_id: RoomID, user_id: UserID, reason: str = "") -> None:
        await self.request(Method.POST, Path.v3.rooms[room_id].kick, content={"user_id": user_id, "reason": reason})

    async def ban(self, room_id: RoomID, user_id: UserID, reason: str = "", *, redact_events: bool = False) -> None:
        """`redact_events` (MSC4293) asks the server to redact the user's events too: sent under the stable name
        and the unstable one Synapse reads today. The ban is sent as the `m.room.member` state event itself, so
        the homeserver keeps the whole content (Synapse's `/ban` keeps only `reason`, and the unstable flag only
        with `msc4293_enabled`); the same membership handler and auth rules apply. A homeserver that refuses
        that form (404, 405, 501, 400 M_UNRECOGNIZED) gets it through `/ban`."""
        flags: dict[str, Any] = {"redact_events": True, REDACT_EVENTS_UNSTABLE: True} if redact_events else {}
        content = {"membership": "ban", **({"reason": reason} if reason else {}), **flags}
        try:
            await self.put_state(room_id, "m.room.member", content, user_id)
            return
        except MatrixRequestError as e:
            if not refuses_state_ban(e):
                raise
            log.info("the homeserver refuses a ban sent as state: sending it to /ban", error=f"{e.http_status} {e}")
        await self.request(
            Method.POST, Path.v3.rooms[room_id].ban, content={"user_id": user_id, "reason": reason, **flags}
        )

    async def recent_messages_of(
        self, room_id: RoomID, user_id: UserID, limit: int, scan: int = 500, since_ms: int | None = None
    ) -> list[str]:
        """Event ids of the user's last `limit` messages in the room (not state, not redacted), newest first,
        looking back at most `scan` events, and (`since_ms`) none sent before that time."""
        found: list[str] = []
        start: str | None = None
        seen = 0
        while len(found) < limit and seen < scan:
            query: dict[str, Any] = {"dir": "b", "limit": 100}
            if start:
                query["from"] = start
            data = await self.request(Method.GET, Path.v3.rooms[room_id].messages, query=query, timeout=30)
            chunk = data.get("chunk") or [] if isinstance(data, dict) else []
            for event in chunk:
                seen += 1
                ts = event.get("origin_server_ts") if isinstance(event, dict) else None
                if since_ms is not None and isinstance(ts, int) and ts < since_ms:
                    return found  # older than asked for: so is everything further back
                if (
                    isinstance(event, dict)
                    and event.get("sender") == user_id
                    and "state_key" not in event
                    and event.get("type") != "m.room.redaction"
                    and event.get("content")
                    and isinstance(event.get("event_id"), str)
                ):
                    found.append(event["event_id"])
                    if len(found) >= limit:
                        break
            start = data.get("end") if isinstance(data, dict) else None
            if not chunk or not start:
                break
        return found

    async def redact(self, room_id: RoomID, event_id: str, reason: str = "") -> None:
        txn = self.api.get_txn_id()
        await self.request(
            Method.PUT, Path.v3.rooms[room_id].redact[event_id][txn], content={"reason": reason} if reason else {}
        )

    async def unban(self, room_id: RoomID, user_id: UserID, reason: str = "") -> None:
        await self.request(Method.POST, Path.v3.rooms[room_id].unban, content={"user_id": user_id, "reason": reason})

    async def invite(self, room_id: RoomID, user_id: UserID, reason: str = "") -> None:
        await self.request(Method.POST, Path.v3.rooms[room_id].invite, content={"user_id": user_id, "reason": reason})

    async def put_state(self, room_id: RoomID, event_type: str, content: dict[str, Any], state_key: str = "") -> str:
        data = await self.request(Method.PUT, Path.v3.rooms[room_id].state[event_type][state_key], content=content)
        return data.get("event_id", "")

    async def send_notice(
        self,
        room_id: RoomID,
        body: str,
        html: str | None = None,
        reply_to: str | None = None,
        txn: str | None = None,
        *,
        plaintext_ok: bool = False,
    ) -> str:
        """A notice; sending again with the same `txn` cannot post it twice. In an encrypted room it is sent
        encrypted, or not at all (CryptoError) unless `plaintext_ok` (only for saying that encryption fails); in a
        room whose encryption is unknown (its state cannot be read), not at all."""
        content: dict[str, Any] = {"msgtype": "m.notice", "body": body}
        if html:
            content.update(format="org.matrix.custom.html", formatted_body=html)
        if reply_to:
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        txn = txn or self.api.get_txn_id()
        event_type = "m.room.message"
        encryption = await self.crypto.encryption(room_id) if self.crypto is not None else Encryption.PLAIN
        if encryption is Encryption.UNKNOWN:
            raise CryptoError(f"{room_id}: its state could not be read, so whether it is encrypted is unknown")
        if self.crypto is not None and encryption is Encryption.ENCRYPTED:
            if self.crypto.ready:
                content, event_type = await self.crypto.encrypt(room_id, event_type, content), "m.room.encrypted"
            elif not plaintext_ok:
                raise CryptoError(f"{room_id} is encrypted and {self.crypto.problem or 'encryption is off'}")
        data = await self.request(
            Method.PUT, Path.v3.rooms[room_id].send[event_type][txn], content=content, priority=WritePriority.NOTICE
        )
        return data.get("event_id", "")

    # endregion
