"""A small raw Matrix client, independent of mautrix, and the accounts it is logged in as."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import attrs

from .waiting import wait_for

__all__ = ["JSON", "TestClient", "TestUser", "TestbedRequestError"]

JSON = dict[str, Any]

_RATE_LIMIT_PATIENCE: Final = 120.0


class TestbedRequestError(Exception):
    """A non-2xx answer from the homeserver."""

    __test__ = False

    def __init__(self, status: int, errcode: str | None, error: str | None, body: Any) -> None:
        super().__init__(f"HTTP {status} {errcode or ''}: {error or body!r}")
        self.status = status
        self.errcode = errcode
        self.error = error
        self.body = body


async def _matrix_request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    token: str | None = None,
    json_body: Any = None,
    params: Sequence[tuple[str, str]] | None = None,
    on_rate_limited: Callable[[], None] | None = None,
) -> Any:
    """Send a request, wait out 429 answers as told, raise TestbedRequestError on other errors."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    waited = 0.0
    while True:
        async with session.request(method, url, json=json_body, params=params, headers=headers) as resp:
            text = await resp.text()
            status = resp.status
            retry_after_header = resp.headers.get("Retry-After")
        try:
            body: Any = json.loads(text) if text else {}
        except ValueError:
            body = text
        if 200 <= status < 300:
            return body
        errcode = body.get("errcode") if isinstance(body, dict) else None
        error = body.get("error") if isinstance(body, dict) else None
        if status == 429:
            delay = _retry_delay(body, retry_after_header)
            if waited + delay <= _RATE_LIMIT_PATIENCE:
                if on_rate_limited is not None:
                    on_rate_limited()
                waited += delay
                await asyncio.sleep(delay)
                continue
        raise TestbedRequestError(status, errcode, error, body)


def _retry_delay(body: Any, retry_after_header: str | None) -> float:
    if isinstance(body, dict) and isinstance(body.get("retry_after_ms"), int | float):
        return max(float(body["retry_after_ms"]) / 1000, 0.0)
    if retry_after_header is not None:
        try:
            return max(float(retry_after_header), 0.0)
        except ValueError:
            pass
    return 1.0


def _q(segment: str) -> str:
    return quote(segment, safe="")


@attrs.frozen
class TestUser:
    """A registered account and a client logged in as it."""

    __test__ = False

    user_id: str
    access_token: str
    password: str
    device_id: str
    client: TestClient


class TestClient:
    """A small raw client-server API client, independent of mautrix, over one aiohttp session."""

    __test__ = False

    def __init__(self, base_url: str, access_token: str, user_id: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self.user_id = user_id
        self.rate_limited_count = 0
        """How many 429 answers this client has waited out."""
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._txn_prefix = secrets.token_hex(4)
        self._txn_counter = itertools.count()

    @property
    def server_name(self) -> str:
        return self.user_id.split(":", 1)[1]

    async def __aenter__(self) -> TestClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _count_rate_limited(self) -> None:
        self.rate_limited_count += 1

    async def request(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        params: Mapping[str, str | Iterable[str]] | None = None,
    ) -> Any:
        """Call any endpoint, e.g. ``request("GET", "/_matrix/client/v1/rooms/!r:hs/hierarchy")``.

        Query parameters given as a list are repeated (``{"via": ["a", "b"]}``).
        """
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        pairs: list[tuple[str, str]] = []
        for key, value in (params or {}).items():
            if isinstance(value, str):
                pairs.append((key, value))
            else:
                pairs.extend((key, item) for item in value)
        return await _matrix_request(
            self._session,
            method,
            self.base_url + path,
            token=self.access_token,
            json_body=json_body,
            params=pairs,
            on_rate_limited=self._count_rate_limited,
        )

    def _txn_id(self) -> str:
        return f"tb{self._txn_prefix}.{next(self._txn_counter)}"

    # Account

    async def whoami(self) -> JSON:
        result: JSON = await self.request("GET", "/_matrix/client/v3/account/whoami")
        return result

    async def joined_rooms(self) -> set[str]:
        result = await self.request("GET", "/_matrix/client/v3/joined_rooms")
        return set(result["joined_rooms"])

    # Rooms and Spaces

    async def create_room(
        self,
        *,
        name: str | None = None,
        room_version: str = "10",
        space: bool = False,
        join_rule: str | None = None,
        allow: Iterable[str] = (),
        invite: Iterable[str] = (),
        preset: str | None = None,
        power_level_content_override: Mapping[str, Any] | None = None,
        initial_state: Iterable[Mapping[str, Any]] = (),
        creation_content: Mapping[str, Any] | None = None,
    ) -> str:
        """Create a room and return its id.

        ``allow`` lists the rooms whose members may join a ``restricted`` or
        ``knock_restricted`` room.
        """
        allow = list(allow)
        state = [dict(event) for event in initial_state]
        if join_rule is not None:
            state.append(
                {
                    "type": "m.room.join_rules",
                    "state_key": "",
                    "content": _join_rule(join_rule, allow),
                }
            )
        elif allow:
            raise ValueError("allow needs join_rule='restricted' or 'knock_restricted'")
        creation = dict(creation_content or {})
        if space:
            creation["type"] = "m.space"
        body: JSON = {"room_version": room_version, "initial_state": state}
        if name is not None:
            body["name"] = name
        if creation:
            body["creation_content"] = creation
        if invite := list(invite):
            body["invite"] = invite
        if preset is not None:
            body["preset"] = preset
        if power_level_content_override is not None:
            body["power_level_content_override"] = dict(power_level_content_override)
        result = await self.request("POST", "/_matrix/client/v3/createRoom", body)
        room_id: str = result["room_id"]
        return room_id

    async def create_space(
        self,
        *,
        name: str | None = None,
        room_version: str = "10",
        join_rule: str | None = None,
        allow: Iterable[str] = (),
        invite: Iterable[str] = (),
        preset: str | None = None,
        power_level_content_override: Mapping[str, Any] | None = None,
        initial_state: Iterable[Mapping[str, Any]] = (),
        creation_content: Mapping[str, Any] | None = None,
    ) -> str:
        """Create a Space (a room of type ``m.space``) and return its id."""
        return await self.create_room(
            name=name,
            room_version=room_version,
            space=True,
            join_rule=join_rule,
            allow=allow,
            invite=invite,
            preset=preset,
            power_level_content_override=power_level_content_override,
            initial_state=initial_state,
            creation_content=creation_content,
        )

    async def add_child(
        self,
        space_id: str,
        child_id: str,
        *,
        via: Iterable[str] | None = None,
        suggested: bool = False,
    ) -> str:
        content = {
            "via": list(via) if via is not None else [self.server_name],
            "suggested": suggested,
        }
        return await self.send_state(space_id, "m.space.child", content, state_key=child_id)

    async def set_parent(
        self,
        child_id: str,
        parent_id: str,
        *,
        canonical: bool = True,
        via: Iterable[str] | None = None,
    ) -> str:
        content = {
            "via": list(via) if via is not None else [self.server_name],
            "canonical": canonical,
        }
        return await self.send_state(child_id, "m.space.parent", content, state_key=parent_id)

    async def upgrade_room(self, room_id: str, new_version: str) -> str:
        """Upgrade a room and return the replacement room's id."""
        result = await self.request(
            "POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/upgrade", {"new_version": new_version}
        )
        new_room_id: str = result["replacement_room"]
        return new_room_id

    async def create_alias(self, alias: str, room_id: str) -> None:
        await self.request("PUT", f"/_matrix/client/v3/directory/room/{_q(alias)}", {"room_id": room_id})

    async def set_room_alias(self, room_id: str, alias: str) -> str:
        """Create ``alias`` for the room and make it the canonical alias."""
        await self.create_alias(alias, room_id)
        return await self.send_state(room_id, "m.room.canonical_alias", {"alias": alias})

    # Membership

    async def join(self, room_id_or_alias: str, *, via: Iterable[str] | None = None) -> str:
        """Join a room by id or alias and return its id."""
        params = {"via": list(via)} if via is not None else None
        result = await self.request("POST", f"/_matrix/client/v3/join/{_q(room_id_or_alias)}", {}, params=params)
        room_id: str = result["room_id"]
        return room_id

    async def leave(self, room_id: str, *, reason: str | None = None) -> None:
        await self._membership(room_id, "leave", None, reason)

    async def invite(self, room_id: str, user_id: str, *, reason: str | None = None) -> None:
        await self._membership(room_id, "invite", user_id, reason)

    async def kick(self, room_id: str, user_id: str, *, reason: str | None = None) -> None:
        await self._membership(room_id, "kick", user_id, reason)

    async def ban(self, room_id: str, user_id: str, *, reason: str | None = None) -> None:
        await self._membership(room_id, "ban", user_id, reason)

    async def unban(self, room_id: str, user_id: str, *, reason: str | None = None) -> None:
        await self._membership(room_id, "unban", user_id, reason)

    async def _membership(self, room_id: str, action: str, user_id: str | None, reason: str | None) -> None:
        body: JSON = {}
        if user_id is not None:
            body["user_id"] = user_id
        if reason is not None:
            body["reason"] = reason
        await self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/{action}", body)

    async def members(self, room_id: str) -> dict[str, str]:
        """Map every user with a membership event in the room to its membership."""
        result = await self.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/members")
        return {event["state_key"]: event["content"]["membership"] for event in result["chunk"]}

    async def joined_members(self, room_id: str) -> set[str]:
        result = await self.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/joined_members")
        return set(result["joined"])

    # State

    async def get_state(self, room_id: str) -> list[JSON]:
        result: list[JSON] = await self.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/state")
        return result

    async def get_state_event(self, room_id: str, event_type: str, state_key: str = "") -> JSON | None:
        """Return the content of a state event, or None if there is none."""
        try:
            result: JSON = await self.request("GET", self._state_path(room_id, event_type, state_key))
        except TestbedRequestError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def send_state(self, room_id: str, event_type: str, content: Mapping[str, Any], state_key: str = "") -> str:
        result = await self.request("PUT", self._state_path(room_id, event_type, state_key), dict(content))
        event_id: str = result["event_id"]
        return event_id

    @staticmethod
    def _state_path(room_id: str, event_type: str, state_key: str) -> str:
        return f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}"

    async def get_power_levels(self, room_id: str) -> JSON:
        content = await self.get_state_event(room_id, "m.room.power_levels")
        if content is None:
            raise LookupError(f"{room_id} has no m.room.power_levels")
        return content

    async def set_user_level(self, room_id: str, user_id: str, level: int) -> str:
        content = await self.get_power_levels(room_id)
        content["users"] = {**content.get("users", {}), user_id: level}
        return await self.send_state(room_id, "m.room.power_levels", content)

    async def set_join_rule(self, room_id: str, join_rule: str, allow: Iterable[str] | None = None) -> str:
        content = _join_rule(join_rule, list(allow) if allow is not None else None)
        return await self.send_state(room_id, "m.room.join_rules", content)

    # Messages

    async def send_event(self, room_id: str, event_type: str, content: Mapping[str, Any]) -> str:
        result = await self.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{_q(room_id)}/send/{_q(event_type)}/{self._txn_id()}",
            dict(content),
        )
        event_id: str = result["event_id"]
        return event_id

    async def send_text(self, room_id: str, body: str, *, html: str | None = None, reply_to: str | None = None) -> str:
        content: JSON = {"msgtype": "m.text", "body": body}
        if html is not None:
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = html
        if reply_to is not None:
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        return await self.send_event(room_id, "m.room.message", content)

    async def edit_text(self, room_id: str, original_event_id: str, new_body: str) -> str:
        content = {
            "msgtype": "m.text",
            "body": f"* {new_body}",
            "m.new_content": {"msgtype": "m.text", "body": new_body},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original_event_id},
        }
        return await self.send_event(room_id, "m.room.message", content)

    async def messages(self, room_id: str, limit: int = 50) -> list[JSON]:
        """Return the room's latest events, newest first."""
        result = await self.request(
            "GET",
            f"/_matrix/client/v3/rooms/{_q(room_id)}/messages",
            params={"dir": "b", "limit": str(limit)},
        )
        chunk: list[JSON] = result["chunk"]
        return chunk

    wait_for = staticmethod(wait_for)


def _join_rule(join_rule: str, allow: list[str] | None) -> JSON:
    content: JSON = {"join_rule": join_rule}
    if allow is not None and (allow or join_rule in ("restricted", "knock_restricted")):
        content["allow"] = [{"type": "m.room_membership", "room_id": room} for room in allow]
    return content
