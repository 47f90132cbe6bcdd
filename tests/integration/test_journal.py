"""The journal's failure bookkeeping on both backends: backoff, parking, notices once, the guard's window."""

from __future__ import annotations

from spacesync.model import Action, ActionKind, RoomID, UserID
from spacesync.store import Status, Store
from spacesync.store.journal import ROWS_PER_INSERT, BatchStatus, now_ms

SPACE = RoomID("!space:example.org")
ROOM = RoomID("!room:example.org")


def kick(user: str, room: RoomID = ROOM) -> Action:
    return Action(ActionKind.KICK, room, UserID(f"@{user}:example.org"), reason="left", space_id=SPACE)


async def test_backoff_parking_and_retry(db_url):
    store = Store(db_url)
    await store.start()
    journal = store.journal
    try:
        await journal.add_batch("b1", "sync", None, [kick("a"), kick("b")], Status.PENDING)
        a, b = await journal.runnable()
        await journal.back_off(a.id, "403 M_FORBIDDEN: no", now_ms() + 60_000, refused=True)
        assert [e.id for e in await journal.runnable()] == [b.id], "a backing-off entry is skipped"
        assert abs((await journal.next_due() or 0) - (now_ms() + 60_000)) < 5_000
        assert [e.id for e in await journal.runnable(now=now_ms() + 61_000)] == [a.id, b.id]

        await journal.park(a.id, "403 M_FORBIDDEN: no", "fp1")
        (parked,) = await journal.parked("b1")
        assert (parked.status, parked.failures, parked.fingerprint) == (Status.PARKED, 2, "fp1")
        assert await journal.parked_fingerprints() == {kick("a").key: "fp1"}
        assert kick("a").key not in await journal.open_keys()
        assert (await journal.depth()).get("parked") == 1

        assert await journal.first_notice(f"{kick('a').key}|403 M_FORBIDDEN")
        assert not await journal.first_notice(f"{kick('a').key}|403 M_FORBIDDEN"), "one notice per action and reason"
        assert await journal.first_notice(f"{kick('a').key}|400 M_UNKNOWN")

        (retried,) = await journal.unpark("b1")
        assert retried.id == a.id and not await journal.parked()
        (again,) = [e for e in await journal.runnable() if e.id == a.id]
        assert again.failures == 0 and again.not_before > 0, "a retried entry is re-checked before it runs"
        await journal.forget_notices([f"{kick('a').key}|"])
        assert await journal.first_notice(f"{kick('a').key}|403 M_FORBIDDEN")

        await journal.park(a.id, "403", "fp2")
        await journal.close_parked([kick("a").key])
        assert not await journal.parked() and (await journal.batch_entries("b1"))[0].status is Status.FAILED
    finally:
        await store.stop()


async def test_the_guard_window_and_the_open_held_batch(db_url):
    store = Store(db_url)
    await store.start()
    journal = store.journal
    try:
        start = now_ms()
        await journal.add_batch(
            "q1", "sync", None, [kick("a"), kick("b", RoomID("!other:example.org"))], Status.PENDING
        )
        await journal.add_batch("h1", "sync", SPACE, [kick("c")], Status.HELD)
        assert await journal.evicted_users_since(SPACE, start - 1000) == {"@a:example.org", "@b:example.org"}
        assert await journal.evicted_users_since(SPACE, now_ms() + 1000) == set(), "outside the window"
        assert await journal.evicted_users_since(RoomID("!else:example.org"), start - 1000) == set()

        assert await journal.open_held_batch(SPACE) == "h1"
        assert await journal.open_held_batch(None) is None
        assert await journal.add_to_batch("h1", [kick("d")], Status.HELD) == 1
        assert {e.action.user_id for e in await journal.batch_entries("h1")} == {"@c:example.org", "@d:example.org"}

        # Confirmed by a moderator from a held batch: not counted again.
        await journal.set_batch_status("h1", BatchStatus.RELEASED, Status.HELD, Status.PENDING)
        assert await journal.open_held_batch(SPACE) is None
        assert await journal.evicted_users_since(SPACE, start - 1000) == {"@a:example.org", "@b:example.org"}
    finally:
        await store.stop()


async def test_a_batch_larger_than_one_insert_is_journaled_whole(db_url):
    store = Store(db_url)
    await store.start()
    try:
        count = ROWS_PER_INSERT * 2 + 7
        batch = await store.journal.add_new_batch("sync", SPACE, [kick(f"u{i}") for i in range(count)], Status.HELD)
        entries = await store.journal.batch_entries(batch)
        assert len(entries) == count
        assert {e.action.user_id for e in entries} == {UserID(f"@u{i}:example.org") for i in range(count)}
    finally:
        await store.stop()
