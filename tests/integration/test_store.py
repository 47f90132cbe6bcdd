"""The store on both backends: migrations, journal, audit, records, settings and leadership."""

from __future__ import annotations

from spacesync.model import Action, ActionKind, OwnedLevel, PlacedBan, RoomID, UserID
from spacesync.store import Status, Store
from spacesync.store.journal import now_ms
from spacesync.store.migrations import upgrade_table

ROOM = RoomID("!room:example.org")
USER = UserID("@alice:example.org")
MOD = UserID("@mod:example.org")


async def open_store(url: str) -> Store:
    store = Store(url)
    await store.start()
    return store


async def test_migrations_are_idempotent_and_kv_persists(db_url):
    store = await open_store(db_url)
    await store.put("next_batch", "s1")
    await store.put("next_batch", "s2")
    await store.stop()
    again = await open_store(db_url)
    try:
        assert await again.get("next_batch") == "s2"
        assert await again.get("missing") is None
        assert await again.db.fetchval("SELECT version FROM spacesync_version") == len(upgrade_table.upgrades)
    finally:
        await again.stop()


async def test_journal_lifecycle(db_url):
    store = await open_store(db_url)
    try:
        kick = Action(ActionKind.KICK, ROOM, USER, reason="left Space", cause="on_leave")
        levels = Action(ActionKind.SET_POWER_LEVELS, ROOM, reason="mirror", content={"users": {USER: 50}},
                        changes={USER: (None, 50)}, ownership={USER: OwnedLevel(ROOM, USER, 50, None)})
        assert await store.journal.add_batch("b1", "test", None, [kick, levels], Status.PENDING) == 2
        assert await store.journal.add_batch("b2", "test", ROOM, [Action(ActionKind.BAN, ROOM, MOD)],
                                             Status.HELD) == 1
        entries = await store.journal.runnable()
        assert [e.action for e in entries] == [kick, levels]
        assert await store.journal.open_keys() == {kick.key, levels.key, f"ban|{ROOM}|{MOD}"}
        await store.journal.set_status(entries[0].id, Status.RUNNING, attempt=True)
        await store.journal.set_status(entries[0].id, Status.DONE)
        assert [e.action for e in await store.journal.runnable()] == [levels]
        assert kick.key not in await store.journal.open_keys()
        assert await store.journal.done_keys_since(now_ms() - 60_000) == {kick.key}
        assert await store.journal.done_keys_since(now_ms() + 60_000) == set()
        assert await store.journal.depth() == {"pending": 1, "held": 1}
        assert await store.journal.set_batch_status("b2", "released", Status.HELD, Status.PENDING) == 1
        batch = await store.journal.batch("b2")
        assert batch is not None and batch.status == "released" and batch.counts == {"pending": 1}
        assert await store.journal.set_batch_status("b2", "cancelled", Status.HELD, Status.CANCELLED) == 0
        assert (await store.journal.batch_entries("b1"))[0].attempts == 1
        assert await store.journal.cancel_evictions_of(MOD) == 1
        assert [e.status for e in await store.journal.batch_entries("b2")] == [Status.CANCELLED]
        assert await store.journal.cancel_evictions_of(MOD) == 0
    finally:
        await store.stop()


async def test_records_settings_and_audit(db_url):
    store = await open_store(db_url)
    try:
        await store.add_placed_ban(PlacedBan(ROOM, USER, "space_ban"))
        assert await store.placed_bans() == {PlacedBan(ROOM, USER, "space_ban")}
        await store.forget_ban(ROOM, USER)
        assert await store.placed_bans() == frozenset()

        await store.set_owned_level(ROOM, USER, OwnedLevel(ROOM, USER, 50, 10))
        new_room = RoomID("!new:example.org")
        await store.move_room_records(ROOM, new_room)
        assert await store.owned_levels() == {(new_room, USER): OwnedLevel(new_room, USER, 50, 10)}
        await store.set_owned_level(new_room, USER, OwnedLevel(new_room, USER, 50, None, released=True))
        assert (await store.owned_levels())[(new_room, USER)].released is True
        await store.set_owned_level(new_room, USER, None)
        assert await store.owned_levels() == {}

        assert await store.add_exempt(USER, MOD) is True
        assert await store.add_exempt(USER, MOD) is False
        assert await store.exempt_users() == {USER}
        assert await store.remove_exempt(USER) is True
        assert await store.remove_exempt(USER) is False

        assert await store.add_space(ROOM, MOD) is True
        assert await store.managed_spaces() == [ROOM]
        await store.add_extra_room(ROOM, new_room, MOD)
        assert await store.extra_rooms() == {ROOM: {new_room}}
        assert await store.remove_extra_room(new_room) is True

        assert await store.mark_handled("$event") is True
        assert await store.mark_handled("$event") is False

        await store.audit(Action(ActionKind.KICK, ROOM, USER, reason="left"), "done", batch="b1")
        await store.audit(Action(ActionKind.KICK, new_room, MOD, reason="left"), "failed")
        log = await store.audit_log(10, target=USER)
        assert [(r.room_id, r.outcome, r.reason) for r in log] == [(ROOM, "done", "left")]
        assert [r.target for r in await store.audit_log(10)] == [MOD, USER]
    finally:
        await store.stop()


async def test_only_one_leader(db_url):
    first, second = await open_store(db_url), await open_store(db_url)
    try:
        assert await first.try_leadership() is True
        assert await second.try_leadership() is False
        await first.release_leadership()
        assert await second.try_leadership() is True
    finally:
        await first.stop()
        await second.stop()


async def test_a_batch_keeps_who_it_left_in_place(db_url):
    from spacesync.model import LeftBehind

    store = await open_store(db_url)
    try:
        kick = Action(ActionKind.KICK, RoomID("!a:hs"), UserID("@u:hs"), reason="left")
        await store.journal.add_batch("b00001", "sync", None, [kick], Status.PENDING)
        left = [LeftBehind(RoomID("!b:hs"), UserID("@u:hs"), ActionKind.KICK, "the bot lacks the power to kick there")]
        await store.journal.set_left_behind("b00001", left)
        assert await store.journal.left_behind("b00001") == left
        assert await store.journal.left_behind("b00002") == []
    finally:
        await store.stop()
