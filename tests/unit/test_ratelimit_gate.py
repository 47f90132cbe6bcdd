"""The adapter's shared 429 pause: overlapping waits are counted once, and each rate-limit class pauses alone."""

from __future__ import annotations

import pytest
from mautrix.api import Method, Path

from spacesync.matrix import MatrixAdapter
from spacesync.matrix.adapter import _limit_class
from spacesync.metrics import RATELIMIT_WAIT


def test_overlapping_429s_count_their_wall_time_once():
    adapter = MatrixAdapter("http://127.0.0.1:1", "@bot:hs.test")
    before = RATELIMIT_WAIT._value.get()
    adapter._pause("write", 2.0)
    adapter._pause("write", 2.0)  # a second request told the same thing: no extra waiting
    adapter._pause("write", 1.0)
    assert adapter.ratelimit_wait_s == pytest.approx(2.0, abs=0.05)
    adapter._pause("write", 3.0)  # reaches further: only the extra second counts
    assert adapter.ratelimit_wait_s == pytest.approx(3.0, abs=0.05)
    assert RATELIMIT_WAIT._value.get() - before == pytest.approx(3.0, abs=0.05)
    assert "read" not in adapter._paused_until


def test_requests_are_classed_by_the_limit_they_hit():
    room = "!r:hs.test"
    assert _limit_class(Method.POST, Path.v3.rooms[room].kick) == "write"
    assert _limit_class(Method.PUT, Path.v3.rooms[room].send["m.room.message"]["t1"]) == "write"
    assert _limit_class(Method.GET, Path.v3.rooms[room].state) == "read"
    assert _limit_class(Method.POST, Path.v3.join[room]) == "join"
    assert _limit_class(Method.POST, Path.v3.rooms[room].join) == "join"
    assert _limit_class(Method.GET, Path.v3.joined_rooms) == "read"
    assert _limit_class(Method.GET, f"/_matrix/client/v1/rooms/{room}/hierarchy") == "hierarchy"
