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
