"""Server ACL mirroring: merged deny entries, ownership, and the entries never written."""

from __future__ import annotations

import attrs

from spacesync.core.planner import plan
from spacesync.core.serveracl import denies, host
from spacesync.model import ActionKind, Policy, SpacePolicy

from .helpers import BOT, JOIN, actions_of, codes, rid, room, snapshot, space

SYNC = SpacePolicy(rid("root"), server_acl=True)


def acl_snapshot(space_deny, room_acl=None, owned=(), members=None, creator=None):
    root = attrs.evolve(space("root", children=["a"]), server_acl={"allow": ["*"], "deny": list(space_deny)})
    child = room("a", join_rule="restricted", allow=["root"], members=members or {}, creator=creator)
    child = attrs.evolve(child, server_acl=room_acl)
    snap = snapshot(root, child)
    return attrs.evolve(snap, owned_acl={rid("a"): frozenset(owned)} if owned else {})


def acl_action(p):
    found = actions_of(p, ActionKind.SET_SERVER_ACL)
    return found[0] if found else None


def test_space_entries_merge_into_the_room_and_its_own_entries_stay():
    snap = acl_snapshot(["evil.example"], {"allow": ["*"], "deny": ["mine.example"]})
    action = acl_action(plan(snap, Policy(bot=BOT, spaces=(SYNC,))))
    assert action.content["deny"] == ["mine.example", "evil.example"]
    assert action.changes["owned"] == ([], ["evil.example"])
    assert plan(snap, Policy(bot=BOT, spaces=(SpacePolicy(rid("root")),))).actions == (), "server_acl off acts"


def test_only_spacesyncs_own_entries_are_removed_when_the_space_drops_them():
    room_acl = {"allow": ["*"], "deny": ["mine.example", "evil.example", "gone.example"]}
    snap = acl_snapshot([], room_acl, owned=["gone.example"])
    action = acl_action(plan(snap, Policy(bot=BOT, spaces=(SYNC,))))
    assert action.content["deny"] == ["mine.example", "evil.example"]
    assert action.changes["deny"] == ([], ["gone.example"])


def test_never_denies_the_bots_server_the_creators_server_or_everyone():
    snap = acl_snapshot(
        ["hs.test", "*.test", "*", "creator.example", "evil.example"],
        {"allow": ["*"], "deny": []},
        creator="@founder:creator.example",
    )
    p = plan(snap, Policy(bot=BOT, spaces=(SYNC,)))
    assert acl_action(p).content["deny"] == ["evil.example"]
    refused = [f.message for f in p.findings if f.code == "acl_refused"]
    assert len(refused) == 4 and any("denies hs.test" in m for m in refused)
    assert any("every server" in m for m in refused) and any("creator.example" in m for m in refused)


def test_an_acl_that_would_shut_out_every_member_is_refused():
    # The room's own allow list already leaves out the bot's server: one more deny would leave nobody in.
    snap = acl_snapshot(["far.example"], {"allow": ["far.example"], "deny": []}, members={"@x:far.example": JOIN})
    p = plan(snap, Policy(bot=BOT, spaces=(SYNC,)))
    assert acl_action(p) is None
    assert (rid("a"), "acl_refused") in codes(p)


def test_acl_matching_follows_the_spec():
    content = {"allow": ["*"], "deny": ["*.evil.example", "b?d.example"], "allow_ip_literals": False}
    assert denies(content, "x.evil.example:8448") and denies(content, "bad.example")
    assert denies(content, "1.2.3.4") and denies(content, "[::1]:8448")
    assert not denies(content, "good.example") and not denies(content, "evil.example")
    assert host("example.org:8448") == "example.org" and host("[::1]:80") == "[::1]"


def test_acl_matching_is_case_insensitive():
    """MSC4436: patterns match server names without regard to case, in every check spacesync makes."""
    assert denies({"allow": ["*"], "deny": ["EVIL.example"]}, "evil.EXAMPLE")
    assert not denies({"allow": ["Good.Example"]}, "good.example")
    # A Space deny in other case than the bot's or a creator's server is refused like the exact one.
    snap = acl_snapshot(
        ["HS.TEST", "Creator.Example", "evil.example"], {"allow": ["*"], "deny": []}, creator="@c:creator.example"
    )
    p = plan(snap, Policy(bot=BOT, spaces=(SYNC,)))
    assert acl_action(p).content["deny"] == ["evil.example"]
    assert len([f for f in p.findings if f.code == "acl_refused"]) == 2
    # An entry the room already holds in other case is not added twice; owned entries the Space still lists
    # in other case are kept.
    snap = acl_snapshot(
        ["EVIL.example", "gone.example"],
        {"allow": ["*"], "deny": ["evil.example", "Gone.Example"]},
        owned=["Gone.Example"],
    )
    assert acl_action(plan(snap, Policy(bot=BOT, spaces=(SYNC,)))) is None
