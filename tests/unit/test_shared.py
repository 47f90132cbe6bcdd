"""The small shared policies: backoff, room labels, server names, legacy power levels."""

from __future__ import annotations

import pytest

from spacesync.backoff import backoff
from spacesync.core.powerlevels import int_level
from spacesync.model import PowerLevels, parse_level
from spacesync.refs import room_label, server_name


def test_backoff_doubles_from_half_a_second_up_to_the_cap():
    assert [backoff(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff(3, cap=3.0) == 3.0
    assert backoff(1000) == 30.0


def test_room_label_names_the_room_and_its_id():
    assert room_label("!a:x", "Lobby") == "Lobby (!a:x)"
    assert room_label("!a:x", None) == "!a:x"
    assert room_label("!a:x", "") == "!a:x"


@pytest.mark.parametrize(
    ("ident", "expected"),
    [("!a:example.org", "example.org"), ("@u:host:8448", "host:8448"), ("!v12roomid", None)],
)
def test_server_name_is_after_the_first_colon(ident, expected):
    assert server_name(ident) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(50, 50), ("50", 50), (" 75 ", 75), (100.0, 100), (True, None), ("x", None), (None, None), (1.5, None)],
)
def test_parse_level_reads_integers_and_legacy_strings(value, expected):
    assert parse_level(value) == expected


def test_both_readers_share_the_parser():
    levels = PowerLevels.from_content({"users": {"@a:x": "50", "@b:x": "junk"}, "kick": "75"})
    assert levels.users == {"@a:x": 50, "@b:x": 0} and levels.kick == 75
    assert int_level("50") == 50 and int_level("junk") == "junk" and int_level(50.0) == 50.0
