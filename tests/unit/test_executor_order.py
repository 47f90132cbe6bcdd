"""Which queued entries the executor starts first, and how long the queue is expected to take."""

from __future__ import annotations

import time

import pytest

from spacesync.commands.status import queue_text
from spacesync.engine.executor import Estimate, Executor, impact_order
from spacesync.matrix import MatrixAdapter
from spacesync.matrix.state import StateCache
from spacesync.model import Action, ActionKind, Cause, RoomID, UserID
from spacesync.store import Status, Store
from spacesync.store.journal import Entry

SPACE = RoomID("!space:hs")
BIG = RoomID("!zbig:hs")
MID = RoomID("!mid:hs")
SMALL = RoomID("!asmall:hs")
UNKNOWN = RoomID("!unknown:hs")


def _room(cache: StateCache, room_id: RoomID, joined: int, *, is_space: bool = False) -> None:
    create = {"room_version": "10", **({"type": "m.space"} if is_space else {})}
    events = [{"type": "m.room.create", "state_key": "", "sender": "@o:hs", "content": create}]
    events += [
        {"type": "m.room.member", "state_key": f"@m{i}:hs", "sender": f"@m{i}:hs", "content": {"membership": "join"}}
        for i in range(joined)
    ]
    cache.replace(room_id, events)


@pytest.fixture
def cache() -> StateCache:
    cache = StateCache()
    _room(cache, SPACE, 2, is_space=True)
    _room(cache, BIG, 30)
    _room(cache, MID, 10)
    _room(cache, SMALL, 3)
    return cache


def _entry(entry_id: int, kind: ActionKind, room: RoomID, user: str, cause: str = Cause.ON_LEAVE.value) -> Entry:
    action = Action(kind=kind, room_id=room, user_id=UserID(user), reason="r", cause=cause)
    return Entry(entry_id, "b", action, Status.PENDING, 0, None, 0)


def _order(entries: list[Entry], cache: StateCache) -> list[tuple[RoomID, str]]:
    return [(e.action.room_id, e.action.kind.value) for e in impact_order(entries, cache)]


def test_spaces_then_the_biggest_rooms_first(cache):
    kick = ActionKind.KICK
    entries = [
        _entry(1, kick, SMALL, "@u:hs"),
        _entry(2, kick, UNKNOWN, "@u:hs"),
        _entry(3, kick, MID, "@u:hs"),
        _entry(4, kick, BIG, "@u:hs"),
        _entry(5, kick, SPACE, "@u:hs"),
        _entry(6, kick, BIG, "@v:hs"),
    ]
    assert _order(entries, cache) == [
        (SPACE, "kick"),
        (BIG, "kick"),
        (BIG, "kick"),
        (MID, "kick"),
        (SMALL, "kick"),
        (UNKNOWN, "kick"),  # a room the cache does not hold comes last
    ]
    # Within a room, journal order; and the same entries in any order give the same order.
    assert [e.id for e in impact_order(entries, cache)][1:3] == [4, 6]
    assert impact_order(list(reversed(entries)), cache) == impact_order(entries, cache)


def test_bans_and_lockdowns_go_before_other_entries_but_never_overtake_their_target(cache):
    entries = [
        _entry(1, ActionKind.KICK, BIG, "@leaver:hs"),
        _entry(2, ActionKind.BAN, SMALL, "@spammer:hs", Cause.SPACE_BAN.value),
        _entry(3, ActionKind.UNBAN, MID, "@x:hs", Cause.UNDO.value),
        _entry(4, ActionKind.BAN, MID, "@x:hs", Cause.SPACE_BAN.value),  # queued after the unban: stays after it
        _entry(5, ActionKind.KICK, SMALL, "@leaver:hs"),
    ]
    lock = Action(
        kind=ActionKind.SET_JOIN_RULES, room_id=SMALL, state_key="", reason="lockdown", cause=Cause.LOCKDOWN.value
    )
    entries.append(Entry(6, "b", lock, Status.PENDING, 0, None, 0))
    assert [e.id for e in impact_order(entries, cache)] == [2, 6, 1, 3, 4, 5]


def test_the_estimate_follows_the_completion_rate_and_the_rate_limit_pause(tmp_path):
    matrix = MatrixAdapter("http://127.0.0.1:1", "@bot:hs")
    executor = Executor(Store(f"sqlite:{tmp_path}/bot.db"), matrix, StateCache())
    assert executor.estimate(0) is None
    unknown = executor.estimate(5)
    assert unknown is not None and unknown.seconds is None and unknown.rate is None

    executor._busy_since = time.monotonic() - 10  # 20 entries done over the last 10 s: 2/s
    for _ in range(20):
        executor._completed_one()
    estimate = executor.estimate(30)
    assert estimate is not None and estimate.rate == pytest.approx(2.0, rel=0.05)
    assert estimate.seconds == pytest.approx(15.0, rel=0.05)

    matrix._pause("write", 5.0)  # a 429: the wait comes first, then the rate the homeserver grants, not the burst
    paused = executor.estimate(30)
    assert paused is not None and paused.paused_s == pytest.approx(5.0, abs=0.5)
    assert paused.rate == pytest.approx(0.2, rel=0.05)
    assert paused.seconds == pytest.approx(5.0 + 30 / 0.2, rel=0.05)

    episode = matrix.gate.episode
    assert episode is not None
    executor._completed.extend([episode.started + 1, episode.started + 5, episode.started + 9])
    paced = executor.estimate(30)  # three done during the episode, 4 s apart: their pace
    assert paced is not None and paced.rate == pytest.approx(0.25, rel=0.01)


def test_the_queue_line():
    assert queue_text(None) is None
    assert queue_text(Estimate(40, 0.2, 200.0)) == "Queue: 40 actions, expected to finish in ~3 min 20 s (at 0.2/s)"
    assert queue_text(Estimate(30, 0.2, 150.0)) == "Queue: 30 actions, expected to finish in ~2 min 30 s (at 0.2/s)"
    assert queue_text(Estimate(1, 48.25, 0.02)) == "Queue: 1 action, expected to finish in ~1 s (at 48.2/s)"
    assert (
        queue_text(Estimate(9000, 1.25, 7200.0)) == "Queue: 9000 actions, expected to finish in ~2 h 0 min (at 1.2/s)"
    )
    assert queue_text(Estimate(3, None, None, 20.0)) == (
        "Queue: 3 actions, finish time not known yet (none completed in the last minute); rate-limited for another 20 s"
    )


def test_one_entry_in_flight_while_the_homeserver_rate_limits_writes(tmp_path):
    matrix = MatrixAdapter("http://127.0.0.1:1", "@bot:hs")
    executor = Executor(Store(f"sqlite:{tmp_path}/bot.db"), matrix, StateCache(), concurrency=32)
    assert executor.in_flight_limit() == 32
    matrix._pause("read", 5.0)  # reads do not hold actions back
    assert executor.in_flight_limit() == 32
    matrix._pause("write", 0.01)
    time.sleep(0.02)  # the pause is over, but a 429 was seen just now: still one at a time
    assert executor.in_flight_limit() == 1
    matrix.gate._last_refused -= 31  # no write waiting and no 429 for 31 s: the episode is over
    assert executor.in_flight_limit() == 32
    assert matrix.gate.episode is None and matrix.gate.last_episode is not None
