"""Homeserver answers are read with orjson, and whatever it refuses that the standard library reads still reads."""

from __future__ import annotations

import json
import math

import pytest

from spacesync.matrix.http import loads


def test_an_ordinary_answer_reads_as_the_standard_library_reads_it() -> None:
    body = json.dumps([{"type": "m.room.member", "content": {"membership": "join", "displayname": "Ünï ✓"}}])
    assert loads(body.encode()) == json.loads(body)


def test_a_lone_surrogate_in_a_display_name_does_not_make_the_room_unreadable() -> None:
    body = b'[{"type": "m.room.member", "content": {"membership": "join", "displayname": "\\ud800x"}}]'
    assert loads(body)[0]["content"] == {"membership": "join", "displayname": "\ud800x"}


def test_nan_reads_and_broken_json_is_a_value_error() -> None:
    assert math.isnan(loads(b'{"n": NaN}')["n"])
    with pytest.raises(ValueError):
        loads(b'{"unterminated": ')
