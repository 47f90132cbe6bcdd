"""Reads the world into a Snapshot: walks the Spaces the bot is in, one /state request per room."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from collections.abc import Callable, Collection

import structlog
from mautrix.errors import MatrixRequestError

from ..backoff import backoff
from ..core.graph import RESTRICTED_RULES
from ..core.routing import declared_via, hierarchy_via, member_servers, via_servers
from ..matrix import MatrixAdapter, StateCache, retry_after_ms
from ..matrix.errors import REQUEST_ERRORS, TRANSPORT_ERRORS
from ..model import Policy, RoomID, Snapshot, UserID
from ..refs import server_name
from ..store import Store
from .history import MemberHistory
from .recheck import only_users

log = structlog.get_logger("spacesync.observer")

READ_ATTEMPTS = 3
PARTIAL_STATE_PROBE = 3.0
"""How long the first /state read of a freshly joined room is waited for before it counts as partial state."""
PARTIAL_STATE_WAIT = 600.0
"""How long a room may stay in partial state before it is reported as a moderator's matter (still waited for)."""
PARTIAL_STATE = "partial state: its homeserver is still fetching the room's full state after the join; waiting"
PARTIAL_STATE_STUCK = (
    "state still partial {minutes:.0f} min after the join: the homeserver's resync of the room has not ended "
    "(a restart of the homeserver resumes a failed one); waiting"
)
READ_ERRORS: tuple[type[BaseException], ...] = (*REQUEST_ERRORS, ValueError)
POSITION_WAIT = 120.0
"""How long a walk that reads every room waits for the first /sync answer after a start (see `positioned`)."""


def describe_error(error: BaseException) -> str:
    """A short reason for findings and logs: '502 M_UNKNOWN', 'TimeoutError', ..."""
    if isinstance(error, MatrixRequestError):
        return f"{error.http_status} {getattr(error, 'errcode', '') or ''}".strip()
    return f"{type(error).__name__}: {error}".rstrip(": ")


class Observer:
    """Breadth-first from the roots: read each joined room's state, follow Space children and allow lists."""

    def __init__(
        self,
        matrix: MatrixAdapter,
        cache: StateCache,
        store: Store,
        *,
        max_seconds: float = 120,
        concurrency: int = 8,
        reread_interval: float = 86400.0,
        on_full_state: Callable[[RoomID], None] = lambda room_id: None,
    ) -> None:
        self.matrix = matrix
        self.cache = cache
        self.store = store
        self.max_seconds = max_seconds
        self._sem = asyncio.Semaphore(concurrency)
        self.joined: set[RoomID] = set()
        self.seen: set[RoomID] = set()
        """Every room the last walk reached: the roots, their descendants and allow-list rooms."""
        self.requests = 0
        self.auto_join = False
        """Join opted-in rooms and verified upgrades by itself (the running service; never `plan`)."""
        self.known_managed: set[RoomID] = set()
        """Managed rooms as of the last plan: the Spaces whose restricted children the bot may join."""
        self._join_attempted: set[RoomID] = set()
        self.awaiting_full_state: dict[RoomID, float] = {}
        """Rooms the bot joined in this run whose full state has not been read yet, with when it joined.
        Synapse joins remote rooms with partial state (faster joins) and holds every /state read of such a
        room until its resync has fetched the full state. That held read is the signal, whatever the /sync
        filter (an eager /sync leaves partial-state rooms out, a lazy-loading one shows them at once): the
        first read runs in the background, a room whose read has not answered within PARTIAL_STATE_PROBE is
        reported as partial state and neither read nor acted in, other rooms carry on, and the read's
        answer fills the cache and, when the room was reported, asks for a new reconcile (`on_full_state`)."""
        self.on_full_state = on_full_state
        self._full_state_reads: dict[RoomID, asyncio.Task[None]] = {}
        self._reported_partial: set[RoomID] = set()
        self.reread_interval = reread_interval
        self.stale: dict[RoomID, float] = {}
        """Rooms whose cached state may miss changes (a gappy /sync timeline, a failed read, an answer that
        could not be handled), with when (monotonic) that was found: the next full reconcile reads them
        whatever their age. Only a read that started after that clears it."""
        self.last_read: dict[RoomID, float] = {}
        """When (monotonic) each room's state was last read whole from /state."""
        self._reread_asked = 1
        self._reread_done = 0
        self._last_slice = time.monotonic()
        self._slice_due = 0.0
        self.last_walk_reads = 0
        """Rooms read from /state by the last walk."""
        self.positioned: asyncio.Event | None = None
        """Set by the sync loop once its first answer after a start is handled. A room read before that answer
        may have changed between the read and the answer with nothing telling of it (a first /sync carries no
        changes), so a walk that reads every room first waits for it (bounded by POSITION_WAIT)."""
        self._hierarchy: dict[RoomID, list[dict]] = {}
        self.history = MemberHistory(matrix, store)

    def reread_all(self) -> None:
        """Read every room at the next full reconcile (a start, a takeover, a homeserver back after an outage:
        what happened meanwhile may be in no /sync answer)."""
        self._reread_asked += 1

    def mark_stale(self, room_id: RoomID) -> None:
        self.stale[room_id] = time.monotonic()

    def _rereads(self, everything: bool) -> set[RoomID] | None:
        """The rooms a full reconcile reads again (None: all of them). Besides the stale ones and those never
        read, a rolling slice: the longest unread, as many as the time since the last slice is a share of
        reread_interval, and any older than reread_interval. So every room is read at least once per
        reread_interval, spread evenly, and a no-op reconcile reads few rooms."""
        now = time.monotonic()
        if everything or self._reread_done < self._reread_asked:
            self._last_slice = now
            return None
        oldest = sorted(self.last_read, key=self.last_read.__getitem__)
        # Fractions of a room carry over, so the slices add up to every room per reread_interval.
        self._slice_due += len(oldest) * (now - self._last_slice) / self.reread_interval
        self._last_slice = now
        count = min(len(oldest), math.floor(self._slice_due + 1e-9))
        self._slice_due = max(0.0, self._slice_due - count) if count < len(oldest) else 0.0
        overdue = {r for r in oldest[count:] if now - self.last_read[r] >= self.reread_interval}
        return set(oldest[:count]) | overdue | self.stale.keys()

    async def observe(
        self, policy: Policy, *, refresh: bool, everything: bool = True, users: Collection[UserID] | None = None
    ) -> Snapshot:
        """A snapshot of every room reachable from the roots. `refresh` re-reads state (every room, or with
        `everything` False the stale ones and a rolling slice of the rest); else the cache serves. With `users`,
        the rooms hold only those users' memberships (a re-check of their actions just before they are sent)."""
        everything = everything or self._reread_done < self._reread_asked
        if refresh and everything and self.positioned is not None and not self.positioned.is_set():
            try:
                await asyncio.wait_for(self.positioned.wait(), POSITION_WAIT)
            except TimeoutError:
                log.info("reading every room before the first /sync answer: rooms it shows gaps in are read again")
        deadline = time.monotonic() + self.max_seconds
        self.cache.keep_detail(s.room_id for s in policy.spaces)  # their membership history needs every event id
        asked = self._reread_asked
        rereads = self._rereads(everything) if refresh else set()
        self.last_walk_reads = 0
        if refresh or not self.joined:
            self.joined = await self.matrix.joined_rooms()
            self.requests += 1
        unreachable: dict[RoomID, str] = {}
        visited: set[RoomID] = set()
        self._hierarchy = {}
        if refresh:
            self._join_attempted.clear()
        upgrades: dict[RoomID, RoomID] = {}
        frontier = [s.room_id for s in policy.spaces]
        depth = 0
        while frontier:
            pending = [r for r in dict.fromkeys(frontier) if r not in visited]
            room_cap = max(0, policy.max_rooms - len(visited))
            level = pending[:room_cap]
            for room_id in pending[room_cap:]:  # beyond the room cap: unknown, never absent
                unreachable.setdefault(room_id, f"walk room cap {policy.max_rooms} reached: not read")
            if not level:
                break
            visited.update(level)
            if time.monotonic() > deadline:
                for room_id in level:
                    unreachable[room_id] = f"walk time cap {self.max_seconds:.0f}s reached"
                break
            if refresh and self.auto_join:
                await self._auto_join(policy, [r for r in level if r not in self.joined], upgrades)
            # A cached room that is not to be read again needs no task: `_load` would return at once (10,000 of them
            # cost a quick plan a tenth of a second).
            await asyncio.gather(
                *(
                    self._load(r, read, unreachable)
                    for r in level
                    if (read := refresh and (rereads is None or r in rereads))
                    or r not in self.cache
                    or r not in self.joined
                    or r in self.awaiting_full_state
                )
            )
            frontier = []
            queued: set[RoomID] = set()  # the rooms in `frontier`: looked up once per room, not in the list
            if depth >= policy.max_depth:
                break
            for room_id in level:
                room = self.cache.get(room_id)
                if room is None:
                    continue
                before = len(frontier)
                if room.is_space or room_id in queued or any(s.room_id == room_id for s in policy.spaces):
                    frontier.extend(room.children)
                frontier.extend(room.allow)
                space = policy.space(room_id)
                if space is not None:
                    frontier.extend(space.extra_rooms)
                    frontier.extend(space.policy_lists)
                if room.tombstone:
                    frontier.append(room.tombstone)
                    if room_id in self.known_managed:  # a room that never opted in gets no say
                        upgrades[room.tombstone] = room_id
                queued.update(frontier[before:])
            depth += 1
        self.seen = visited
        if refresh:
            if rereads is None:
                self._reread_done = max(self._reread_done, asked)
            for room_id in set(self.last_read) - self.joined:
                del self.last_read[room_id]
        for room_id in visited & self.cache.uncertain:  # unknown is not absent: nothing is done on its account
            unreachable.setdefault(room_id, "changed while it was read: read again before acting")
        # Rooms that could not be read this time keep their last known state (stale): see Snapshot.
        rooms = {r: state for r in visited if (state := self.cache.get(r)) is not None}
        if users is not None:
            rooms = only_users(rooms, users)
        roots = {s.room_id for s in policy.spaces}
        rooms = await self.history.annotate(rooms, [r for r, s in rooms.items() if s.is_space or r in roots])
        return Snapshot(
            rooms=rooms,
            unreachable=unreachable,
            placed_bans=await self.store.placed_bans(),
            owned_levels=await self.store.owned_levels(),
            lockdowns=await self.store.lockdowns(),
            owned_acl=await self.store.owned_acl(),
            owned_policy=await self.store.owned_policy(),
            now_ms=int(time.time() * 1000),
        )

    async def _load(self, room_id: RoomID, refresh: bool, unreachable: dict[RoomID, str]) -> None:
        """Read one room's state into the cache. A room that cannot be read keeps its last known state
        (and is listed in `unreachable`, which makes it stale): unknown is not absent."""
        if room_id not in self.joined:
            self.cache.forget(room_id)
            unreachable[room_id] = "the bot is not joined: invite it or make the room restricted to the Space"
            return
        if room_id in self.awaiting_full_state:
            reason = await self.partial_state(room_id)
            if reason is not None:
                unreachable[room_id] = reason
                return
            if room_id in self.cache:  # the first read answered: that is this walk's read
                return
        if not refresh and room_id in self.cache:
            return
        async with self._sem:
            started = time.monotonic()
            self.cache.begin_read(room_id)
            try:
                events = await self._read_state(room_id)
            except READ_ERRORS as e:
                self.cache.end_read(room_id)
                self.mark_stale(room_id)
                unreachable[room_id] = f"state unreadable: {describe_error(e)}"
                log.warning(
                    "room state unreadable",
                    room=room_id,
                    error=describe_error(e),
                    kept_last_known=room_id in self.cache,
                )
                return
            self._read_done(room_id, events, started)

    def _read_done(self, room_id: RoomID, events: list[dict], started: float) -> None:
        self.cache.replace(room_id, events)
        self.last_read[room_id] = started
        if room_id in self.stale and self.stale[room_id] <= started:
            del self.stale[room_id]
        self.last_walk_reads += 1
        if room_id in self.cache.uncertain:  # a change during the read could not be ordered against its answer
            log.info("room changed while it was read: reading it again", room=room_id)
            self.mark_stale(room_id)
            self.on_full_state(room_id)

    async def _read_state(self, room_id: RoomID) -> list[dict]:
        """GET /state, tried again after a 429 (its retry_after_ms) or a 5xx, timeout or dropped connection
        (with backoff), a bounded number of times. Other answers (403, 404) are final."""
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                events = await self.matrix.room_state(room_id)
                self.requests += 1
                return events
            except MatrixRequestError as e:
                self.requests += 1
                if attempt == READ_ATTEMPTS or not (e.http_status == 429 or e.http_status >= 500):
                    raise
                wait = min(30.0, (retry_after_ms(e) or 1000) / 1000) if e.http_status == 429 else backoff(attempt)
            except TRANSPORT_ERRORS:
                self.requests += 1
                if attempt == READ_ATTEMPTS:
                    raise
                wait = backoff(attempt)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _auto_join(self, policy: Policy, rooms: list[RoomID], upgrades: dict[RoomID, RoomID]) -> None:
        """Join rooms that opted in by their join rule (the hierarchy API shows their allow list), and the
        replacements of upgraded rooms (the planner follows an upgrade only once it can verify it)."""
        pending = [r for r in rooms if r not in self._join_attempted]
        if not pending:
            return
        extra = {r for s in policy.spaces for r in (*s.extra_rooms, *s.policy_lists)}
        managed_spaces = {s.room_id for s in policy.spaces} | {
            r for r in self.known_managed if (state := self.cache.get(r)) is not None and state.is_space
        }
        opted: dict[RoomID, list[str]] = {}
        for room_id in pending:
            if room_id in upgrades or room_id in extra:
                old = upgrades.get(room_id, room_id)
                opted[room_id] = self.via_for(room_id, [old], [])
        for root in sorted({s.room_id for s in policy.spaces} & self.joined):
            if not set(pending) - set(opted):
                break
            entries = await self._hierarchy_of(root, policy)
            for entry in entries:
                room_id = RoomID(entry["room_id"])
                allowed = set(entry.get("allowed_room_ids") or ())
                if room_id in pending and entry.get("join_rule") in RESTRICTED_RULES and allowed & managed_spaces:
                    opted.setdefault(room_id, self.via_for(room_id, [root, *allowed], entries))
        for room_id, via in sorted(opted.items()):
            self._join_attempted.add(room_id)
            try:
                await self.matrix.join(room_id, via or None)
                self.joined_now(room_id)
                log.info("joined opted-in room", room=room_id)
            except MatrixRequestError as e:
                log.warning("could not join opted-in room", room=room_id, error=getattr(e, "message", str(e)))

    def joined_now(self, room_id: RoomID) -> None:
        """The bot has just joined: the room may hold partial state until its first /state read answers."""
        self.joined.add(room_id)
        self._stop_full_state_read(room_id)
        self.awaiting_full_state[room_id] = time.monotonic()

    async def partial_state(self, room_id: RoomID) -> str | None:
        """Why a freshly joined room cannot be read yet (its state is partial), or None once its first
        /state read has ended (answered, or failed: then the ordinary read reports the failure). The read
        runs in the background and is waited for PARTIAL_STATE_PROBE at most, once."""
        read = self._full_state_reads.get(room_id)
        if read is None:
            self.cache.begin_read(room_id)
            # Not metered with the walk that started it (an empty context): it may answer long after.
            read = self._full_state_reads[room_id] = asyncio.get_running_loop().create_task(
                self._read_full_state(room_id), context=contextvars.Context()
            )
            await asyncio.wait([read], timeout=PARTIAL_STATE_PROBE)
        if read.done():
            self._full_state_reads.pop(room_id, None)
            return None
        self._reported_partial.add(room_id)
        waited = time.monotonic() - self.awaiting_full_state[room_id]
        if waited < PARTIAL_STATE_WAIT:
            log.info("room state partial: waiting for the homeserver's resync", room=room_id)
            return PARTIAL_STATE
        log.warning("room state still partial: the homeserver's resync has not ended", room=room_id)
        return PARTIAL_STATE_STUCK.format(minutes=waited / 60)

    async def _read_full_state(self, room_id: RoomID) -> None:
        """The first /state read of a freshly joined room: Synapse answers it once the room's full state is
        in. Read again after a timeout, a dropped connection, a 429 or a 5xx (a reverse proxy may give up on
        the held read first); a final answer (403, 404) ends the wait and leaves the room to the ordinary
        read, which reports it."""
        attempt = 0
        while True:
            try:
                started = time.monotonic()
                events = await self.matrix.room_state(room_id)
                self.requests += 1
                self._read_done(room_id, events, started)
                log.info("room state complete after the join", room=room_id)
                break
            except READ_ERRORS as e:
                self.requests += 1
                status = e.http_status if isinstance(e, MatrixRequestError) else None
                if (status is not None and status != 429 and status < 500) or isinstance(e, ValueError):
                    self.cache.end_read(room_id)
                    log.warning("room state unreadable after the join", room=room_id, error=describe_error(e))
                    break
                attempt += 1
                await asyncio.sleep(backoff(attempt))
        self._full_state_reads.pop(room_id, None)
        self.awaiting_full_state.pop(room_id, None)
        if room_id in self._reported_partial:  # (else the walk that started the read is still using it)
            self._reported_partial.discard(room_id)
            self.on_full_state(room_id)

    def _stop_full_state_read(self, room_id: RoomID) -> None:
        read = self._full_state_reads.pop(room_id, None)
        if read is not None and not read.done():
            read.cancel()
            self.cache.end_read(room_id)
        self.awaiting_full_state.pop(room_id, None)
        self._reported_partial.discard(room_id)

    async def close(self) -> None:
        """Cancel the background reads of freshly joined rooms (their rooms stay awaited: read at the next walk)."""
        reads = [read for read in self._full_state_reads.values() if not read.done()]
        for read in reads:
            read.cancel()
        for read in reads:
            with contextlib.suppress(asyncio.CancelledError):
                await read
        for room_id in self._full_state_reads:
            self.cache.end_read(room_id)
        self._full_state_reads.clear()

    def left(self, room_id: RoomID) -> None:
        """The bot is no longer in the room."""
        self.joined.discard(room_id)
        self._stop_full_state_read(room_id)
        self.stale.pop(room_id, None)
        self.last_read.pop(room_id, None)

    def is_partial(self, room_id: RoomID) -> bool:
        """Joined in this run and its full state not read yet."""
        return room_id in self.awaiting_full_state

    def via_for(self, room_id: RoomID, related: list[RoomID], entries: list[dict]) -> list[str]:
        """Servers to join `room_id` through: the `via` of the Spaces' m.space.child entries and of the
        hierarchy answer, then the servers of the members of related rooms (its Spaces, its predecessor),
        never only the room id's server part (v12 ids have none)."""
        cached = (self.cache.get(r) for r in self.cache.rooms())
        parents = [state for state in cached if state is not None and room_id in state.children]
        related_states = [self.cache.get(r) for r in related]
        return via_servers(
            room_id,
            declared_via(room_id, parents),
            hierarchy_via(room_id, entries),
            *(member_servers(state) for state in related_states),
            *(member_servers(state) for state in parents),
            [server for r in related if (server := server_name(r))],
        )

    async def _hierarchy_of(self, root: RoomID, policy: Policy) -> list[dict]:
        """The hierarchy below a root, fetched at most once per walk."""
        if root not in self._hierarchy:
            try:
                self._hierarchy[root] = await self.matrix.hierarchy(root, policy.max_depth, policy.max_rooms)
                self.requests += 1
            except (TimeoutError, MatrixRequestError) as e:
                log.warning("hierarchy unreadable", room=root, error=str(e))
                self._hierarchy[root] = []
        return self._hierarchy[root]
