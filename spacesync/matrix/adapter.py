"""The only code that talks to the homeserver: login, /sync, state reads, the hierarchy and actions."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import quote

import structlog
from aiohttp import ClientError, ClientSession, ClientTimeout
from mautrix.api import Method, Path
from mautrix.client import ClientAPI
from mautrix.errors import MatrixConnectionError, MatrixRequestError, MForbidden, MUnknownToken
from mautrix.types import RoomAlias, RoomID, UserID

from .http import SpacesyncHTTPAPI

log = structlog.get_logger("spacesync.matrix")

HIERARCHY_MIN_INTERVAL = 0.21
"""Synapse answers at most 5 hierarchy requests per second, whatever its configured limits."""


class ConnectError(Exception):
    """Login or the first request failed: one line for the operator."""


class MatrixAdapter:
    """A thin layer over mautrix's ClientAPI returning raw JSON where spacesync reads state itself."""

    def __init__(self, base_url: str, user_id: UserID, *, access_token: str | None = None,
                 password: str | None = None, device_id: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.user_id = user_id
        self._token = access_token
        self._password = password
        self._device_id = device_id or ""
        self.session: ClientSession | None = None
        self.client: ClientAPI | None = None
        self._hierarchy_lock = asyncio.Lock()
        self._last_hierarchy = 0.0

    @property
    def api(self) -> SpacesyncHTTPAPI:
        assert self.client is not None, "connect() first"
        return self.client.api  # type: ignore[return-value]

    async def connect(self, saved_token: str | None = None) -> str:
        """Log in (token or password) and confirm with whoami. Returns the access token in use."""
        self.session = ClientSession(timeout=ClientTimeout(total=None, sock_connect=10))
        api = SpacesyncHTTPAPI(self.base_url, self._token or saved_token or "", client_session=self.session,
                               default_retry_count=0, log=logging.getLogger("spacesync.http"))
        self.client = ClientAPI(self.user_id, self._device_id, api=api)
        try:
            if api.token:
                try:
                    return await self._whoami()
                except MUnknownToken:
                    if self._token or not self._password:
                        raise ConnectError("bot.access_token: the homeserver does not accept this token; "
                                           "create a new one (log in as the bot) and update the config")
            if self._password:
                resp = await self.client.login(identifier=self.user_id, password=self._password,
                                               device_id=self._device_id or None,
                                               device_name="spacesync")
                self.client.device_id = resp.device_id
                return await self._whoami()
            raise ConnectError("bot: no credential; set bot.access_token or bot.password")
        except (ClientError, MatrixConnectionError, OSError, asyncio.TimeoutError) as e:
            raise ConnectError(f"homeserver.url: cannot reach {self.base_url} ({type(e).__name__}: {e}); "
                               "check the URL and that the homeserver is up") from e
        except MForbidden as e:
            raise ConnectError(f"bot: login refused for {self.user_id} ({e.message}); check the password") from e
        except MatrixRequestError as e:
            raise ConnectError(f"homeserver.url: {self.base_url} answered {e.http_status} "
                               f"({getattr(e, 'errcode', '')}: {getattr(e, 'message', '')})") from e

    async def _whoami(self) -> str:
        assert self.client is not None
        who = await self.client.whoami()
        if who.user_id != self.user_id:
            raise ConnectError(f"bot.user_id: the token belongs to {who.user_id}, not {self.user_id}")
        return self.api.token

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def request(self, method: Method, path: Any, content: Any = None,
                      query: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        coro = self.api.request(method, path, content=content, query_params=query or {}, retry_count=0)
        if timeout is None:
            return await coro
        return await asyncio.wait_for(coro, timeout)

    # region reading
    async def sync(self, since: str | None, timeout_ms: int, filter_json: str | None) -> dict[str, Any]:
        query: dict[str, Any] = {"timeout": str(timeout_ms)}
        if since:
            query["since"] = since
        if filter_json:
            query["filter"] = filter_json
        return await self.request(Method.GET, Path.v3.sync, query=query, timeout=timeout_ms / 1000 + 30)

    async def joined_rooms(self) -> set[RoomID]:
        data = await self.request(Method.GET, Path.v3.joined_rooms, timeout=30)
        return {RoomID(r) for r in data.get("joined_rooms", []) if isinstance(r, str)}

    async def room_state(self, room_id: RoomID) -> list[dict[str, Any]]:
        data = await self.request(Method.GET, Path.v3.rooms[room_id].state, timeout=60)
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
                data = await self.request(Method.GET, f"/_matrix/client/v1/rooms/{quote(root, safe='')}/hierarchy",
                                          query=query, timeout=60)
            for room in data.get("rooms") or []:
                if isinstance(room, dict) and isinstance(room.get("room_id"), str):
                    rooms.setdefault(room["room_id"], room)
            token = data.get("next_batch")
            if not token:
                break
        return list(rooms.values())

    async def resolve_alias(self, alias: str) -> RoomID:
        assert self.client is not None
        info = await self.client.resolve_room_alias(RoomAlias(alias))
        return info.room_id
    # endregion

    # region acting
    async def join(self, room: str, via: list[str] | None = None) -> RoomID:
        assert self.client is not None
        return await self.client.join_room(room, servers=via or None, max_retries=0)

    async def leave(self, room_id: RoomID) -> None:
        await self.request(Method.POST, Path.v3.rooms[room_id].leave, content={})

    async def kick(self, room_id: RoomID, user_id: UserID, reason: str = "") -> None:
        await self.request(Method.POST, Path.v3.rooms[room_id].kick, content={"user_id": user_id, "reason": reason})

    async def ban(self, room_id: RoomID, user_id: UserID, reason: str = "") -> None:
        await self.request(Method.POST, Path.v3.rooms[room_id].ban, content={"user_id": user_id, "reason": reason})

    async def unban(self, room_id: RoomID, user_id: UserID, reason: str = "") -> None:
        await self.request(Method.POST, Path.v3.rooms[room_id].unban, content={"user_id": user_id, "reason": reason})

    async def invite(self, room_id: RoomID, user_id: UserID, reason: str = "") -> None:
        await self.request(Method.POST, Path.v3.rooms[room_id].invite, content={"user_id": user_id, "reason": reason})

    async def put_state(self, room_id: RoomID, event_type: str, content: dict[str, Any], state_key: str = "") -> str:
        data = await self.request(Method.PUT, Path.v3.rooms[room_id].state[event_type][state_key], content=content)
        return data.get("event_id", "")

    async def send_notice(self, room_id: RoomID, body: str, html: str | None = None,
                          reply_to: str | None = None, txn_id: str | None = None) -> str:
        """Post a notice; a fixed `txn_id` makes sending it again a no-op on the homeserver."""
        content: dict[str, Any] = {"msgtype": "m.notice", "body": body}
        if html:
            content.update(format="org.matrix.custom.html", formatted_body=html)
        if reply_to:
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        txn = txn_id or self.api.get_txn_id()
        data = await self.request(Method.PUT, Path.v3.rooms[room_id].send["m.room.message"][txn], content=content)
        return data.get("event_id", "")
    # endregion
