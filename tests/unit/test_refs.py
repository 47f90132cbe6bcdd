"""Room and user references in every form people paste them."""

from __future__ import annotations

import pytest

from spacesync.refs import (
    RefError,
    RoomRef,
    is_server_name,
    parse_room_ref,
    parse_user_ref,
    refs_in_html,
    split_server_name,
)

V12_ID = "!" + "aBcD-_9" * 6 + "x"  # 43 characters of unpadded url-safe base64

ROOMS = [
    ("!opaque:example.org", RoomRef(room_id="!opaque:example.org")),
    ("  !opaque:example.org  ", RoomRef(room_id="!opaque:example.org")),
    (V12_ID, RoomRef(room_id=V12_ID)),
    ("!a", RoomRef(room_id="!a")),
    ("!opaque:example.org:8448", RoomRef(room_id="!opaque:example.org:8448")),
    ("!opaque:[::1]:8448", RoomRef(room_id="!opaque:[::1]:8448")),
    ("#room:example.org", RoomRef(alias="#room:example.org")),
    ("#room:127.0.0.1:8008", RoomRef(alias="#room:127.0.0.1:8008")),
    ("matrix:r/room:example.org", RoomRef(alias="#room:example.org")),
    ("matrix:r/room%3Aexample.org", RoomRef(alias="#room:example.org")),
    ("matrix:r/room:example.org?action=join", RoomRef(alias="#room:example.org")),
    (
        "matrix:roomid/opaque:example.org?via=a.org&via=b.org",
        RoomRef(room_id="!opaque:example.org", via=("a.org", "b.org")),
    ),
    ("matrix:roomid/opaque:example.org/e/event", RoomRef(room_id="!opaque:example.org")),
    (f"matrix:roomid/{V12_ID[1:]}?via=example.org", RoomRef(room_id=V12_ID, via=("example.org",))),
    (
        "https://matrix.to/#/!opaque:example.org?via=a.org&via=b.org",
        RoomRef(room_id="!opaque:example.org", via=("a.org", "b.org")),
    ),
    ("https://matrix.to/#/%21opaque%3Aexample.org", RoomRef(room_id="!opaque:example.org")),
    (
        "https://matrix.to/#/!opaque:example.org/$event?via=a.org",
        RoomRef(room_id="!opaque:example.org", via=("a.org",)),
    ),
    ("https://matrix.to/#/%23room:example.org", RoomRef(alias="#room:example.org")),
    ("https://matrix.to/#/#room:example.org", RoomRef(alias="#room:example.org")),
    ("<https://matrix.to/#/#room:example.org>", RoomRef(alias="#room:example.org")),
    ("#room:example.org.", RoomRef(alias="#room:example.org")),
    ("(#room:example.org),", RoomRef(alias="#room:example.org")),
    ("<#room:example.org>", RoomRef(alias="#room:example.org")),
    ('<a href="https://matrix.to/#/#room:example.org">Room</a>', RoomRef(alias="#room:example.org")),
]


@pytest.mark.parametrize(("text", "expected"), ROOMS)
def test_room_forms(text: str, expected: RoomRef) -> None:
    assert parse_room_ref(text) == expected


def test_room_ref_str() -> None:
    assert str(parse_room_ref("matrix:roomid/x:example.org?via=a.org")) == "!x:example.org"
    assert str(parse_room_ref("https://matrix.to/#/%23room:example.org")) == "#room:example.org"


@pytest.mark.parametrize(
    "text",
    [
        "foo",
        "",
        "!",
        "#room",
        "#:example.org",
        "#room:",
        "#room:exa mple.org",
        "!opaque:a_b",
        "! opaque:example.org",
        "!opaque:bad_host!",
        "#room:example.org:99999",
        "#room:[not-ipv6]",
        "@user:example.org",
        "$event:example.org",
        "matrix:u/user:example.org",
        "matrix:x/room:example.org",
        "matrix:r/",
        "matrix:roomid/x:example.org/e",
        "https://example.org/#/#room:example.org",
        "https://matrix.to/#/",
        "https://matrix.to/#/!opaque:example.org?via=bad host",
        "#" + "a" * 250 + ":example.org",
        '<a href="https://matrix.to/#/#a:b.org">A</a> <a href="https://matrix.to/#/#c:d.org">C</a>',
    ],
)
def test_room_rejections(text: str) -> None:
    with pytest.raises(RefError) as info:
        parse_room_ref(text)
    message = str(info.value)
    assert "\n" not in message
    assert "is not a room" in message
    assert "expected !id:server" in message


def test_room_rejection_message() -> None:
    with pytest.raises(
        RefError, match=r"^'foo' is not a room: expected !id:server, #alias:server, a matrix: URI or a matrix.to link$"
    ):
        parse_room_ref("foo")
    with pytest.raises(RefError, match="that is a user ID"):
        parse_room_ref("@user:example.org")
    assert issubclass(RefError, ValueError)


USERS = [
    ("@user:example.org", "@user:example.org"),
    ("@user:example.org:8448", "@user:example.org:8448"),
    ("@user:[2001:db8::1]:8448", "@user:[2001:db8::1]:8448"),
    ("@user:10.0.0.1", "@user:10.0.0.1"),
    ("@User.Name=_-/+:example.org", "@User.Name=_-/+:example.org"),
    ("matrix:u/user:example.org", "@user:example.org"),
    ("matrix:u/user%3Aexample.org?action=chat", "@user:example.org"),
    ("https://matrix.to/#/@user:example.org", "@user:example.org"),
    ("https://matrix.to/#/%40user%3Aexample.org", "@user:example.org"),
    ('<a href="https://matrix.to/#/@user:example.org">User</a>', "@user:example.org"),
    ("<a href='https://matrix.to/#/@user:example.org'>User</a>:", "@user:example.org"),
    ("@user:example.org,", "@user:example.org"),
]


@pytest.mark.parametrize(("text", "expected"), USERS)
def test_user_forms(text: str, expected: str) -> None:
    assert parse_user_ref(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "user",
        "@user",
        "@:example.org",
        "@user:",
        "@us er:example.org",
        "@user:exa mple.org",
        "@user:example.org:0",
        "@user:[::g]",
        "@user:a_b",
        "@" + "u" * 250 + ":example.org",
        "#room:example.org",
        "!room:example.org",
        "matrix:r/room:example.org",
        "https://matrix.to/#/#room:example.org",
        '<a href="https://example.org">x</a>',
        "<b>no link</b>",
    ],
)
def test_user_rejections(text: str) -> None:
    with pytest.raises(RefError) as info:
        parse_user_ref(text)
    assert "\n" not in str(info.value)
    assert "is not a user" in str(info.value)


def test_refs_in_html() -> None:
    html = (
        'Hello <a href="https://matrix.to/#/@alice:example.org">Alice</a> and '
        "<a href='https://matrix.to/#/%23room:example.org'>#room</a>, see <a href=\"https://x.org/?a=1&amp;b=2\">x</a>"
        "<a name=anchor>no href</a>"
    )
    assert refs_in_html(html) == [
        "https://matrix.to/#/@alice:example.org",
        "https://matrix.to/#/%23room:example.org",
        "https://x.org/?a=1&b=2",
    ]
    assert refs_in_html("plain text") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.org", ("example.org", None)),
        ("localhost:8008", ("localhost", 8008)),
        ("1.2.3.4", ("1.2.3.4", None)),
        ("[::1]:9090", ("::1", 9090)),
    ],
)
def test_split_server_name(text: str, expected: tuple[str, int | None]) -> None:
    assert split_server_name(text) == expected


@pytest.mark.parametrize("text", ["", "a b", "host:", "host:65536", "[::1", "::1", "a..b", "host:x"])
def test_bad_server_names(text: str) -> None:
    assert not is_server_name(text)
