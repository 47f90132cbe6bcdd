"""Admin-room notices: decides what is announced, and once, and posts what the injected renderer makes of
each event. The engine never formats a notice itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import structlog
from mautrix.errors import MatrixRequestError

from ..matrix import MatrixAdapter
from ..matrix.crypto import CryptoError
from ..matrix.errors import REQUEST_ERRORS
from ..model import ActionKind, RoomID
from ..store import Store
from ..store.journal import Entry
from .events import ActionParked, BatchFinished, Event, RoomsNeedAttention
from .executor import redaction_key, refusal_reason

log = structlog.get_logger("spacesync")
NOTICE_ATTEMPTS = 4


class Notice(Protocol):
    @property
    def text(self) -> str: ...

    @property
    def html(self) -> str | None: ...


Renderer = Callable[[Event], Notice]


class Announcer:
    """The engine's event listener: one notice per event in the admin room."""

    def __init__(
        self, matrix: MatrixAdapter, store: Store, *, admin_room: Callable[[], RoomID | None], render: Renderer
    ) -> None:
        self.matrix = matrix
        self.store = store
        self.admin_room = admin_room
        self.render = render
        self._attention: set[tuple[RoomID, str]] = set()

    async def __call__(self, event: Event) -> None:
        if isinstance(event, RoomsNeedAttention):
            # Once per room and finding code: a finding whose text embeds a changing number (members, levels)
            # is the same matter and is not announced again on every full reconcile.
            fresh = [f for f in event.findings if (f.room_id, f.code) not in self._attention]
            if not fresh:
                return
            self._attention.update((f.room_id, f.code) for f in fresh)
            event = RoomsNeedAttention(findings=fresh)
        notice = self.render(event)
        await self.notify(notice.text, notice.html)

    async def notify(self, text: str, html: str | None = None) -> None:
        """One notice in the admin room; never lets a failure to announce stop the work.

        Rate limits are waited out by the adapter; a timeout or a 5xx is tried again a few times with the
        same transaction id, so the notice is posted once."""
        admin_room = self.admin_room()
        if admin_room is None:
            return
        txn = self.matrix.api.get_txn_id()
        for attempt in range(1, NOTICE_ATTEMPTS + 1):
            try:
                await self.matrix.send_notice(admin_room, text, html, txn=txn)
                return
            except CryptoError as e:  # an encrypted room and no way to encrypt: never plaintext
                log.warning("could not post to the admin room", admin_room=str(admin_room), error=str(e))
                return
            except REQUEST_ERRORS as e:
                transient = not isinstance(e, MatrixRequestError) or e.http_status >= 500 or e.http_status == 429
                if not transient or attempt == NOTICE_ATTEMPTS:
                    log.warning("could not post to the admin room", error=f"{type(e).__name__}: {e}")
                    return
                await asyncio.sleep(attempt)

    async def parked(self, entry: Entry, error: str) -> None:
        """One notice per action and reason when an action is parked."""
        if not await self.store.journal.first_notice(f"{entry.action.key}|{refusal_reason(error)}"):
            return
        await self(ActionParked(entry=entry, error=error))

    async def batch_finished(self, batch: str, trigger: str, entries: list[Entry]) -> None:
        """One notice per finished batch: what was done to whom, where, what failed, how to undo."""
        if not await self.store.journal.mark_announced(batch):
            return
        left = await self.store.journal.left_behind(batch)
        redacted: dict[RoomID, int] = {}
        for entry in entries:
            run = (entry.action.content or {}).get("run") if entry.action.kind is ActionKind.REDACT else None
            if run:
                count = await self.store.get(redaction_key(str(run), entry.action.room_id))
                redacted[entry.action.room_id] = int(count or 0)
        await self(BatchFinished(batch=batch, trigger=trigger, entries=entries, left_behind=left, redacted=redacted))
