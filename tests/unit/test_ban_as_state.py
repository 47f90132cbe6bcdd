"""A ban goes as the `m.room.member` state event, so the homeserver keeps `redact_events`; `/ban` where that
form is refused."""

from __future__ import annotations

from typing import Any

from mautrix.api import Method
from mautrix.errors import MatrixStandardRequestError

from spacesync.matrix import MatrixAdapter
from spacesync.matrix.state import REDACT_EVENTS_UNSTABLE


def _adapter(refuse: int | None) -> tuple[MatrixAdapter, list[tuple[Method, str, Any]]]:
    matrix = MatrixAdapter("http://127.0.0.1:1", "@bot:hs")
    sent: list[tuple[Method, str, Any]] = []

    async def request(method: Method, path: Any, content: Any = None, **_: Any) -> Any:
        sent.append((method, str(path), content))
        if method == Method.PUT and refuse is not None:
            raise MatrixStandardRequestError(refuse, "no")
        return {"event_id": "$ban"}

    matrix.request = request  # type: ignore[method-assign]
    return matrix, sent


async def test_a_ban_is_sent_as_member_state_with_the_flag_under_both_names():
    matrix, sent = _adapter(None)
    await matrix.ban("!r:hs", "@u:hs", "raid", redact_events=True)
    assert sent == [
        (
            Method.PUT,
            "_matrix/client/v3/rooms/%21r%3Ahs/state/m.room.member/%40u%3Ahs",
            {"membership": "ban", "reason": "raid", "redact_events": True, REDACT_EVENTS_UNSTABLE: True},
        )
    ]


async def test_a_homeserver_that_refuses_that_form_gets_the_ban_through_ban():
    matrix, sent = _adapter(405)
    await matrix.ban("!r:hs", "@u:hs", "raid")
    assert [(m, p.rsplit("/", 1)[-1]) for m, p, _ in sent] == [(Method.PUT, "%40u%3Ahs"), (Method.POST, "ban")]
    assert sent[-1][2] == {"user_id": "@u:hs", "reason": "raid"}
