"""Snapshot + policy -> plan: the evictions, bans, unbans and other changes that should happen now."""

from __future__ import annotations

from ..model import (
    Action,
    ActionKind,
    Finding,
    Membership,
    OnLeave,
    PlacedBan,
    Plan,
    Policy,
    RoomID,
    RoomState,
    Snapshot,
    UserID,
)
from .entitlement import Memberships, entitled_by, entitlers, protection, user_level
from .graph import SpaceGraph, build_graph, policies_for
from .joinrules import plan_join_rules
from .powerlevels import plan_power_levels


def plan(snapshot: Snapshot, policy: Policy) -> Plan:
    """Everything that should change now, from the state alone."""
    graph = build_graph(snapshot, policy)
    membership = MembershipPlanner(snapshot, policy, graph)
    membership.run()
    pl_actions, stale_levels, pl_findings = plan_power_levels(snapshot, policy, graph)
    jr_actions, jr_findings = plan_join_rules(snapshot, policy, graph, membership.memberships)
    findings = list(graph.findings) + membership.findings + pl_findings + jr_findings
    return Plan(
        actions=tuple(membership.actions + jr_actions + pl_actions),
        findings=tuple(dict.fromkeys(findings)),
        managed=tuple(sorted(graph.managed)),
        recheck_at_ms=membership.recheck_at_ms,
        stale_bans=tuple(membership.stale_bans),
        stale_levels=tuple(stale_levels),
    )


class MembershipPlanner:
    """Space bans carried down, evictions cascaded to a fixpoint, and the bot's own bans lifted."""

    def __init__(self, snapshot: Snapshot, policy: Policy, graph: SpaceGraph) -> None:
        self.snapshot = snapshot
        self.policy = policy
        self.graph = graph
        self.memberships = Memberships(snapshot)
        self.actions: list[Action] = []
        self.findings: list[Finding] = []
        self.stale_bans: list[PlacedBan] = []
        self.recheck_at_ms: int | None = None
        self._managed_rooms = sorted(r for r in graph.managed if r in snapshot.rooms)
        self._managed_spaces = [r for r in self._managed_rooms if snapshot.rooms[r].is_space or r in graph.roots]
        self._no_power: set[tuple[RoomID, str]] = set()

    def run(self) -> None:
        self._propagate_bans()
        self._evict()
        self._lift_bans()

    def _root_for(self, room_id: RoomID) -> RoomID | None:
        governing = policies_for(self.graph, self.policy, room_id)
        return governing[0].room_id if governing else None

    def _may_act(self, room: RoomState, user_id: UserID, kind: ActionKind) -> bool:
        """Checks the target's protection and the bot's own power, reporting why not."""
        why = protection(room, user_id, self.policy, self.graph)
        if why:
            self.findings.append(
                Finding(room.room_id, "protected", f"{user_id} not {kind.value}ed: {why}")
            )
            return False
        pl = room.power_levels
        needed = pl.kick if kind is ActionKind.KICK else pl.ban
        if user_level(room, self.policy.bot) < needed:
            if (room.room_id, kind.value) not in self._no_power:
                self._no_power.add((room.room_id, kind.value))
                self.findings.append(
                    Finding(room.room_id, "no_power", f"the bot lacks the power to {kind.value} (needs {needed})")
                )
            return False
        return True

    def _propagate_bans(self) -> None:
        for space_id in self._managed_spaces:
            policies = policies_for(self.graph, self.policy, space_id)
            if not policies or not all(p.propagate_bans for p in policies):
                continue
            banned = [u for u in self.snapshot.rooms[space_id].members
                      if self.snapshot.rooms[space_id].members[u].membership is Membership.BAN]
            if not banned:
                continue
            for room_id in sorted(self.graph.managed_descendants(space_id)):
                room = self.snapshot.rooms.get(room_id)
                if room is None or room.tombstone:
                    continue
                for user_id in sorted(banned):
                    if self.memberships.get(room_id, user_id) is Membership.BAN:
                        continue
                    if not self._may_act(room, user_id, ActionKind.BAN):
                        continue
                    self.memberships.plan(room_id, user_id, Membership.BAN)
                    self.actions.append(Action(
                        kind=ActionKind.BAN, room_id=room_id, user_id=user_id, cause="space_ban",
                        reason=f"banned in Space {space_id}", space_id=self._root_for(room_id),
                    ))

    def _evict(self) -> None:
        unknown_reported: set[tuple[RoomID, RoomID]] = set()
        changed = True
        while changed:
            changed = False
            for room_id in self._managed_rooms:
                room = self.snapshot.rooms[room_id]
                if room.tombstone:
                    continue
                allowed_by = entitlers(room, self.graph)
                spaces = [e for e in allowed_by if e in self._managed_spaces]
                if not spaces:
                    continue
                policies = policies_for(self.graph, self.policy, room_id)
                on_leave = OnLeave.NONE
                if policies:
                    on_leave = policies[0].on_leave
                    for p in policies[1:]:
                        on_leave = p.milder_on_leave(on_leave)
                if on_leave is OnLeave.NONE:
                    continue
                grace_ms = int(max((p.grace_period_s for p in policies), default=0) * 1000)
                unreadable = sorted(e for e in allowed_by if e not in self.snapshot.rooms)
                for user_id in self.memberships.joined(room_id):
                    if entitled_by(user_id, allowed_by, self.memberships):
                        continue
                    left = [s for s in spaces
                            if self.memberships.get(s, user_id) in (Membership.LEAVE, Membership.BAN)]
                    if not left:
                        continue
                    if unreadable:
                        for other in unreadable:
                            if (room_id, other) not in unknown_reported:
                                unknown_reported.add((room_id, other))
                                self.findings.append(Finding(
                                    room_id, "unchecked_entitlement",
                                    f"cannot see the members of {other}: its members are assumed entitled",
                                ))
                        continue
                    if grace_ms and not any(self.memberships.is_planned(s, user_id) for s in left):
                        left_at = max(self.snapshot.rooms[s].members[user_id].ts for s in left)
                        ends = left_at + grace_ms
                        if ends > self.snapshot.now_ms:
                            self.recheck_at_ms = min(ends, self.recheck_at_ms or ends)
                            continue
                    kind = ActionKind.BAN if on_leave is OnLeave.BAN else ActionKind.KICK
                    if not self._may_act(room, user_id, kind):
                        continue
                    self.memberships.plan(
                        room_id, user_id, Membership.BAN if kind is ActionKind.BAN else Membership.LEAVE
                    )
                    self.actions.append(Action(
                        kind=kind, room_id=room_id, user_id=user_id, cause="on_leave",
                        reason=self._leave_reason(user_id, left), space_id=self._root_for(room_id),
                    ))
                    changed = True

    def _leave_reason(self, user_id: UserID, left: list[RoomID]) -> str:
        space_id = left[0]
        if self.memberships.is_planned(space_id, user_id):
            return f"removed from Space {space_id}"
        state = self.snapshot.rooms[space_id].members[user_id]
        if state.membership is Membership.BAN:
            return f"banned in Space {space_id}"
        if state.sender and state.sender != user_id:
            return f"kicked from Space {space_id}"
        return f"left Space {space_id}"

    def _lift_bans(self) -> None:
        for placed in sorted(self.snapshot.placed_bans, key=lambda b: (b.room_id, b.user_id)):
            room = self.snapshot.rooms.get(placed.room_id)
            if room is None:
                continue
            if room.membership(placed.user_id) is not Membership.BAN:
                self.stale_bans.append(placed)
                continue
            if placed.room_id not in self.graph.managed or room.tombstone:
                continue
            policies = policies_for(self.graph, self.policy, placed.room_id)
            if not policies or not all(p.propagate_unbans for p in policies):
                continue
            if self.memberships.is_planned(placed.room_id, placed.user_id):
                continue
            if not self._ban_lifted(room, placed):
                continue
            if user_level(room, self.policy.bot) < room.power_levels.ban:
                continue
            self.memberships.plan(placed.room_id, placed.user_id, Membership.LEAVE)
            self.actions.append(Action(
                kind=ActionKind.UNBAN, room_id=placed.room_id, user_id=placed.user_id, cause="unban",
                reason=("unbanned in the Space" if placed.cause == "space_ban" else "back in the Space"),
                space_id=self._root_for(placed.room_id),
            ))

    def _ban_lifted(self, room: RoomState, placed: PlacedBan) -> bool:
        if placed.cause == "space_ban":
            above = self.graph.ancestors(room.room_id) & set(self._managed_spaces)
            return not any(self.memberships.get(s, placed.user_id) is Membership.BAN for s in above)
        return entitled_by(placed.user_id, entitlers(room, self.graph), self.memberships) is not None
