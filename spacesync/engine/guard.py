"""The mass-action guard: too many users evicted from a Space within a window wait for a moderator.

It counts over time, not per pass: a slow exodus (one leaver per /sync) is held like a sudden one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet

import attrs

from ..model import EVICTIONS, Action, RoomID


@attrs.frozen
class Guarded:
    release: tuple[Action, ...]
    hold: Mapping[RoomID | None, tuple[Action, ...]]
    """Held evictions per root Space."""


def guard(
    actions: Iterable[Action],
    limit_for: Mapping[RoomID | None, int],
    default_limit: int,
    evicted_recently: Mapping[RoomID | None, AbstractSet[str]] | None = None,
    held: Mapping[RoomID | None, AbstractSet[str]] | None = None,
) -> Guarded:
    """Hold every new eviction of a Space once the distinct users it evicts, together with the users already
    evicted from it within the window (`evicted_recently`) and the users its held batch waits to evict (`held`),
    exceed its limit; release the rest.

    A user already evicted within the window does not count twice (another room of theirs is released
    while the Space stays within its limit). Held users count as evicted: while a batch waits for a moderator,
    a second one as big is held too, not run."""
    recent: dict[RoomID | None, set[str]] = defaultdict(set)
    for counted in (evicted_recently or {}, held or {}):
        for space_id, users in counted.items():
            recent[space_id].update(users)
    evicted: dict[RoomID | None, set[str]] = defaultdict(set)
    actions = list(actions)
    for action in actions:
        if action.kind in EVICTIONS and action.user_id:
            evicted[action.space_id].add(action.user_id)
    over = {s for s, users in evicted.items() if len(users | set(recent.get(s, ()))) > limit_for.get(s, default_limit)}
    release = tuple(a for a in actions if not (a.kind in EVICTIONS and a.space_id in over))
    hold = {s: tuple(a for a in actions if a.kind in EVICTIONS and a.space_id == s) for s in over}
    return Guarded(release, hold)
