"""What the engine tells the outside world, as typed events: presentation (admin-room notices) is the
listener's business, so the engine never imports the command layer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import attrs

from ..model import Action, Finding, LeftBehind, RoomID
from ..store.journal import Entry


@attrs.frozen
class BatchFinished:
    """A batch's last action ended: what was done to whom, where, what failed, how to undo."""

    batch: str
    trigger: str
    entries: list[Entry]
    left_behind: list[LeftBehind]
    redacted: Mapping[RoomID, int] = attrs.field(factory=dict)
    """Messages each REDACT action of the batch removed, by room."""


@attrs.frozen
class BatchHeld:
    """Evictions above a Space's limit were held for a moderator to confirm or cancel."""

    batch: str
    space_id: RoomID | None
    actions: tuple[Action, ...]
    limit: int
    window_s: float
    recent: int
    """Users of that Space already evicted within the guard window."""


@attrs.frozen
class ActionParked:
    """An action was refused for good (first time for this action and reason)."""

    entry: Entry
    error: str


@attrs.frozen
class RoomsNeedAttention:
    """Findings a moderator should act on, each reported once per run."""

    findings: list[Finding]


Event = BatchFinished | BatchHeld | ActionParked | RoomsNeedAttention
Listener = Callable[[Event], Awaitable[None]]
