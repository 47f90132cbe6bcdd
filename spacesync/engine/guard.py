"""The mass-action guard: one trigger evicting too many users from a Space waits for a moderator."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

import attrs

from ..model import EVICTIONS, Action, RoomID


@attrs.frozen
class Guarded:
    release: tuple[Action, ...]
    hold: Mapping[RoomID | None, tuple[Action, ...]]
    """Held evictions per root Space."""


def guard(actions: Iterable[Action], limit_for: Mapping[RoomID | None, int], default_limit: int) -> Guarded:
    """Hold every eviction of a Space whose distinct evicted users exceed its limit; release the rest."""
    evicted: dict[RoomID | None, set[str]] = defaultdict(set)
    actions = list(actions)
    for action in actions:
        if action.kind in EVICTIONS and action.user_id:
            evicted[action.space_id].add(action.user_id)
    over = {s for s, users in evicted.items() if len(users) > limit_for.get(s, default_limit)}
    release = tuple(a for a in actions if not (a.kind in EVICTIONS and a.space_id in over))
    hold = {s: tuple(a for a in actions if a.kind in EVICTIONS and a.space_id == s) for s in over}
    return Guarded(release, hold)
