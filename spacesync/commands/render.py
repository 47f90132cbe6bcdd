"""Renders the engine's events into admin-room notices (the engine's announcer posts them)."""

from __future__ import annotations

from ..engine.events import ActionParked, BatchFinished, BatchHeld, Event, RateLimited, RoomsNeedAttention
from ..matrix import StateCache
from ..model import RoomID
from ..refs import room_label
from .format import Reply, line, listing
from .notices import batch_summary, held_notice, parked_notice, rate_limited_notice


class NoticeRenderer:
    """One notice per engine event, rooms named from the state cache."""

    def __init__(self, cache: StateCache) -> None:
        self.cache = cache

    def room_name(self, room_id: RoomID) -> str:
        room = self.cache.get(room_id)
        return room.name if room is not None and room.name else str(room_id)

    def room_label(self, room_id: RoomID) -> str:
        """Name and id, for notices a moderator acts on by room."""
        room = self.cache.get(room_id)
        return room_label(room_id, room.name if room is not None else None)

    def __call__(self, event: Event) -> Reply:
        match event:
            case BatchFinished():
                return batch_summary(
                    event.batch, event.trigger, event.entries, self.room_name, event.left_behind, event.redacted
                )
            case BatchHeld():
                return held_notice(
                    event.batch,
                    self.room_label(event.space_id) if event.space_id else "?",
                    event.actions,
                    event.limit,
                    self.room_label,
                    window_s=event.window_s,
                    recent=event.recent,
                )
            case ActionParked():
                return parked_notice(event.entry, event.error, self.room_name)
            case RoomsNeedAttention():
                return listing(
                    f"Rooms that need attention ({len(event.findings)}):",
                    [line(f"{self.room_label(f.room_id)}: {f.message}") for f in event.findings],
                    hint="!spacesync plan lists them all",
                )
            case RateLimited():
                return rate_limited_notice(event)
