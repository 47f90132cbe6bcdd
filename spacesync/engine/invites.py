"""The invite policy: invites from admins only, and only to the admin room or to rooms under a managed Space."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from mautrix.errors import MatrixRequestError

from ..core.routing import via_servers
from ..matrix import MatrixAdapter
from ..matrix.errors import REQUEST_ERRORS, StateUnknown
from ..model import RoomID, UserID
from ..refs import server_name
from ..store import Store
from .observer import Observer

log = structlog.get_logger("spacesync")


class Invites:
    """Accepts, declines or keeps pending the invites /sync delivers.

    An admin's invite to a room the walk has not reached yet stays pending (not declined) and is looked at
    again after each full reconcile; pending invites survive a restart, as /sync does not deliver them again.
    """

    def __init__(
        self,
        matrix: MatrixAdapter,
        store: Store,
        observer: Observer,
        *,
        is_admin: Callable[[UserID], Awaitable[bool]],
        admin_room: Callable[[], RoomID | None],
        request_reconcile: Callable[..., None],
    ) -> None:
        self.matrix = matrix
        self.store = store
        self.observer = observer
        self.is_admin = is_admin
        self.admin_room = admin_room
        self.request_reconcile = request_reconcile
        self.pending: dict[RoomID, UserID] = {}

    async def load(self) -> None:
        invites = await self.store.get("pending_invites")
        self.pending = {RoomID(r): UserID(u) for r, u in json.loads(invites or "{}").items()}

    async def on_invite(self, room_id: RoomID, room: dict[str, Any]) -> None:
        inviter = None
        for event in (room.get("invite_state") or {}).get("events") or []:
            if event.get("type") == "m.room.member" and event.get("state_key") == self.matrix.user_id:
                inviter = event.get("sender")
        try:
            admin = inviter is not None and await self.is_admin(UserID(inviter))
        except StateUnknown as e:  # unknown is not "no": the invite stays, answered at the next start
            log.warning(
                "invite left unanswered: cannot tell whether the inviter is an admin", room=room_id, error=str(e)
            )
            return
        if inviter is None or not admin:
            log.info("invite declined: not from an admin", room=room_id, inviter=inviter)
            try:
                await self.matrix.leave(room_id)
            except REQUEST_ERRORS:
                pass
            return
        self.pending[room_id] = UserID(inviter)
        await self.accept()

    async def _save(self) -> None:
        await self.store.put("pending_invites", json.dumps(self.pending))

    async def accept(self) -> None:
        """Join the pending invites' rooms that are now known; keep the others pending."""
        for room_id, inviter in list(self.pending.items()):
            if room_id != self.admin_room() and room_id not in self.observer.seen:
                log.info("invite pending: the room is not listed under a managed Space", room=room_id, inviter=inviter)
                await self._save()
                continue
            del self.pending[room_id]
            await self._save()
            try:
                # the inviter's server is in the room; v12 room ids name none
                inviter_server = [server] if (server := server_name(inviter)) else []
                await self.matrix.join(
                    room_id, via_servers(room_id, inviter_server, self.observer.via_for(room_id, [], []))
                )
            except MatrixRequestError as e:
                log.warning("could not join after invite", room=room_id, error=getattr(e, "message", str(e)))
                continue
            log.info("joined after an admin's invite", room=room_id, inviter=inviter)
            self.observer.joined_now(room_id)
            self.request_reconcile(full=True)
