"""The homeserver's side of an application service, on mautrix's `AppServiceServerMixin`: transactions
authenticated by the hs_token, refused (503, the homeserver sends them again) while this instance cannot take
them, and answered only once their handler returned; a failing handler gets a 500, so nothing is lost. Also what
turns a transaction into the shape of a /sync answer, and the bot's device login (`m.login.application_service`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog
from aiohttp import web
from mautrix.api import Method, Path
from mautrix.appservice import AppServiceServerMixin
from mautrix.errors import MatrixRequestError

from ..metrics import APPSERVICE_TRANSACTIONS

log = structlog.get_logger("spacesync.appservice")

TransactionHandler = Callable[[str, list[dict[str, Any]]], Awaitable[None]]
LOGIN_TYPE = "m.login.application_service"


class TransactionServer(AppServiceServerMixin):
    """Listens for the homeserver's transactions (and its pings and user/alias queries, answered by mautrix)."""

    def __init__(self, hs_token: str, handler: TransactionHandler, refusal: Callable[[], str | None]) -> None:
        super().__init__(hs_token=hs_token, log=logging.getLogger("spacesync.appservice.http"))
        self.handler = handler
        self.refusal = refusal
        """Why this instance cannot take a transaction now (standing by, starting), or None."""
        self.app = web.Application()
        self.register_routes(self.app)
        self.runner: web.AppRunner | None = None
        self._lock = asyncio.Lock()

    async def start(self, host: str, port: int) -> None:
        """Listen; `reuse_port` lets an active and a standby instance on one host share the address."""
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port, reuse_port=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _http_handle_transaction(self, request: web.Request) -> web.Response:
        if not self._check_token(request):
            return _error(401, "M_UNKNOWN_TOKEN", "invalid hs_token")
        why = self.refusal()
        if why is not None:
            APPSERVICE_TRANSACTIONS.labels(outcome="refused").inc()
            return _error(503, "M_UNKNOWN", why)
        # mautrix reads the id and the body (400 on a body that is not JSON)
        txn_id, body = await self._read_transaction_header(request)
        events = body.get("events")
        if not isinstance(events, list):
            return _error(400, "M_BAD_JSON", "no events list in the transaction")
        async with self._lock:  # the homeserver sends one at a time; a retry racing its original waits
            why = self.refusal()
            if why is not None:
                APPSERVICE_TRANSACTIONS.labels(outcome="refused").inc()
                return _error(503, "M_UNKNOWN", why)
            try:
                await self.handler(txn_id, [e for e in events if isinstance(e, dict)])
            except Exception as e:  # answered 500: the homeserver sends it again
                APPSERVICE_TRANSACTIONS.labels(outcome="failed").inc()
                log.warning("could not apply a transaction", txn_id=txn_id, error=f"{type(e).__name__}: {e}")
                return _error(500, "M_UNKNOWN", "not applied; send it again")
        return web.json_response({})


def _error(status: int, errcode: str, message: str) -> web.Response:
    return web.Response(
        status=status, content_type="application/json", text=json.dumps({"errcode": errcode, "error": message})
    )


def sync_answer(events: list[dict[str, Any]], user_id: str, keep: frozenset[str]) -> dict[str, Any]:
    """A transaction's events as a /sync answer: the rooms the bot is joined to with their timelines (events of
    the `keep` types only, as the /sync filter would), invites of the bot with their stripped state, and rooms
    it left or was removed from."""
    join: dict[str, Any] = {}
    invite: dict[str, Any] = {}
    leave: dict[str, Any] = {}
    for event in events:
        room_id = event.get("room_id")
        if not isinstance(room_id, str):
            continue
        AppServiceServerMixin._fix_prev_content(cast(Any, event))
        own = event.get("type") == "m.room.member" and event.get("state_key") == user_id
        membership = (event.get("content") or {}).get("membership") if own else None
        if membership == "invite":
            stripped = (event.get("unsigned") or {}).get("invite_room_state") or []
            invite[room_id] = {"invite_state": {"events": [*stripped, event]}}
            continue
        if membership in ("leave", "ban"):
            join.pop(room_id, None)
            leave[room_id] = {"timeline": {"events": [event]}}
            continue
        if membership == "join":
            leave.pop(room_id, None)
            invite.pop(room_id, None)
        if event.get("type") not in keep:
            continue
        room = join.setdefault(room_id, {"timeline": {"events": [], "limited": False}})
        room["timeline"]["events"].append(event)
    return {"rooms": {"join": join, "invite": invite, "leave": leave}}


async def register_user(request: Callable[..., Awaitable[Any]], localpart: str) -> bool:
    """Make sure the bot's account exists (an appservice acts only as users that exist); False when it did."""
    try:
        await request(Method.POST, Path.v3.register, {"type": LOGIN_TYPE, "username": localpart, "inhibit_login": True})
    except MatrixRequestError as e:
        if e.errcode == "M_USER_IN_USE":
            return False
        raise
    return True


async def device_login(request: Callable[..., Awaitable[Any]], user_id: str, device_id: str | None) -> tuple[str, str]:
    """A device for the bot, logged in with the as_token (`request` sends with it): its access token and id. Stock
    Synapse supports this login type (no experimental flag); the device carries the bot's encryption keys."""
    content: dict[str, Any] = {
        "type": LOGIN_TYPE,
        "identifier": {"type": "m.id.user", "user": user_id},
        "initial_device_display_name": "spacesync",
    }
    if device_id:
        content["device_id"] = device_id
    answer = await request(Method.POST, Path.v3.login, content)
    return str(answer["access_token"]), str(answer["device_id"])
