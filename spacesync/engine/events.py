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


@attrs.frozen
class RateLimited:
    """The homeserver keeps answering the bot's writes with 429 (one rate-limit episode): when the queue is
    expected to be done at the rate it grants, and exactly what lifts the limit."""

    since: float
    """Wall time the episode began."""
    refusals: int
    granted_rate: float
    """Writes per second the homeserver grants (from its `retry_after_ms`)."""
    queued: int
    seconds: float | None
    """Until the queued actions are expected to be done; None when nothing is queued."""
    lift: str
    """For Synapse the admin API call with the bot's id; for others the general rule."""

    def details(self) -> dict[str, object]:
        """For /ready and the log line."""
        return {
            "since": round(self.since, 1),
            "refused_writes": self.refusals,
            "granted_writes_per_s": round(self.granted_rate, 3),
            "queued_actions": self.queued,
            "expected_finish_s": None if self.seconds is None else round(self.seconds, 1),
            "lift": self.lift,
        }


Event = BatchFinished | BatchHeld | ActionParked | RoomsNeedAttention | RateLimited
Listener = Callable[[Event], Awaitable[None]]
