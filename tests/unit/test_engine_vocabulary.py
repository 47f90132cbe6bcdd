"""The engine's typed vocabulary keeps the stored strings, and its events render to the notices they replace."""

from __future__ import annotations

from spacesync.commands.notices import held_notice
from spacesync.commands.render import NoticeRenderer
from spacesync.engine.events import BatchHeld, RoomsNeedAttention
from spacesync.engine.executor import Outcome
from spacesync.engine.reconciler import ATTENTION
from spacesync.matrix import StateCache
from spacesync.model import (
    Action,
    ActionKind,
    Cause,
    Finding,
    FindingCode,
    FindingFamily,
    RoomID,
    UserID,
    finding_family,
)


def test_stored_values_are_unchanged() -> None:
    assert [o.value for o in Outcome] == [
        "done",
        "already_done",
        "failed",
        "parked",
        "skipped",
        "banned_by_someone_else",
        "no longer needed",
        "superseded",
    ]
    assert Cause.UNDO == "undo" and Cause.SPACE_BAN == "space_ban" and Cause.ON_LEAVE == "on_leave"


def test_findings_fall_into_families() -> None:
    assert finding_family("unreachable") is FindingFamily.CANNOT_SEE
    assert finding_family("history_unknown") is FindingFamily.CANNOT_SEE
    assert finding_family("protected") is FindingFamily.CANNOT_ACT
    assert finding_family("no_power") is FindingFamily.CANNOT_ACT
    assert finding_family("not a code") is None
    assert all(isinstance(code.family, FindingFamily) for code in FindingCode)
    assert "not_opted_in" in ATTENTION and "protected" not in ATTENTION


def test_events_render_to_the_notices() -> None:
    space, room = RoomID("!space:x"), RoomID("!room:x")
    held = tuple(Action(ActionKind.KICK, room, UserID(f"@u{i}:x"), space_id=space) for i in range(3))
    event = BatchHeld(batch="b1", space_id=space, actions=held, limit=2, window_s=600.0, recent=1)
    rendered = NoticeRenderer(StateCache())(event)
    expected = held_notice("b1", str(space), held, 2, str, window_s=600.0, recent=1)
    assert (rendered.text, rendered.html) == (expected.text, expected.html)
    finding = Finding(room, "unreachable", "cannot read the room")
    text = NoticeRenderer(StateCache())(RoomsNeedAttention(findings=[finding])).text
    assert "Rooms that need attention (1):" in text and "!room:x: cannot read the room" in text


def test_a_batch_notice_names_what_was_superseded_apart_from_what_was_done() -> None:
    from spacesync.commands.notices import batch_summary, parked_notice
    from spacesync.store.journal import Entry, Status

    user, rooms = UserID("@u:x"), [RoomID(f"!r{i}:x") for i in range(3)]

    def entry(i: int, status: Status, error: str | None = None) -> Entry:
        return Entry(i, "b1", Action(ActionKind.KICK, rooms[i], user), status, 1, error, 0)

    entries = [
        entry(0, Status.DONE),
        entry(1, Status.SUPERSEDED, "@u:x rejoined the Space"),
        entry(2, Status.SUPERSEDED, "@u:x rejoined the Space"),
    ]
    text = batch_summary("b1", "sync", entries, str).text
    assert "1 action done, 2 superseded" in text
    assert "2 superseded: @u:x rejoined the Space (kick in !r1:x, !r2:x), not sent" in text
    assert "kicked @u:x in 1 room: !r0:x" in text, "already done and superseded are kept apart"
    parked = entry(0, Status.PARKED)
    assert "failed 1 time (502 from the homeserver)" in parked_notice(parked, "502 from the homeserver", str).text
    assert "was refused 1 time" in parked_notice(parked, "403 M_FORBIDDEN: no", str).text
