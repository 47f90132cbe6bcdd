"""Which users a quick plan looks at: the incremental plan's scope (`core.planner.plan`, `users`)."""

from __future__ import annotations

from ..core.graph import SpaceGraph
from ..core.planner import graph_of
from ..matrix.state import StateCache
from ..model import Policy, Snapshot, UserID
from .history import MemberHistory


class PlanScope:
    """The users whose membership changed since the last reconcile, while nothing else changed that decides what
    anyone should have; else everyone (None).

    A quick plan may look at those users alone when the last reconcile journaled everything it planned (not
    paused, not a dry run, nothing skipped to look at again) and, since then, only memberships changed: the
    state cache saw no other state event nor a room read or dropped (`StateCache.take_changes`), and the policy
    and spacesync's own records (placed bans, owned levels and ACL entries, lockdowns) and the unreadable rooms
    are as they were. Users whose membership history changed without a new event (a look-up answered) are
    added. What one user should have depends on nothing else (property-tested in tests/unit/test_incremental.py).
    """

    def __init__(self, cache: StateCache, history: MemberHistory) -> None:
        self.cache = cache
        self.history = history
        self._changed: frozenset[UserID] | None = None
        self._basis: object = None
        self._complete = False
        self._graph: SpaceGraph | None = None

    def begin(self, *, incremental: bool) -> None:
        """A reconcile starts: take what changed since the last one (a full one takes it too, and starts afresh)."""
        changed = self.cache.take_changes()
        self._changed = changed if incremental and self._complete else None
        self._complete = False

    def users(self, policy: Policy, snapshot: Snapshot) -> frozenset[UserID] | None:
        """The users to plan for, once the snapshot is read; None for everyone."""
        resolved = frozenset(self.history.changed_users)
        self.history.changed_users.clear()
        basis = (
            policy,
            snapshot.unreachable,
            snapshot.placed_bans,
            snapshot.owned_levels,
            snapshot.lockdowns,
            snapshot.owned_acl,
            snapshot.owned_policy,
        )
        same, self._basis = basis == self._basis, basis
        if self._changed is None or not same:
            return None
        return self._changed | resolved

    def graph(self, snapshot: Snapshot, policy: Policy, users: frozenset[UserID] | None) -> SpaceGraph:
        """The Space graph for this plan: the last one while only memberships changed (`users` not None: the
        graph reads no membership), else worked out again."""
        if users is None or self._graph is None:
            self._graph = graph_of(snapshot, policy)
        return self._graph

    def finished(self, *, complete: bool) -> None:
        """The reconcile journaled all its plan held (`complete`): the next quick plan may be incremental."""
        self._complete = complete
