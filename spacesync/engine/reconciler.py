"""One reconcile: policy from config and database, observe, plan, guard, and write the journal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import attrs
import structlog
from mautrix.errors import MatrixRequestError

from ..config import Config, SpaceConfig
from ..core.planner import plan as make_plan
from ..matrix import MatrixAdapter
from ..metrics import (
    HELD_ACTIONS,
    LAST_RECONCILE,
    MANAGED_ROOMS,
    MANAGED_SPACES,
    MANAGED_USERS,
    RECONCILE_BYTES,
    RECONCILE_DURATION,
    RECONCILE_REQUESTS,
)
from ..model import (
    EVICTIONS,
    MODERATOR_CAUSES,
    Action,
    ActionKind,
    FindingCode,
    LeftBehind,
    Plan,
    Policy,
    RoomID,
    UserID,
)
from ..refs import RoomRef
from ..store import Status, Store
from ..store.journal import BatchStatus, now_ms
from .events import BatchHeld, Listener, RoomsNeedAttention
from .executor import Executor, fingerprint
from .guard import guard
from .observer import Observer
from .recheck import MEMBERSHIP_KINDS
from .scope import PlanScope

log = structlog.get_logger("spacesync.reconciler")

ATTENTION = frozenset(
    {
        FindingCode.NOT_OPTED_IN,
        FindingCode.UNREACHABLE,
        FindingCode.NO_POWER,
        FindingCode.VERSION,
        FindingCode.CAP_ROOMS,
        FindingCode.CAP_DEPTH,
        FindingCode.UNCHECKED_ENTITLEMENT,
        FindingCode.HISTORY_UNKNOWN,
        FindingCode.MALFORMED,
        FindingCode.UNROUTABLE_CHILD,
        FindingCode.ACL_REFUSED,
        FindingCode.POLICY_RULES_IGNORED,
    }
)
"""Finding codes the admin room is told about once: rooms that need a moderator."""

NOT_REPEATABLE = frozenset(
    {
        ActionKind.KICK,
        ActionKind.BAN,
        ActionKind.UNBAN,
        ActionKind.INVITE,
        ActionKind.SET_JOIN_RULES,
        ActionKind.SET_SPACE_CHILD,
    }
)
"""Actions a plan made from stale state must not repeat. Power-level writes are safe to repeat: the
executor re-reads the current levels and applies only the changes still missing."""
CLOCK_MARGIN_MS = 2000
"""Slack for clocks of instances sharing a database (standby) when comparing journal times."""


def left_behind_for(plan: Plan, actions: Sequence[Action]) -> list[LeftBehind]:
    """Where the plan had to leave in place the users these actions evict: their batch's notice says so."""
    evicted = {a.user_id for a in actions if a.kind in EVICTIONS and a.user_id}
    return [item for item in plan.left_behind if item.user_id in evicted]


@attrs.frozen
class Submitted:
    """What journaling one plan did."""

    batches: list[str] = attrs.field(factory=list)
    queued: int = 0
    held: int = 0
    recheck_soon: bool = False
    """Actions done meanwhile were skipped: plan again shortly rather than repeat them."""


@attrs.frozen
class ReconcileResult:
    """The outcome of one reconcile, for the caller to act on (what to wait for, when to look again)."""

    plan: Plan
    batches: list[str] = attrs.field(factory=list)
    """New (or joined held) batch ids."""
    queued: int = 0
    held: int = 0
    recheck_soon: bool = False
    """Actions done after the state behind the plan was read were skipped: reconcile again shortly."""

    @property
    def requeue_at_ms(self) -> int | None:
        """When the plan itself asks to be made again (an entitlement or a guard window ends)."""
        return self.plan.recheck_at_ms


class Reconciler:
    """Turns the world as it is into journal entries; the executor carries them out."""

    def __init__(
        self,
        config: Config,
        store: Store,
        matrix: MatrixAdapter,
        observer: Observer,
        executor: Executor,
        listener: Listener | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.matrix = matrix
        self.observer = observer
        self.executor = executor
        self.listener = listener
        self.paused = False
        self.last_plan: Plan | None = None
        self.last_policy: Policy | None = None
        self.last_reconcile_at: float | None = None
        self.last_reconcile_s: float | None = None
        self._lock = asyncio.Lock()
        self.scope = PlanScope(observer.cache, observer.history)
        self._aliases: dict[str, RoomID] = {}
        self._announced_findings: set[str] = set()
        self.last_timing: dict[str, float] = {}
        """How long the last plan took to observe (the policy and the snapshot) and to plan."""
        self.last_read_bytes = 0
        self.last_read_requests = 0
        """What the last full reconcile read from the homeserver to see the world."""

    async def resolve(self, ref: RoomRef) -> RoomID | None:
        """A room reference's id; aliases are resolved once and remembered."""
        if ref.room_id:
            return ref.room_id
        alias = str(ref.alias)
        if alias not in self._aliases:
            try:
                self._aliases[alias] = await self.matrix.resolve_alias(alias)
            except MatrixRequestError as e:
                log.warning("alias does not resolve", alias=alias, error=getattr(e, "message", str(e)))
                return None
        return self._aliases[alias]

    async def policy(self) -> Policy:
        """The policy now: configured Spaces, Spaces and exemptions added from the admin room."""
        exempt = await self.store.exempt_users()
        extra = await self.store.extra_rooms()
        spaces = []
        seen: set[RoomID] = set()
        for space in self.config.spaces:
            room_id = await self.resolve(space.room)
            if room_id is None or room_id in seen:
                continue
            seen.add(room_id)
            extra_ids = {r for ref in space.extra_rooms if (r := await self.resolve(ref))}
            lists = tuple([r for ref in space.policy_lists if (r := await self.resolve(ref))])
            spaces.append(
                space.to_policy(
                    room_id,
                    extra_rooms_resolved=frozenset(extra_ids | extra.get(room_id, set())),
                    policy_lists_resolved=lists,
                )
            )
        for room_id in await self.store.managed_spaces():
            if room_id not in seen:
                seen.add(room_id)
                default = SpaceConfig(
                    room=RoomRef(room_id=room_id),
                    max_evictions_without_confirmation=(self.config.max_evictions_without_confirmation),
                    guard_window=self.config.guard_window,
                )
                spaces.append(default.to_policy(room_id, extra_rooms_resolved=frozenset(extra.get(room_id, set()))))
        return Policy(
            bot=self.matrix.user_id,
            spaces=tuple(spaces),
            admins=self.config.admin.users,
            exempt=exempt,
            max_depth=self.config.walk.max_depth,
            max_rooms=self.config.walk.max_rooms,
            reason_template=self.config.reason_template,
        )

    async def plan(self, *, refresh: bool = True, everything: bool = True, scoped: bool = False) -> Plan:
        """What spacesync would do now, without doing it. `refresh` reads state again: every room, or with
        `everything` False only the rooms that need it and a rolling slice of the rest (the periodic reconcile).
        `scoped` (a reconcile's own plan): only the users `self.scope` names, when it names any."""
        started = time.monotonic()
        policy = self.last_policy = await self.policy()
        if refresh:
            with self.matrix.metered() as meter:
                snapshot = await self.observer.observe(policy, refresh=True, everything=everything)
            self.last_read_bytes, self.last_read_requests = meter.bytes, meter.requests
            RECONCILE_BYTES.set(meter.bytes)
            RECONCILE_REQUESTS.set(meter.requests)
        else:
            snapshot = await self.observer.observe(policy, refresh=False)
        self.last_timing = {"observe_s": round(time.monotonic() - started, 4)}
        started = time.monotonic()
        if scoped:
            only = self.scope.users(policy, snapshot)
            plan = make_plan(snapshot, policy, only, self.scope.graph(snapshot, policy, only))
        else:
            plan = make_plan(snapshot, policy)
        self.last_timing["plan_s"] = round(time.monotonic() - started, 4)
        self.observer.known_managed = set(plan.managed)
        MANAGED_SPACES.set(len(policy.spaces))
        MANAGED_ROOMS.set(len(plan.managed))
        if refresh:  # a walk over every membership: not in the quick plans, which should take milliseconds
            users: set[UserID] = set()
            for room_id in plan.managed:
                if (room := snapshot.rooms.get(room_id)) is not None:
                    users.update(room.joined())
            MANAGED_USERS.set(len(users))
        return plan

    async def reconcile(
        self, trigger: str = "reconcile", *, refresh: bool = True, everything: bool = True
    ) -> ReconcileResult:
        """Observe, plan, and put what should happen into the journal."""
        async with self._lock:
            started = time.monotonic()
            observed_ms = now_ms() - CLOCK_MARGIN_MS
            self.scope.begin(incremental=not refresh)
            plan = await self.plan(refresh=refresh, everything=everything, scoped=True)
            for ban in plan.stale_bans:
                await self.store.forget_ban(ban.room_id, ban.user_id)
            for room_id, user_id in plan.stale_levels:
                await self.store.set_owned_level(room_id, user_id, None)
            for released in plan.released_levels:
                await self.store.set_owned_level(released.room_id, released.user_id, released)
            for old, new in plan.upgrades:
                await self.store.move_room_records(old, new)
            submitted = await self.submit(plan, trigger, observed_ms)
            self.scope.finished(complete=not (self.paused or self.config.dry_run or submitted.recheck_soon))
            if plan.users is None:  # an incremental plan holds only some users' actions and findings
                self.last_plan = plan
            self.last_reconcile_at = time.time()
            self.last_reconcile_s = time.monotonic() - started
            RECONCILE_DURATION.observe(self.last_reconcile_s)
            LAST_RECONCILE.set(self.last_reconcile_at)
        if refresh:
            await self._announce_findings(plan)
        read = (
            {
                "rooms_read": self.observer.last_walk_reads,
                "requests": self.last_read_requests,
                "bytes_read": self.last_read_bytes,
            }
            if refresh
            else {}
        )
        (log.info if submitted.queued or submitted.held or refresh else log.debug)(
            "reconciled",
            trigger=trigger,
            **read,
            planned=len(plan.actions),
            users="all" if plan.users is None else len(plan.users),
            **self.last_timing,
            queued=submitted.queued,
            held=submitted.held,
            paused=self.paused,
            findings=len(plan.findings),
            managed=len(plan.managed),
            seconds=round(time.monotonic() - started, 3),
        )
        return ReconcileResult(
            plan=plan,
            batches=submitted.batches,
            queued=submitted.queued,
            held=submitted.held,
            recheck_soon=submitted.recheck_soon,
        )

    async def submit(self, plan: Plan, trigger: str, observed_ms: int | None = None) -> Submitted:
        """Journal the plan's new actions: guarded evictions held, the rest released to the executor.

        Actions already open in the journal, or finished since the state behind the plan was read
        (`observed_ms`), are not journaled again.
        """
        if self.paused:
            return Submitted()
        if self.config.dry_run:
            for action in plan.actions:
                log.info(
                    "dry run: would act",
                    action=action.kind.value,
                    room=action.room_id,
                    user=action.user_id,
                    reason=action.reason,
                )
            return Submitted()
        open_keys = await self.store.journal.open_keys()
        recent = await self.store.journal.done_keys_since(observed_ms) if observed_ms is not None else set()
        parked = await self.store.journal.parked_fingerprints()
        fresh = []
        superseded = []
        recheck_soon = False
        for action in plan.actions:
            if action.key in open_keys:
                continue
            if action.key in recent and action.kind in NOT_REPEATABLE:
                # Done after the state behind this plan was read: look again once that state is fresh.
                recheck_soon = True
                continue
            if action.key in parked:
                if fingerprint(action, self.observer.cache.get(action.room_id)) == parked[action.key]:
                    continue  # refused against this very state: it would be refused again
                superseded.append(action.key)
            fresh.append(action)
        if not fresh:
            return Submitted(recheck_soon=recheck_soon)
        await self.store.journal.close_parked(superseded)
        policy = self.last_policy or await self.policy()
        limits: dict[RoomID | None, int] = {s.room_id: s.max_evictions_without_confirmation for s in policy.spaces}
        windows: dict[RoomID | None, float] = {s.room_id: s.guard_window_s for s in policy.spaces}
        recently: dict[RoomID | None, set[str]] = {}
        waiting: dict[RoomID | None, set[str]] = {}
        for evicting in {a.space_id for a in fresh if a.kind in EVICTIONS and a.space_id}:
            window = windows.get(evicting, self.config.guard_window)
            recently[evicting] = await self.store.journal.evicted_users_since(evicting, now_ms() - int(window * 1000))
            waiting[evicting] = await self.store.journal.held_users(evicting)
        guarded = guard(fresh, limits, self.config.max_evictions_without_confirmation, recently, waiting)
        batches = []
        if guarded.release:
            batch = await self.store.journal.add_new_batch(trigger, None, guarded.release, Status.PENDING)
            await self.store.journal.set_left_behind(batch, left_behind_for(plan, guarded.release))
            batches.append(batch)
            self.executor.wake()
        for space_id, held in guarded.hold.items():
            users = len({a.user_id for a in held})
            hint = "!spacesync confirm {0} to run it, !spacesync cancel {0} to drop it"
            joined = await self.store.journal.open_held_batch(space_id)
            if joined is not None:
                # One open held batch per Space: later evictions join it, with no new notice.
                await self.store.journal.add_to_batch(joined, held, Status.HELD)
                batches.append(joined)
                log.warning(
                    "mass action held: joined the open held batch",
                    batch=joined,
                    space=space_id,
                    users=users,
                    actions=len(held),
                    hint=hint.format(joined),
                )
                continue
            batch = await self.store.journal.add_new_batch(trigger, space_id, held, Status.HELD)
            await self.store.journal.set_left_behind(batch, left_behind_for(plan, held))
            batches.append(batch)
            log.warning(
                "mass action held", batch=batch, space=space_id, users=users, actions=len(held), hint=hint.format(batch)
            )
            if self.listener:
                await self.listener(
                    BatchHeld(
                        batch=batch,
                        space_id=space_id,
                        actions=held,
                        limit=limits.get(space_id, self.config.max_evictions_without_confirmation),
                        window_s=windows.get(space_id, self.config.guard_window)
                        if space_id
                        else self.config.guard_window,
                        recent=len(recently.get(space_id, ())),
                    )
                )
        HELD_ACTIONS.set(sum(1 for _ in await self.store.journal.by_status(Status.HELD)))
        return Submitted(
            batches=batches,
            queued=len(guarded.release),
            held=sum(len(held) for held in guarded.hold.values()),
            recheck_soon=recheck_soon,
        )

    async def _announce_findings(self, plan: Plan) -> None:
        """Tell the admin room once about rooms that need a moderator (not opted in, unreachable, no power)."""
        new = [f for f in plan.findings if f.code in ATTENTION and str(f) not in self._announced_findings]
        if not new or not self.listener:
            return
        self._announced_findings.update(str(f) for f in new)
        await self.listener(RoomsNeedAttention(findings=new))

    async def release(self, batch: str) -> int:
        """Run a held batch's actions that a fresh plan still wants; drop the rest (exempted or back since)."""
        async with self._lock:
            still_wanted = {a.key for a in (await self.plan(refresh=True)).actions}
            held = [e for e in await self.store.journal.batch_entries(batch) if e.status is Status.HELD]
            stale = [e.id for e in held if e.action.key not in still_wanted and e.action.cause not in MODERATOR_CAUSES]
            await self.store.journal.set_statuses(stale, Status.CANCELLED)
            count = await self.store.journal.set_batch_status(batch, BatchStatus.RELEASED, Status.HELD, Status.PENDING)
        if stale:
            log.info("held actions no longer planned: dropped", batch=batch, dropped=len(stale))
        self.executor.wake()
        HELD_ACTIONS.set(len(await self.store.journal.by_status(Status.HELD)))
        return count

    async def still_wanted(self, actions: list[Action]) -> set[str]:
        """Keys of these journaled actions that a fresh plan from the state cache still makes: the executor asks
        just before it sends them. Membership actions are planned for their users only (cheap at any size);
        other kinds (entries from before this instance led, or that waited in backoff) by a whole plan."""
        async with self._lock:
            if actions and all(a.kind in MEMBERSHIP_KINDS and a.user_id for a in actions):
                policy = self.last_policy = await self.policy()
                users = {UserID(a.user_id) for a in actions if a.user_id} | {policy.bot}
                plan = make_plan(await self.observer.observe(policy, refresh=False, users=users), policy)
            else:
                plan = await self.plan(refresh=False)
        wanted = {a.key for a in plan.actions}
        return {a.key for a in actions if a.key in wanted}

    async def retry(self, batch: str | None) -> int:
        """Un-park the parked actions of one batch (or all): they run again, with a fresh count of failures,
        and may be announced again if they are refused again."""
        entries = await self.store.journal.unpark(batch)
        await self.store.journal.forget_notices(f"{e.action.key}|" for e in entries)
        for entry in entries:
            await self.store.audit(entry.action, "retry requested", journal_id=entry.id, batch=entry.batch)
        if entries:
            self.executor.wake()
        return len(entries)

    async def cancel(self, batch: str) -> int:
        count = await self.store.journal.set_batch_status(batch, BatchStatus.CANCELLED, Status.HELD, Status.CANCELLED)
        HELD_ACTIONS.set(len(await self.store.journal.by_status(Status.HELD)))
        return count

    async def enqueue(self, actions: list[Action], trigger: str, *, held: bool = False) -> str | None:
        """Journal actions chosen by a moderator (undo, lockdown), outside the guard; `held` keeps them as one
        batch for a moderator to confirm (never joined by the guard's held evictions)."""
        if not actions:
            return None
        if held:
            batch = await self.store.journal.add_new_batch(trigger, None, actions, Status.HELD)
            HELD_ACTIONS.set(len(await self.store.journal.by_status(Status.HELD)))
            return batch
        batch = await self.store.journal.add_new_batch(trigger, None, actions, Status.PENDING)
        self.executor.wake()
        return batch
