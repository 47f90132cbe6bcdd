"""Admin-room notices: "rooms need attention" once per room and finding code, whatever the text says."""

from __future__ import annotations

import asyncio
from typing import Any

import attrs

from spacesync.engine.announcer import Announcer
from spacesync.engine.events import RoomsNeedAttention
from spacesync.model import Finding

from .helpers import rid


@attrs.frozen
class Text:
    text: str
    html: str | None = None


class AdminRoom:
    """The homeserver side of posting a notice: what was posted, in order."""

    def __init__(self) -> None:
        self.posted: list[str] = []
        self.api = self

    def get_txn_id(self) -> str:
        return f"t{len(self.posted)}"

    async def send_notice(self, room_id: Any, text: str, html: str | None = None, *, txn: str) -> None:
        self.posted.append(text)


def render(event: Any) -> Text:
    return Text("; ".join(f.message for f in event.findings))


def test_attention_notices_are_de_duplicated_by_room_and_code_not_by_text():
    room = AdminRoom()
    announcer = Announcer(room, None, admin_room=lambda: rid("admin"), render=render)  # type: ignore[arg-type]
    a, b = rid("a"), rid("b")

    async def run() -> None:
        await announcer(RoomsNeedAttention([Finding(a, "partial_state", "waited 3 s for the full state")]))
        await announcer(RoomsNeedAttention([Finding(a, "partial_state", "waited 63 s for the full state")]))
        await announcer(
            RoomsNeedAttention(
                [Finding(a, "partial_state", "waited 123 s"), Finding(a, "no_power", "x"), Finding(b, "no_power", "x")]
            )
        )

    asyncio.run(run())
    assert room.posted == ["waited 3 s for the full state", "x; x"]
