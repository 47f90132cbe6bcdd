"""The Space graph: which rooms each managed Space reaches, which of them opted in, and why."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet

import attrs

from ..model import Finding, Policy, RoomID, RoomState, Snapshot, SpacePolicy, UserID

RESTRICTED_RULES = frozenset({"restricted", "knock_restricted"})


@attrs.frozen
class SpaceGraph:
    """The walked hierarchy below the configured root Spaces."""

    roots: tuple[RoomID, ...]
    children: Mapping[RoomID, frozenset[RoomID]]
    """Edges followed: Space -> children (only Spaces the bot could read have out-edges)."""
    parents: Mapping[RoomID, frozenset[RoomID]]
    """Reverse edges: room -> the walked Spaces listing it."""
    depth: Mapping[RoomID, int]
    """Shortest distance from a root, for every room reached."""
    managed: frozenset[RoomID]
    """Roots and every room that opted in (see `opt_in_reason`)."""
    opt_in: Mapping[RoomID, str]
    """Managed room -> why it is managed."""
    governing: Mapping[RoomID, frozenset[RoomID]]
    """Managed room -> the root Spaces whose policies apply to it."""
    findings: tuple[Finding, ...]
    authority: Mapping[RoomID, frozenset[RoomID]] = attrs.field(factory=dict)
    """Managed room -> the managed Spaces it answers to: those it opted into, and theirs, upwards.

    Only these Spaces' memberships, bans and power levels apply to the room. A Space that merely
    lists a room (any Space admin can) gains no authority over it: the confused deputy.
    """

    def descendants(self, room_id: RoomID) -> frozenset[RoomID]:
        """Every room reachable from `room_id` by walked edges, excluding itself."""
        seen: set[RoomID] = set()
        stack = list(self.children.get(room_id, ()))
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            stack.extend(self.children.get(current, ()))
        seen.discard(room_id)
        return frozenset(seen)

    def governed_by(self, space_id: RoomID) -> frozenset[RoomID]:
        """Managed rooms that answer to `space_id` (its bans and levels reach them)."""
        return frozenset(r for r, spaces in self.authority.items() if space_id in spaces)

    def managed_parents(self, room_id: RoomID) -> frozenset[RoomID]:
        """Every managed Space listing the room (including one that lists it back in a cycle)."""
        return self.parents.get(room_id, frozenset()) & self.managed

    def entitling_parents(self, room_id: RoomID) -> frozenset[RoomID]:
        """Managed parent Spaces the room answers to: their members may stay in it."""
        return self.managed_parents(room_id) & self.authority.get(room_id, frozenset())

    def ancestors(self, room_id: RoomID) -> frozenset[RoomID]:
        seen: set[RoomID] = set()
        stack = list(self.parents.get(room_id, ()))
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            stack.extend(self.parents.get(current, ()))
        seen.discard(room_id)
        return frozenset(seen)

    def rooms(self) -> frozenset[RoomID]:
        return frozenset(self.depth)


def _space_children(room: RoomState, policy: SpacePolicy | None) -> Iterable[RoomID]:
    yield from sorted(room.children)
    if policy is not None:
        yield from sorted(policy.extra_rooms - set(room.children))


def build_graph(snapshot: Snapshot, policy: Policy) -> SpaceGraph:
    """Walk from every root Space, breadth first, within the depth and room caps."""
    findings: list[Finding] = []
    children: dict[RoomID, set[RoomID]] = defaultdict(set)
    parents: dict[RoomID, set[RoomID]] = defaultdict(set)
    depth: dict[RoomID, int] = {}
    reached_by: dict[RoomID, set[RoomID]] = defaultdict(set)
    roots = tuple(s.room_id for s in policy.spaces)
    capped = False
    discovered: set[RoomID] = set(roots)
    """Every room walked or queued: what the room cap counts."""

    for root_policy in policy.spaces:
        root = root_policy.room_id
        frontier: list[tuple[RoomID, int]] = [(root, 0)]
        seen_here: set[RoomID] = set()
        while frontier:
            room_id, d = frontier.pop(0)
            if room_id in seen_here:
                continue
            seen_here.add(room_id)
            reached_by[room_id].add(root)
            depth[room_id] = min(d, depth.get(room_id, d))
            room = snapshot.rooms.get(room_id)
            if room is None:
                reason = snapshot.unreachable.get(room_id, "the bot is not joined")
                # (a room joined a moment ago, still in partial state, is waited for: not a moderator's matter)
                code = "partial_state" if reason.startswith("partial state") else "unreachable"
                findings.append(Finding(room_id, code, f"cannot read the room ({reason})"))
                continue
            if room_id in snapshot.unreachable:
                findings.append(
                    Finding(
                        room_id,
                        "unreachable",
                        (
                            f"cannot read the room ({snapshot.unreachable[room_id]}): its last known state keeps the "
                            "Space tree whole, and nothing changes in it or because of it until it reads again"
                        ),
                    )
                )
            if not (room.is_space or room_id == root):
                continue
            if d >= policy.max_depth:
                if room.children:
                    findings.append(
                        Finding(room_id, "cap_depth", f"depth cap {policy.max_depth} reached: children not walked")
                    )
                continue
            for child in _space_children(room, root_policy if room_id == root else None):
                if child == room_id:
                    findings.append(Finding(child, "cycle", f"Space cycle: {room_id} lists itself"))
                    continue
                if child not in discovered and len(discovered) >= policy.max_rooms:
                    if not capped:
                        findings.append(
                            Finding(room_id, "cap_rooms", f"room cap {policy.max_rooms} reached: walk stopped")
                        )
                    capped = True
                    continue
                children[room_id].add(child)
                parents[child].add(room_id)
                discovered.add(child)
                frontier.append((child, d + 1))

    frozen_children = {k: frozenset(v) for k, v in children.items()}
    findings.extend(_cycles(frozen_children))
    frozen_parents = {k: frozenset(v) for k, v in parents.items()}
    dominated = _dominated(roots, frozen_children)
    managed, opt_in = _opt_in(snapshot, policy, roots, frozen_parents, depth, frozen_children)
    authority = _authority(snapshot, policy, roots, managed, frozen_parents, dominated)
    for room_id in sorted(set(depth) - managed):
        if room_id in snapshot.rooms:
            findings.append(Finding(room_id, "not_opted_in", "listed as a child but not opted in: left untouched"))
    governing = {room_id: frozenset(r for r in roots if r == room_id or r in authority[room_id]) for room_id in managed}
    return SpaceGraph(
        roots=roots,
        children=frozen_children,
        parents=frozen_parents,
        depth=depth,
        managed=frozenset(managed),
        opt_in=opt_in,
        governing=governing,
        findings=tuple(_dedupe(findings)),
        authority=authority,
    )


def _reach(starts: Iterable[RoomID], children: Mapping[RoomID, frozenset[RoomID]], avoid: RoomID | None) -> set[RoomID]:
    seen: set[RoomID] = set()
    stack = [r for r in starts if r != avoid]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(c for c in children.get(current, ()) if c != avoid and c not in seen)
    return seen


def _dominated(
    roots: tuple[RoomID, ...], children: Mapping[RoomID, frozenset[RoomID]]
) -> dict[RoomID, frozenset[RoomID]]:
    """For every room on a walked cycle, the rooms reachable from the roots only through it."""
    out: dict[RoomID, frozenset[RoomID]] = {}
    for room_id in sorted(children):
        below = _reach(children[room_id], children, None)
        if room_id not in below:
            continue  # on no cycle
        below.discard(room_id)
        out[room_id] = frozenset(below - _reach(roots, children, room_id))
    return out


def _cycles(children: Mapping[RoomID, frozenset[RoomID]]) -> list[Finding]:
    """One finding per back edge of the walked edges (every cycle has one), whichever roots walked them."""
    findings = []
    state: dict[RoomID, int] = {}  # 1: on the current path, 2: done
    for start in sorted(children):
        if start in state:
            continue
        state[start] = 1
        stack = [(start, iter(sorted(children.get(start, ()))))]
        while stack:
            node, todo = stack[-1]
            nxt = next(todo, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                findings.append(Finding(nxt, "cycle", f"Space cycle: {node} lists its ancestor {nxt}"))
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(children.get(nxt, ())))))
    return findings


def _ancestors_of(parents: Mapping[RoomID, AbstractSet[RoomID]], room_id: RoomID) -> set[RoomID]:
    seen: set[RoomID] = set()
    stack = [room_id]
    while stack:
        current = stack.pop()
        for p in parents.get(current, ()):
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def _opt_in(
    snapshot: Snapshot,
    policy: Policy,
    roots: tuple[RoomID, ...],
    parents: Mapping[RoomID, frozenset[RoomID]],
    depth: Mapping[RoomID, int],
    children: Mapping[RoomID, frozenset[RoomID]],
) -> tuple[set[RoomID], dict[RoomID, str]]:
    """Grow the managed set from the roots until no further room opts in."""
    managed: set[RoomID] = {r for r in roots if r in snapshot.rooms}
    why: dict[RoomID, str] = {r: "configured root Space" for r in managed}
    ancestors = {room_id: _ancestors_of(parents, room_id) for room_id in depth}
    extra_for = _extra_for(policy)
    changed = True
    while changed:
        changed = False
        for room_id in sorted(depth, key=lambda r: (depth[r], r)):
            if room_id in managed:
                continue
            room = snapshot.rooms.get(room_id)
            if room is None:
                continue
            above = {a for a in ancestors[room_id] if a in managed and _is_space(snapshot, a, roots)}
            reason = _opt_in_reason(room, above, snapshot, extra_for.get(room_id, set()) & managed)
            if reason:
                managed.add(room_id)
                why[room_id] = reason
                changed = True
    return managed, why


def _extra_for(policy: Policy) -> dict[RoomID, set[RoomID]]:
    """Room -> the roots that added it explicitly."""
    extra_for: dict[RoomID, set[RoomID]] = defaultdict(set)
    for space in policy.spaces:
        for extra in space.extra_rooms:
            extra_for[extra].add(space.room_id)
    return extra_for


def _opted_into(room: RoomState, managed_above: set[RoomID], snapshot: Snapshot, explicit: set[RoomID]) -> set[RoomID]:
    """Every managed Space above the room that the room itself chose (allow list, parent, operator)."""
    chosen = set(explicit)
    if room.join_rule in RESTRICTED_RULES:
        chosen |= set(room.allow) & managed_above
    for parent_id in set(room.parents) & managed_above:
        parent = snapshot.rooms.get(parent_id)
        if parent is not None and room.room_id in parent.children:
            chosen.add(parent_id)
    return chosen


def _authority(
    snapshot: Snapshot,
    policy: Policy,
    roots: tuple[RoomID, ...],
    managed: set[RoomID],
    parents: Mapping[RoomID, frozenset[RoomID]],
    dominated: Mapping[RoomID, frozenset[RoomID]],
) -> dict[RoomID, frozenset[RoomID]]:
    """The Spaces each managed room answers to: the ones it opted into, closed upwards."""
    extra_for = _extra_for(policy)
    direct: dict[RoomID, set[RoomID]] = {}
    for room_id in managed:
        room = snapshot.rooms[room_id]
        above = {
            a for a in _ancestors_of(parents, room_id) if a in managed and _is_space(snapshot, a, roots)
        } - dominated.get(room_id, frozenset())
        direct[room_id] = _opted_into(room, above, snapshot, extra_for.get(room_id, set()) & managed)
    authority: dict[RoomID, frozenset[RoomID]] = {}
    for room_id in managed:
        seen: set[RoomID] = set()
        stack = list(direct[room_id])
        while stack:
            space_id = stack.pop()
            if space_id in seen or space_id == room_id:
                continue
            seen.add(space_id)
            stack.extend(direct.get(space_id, ()))
        authority[room_id] = frozenset(seen)
    return authority


def _opt_in_reason(
    room: RoomState, managed_above: set[RoomID], snapshot: Snapshot, explicit: set[RoomID]
) -> str | None:
    if explicit:
        return f"added explicitly under {sorted(explicit)[0]}"
    if room.join_rule in RESTRICTED_RULES:
        named = sorted(set(room.allow) & managed_above)
        if named:
            return f"{room.join_rule} to {named[0]}"
    for parent_id in sorted(set(room.parents) & managed_above):
        parent = snapshot.rooms.get(parent_id)
        if parent is not None and room.room_id in parent.children:
            return f"m.space.parent names {parent_id}"
    return None


def _is_space(snapshot: Snapshot, room_id: RoomID, roots: tuple[RoomID, ...]) -> bool:
    room = snapshot.rooms.get(room_id)
    return room is not None and (room.is_space or room_id in roots)


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple[RoomID, str, str]] = set()
    out = []
    for f in findings:
        key = (f.room_id, f.code, f.message)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def policies_for(graph: SpaceGraph, policy: Policy, room_id: RoomID) -> list[SpacePolicy]:
    """The root Space policies that govern a managed room, in configuration order."""
    governing = graph.governing.get(room_id, frozenset())
    return [s for s in policy.spaces if s.room_id in governing]


def exempt_in(graph: SpaceGraph, policy: Policy, room_id: RoomID) -> frozenset[UserID]:
    exempt = set(policy.exempt)
    for space in policies_for(graph, policy, room_id):
        exempt |= space.exempt
    return frozenset(exempt)
