from __future__ import annotations

from spacesync.core.routing import MAX_VIA, declared_via, hierarchy_via, member_servers, via_servers
from spacesync.model import Membership, MemberState, RoomID, RoomState, UserID

V12 = RoomID("!abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG")


def room(**members: Membership) -> RoomState:
    return RoomState(RoomID("!r:a.example"), members={UserID(u): MemberState(m) for u, m in members.items()})


def test_v12_room_id_gives_no_server_but_the_sources_do() -> None:
    space = RoomState(RoomID("!s:b.example"), children={V12: ("b.example", "c.example")})
    assert via_servers(V12) == []
    assert via_servers(V12, declared_via(V12, [space, None])) == ["b.example", "c.example"]


def test_room_id_server_comes_after_the_sources_and_before_the_fallback() -> None:
    assert via_servers(RoomID("!x:old.example"), ["b.example"], fallback=["bot.example"]) == [
        "b.example",
        "old.example",
        "bot.example",
    ]


def test_member_servers_count_joined_members_only() -> None:
    state = room(
        **{
            "@a:one.example": Membership.JOIN,
            "@b:two.example": Membership.JOIN,
            "@c:two.example": Membership.JOIN,
            "@d:three.example": Membership.LEAVE,
        }
    )
    assert member_servers(state) == ["two.example", "one.example"]
    assert member_servers(None) == []


def test_hierarchy_via_reads_children_state_and_skips_junk() -> None:
    entries = [
        {"room_id": "!s", "children_state": [{"state_key": V12, "content": {"via": ["b.example", 3, ""]}}, "junk"]},
        {"room_id": "!t", "children_state": [{"state_key": "!other", "content": {"via": ["x.example"]}}]},
    ]
    assert hierarchy_via(V12, entries) == ["b.example"]


def test_via_is_capped() -> None:
    assert len(via_servers(V12, [f"s{i}.example" for i in range(20)])) == MAX_VIA
