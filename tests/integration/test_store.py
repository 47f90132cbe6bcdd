"""The store on both backends: migrations, journal, audit, records, settings and leadership."""

from __future__ import annotations

import pytest

from spacesync.model import Action, ActionKind, OwnedLevel, PlacedBan, RoomID, UserID
from spacesync.store import Status, Store
from spacesync.store.journal import BATCH_ID_CHARS, BatchIdExhausted, BatchStatus, now_ms
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
        levels = Action(
            ActionKind.SET_POWER_LEVELS,
            ROOM,
            reason="mirror",
            content={"users": {USER: 50}},
            changes={USER: (None, 50)},
            ownership={USER: OwnedLevel(ROOM, USER, 50, None)},
        )
        assert await store.journal.add_batch("b1", "test", None, [kick, levels], Status.PENDING) == 2
        assert await store.journal.add_batch("b2", "test", ROOM, [Action(ActionKind.BAN, ROOM, MOD)], Status.HELD) == 1
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
        assert await store.journal.set_batch_status("b2", BatchStatus.RELEASED, Status.HELD, Status.PENDING) == 1
        batch = await store.journal.batch("b2")
        assert batch is not None and batch.status == "released" and batch.counts == {"pending": 1}
        assert await store.journal.set_batch_status("b2", BatchStatus.CANCELLED, Status.HELD, Status.CANCELLED) == 0
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


async def test_batch_id_taken_is_drawn_again(db_url):
    """Batch ids are unique for sure: an id already in use, however unlikely, is replaced in the same
    transaction that claims it, and the batch lands whole under the new id."""
    store = await open_store(db_url)
    try:
        kick = Action(ActionKind.KICK, ROOM, USER, reason="left Space")
        ban = Action(ActionKind.BAN, ROOM, MOD, reason="banned in Space")
        first = await store.journal.add_new_batch("test", None, [kick], Status.PENDING)
        assert len(first) == BATCH_ID_CHARS and int(first, 16) >= 0
        draws = iter([first, first, "0123abcd"])
        store.journal.new_id = lambda: next(draws)
        second = await store.journal.add_new_batch("test", ROOM, [ban], Status.HELD)
        assert second == "0123abcd"
        assert [e.action for e in await store.journal.batch_entries(first)] == [kick]
        assert [e.action for e in await store.journal.batch_entries(second)] == [ban]
        info = await store.journal.batch(second)
        assert info is not None and info.status == "held" and info.space_id == ROOM
        assert (await store.journal.batch(first)).status == "open"  # type: ignore[union-attr]

        store.journal.new_id = lambda: first
        with pytest.raises(BatchIdExhausted):
            await store.journal.add_new_batch("test", None, [kick], Status.PENDING)
        assert len(await store.journal.runnable()) == 1  # nothing half-written by the failed draws
    finally:
        await store.stop()


async def test_batch_named_by_unique_prefix(db_url):
    store = await open_store(db_url)
    try:
        kick = Action(ActionKind.KICK, ROOM, USER)
        for batch_id in ("3fa9c1d0", "3fa9e777", "77aa0000"):
            await store.journal.add_batch(batch_id, "test", None, [kick], Status.PENDING)
        assert await store.journal.batch_ids_like("77aa0000") == ["77aa0000"]
        assert await store.journal.batch_ids_like("77aa") == ["77aa0000"]
        assert sorted(await store.journal.batch_ids_like("3fa9")) == ["3fa9c1d0", "3fa9e777"]
        assert await store.journal.batch_ids_like("3fa9c") == ["3fa9c1d0"]
        assert await store.journal.batch_ids_like("77a") == []  # too short to name a batch
        assert await store.journal.batch_ids_like("ffff") == []
    finally:
        await store.stop()


async def test_command_queue_survives_a_restart(db_url):
    store = await open_store(db_url)
    events = [
        {
            "type": "m.room.message",
            "event_id": f"$cmd{i}",
            "sender": str(MOD),
            "content": {"msgtype": "m.text", "body": f"!ss status {i}"},
        }
        for i in range(3)
    ]
    try:
        for event in events:
            assert await store.queue_command(ROOM, event) is True
        assert await store.queue_command(ROOM, events[0]) is False  # a replayed /sync
        await store.command_done("$cmd1")
    finally:
        await store.stop()
    again = await open_store(db_url)
    try:
        pending = await again.pending_commands()
        assert [(c.event_id, c.room_id, c.sender) for c in pending] == [("$cmd0", ROOM, MOD), ("$cmd2", ROOM, MOD)]
        assert pending[1].event == events[2]
        assert await again.command_waiting("$cmd0") is True
        assert await again.command_waiting("$cmd1") is False
        assert await again.command_waiting("$unknown") is False
    finally:
        await again.stop()
