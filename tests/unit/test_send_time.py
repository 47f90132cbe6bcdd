"""Acting on the present: over random interleavings of membership changes, plans and executor progress, every
request the executor sends is one the plan made from the world at that moment contains.

The executor, its journal (SQLite) and the state cache are the real ones; the homeserver is a stand-in that plans
from the state cache (the present, as /sync shows it) whenever a request reaches it, and checks the request."""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spacesync.core.planner import plan as make_plan
from spacesync.engine.executor import Executor
from spacesync.engine.recheck import MEMBERSHIP_KINDS, only_users
from spacesync.matrix import StateCache
from spacesync.matrix.ratelimit import WriteGate
from spacesync.model import Action, Membership, Plan, Policy, RoomID, Snapshot, SpacePolicy, UserID
from spacesync.store import Status, Store

BOT, OWNER = UserID("@bot:hs"), UserID("@owner:hs")
SPACE = RoomID("!space:hs")
ROOMS = (RoomID("!a:hs"), RoomID("!b:hs"), RoomID("!c:hs"))
USERS = tuple(UserID(f"@u{i}:hs") for i in range(3))
POLICY = Policy(bot=BOT, spaces=(SpacePolicy(SPACE),))

STEPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["leave", "join", "ban", "unban"]), st.sampled_from(USERS), st.just(SPACE)),
        st.tuples(st.just("enter"), st.sampled_from(USERS), st.sampled_from(ROOMS)),
        st.tuples(st.just("plan"), st.just(BOT), st.just(SPACE)),
        st.tuples(st.just("run"), st.just(BOT), st.sampled_from(ROOMS)),
    ),
    min_size=1,
    max_size=30,
)


class World:
    """The homeserver's rooms as the state cache shows them, with unique event ids."""

    def __init__(self) -> None:
        self.cache = StateCache()
        self.ids = itertools.count()
        self.cache.replace(SPACE, self._base(SPACE, space=True))
        for room in ROOMS:
            self.cache.replace(room, self._base(room))

    def _event(self, event_type: str, key: str, content: dict[str, Any], sender: str = OWNER, **extra: Any) -> dict:
        event = {"type": event_type, "state_key": key, "content": content, "sender": sender}
        return {**event, "event_id": f"$e{next(self.ids)}", **extra}

    def _base(self, room: RoomID, *, space: bool = False) -> list[dict]:
        create = {"room_version": "10", **({"type": "m.space"} if space else {})}
        events = [
            self._event("m.room.create", "", create),
            self._event("m.room.power_levels", "", {"users": {BOT: 100, OWNER: 100}}),
        ]
        if space:
            events += [self._event("m.space.child", r, {"via": ["hs"]}) for r in ROOMS]
        else:
            allow = [{"type": "m.room_membership", "room_id": SPACE}]
            events.append(self._event("m.room.join_rules", "", {"join_rule": "restricted", "allow": allow}))
        for user in (BOT, OWNER, *USERS):
            events.append(self._event("m.room.member", user, {"membership": "join"}, sender=user))
        return events

    def membership(self, room: RoomID, user: UserID) -> Membership:
        state = self.cache.get(room)
        assert state is not None
        return state.membership(user)

    def change(self, room: RoomID, user: UserID, membership: str, sender: UserID) -> None:
        before = self.membership(room, user).value
        unsigned = {"prev_content": {"membership": before}}
        self.cache.update(
            room, [self._event("m.room.member", user, {"membership": membership}, sender, unsigned=unsigned)]
        )

    def plan(self, users: set[UserID] | None = None) -> Plan:
        rooms = {r: state for r in (SPACE, *ROOMS) if (state := self.cache.get(r)) is not None}
        return make_plan(Snapshot(rooms=only_users(rooms, users) if users else rooms, placed_bans=self.placed), POLICY)

    placed: frozenset = frozenset()


class Homeserver:
    """Answers the executor's requests; each one is checked against the plan made at that moment."""

    user_id = BOT
    ratelimit_wait_s = 0.0

    def __init__(self, world: World) -> None:
        self.world = world
        self.gate = WriteGate()
        self.sent: list[str] = []
        self.unwanted: list[str] = []
        """Requests sent that the plan at that moment did not contain (an exception here would only be taken
        for a failed request by the executor: they are collected and asserted on at the end)."""

    def paused_until(self, kind: str) -> float:
        return 0.0

    def _check(self, action: Action) -> None:
        wanted = {a.key for a in self.world.plan().actions}
        if action.key not in wanted:
            self.unwanted.append(f"{action.key} sent, but the plan then was {sorted(wanted)}")
        self.sent.append(action.key)

    async def kick(self, room: RoomID, user: UserID, reason: str = "") -> None:
        self._check(Action(MEMBERSHIP[0], room, user))

    async def ban(self, room: RoomID, user: UserID, reason: str = "", *, redact_events: bool = False) -> None:
        self._check(Action(MEMBERSHIP[1], room, user))

    async def unban(self, room: RoomID, user: UserID, reason: str = "") -> None:
        self._check(Action(MEMBERSHIP[2], room, user))

    async def request(self, method: Any, path: Any, query: Any = None, timeout: float = 0) -> dict:
        """GET m.room.member (format=event), as the unban's compare-and-set reads it."""
        _, room, _, _, user = str(path).rsplit("/", 4)
        state = self.world.cache.get(RoomID(room))
        member = state.members.get(UserID(user)) if state is not None else None
        membership = member.membership.value if member else "leave"
        return {"content": {"membership": membership}, "sender": member.sender if member else None}


MEMBERSHIP = sorted(MEMBERSHIP_KINDS, key=lambda k: ["kick", "ban", "unban", "invite"].index(k.value))


async def _scenario(steps: list[tuple[str, UserID, RoomID]], db: str) -> Homeserver:
    world = World()
    homeserver = Homeserver(world)
    store = Store(db)
    await store.start()
    try:

        async def recheck(actions: list[Action]) -> set[str]:
            world.placed = await store.placed_bans()
            users = {UserID(a.user_id) for a in actions if a.user_id} | {BOT}
            wanted = {a.key for a in world.plan(users).actions}
            return {a.key for a in actions if a.key in wanted}

        executor = Executor(store, homeserver, world.cache, concurrency=1, recheck=recheck)  # type: ignore[arg-type]
        executor.ready.set()
        for step, user, room in steps:
            world.placed = await store.placed_bans()
            now = world.membership(room, user)
            if step == "leave" and now is Membership.JOIN:
                world.change(room, user, "leave", user)
            elif step == "join" and now is Membership.LEAVE:
                world.change(room, user, "join", user)
            elif step == "ban" and now is not Membership.BAN:
                world.change(room, user, "ban", OWNER)
            elif step == "unban" and now is Membership.BAN:
                world.change(room, user, "leave", OWNER)
            elif step == "enter" and now is Membership.LEAVE:
                world.change(room, user, "join", user)
            elif step == "plan":
                open_keys = await store.journal.open_keys()
                new = [a for a in world.plan().actions if a.kind in MEMBERSHIP_KINDS and a.key not in open_keys]
                if new:
                    await store.journal.add_new_batch("sync", None, new, Status.PENDING)
                    executor.wake()
            elif step == "run":  # the executor starts (at most) one entry and it runs to its end
                await executor.dispatch()
                await asyncio.gather(*executor._inflight.values())
    finally:
        await store.stop()
    return homeserver


@settings(
    max_examples=int(os.environ.get("SPACESYNC_PROPERTY_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(STEPS)
def test_every_request_sent_is_in_the_plan_at_sending_time(steps: list[tuple[str, UserID, RoomID]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        homeserver = asyncio.run(_scenario(steps, f"sqlite:{tmp}/journal.db"))
    assert not homeserver.unwanted


def test_a_queued_kick_of_a_user_back_in_the_space_is_never_sent() -> None:
    """The case the property is about, spelled out: leave, plan, rejoin, then the executor runs."""
    steps = [("leave", USERS[0], SPACE), ("plan", BOT, SPACE), ("join", USERS[0], SPACE)]
    steps += [("run", BOT, ROOMS[0])] * 4
    with tempfile.TemporaryDirectory() as tmp:
        homeserver = asyncio.run(_scenario(steps, f"sqlite:{tmp}/journal.db"))
    assert homeserver.sent == [] and not homeserver.unwanted
