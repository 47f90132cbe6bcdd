"""Snapshot + policy -> plan: the evictions, bans, unbans and other changes that should happen now."""

from __future__ import annotations

from typing import Any

import attrs

from ..model import (
    Action,
    ActionKind,
    Cause,
    Finding,
    FindingArea,
    LeftBehind,
    Membership,
    OnLeave,
    PlacedBan,
    Plan,
    Policy,
    RoomID,
    RoomState,
    Snapshot,
    UserID,
    render_reason,
)
from .entitlement import Memberships, entitled_by, entitlers, protection, user_level
from .graph import SpaceGraph, build_graph, exempt_in, policies_for
from .joinrules import plan_join_rules, verified_upgrade
from .lockdown import as_before_lockdown, lockdown_findings, locked_rooms
from .policylists import list_findings, policy_bans, with_list_servers
from .policyserver import plan_policy_server
from .powerlevels import plan_power_levels
from .serveracl import plan_server_acl
from .via import plan_via


def plan(snapshot: Snapshot, policy: Policy) -> Plan:
    """Everything that should change now, from the state alone."""
    # A room spacesync locked down is planned as it was before (its allow list keeps it opted in); its join
    # rules are left alone until it is unlocked, whatever join_rules: enforce would say.
    locked = locked_rooms(snapshot)
    snapshot = as_before_lockdown(snapshot)
    graph = build_graph(snapshot, policy)
    membership = MembershipPlanner(snapshot, policy, graph)
    membership.run()
    pl_actions, stale_levels, released_levels, pl_findings = plan_power_levels(snapshot, policy, graph)
    jr_actions, jr_findings = plan_join_rules(snapshot, policy, graph, membership.memberships)
    jr_actions = [a for a in jr_actions if a.room_id not in locked or a.kind is not ActionKind.SET_JOIN_RULES]
    jr_findings = [f for f in jr_findings if f.room_id not in locked] + lockdown_findings(
        snapshot, locked & graph.managed
    )
    acl_actions, acl_findings = plan_server_acl(with_list_servers(snapshot, policy.spaces), policy, graph)
    via_actions, via_findings = plan_via(snapshot, policy, graph)
    ps_actions, ps_findings = plan_policy_server(snapshot, policy, graph)
    jr_actions += acl_actions + via_actions + ps_actions
    jr_findings += acl_findings + via_findings + ps_findings
    # A room that could not be read, or that answers to a Space that could not be read, gets no state
    # writes: its levels, join rules and children are known only as they were (unknown is not absent).
    waits = unsure_rooms(snapshot, graph)
    findings = (
        list(graph.findings)
        + membership.findings
        + [attrs.evolve(f, area=FindingArea.POWER_LEVELS) for f in pl_findings]
        + [attrs.evolve(f, area=FindingArea.JOIN_RULES) for f in jr_findings]
        + malformed_findings(snapshot)
        + list_findings(snapshot, policy.spaces)
    )
    return Plan(
        actions=tuple(membership.actions + [a for a in jr_actions + pl_actions if a.room_id not in waits]),
        findings=tuple(dict.fromkeys(findings)),
        managed=tuple(sorted(graph.managed)),
        recheck_at_ms=membership.recheck_at_ms,
        stale_bans=tuple(membership.stale_bans),
        stale_levels=tuple(k for k in stale_levels if k[0] not in waits),
        released_levels=tuple(r for r in released_levels if r.room_id not in waits),
        upgrades=tuple(u for u in verified_upgrades(snapshot, graph) if u[0] not in waits),
        left_behind=_one_per_room_and_user(membership.left_behind),
    )


def _one_per_room_and_user(items: list[LeftBehind]) -> tuple[LeftBehind, ...]:
    first: dict[tuple[RoomID, UserID], LeftBehind] = {}
    for item in items:
        first.setdefault((item.room_id, item.user_id), item)
    return tuple(first.values())


def verified_upgrades(snapshot: Snapshot, graph: SpaceGraph) -> list[tuple[RoomID, RoomID]]:
    """Managed rooms replaced by a verified upgrade, as (old, new)."""
    return [
        (room_id, room.tombstone)
        for room_id in sorted(graph.managed)
        if (room := snapshot.rooms.get(room_id)) is not None and room.tombstone and verified_upgrade(snapshot, room)
    ]


def upgrade_copy(new: RoomState, old: RoomState | None, user_id: UserID, bot: UserID) -> bool:
    """Whether the user's ban in an upgraded room is the homeserver's copy of the bot's own ban in the room it
    replaced.

    Synapse copies every ban into the replacement room as it upgrades, sent by the user who upgraded (the
    replacement's creator) with the same content. Such a copy of spacesync's ban is still spacesync's: it may
    ban again over it, to make the ban its own and lift it later. Any other ban is a moderator's.
    """
    if old is None or new.predecessor != old.room_id or old.tombstone != new.room_id:
        return False
    mine, theirs = old.members.get(user_id), new.members.get(user_id)
    return (
        mine is not None
        and mine.membership is Membership.BAN
        and mine.sender == bot
        and theirs is not None
        and theirs.membership is Membership.BAN
        and theirs.sender != bot
        and theirs.sender is not None
        and theirs.sender == new.create_sender
        and theirs.reason == mine.reason
    )


def unsure_rooms(snapshot: Snapshot, graph: SpaceGraph) -> frozenset[RoomID]:
    """Managed rooms not read this time, or answering to a Space not read this time."""
    return frozenset(
        r
        for r in graph.managed
        if not snapshot.known(r) or not all(snapshot.known(s) for s in graph.authority.get(r, ()))
    )


def malformed_findings(snapshot: Snapshot) -> list[Finding]:
    return [
        Finding(
            room_id,
            "malformed",
            f"{room.malformed} state event(s) with malformed content skipped; the rest of the room is planned as usual",
        )
        for room_id, room in sorted(snapshot.rooms.items())
        if room.malformed
    ]


class MembershipPlanner:
    """Space bans carried down, evictions cascaded to a fixpoint, and the bot's own bans lifted."""

    def __init__(self, snapshot: Snapshot, policy: Policy, graph: SpaceGraph) -> None:
        self.snapshot = snapshot
        self.policy = policy
        self.graph = graph
        self.memberships = Memberships(snapshot)
        self.actions: list[Action] = []
        self.findings: list[Finding] = []
        self.left_behind: list[LeftBehind] = []
        self.stale_bans: list[PlacedBan] = []
        self.recheck_at_ms: int | None = None
        # Only rooms read this time are acted in, and only Spaces read this time count departures and
        # bans; a stale room (its last known state) keeps the graph whole but decides nothing.
        self._managed_rooms = sorted(r for r in graph.managed if snapshot.known(r))
        self._managed_spaces = [r for r in self._managed_rooms if snapshot.rooms[r].is_space or r in graph.roots]
        self._upgrades = verified_upgrades(snapshot, graph)
        self._list_banned = policy_bans(
            snapshot, policy.spaces, {s.room_id: graph.governed_by(s.room_id) | {s.room_id} for s in policy.spaces}
        )
        self._no_power: set[tuple[RoomID, str]] = set()
        self._unknown_reported: set[tuple[RoomID, RoomID]] = set()
        self._history_reported: set[tuple[RoomID, UserID]] = set()

    def run(self) -> None:
        """Space bans, evictions and unbans, consistent with each other within one plan.

        Bans the bot plans in a Space (on_leave: ban) are Space bans too, and Space bans make members
        leave: both alternate to a fixpoint. Lifting the bot's own bans interacts with both (a ban
        lifted in a Space no longer carries down; a ban carried down, or an eviction, can keep a ban
        from lifting), so the lifts are the greatest set that still holds once the bans and evictions
        they leave behind are planned: start from every liftable ban and drop those that no longer
        hold, until none is dropped. Each round only drops, so it ends; and the next plan, reading
        the state this one leaves, finds nothing more to do.
        """
        candidates, blocked = self._lift_candidates()
        lifts = set(candidates)
        while True:
            self._reset()
            for room_id, user_id in sorted(lifts):
                self.memberships.plan(room_id, user_id, Membership.LEAVE, lift=True)
            while self._list_bans() | self._carry_bans() | self._propagate_bans() | self._evict():
                pass
            dropped = {key for key in lifts if not self._lift_holds(key, candidates[key])}
            if not dropped:
                break
            lifts -= dropped
        for room_id, user_id in sorted(lifts):
            placed = candidates[(room_id, user_id)]
            self.actions.append(
                Action(
                    kind=ActionKind.UNBAN,
                    room_id=room_id,
                    user_id=user_id,
                    cause="unban",
                    reason=(
                        "back in the Space" if all(p.cause == "on_leave" for p in placed) else "unbanned in the Space"
                    ),
                    space_id=self._root_for(room_id),
                )
            )
        for key, placed in sorted(blocked.items()):
            if self._lift_holds(key, placed):
                self.findings.append(
                    Finding(
                        key[0],
                        "no_power",
                        f"cannot lift its own ban on {key[1]}: needs kick and ban power and a level above theirs",
                    )
                )

    def _reset(self) -> None:
        self.memberships = Memberships(self.snapshot)
        self.actions = []
        self.findings = []
        self.left_behind = []
        self.recheck_at_ms = None
        self._no_power = set()
        self._unknown_reported = set()
        self._history_reported = set()

    def _root_for(self, room_id: RoomID) -> RoomID | None:
        governing = policies_for(self.graph, self.policy, room_id)
        return governing[0].room_id if governing else None

    def _may_act(self, room: RoomState, user_id: UserID, kind: ActionKind) -> bool:
        """Checks the target's protection and the bot's own power, reporting why not."""
        why = protection(room, user_id, self.policy, self.graph)
        if why:
            self.findings.append(Finding(room.room_id, "protected", f"{user_id} not {kind.value}ed: {why}"))
            self.left_behind.append(LeftBehind(room.room_id, user_id, kind, why))
            return False
        pl = room.power_levels
        if kind is ActionKind.KICK:
            needed = pl.kick
        elif kind is ActionKind.UNBAN:
            needed = max(pl.ban, pl.kick)  # lifting a ban is a leave sent by another user: both levels
        else:
            needed = pl.ban
        if user_level(room, self.policy.bot) < needed:
            if (room.room_id, kind.value) not in self._no_power:
                self._no_power.add((room.room_id, kind.value))
                self.findings.append(
                    Finding(room.room_id, "no_power", f"the bot lacks the power to {kind.value} (needs {needed})")
                )
            self.left_behind.append(
                LeftBehind(
                    room.room_id, user_id, kind, f"the bot lacks the power to {kind.value} there (needs {needed})"
                )
            )
            return False
        return True

    def _carry_bans(self) -> bool:
        """The bot's own bans in an upgraded room, placed again in its replacement; True when something was
        planned.

        Only bans that still hold (the Space has not lifted them) are carried. A ban already standing in the
        replacement is left alone, unless it is the homeserver's copy of the bot's ban (`upgrade_copy`): then
        the bot bans again, so that the ban is its own and is lifted with the Space ban.
        """
        planned = False
        bot = self.policy.bot
        for old_id, new_id in self._upgrades:
            old, new = self.snapshot.rooms[old_id], self.snapshot.rooms.get(new_id)
            if new is None or not (self.snapshot.known(old_id) and self.snapshot.known(new_id)):
                continue
            for placed in sorted(self.snapshot.placed_bans, key=lambda b: (b.user_id, b.cause)):
                user_id = placed.user_id
                state = old.members.get(user_id)
                if (
                    placed.room_id != old_id
                    or state is None
                    or state.membership is not Membership.BAN
                    or state.sender != bot
                    or self.memberships.is_planned(new_id, user_id)
                ):
                    continue
                if self._ban_lifted(old, placed):
                    continue
                there = new.members.get(user_id)
                if (
                    there is not None
                    and there.membership is Membership.BAN
                    and (there.sender == bot or not upgrade_copy(new, old, user_id, bot))
                ):
                    continue  # already the bot's ban there, or a moderator's own
                if user_id in exempt_in(self.graph, self.policy, old_id):
                    self.findings.append(Finding(new_id, "protected", f"{user_id} not banned: exempt"))
                    self.left_behind.append(LeftBehind(new_id, user_id, ActionKind.BAN, "exempt"))
                    continue
                if not self._may_act(new, user_id, ActionKind.BAN):
                    continue
                self.memberships.plan(new_id, user_id, Membership.BAN)
                why = state.reason or f"banned by spacesync in {old_id}"
                self.actions.append(
                    Action(
                        kind=ActionKind.BAN,
                        room_id=new_id,
                        user_id=user_id,
                        cause=placed.cause,
                        reason=f"{why} (carried over from {old_id}, which this room replaced)",
                        space_id=self._root_for(old_id),
                    )
                )
                planned = True
        return planned

    def _list_bans(self) -> bool:
        """Ban in each Space the users its policy lists ban (carried down from there as any Space ban); True
        when something was planned. A user already banned there, by anyone, is left as they are."""
        planned = False
        for space_id, bans in sorted(self._list_banned.items()):
            if not bans.banned or space_id not in self._managed_spaces:
                continue
            room = self.snapshot.rooms[space_id]
            for user_id, rule in sorted(bans.banned.items()):
                if self.memberships.get(space_id, user_id) is Membership.BAN:
                    continue
                if not self._may_act(room, user_id, ActionKind.BAN):
                    continue
                self.memberships.plan(space_id, user_id, Membership.BAN)
                self.actions.append(
                    Action(
                        kind=ActionKind.BAN,
                        room_id=space_id,
                        user_id=user_id,
                        cause=Cause.POLICY_LIST.value,
                        reason=rule.reason or f"policy list rule {rule.entity}",
                        space_id=self._root_for(space_id),
                    )
                )
                planned = True
        return planned

    def _propagates_bans(self, space_id: RoomID) -> bool:
        policies = policies_for(self.graph, self.policy, space_id)
        return bool(policies) and all(p.propagate_bans for p in policies)

    def _propagate_bans(self) -> bool:
        """Carry bans (standing or planned) in managed Spaces down; True when something was planned."""
        planned = False
        for space_id in self._managed_spaces:
            if not self._propagates_bans(space_id):
                continue
            banned = self.memberships.banned(space_id)
            if not banned:
                continue
            for room_id in sorted(self.graph.governed_by(space_id)):
                room = self.snapshot.rooms.get(room_id)
                if room is None or room.tombstone or not self.snapshot.known(room_id):
                    continue
                for user_id in sorted(banned):
                    if self.memberships.get(room_id, user_id) is Membership.BAN:
                        continue
                    if not self._may_act(room, user_id, ActionKind.BAN):
                        continue
                    self.memberships.plan(room_id, user_id, Membership.BAN)
                    self.actions.append(
                        Action(
                            kind=ActionKind.BAN,
                            room_id=room_id,
                            user_id=user_id,
                            cause="space_ban",
                            reason=self._reason("banned in", space_id),
                            space_id=self._root_for(room_id),
                            content=self._ban_extras(space_id, room_id, user_id),
                        )
                    )
                    planned = True
        return planned

    def _evict(self) -> bool:
        """Evict members no longer entitled, to a fixpoint; True when something was planned."""
        unknown_reported = self._unknown_reported
        planned = False
        changed = True
        while changed:
            changed = False
            # Only someone with a leave or ban in a managed Space can be evicted: look at them alone,
            # not at every member of every room.
            departed = self.memberships.departed(self._managed_spaces)
            for room_id in self._managed_rooms:
                room = self.snapshot.rooms[room_id]
                if room.tombstone:
                    continue
                allowed_by = sorted(entitlers(room, self.graph))
                spaces = sorted(e for e in allowed_by if e in self._managed_spaces)
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
                # A Space or allow-list room that could not be read may hold any user: nobody is evicted
                # here on its account. That includes a parent the room names that the walk reached but
                # could not read (its m.space.child, and so its say over the room, is unknown).
                unreadable = sorted(
                    {e for e in allowed_by if not self.snapshot.known(e)}
                    | {p for p in room.parents if p in self.snapshot.unreachable}
                    | {
                        s.room_id
                        for s in self.policy.spaces
                        if room_id in s.extra_rooms and not self.snapshot.known(s.room_id)
                    }
                )
                for user_id in sorted(departed):
                    if self.memberships.get(room_id, user_id) is not Membership.JOIN:
                        continue
                    if entitled_by(user_id, allowed_by, self.memberships):
                        continue
                    left = [s for s in spaces if self.memberships.departed_from(s, user_id)]
                    if not left:
                        unknown = [s for s in spaces if self.memberships.history_unknown(s, user_id)]
                        if unknown and (room_id, user_id) not in self._history_reported:
                            self._history_reported.add((room_id, user_id))
                            self.findings.append(
                                Finding(
                                    room_id,
                                    "history_unknown",
                                    f"{user_id} has left {unknown[0]}, but whether they had joined it first "
                                    "cannot be told (a declined invite or a rejected knock is no departure): "
                                    "not evicted",
                                )
                            )
                        continue
                    if unreadable:
                        for other in unreadable:
                            if (room_id, other) not in unknown_reported:
                                unknown_reported.add((room_id, other))
                                self.findings.append(
                                    Finding(
                                        room_id,
                                        "unchecked_entitlement",
                                        f"cannot see the members of {other}: nobody is evicted here on its account "
                                        "until it can be read again",
                                    )
                                )
                        continue
                    if grace_ms and not any(self.memberships.is_planned(s, user_id) for s in left):
                        # spacesync's own clock: when it first saw the departure, never the sender's timestamp.
                        left_at = max(
                            seen
                            if (seen := self.snapshot.rooms[s].members[user_id].seen_ms) is not None
                            else self.snapshot.now_ms
                            for s in left
                        )
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
                    self.actions.append(
                        Action(
                            kind=kind,
                            room_id=room_id,
                            user_id=user_id,
                            cause="on_leave",
                            reason=self._leave_reason(user_id, left),
                            space_id=self._root_for(room_id),
                        )
                    )
                    changed = planned = True
        return planned

    def _ban_extras(self, space_id: RoomID, room_id: RoomID, user_id: UserID) -> dict[str, Any] | None:
        """What a carried-down ban sends besides its reason: MSC4293's redact_events when the Space ban asked for
        it, and how many of the user's last messages to redact there (redact_on_ban)."""
        extras: dict[str, Any] = {}
        state = self.snapshot.rooms[space_id].members.get(user_id) if space_id in self.snapshot.rooms else None
        if state is not None and state.membership is Membership.BAN and state.redact_events:
            extras["redact_events"] = True
        last = max((p.redact_on_ban for p in policies_for(self.graph, self.policy, room_id)), default=0)
        if last:
            extras["redact_last"] = last
        return extras or None

    def _reason(self, event: str, space_id: RoomID) -> str:
        room = self.snapshot.rooms.get(space_id)
        return render_reason(self.policy.reason_template, event, space_id, room.name if room else None)

    def _leave_reason(self, user_id: UserID, left: list[RoomID]) -> str:
        space_id = left[0]
        if self.memberships.is_planned(space_id, user_id):
            return self._reason("removed from", space_id)
        state = self.snapshot.rooms[space_id].members[user_id]
        if state.membership is Membership.BAN:
            return self._reason("banned in", space_id)
        if state.membership is Membership.LEAVE and state.sender and state.sender != user_id:
            return self._reason("kicked from", space_id)
        return self._reason("left", space_id)

    def _lift_candidates(
        self,
    ) -> tuple[dict[tuple[RoomID, UserID], list[PlacedBan]], dict[tuple[RoomID, UserID], list[PlacedBan]]]:
        """The bot's standing bans it may lift (by state alone), and those it could not (protected, no power)."""
        candidates: dict[tuple[RoomID, UserID], list[PlacedBan]] = {}
        blocked: dict[tuple[RoomID, UserID], list[PlacedBan]] = {}
        for placed in sorted(self.snapshot.placed_bans, key=lambda b: (b.room_id, b.user_id, b.cause)):
            room = self.snapshot.rooms.get(placed.room_id)
            if (
                room is None
                or not self.snapshot.known(placed.room_id)
                or not all(self.snapshot.known(s) for s in self.graph.authority.get(placed.room_id, ()))
            ):
                continue  # read again before lifting, or forgetting, anything there
            state = room.members.get(placed.user_id)
            if (
                state is None
                or state.membership is not Membership.BAN
                or (state.sender is not None and state.sender != self.policy.bot)
            ):
                # Lifted, or replaced by a moderator's own ban: no longer spacesync's to lift.
                self.stale_bans.append(placed)
                continue
            if placed.room_id not in self.graph.managed or room.tombstone:
                continue
            policies = policies_for(self.graph, self.policy, placed.room_id)
            own_list_ban = placed.cause == Cause.POLICY_LIST  # lifted with its rule, whatever propagate_unbans says
            if not own_list_ban and (not policies or not all(p.propagate_unbans for p in policies)):
                continue
            key = (placed.room_id, placed.user_id)
            pl = room.power_levels
            # Lifting its own ban is never held back by exemption (it only helps the user); the auth
            # rules still need the kick and ban levels and a target below the bot.
            bot_level = user_level(room, self.policy.bot)
            if bot_level < max(pl.ban, pl.kick) or user_level(room, placed.user_id) >= bot_level:
                blocked.setdefault(key, []).append(placed)
            else:
                candidates.setdefault(key, []).append(placed)
        return candidates, blocked

    def _lift_holds(self, key: tuple[RoomID, UserID], placed: list[PlacedBan]) -> bool:
        room_id, user_id = key
        if self.memberships.get(room_id, user_id) is Membership.BAN and self.memberships.is_planned(room_id, user_id):
            return False  # banned again within this plan
        room = self.snapshot.rooms[room_id]
        return all(self._ban_lifted(room, p) for p in placed)

    def _banned_above(self, room_id: RoomID, user_id: UserID, propagating_only: bool) -> bool:
        """Whether a managed ancestor Space (that carries bans down, if `propagating_only`) bans the user."""
        above = self.graph.authority.get(room_id, frozenset()) & set(self._managed_spaces)
        return any(
            self.memberships.get(s, user_id) is Membership.BAN and (not propagating_only or self._propagates_bans(s))
            for s in above
        )

    def _ban_lifted(self, room: RoomState, placed: PlacedBan) -> bool:
        if placed.cause == Cause.COMMAND_BAN:
            return False  # a moderator's `ban` command: lifted only by `unban` or `undo`
        if placed.cause == Cause.POLICY_LIST:
            # Lifted once no rule of the Space's lists bans the user; while a list cannot be read, kept.
            bans = self._list_banned.get(room.room_id)
            return bans is None or (bans.complete and placed.user_id not in bans.banned)
        if placed.cause == "space_ban":
            return not self._banned_above(room.room_id, placed.user_id, propagating_only=False)
        # An on_leave ban stays while a Space ban would place it again at once.
        if self._banned_above(room.room_id, placed.user_id, propagating_only=True):
            return False
        return entitled_by(placed.user_id, entitlers(room, self.graph), self.memberships) is not None
