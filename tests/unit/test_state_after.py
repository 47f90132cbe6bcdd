"""MSC4222's `state_after`: applied after the timeline, so it wins where the timeline is wrong (a state reset);
without it, `state` (before the timeline) comes first."""

from __future__ import annotations

from spacesync.engine.sync import room_state_events


def _member(event_id: str, membership: str) -> dict:
    return {"type": "m.room.member", "state_key": "@u:hs", "event_id": event_id, "content": {"membership": membership}}


def test_state_after_is_applied_after_the_timeline_and_wins():
    timeline = [_member("$join", "join")]
    room = {"org.matrix.msc4222.state_after": {"events": [_member("$leave", "leave")]}}
    events = room_state_events(room, timeline)
    assert events.after and [e["event_id"] for e in events] == ["$join", "$leave"]
    stable = room_state_events({"state_after": {"events": [_member("$leave", "leave")]}}, timeline)
    assert stable.after and stable[-1]["event_id"] == "$leave"


def test_without_state_after_the_state_section_comes_before_the_timeline():
    events = room_state_events({"state": {"events": [_member("$old", "leave")]}}, [_member("$join", "join")])
    assert not events.after and [e["event_id"] for e in events] == ["$old", "$join"]
