"""The /sync loop: feeds the state cache, triggers reconciles, hands invites to the invite policy and queues
admin-room commands."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import structlog
from mautrix.errors import MUnknownToken

from ..backoff import backoff
from ..matrix import MatrixAdapter, StateCache
from ..matrix.errors import REQUEST_ERRORS
from ..metrics import LAST_SYNC, SYNC_LAG
from ..model import RULE_TYPES, RoomID
from ..store import Store
from .errors import FatalError
from .health import DatabaseHealth
from .invites import Invites
from .observer import Observer
from .queue import CommandQueue

log = structlog.get_logger("spacesync")

TRIGGER_TYPES = frozenset(
    {
        "m.room.member",
        "m.space.child",
        "m.space.parent",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.tombstone",
        "m.room.create",
        "m.room.server_acl",
        "m.room.policy",
        "org.matrix.msc4284.policy",
        *RULE_TYPES,
    }
)
STATE_TYPES = sorted(TRIGGER_TYPES | {"m.room.name", "m.room.encryption"})
"""The state spacesync reads: the planner's (TRIGGER_TYPES), room names, and the admin room's encryption."""
COMMAND_TYPES = ("m.room.message", "m.room.encrypted")
"""Timeline events read besides state changes: the admin room's commands, plain or encrypted."""


def sync_filter(timeline_limit: int, *, lazy_members: bool = True) -> str:
    """Only the state types spacesync reads, and of the timeline only those and the admin room's commands.

    The first /sync lazy-loads members: its `state` section then holds, of the members, only the timeline's
    senders, so an account in 1,000 rooms of 1,000 members gets a few MB, not every membership (each room
    is read once from /state anyway). Later answers are eager: their `state` section holds only the state that
    changed in a gap before a `limited` timeline (nothing otherwise), and the homeserver computes no room
    summary for them (Synapse does for every lazy-loading answer with a membership change: measurable
    during a big batch, when each kick comes back). A gappy room is read again from /state all the same."""
    return json.dumps(
        {
            "presence": {"types": []},
            "account_data": {"types": []},
            "room": {
                "timeline": {"limit": timeline_limit, "types": [*STATE_TYPES, *COMMAND_TYPES]},
                "state": {"lazy_load_members": lazy_members, "types": STATE_TYPES},
                "ephemeral": {"types": []},
                "account_data": {"types": []},
            },
        }
    )


SYNC_FILTER = sync_filter(50, lazy_members=False)
FIRST_SYNC_FILTER = sync_filter(1, lazy_members=True)
"""The first /sync (no saved position) only finds the position to follow from: every room is read from /state
at the start anyway, and commands sent before it are not run."""
PROGRESS_EVERY = 30.0
"""While a slow first /sync is waited for, a progress line this often."""
OWN_ECHOES = frozenset({"m.room.member", "m.room.power_levels", "m.room.join_rules"})
"""The bot's own changes of these kinds come back through /sync already applied to the cache."""

SyncHandler = Callable[[dict[str, Any]], Awaitable[None]]
"""Looks at one /sync answer before the loop reads its rooms (e.g. to decrypt what it carries)."""


STATE_AFTER = ("state_after", "org.matrix.msc4222.state_after")
"""MSC4222's section (spec v1.16), under its stable and unstable names."""


class StateEvents(list[dict[str, Any]]):
    """A room's state changes in one /sync answer, in the order to apply them; `after`: from `state_after`."""

    after: bool = False


def room_state_events(room: dict[str, Any], timeline_state: list[dict[str, Any]]) -> StateEvents:
    """The state events of one joined room's /sync section, in the order to apply them. With `state_after`
    (MSC4222: the state at the end of the timeline, asked with `use_state_after`) the timeline's state events
    come first and `state_after` wins over them: it is right where the timeline is not (a state reset). Without
    it, the `state` section (the state before the timeline) comes first, then the timeline's."""
    result = StateEvents()
    for name in STATE_AFTER:
        after = room.get(name)
        if isinstance(after, dict):  # an event in both is applied twice: the same result
            result.extend(timeline_state + [e for e in after.get("events") or [] if isinstance(e, dict)])
            result.after = True
            return result
    result.extend([*((room.get("state") or {}).get("events") or []), *timeline_state])
    return result


class SyncLoop:
    """Follows /sync: one answer at a time, the position saved only after its commands are queued."""

    def __init__(
        self,
        matrix: MatrixAdapter,
        cache: StateCache,
        store: Store,
        observer: Observer,
        health: DatabaseHealth,
        invites: Invites,
        commands: CommandQueue,
        *,
        admin_room: Callable[[], RoomID | None],
        request_reconcile: Callable[..., None],
        initial_sync_timeout: float = 600.0,
    ) -> None:
        self.matrix = matrix
        self.cache = cache
        self.store = store
        self.observer = observer
        self.health = health
        self.invites = invites
        self.commands = commands
        self.admin_room = admin_room
        self.request_reconcile = request_reconcile
        self.initial_sync_timeout = initial_sync_timeout
        self.handlers: list[SyncHandler] = []
        """Hooks run on each answer, in order, before its rooms are read."""
        self.homeserver_up = False
        self.synced = False
        self.last_sync_at: float | None = None
        self.state_after_answers = 0
        """Room sections applied from MSC4222's `state_after` (the homeserver honoured `use_state_after`)."""

    async def run(self) -> None:
        # What happened while this instance did not follow /sync (down, standing by) is in no answer: every
        # room is read from /state once, after the first answer has fixed the position to follow from.
        self.observer.reread_all()
        await self.matrix.probe_versions()
        positioned = self.observer.positioned = asyncio.Event()
        since = await self.health.call("read the sync position", lambda: self.store.get("next_batch"))
        failures = 0
        while True:
            try:
                # No long-poll while recovering, nor on the first request after a start or a takeover: a
                # homeserver back up, or a new leader, is ready at once, not after a quiet 30 s long-poll.
                long_poll = since and not failures and self.synced
                if long_poll:
                    data = await self.matrix.sync(since, 30000, SYNC_FILTER)
                elif not self.synced:
                    data = await self.first_sync(since)
                else:
                    data = await self.matrix.sync(since, 0, SYNC_FILTER)
            except MUnknownToken as e:
                raise FatalError("bot.access_token: the homeserver no longer accepts the token; log in again") from e
            except REQUEST_ERRORS as e:
                failures += 1
                self.homeserver_up = False
                wait = backoff(failures)
                if failures == 1:
                    log.warning("homeserver unreachable: retrying with backoff", error=f"{type(e).__name__}: {e}")
                else:
                    log.debug("sync still failing", attempt=failures, wait_s=wait)
                await asyncio.sleep(wait)
                continue
            if failures:
                log.info("homeserver reachable again", after_failures=failures)
                self.observer.reread_all()
                self.request_reconcile(full=True)
                failures = 0
            self.homeserver_up = True
            # Commands are in the database before the position moves past them: a crash loses none.
            await self.apply(data, commands=since is not None)
            since = data.get("next_batch") or since
            if since:
                await self.health.call("save the sync position", partial(self.store.put, "next_batch", since))
            self.synced = True
            positioned.set()
            self.last_sync_at = time.time()
            LAST_SYNC.set(self.last_sync_at)
            SYNC_LAG.set(0)

    async def apply(self, data: dict[str, Any], *, commands: bool = True) -> None:
        """One answer in /sync's shape (a /sync answer, or an appservice transaction put in that shape): the
        hooks, the state into the cache, invites, and its admin-room commands queued in the database."""
        try:
            for handler in self.handlers:
                await handler(data)
            await self.handle(data)
        except Exception as e:  # a malformed answer must not stop the bot; the next reconcile repairs
            log.warning("could not handle a /sync answer", error=f"{type(e).__name__}: {e}", exc_info=True)
            for room_id in ((data.get("rooms") or {}).get("join") or {}) if isinstance(data, dict) else ():
                self.observer.mark_stale(RoomID(room_id))
            self.request_reconcile(full=True)
        for room_id, event in self.admin_commands_in(data) if commands else []:
            await self.health.call("queue a command", partial(self.commands.put, room_id, event))

    async def first_sync(self, since: str | None) -> dict[str, Any]:
        """The first /sync after a start or a takeover: a large account's answer takes a while to build, so it
        is waited for up to homeserver.initial_sync_timeout (not the request timeout), with a progress line."""
        started = time.monotonic()
        request = asyncio.ensure_future(
            self.matrix.sync(since, 0, SYNC_FILTER if since else FIRST_SYNC_FILTER, wait=self.initial_sync_timeout)
        )
        try:
            while True:
                done, _ = await asyncio.wait({request}, timeout=PROGRESS_EVERY)
                if done:
                    return request.result()
                log.info(
                    "initial sync still running",
                    elapsed_s=round(time.monotonic() - started),
                    gives_up_after_s=round(self.initial_sync_timeout),
                )
        finally:
            request.cancel()

    async def handle(self, data: dict[str, Any]) -> None:
        """Invites, the state the answer carries into the cache, and a reconcile when something relevant moved."""
        rooms = data.get("rooms") or {}
        trigger = full = False
        for room_id, room in (rooms.get("invite") or {}).items():
            await self.invites.on_invite(RoomID(room_id), room)
        for room_id, room in (rooms.get("join") or {}).items():
            room_id = RoomID(room_id)
            timeline = room.get("timeline") or {}
            events = list(timeline.get("events") or [])
            state_events = room_state_events(room, [e for e in events if isinstance(e, dict) and "state_key" in e])
            if state_events.after:
                self.state_after_answers += 1
            # Also for a room whose first /state read is in flight: the cache keeps the delta for it.
            known = self.cache.update(room_id, state_events)
            if timeline.get("limited"):
                # A gap: with lazy-loaded members, membership changes in it may be in neither section.
                self.observer.mark_stale(room_id)
                full = full or known
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
            self.observer.left(RoomID(room_id))
        if full:
            self.request_reconcile(full=True)
        elif trigger:
            self.request_reconcile(full=False)

    def admin_commands_in(self, data: dict[str, Any]) -> list[tuple[RoomID, dict[str, Any]]]:
        """Messages from others in the admin room, in timeline order: candidate commands."""
        admin_room = self.admin_room()
        if admin_room is None:
            return []
        room = ((data.get("rooms") or {}).get("join") or {}).get(admin_room)
        if not isinstance(room, dict):
            return []
        events = (room.get("timeline") or {}).get("events") or []
        return [
            (admin_room, e)
            for e in events
            if isinstance(e, dict)
            and e.get("type") == "m.room.message"
            and isinstance(e.get("event_id"), str)
            and e.get("sender") != self.matrix.user_id
        ]
