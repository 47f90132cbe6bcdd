"""The admin-room command layer against the real Synapse: authorization, replies, batches, restarts, fuzz."""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spacesync.commands import REFUSAL, REGISTRY, CommandHandler
from spacesync.model import Action, ActionKind
from spacesync.store import Status, Store
from spacesync.testing import TestUser, wait_for

# region helpers


def _reply_target(event: dict[str, Any]) -> str | None:
    content = event.get("content") or {}
    return ((content.get("m.relates_to") or {}).get("m.in_reply_to") or {}).get("event_id")


async def bot_notices(world, bot, limit: int = 100) -> list[dict[str, Any]]:
    events = await world.owner.client.messages(bot.app.admin_room, limit=limit)
    return [
        e
        for e in events
        if e.get("sender") == world.bot.user_id and (e.get("content") or {}).get("msgtype") == "m.notice"
    ]


async def replies_to(world, bot, event_id: str) -> list[dict[str, Any]]:
    return [e for e in await bot_notices(world, bot) if _reply_target(e) == event_id]


async def reply_for(world, bot, event_id: str, timeout: float = 30) -> dict[str, Any]:
    """The content of the bot's notice answering `event_id`."""

    async def found() -> dict[str, Any] | None:
        replies = await replies_to(world, bot, event_id)
        return replies[0]["content"] if replies else None

    return await wait_for(found, timeout=timeout, interval=0.15, message=f"no reply to {event_id}")


async def ready(bot) -> None:
    """Commands are read from /sync after the first one: wait for it."""
    await wait_for(lambda: bot.app.synced and bot.app.command_handler is not None, timeout=20)


async def one_at_a_time_behind(world, make_user, start_bot, fault_proxy):
    """A Space with three rooms and a leaver in all of them; the bot runs one action at a time, through the
    fault proxy. Returns the Space, the leaver and the bot."""
    space = await world.space("S")
    rooms = [await world.room(space, f"R{i}") for i in range(3)]
    user = await make_user("leaver")
    for room in (space, *rooms):
        await user.client.join(room)
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url, executor={"concurrency": 1})
    await ready(bot)
    return space, user, bot


async def ask(world, bot, user: TestUser, text: str, html: str | None = None) -> str:
    event_id = await user.client.send_text(bot.app.admin_room, text, html=html)
    content = await reply_for(world, bot, event_id)
    assert content["msgtype"] == "m.notice"
    assert content.get("format") == "org.matrix.custom.html" and content.get("formatted_body")
    return content["body"]


async def join_admin_room(world, bot, user: TestUser) -> None:
    await world.owner.client.invite(bot.app.admin_room, user.user_id)
    await user.client.join(bot.app.admin_room)


async def set_displayname(user: TestUser, name: str) -> None:
    await user.client.request(
        "PUT", f"/_matrix/client/v3/profile/{quote(user.user_id, safe='')}/displayname", {"displayname": name}
    )


async def joined(world, room_id: str) -> set[str]:
    return await world.owner.client.joined_members(room_id)


async def membership(world, room_id: str, user_id: str) -> str | None:
    return (await world.owner.client.members(room_id)).get(user_id)


async def community(world, make_user, n: int = 1) -> tuple[str, str, list[TestUser]]:
    """A Space with one restricted room, and `n` users joined to both."""
    space = await world.space("Community")
    room = await world.room(space, "General")
    users = []
    for i in range(n):
        user = await make_user(f"member{i}")
        await user.client.join(space)
        await user.client.join(room)
        users.append(user)
    return space, room, users


# endregion


# region authorization


async def test_admin_is_obeyed_and_non_admin_refused(world, start_bot, make_user):
    space, room, _ = await community(world, make_user)
    listed = await make_user("listed")  # admin by config, power level 0 in the admin room
    mallory = await make_user("mallory")
    bot = await start_bot([{"room": space}], admins=[listed.user_id])
    await ready(bot)
    await join_admin_room(world, bot, listed)
    await join_admin_room(world, bot, mallory)

    body = await ask(world, bot, world.owner, "!spacesync status")
    assert "State: running" in body and "Spaces: 1 managed" in body

    assert await ask(world, bot, mallory, f"!spacesync exempt add {mallory.user_id}") == REFUSAL
    assert await ask(world, bot, mallory, "!ss pause") == REFUSAL
    assert await bot.app.store.exempt_users() == frozenset()
    assert not bot.app.reconciler.paused

    # Every command, refused alike for a non-admin, with nothing changed.
    samples = {
        "spaces": f"add {space}",
        "rooms": f"add {room}",
        "exempt": f"add {mallory.user_id}",
        "whois": mallory.user_id,
        "confirm": "abcdef",
        "cancel": "abcdef",
        "undo": "abcdef",
        "batch": "abcdef",
        "audit": "5",
    }
    for name in REGISTRY.names():
        reply = await ask(world, bot, mallory, f"!ss {name} {samples.get(name, '')}".strip())
        assert reply == REFUSAL, (name, reply)
    assert await bot.app.store.exempt_users() == frozenset()
    assert await bot.app.store.extra_rooms() == {} and await bot.app.store.managed_spaces() == []
    assert not bot.app.reconciler.paused and not await bot.app.store.journal.batches()

    assert "is exempt" in await ask(world, bot, listed, f"!ss exempt add {mallory.user_id}")
    assert await bot.app.store.exempt_users() == {mallory.user_id}
    assert await ask(world, bot, world.owner, "!spacesync statsu") == "Unknown command 'statsu'. Did you mean 'status'?"
    assert "Usage: !spacesync exempt add|remove|list [@user]" in await ask(world, bot, world.owner, "!ss exempt")
    bad = await ask(world, bot, world.owner, "!ss exempt add @bob")
    assert "'@bob' is not a user" in bad


async def test_an_admin_is_never_refused_because_the_admin_rooms_state_cannot_be_read(
    world, start_bot, make_user, fault_proxy
):
    """Whether the sender is an admin comes from the admin room's power levels: a read that fails is retried, and
    one that keeps failing leaves the answer unknown ("send it again"), never "only admins"."""
    space, _, _ = await community(world, make_user)
    bot = await start_bot([{"room": space}], homeserver_url=fault_proxy.url)
    await ready(bot)
    state_reads = rf"/rooms/{re.escape(bot.app.admin_room)}/state$"

    fault_proxy.fail(state_reads, status=502, method="GET", times=2)  # a blip: the third read answers
    assert "State: running" in await ask(world, bot, world.owner, "!spacesync status")

    fault_proxy.fail(state_reads, status=502, method="GET")
    reply = await ask(world, bot, world.owner, "!ss pause")
    assert reply != REFUSAL and "could not be read" in reply and "Send it again" in reply, reply
    assert not bot.app.reconciler.paused
    fault_proxy.clear()
    assert "Paused" in await ask(world, bot, world.owner, "!ss pause")


async def test_display_name_spoofing_is_refused(world, start_bot, make_user):
    space, _, _ = await community(world, make_user)
    mallory = await make_user("mallory")
    bot = await start_bot([{"room": space}])
    await ready(bot)
    await join_admin_room(world, bot, mallory)
    profile = await world.owner.client.request(
        "GET", f"/_matrix/client/v3/profile/{quote(world.owner.user_id, safe='')}"
    )
    for name in (profile.get("displayname") or world.owner.user_id, world.owner.user_id):
        await set_displayname(mallory, name)
        assert await ask(world, bot, mallory, f"!spacesync exempt add {mallory.user_id}") == REFUSAL
        # A pill naming the admin does not help either.
        html = f'<a href="https://matrix.to/#/{world.owner.user_id}">{name}</a>: !spacesync pause'
        await mallory.client.send_text(bot.app.admin_room, f"{name}: !spacesync pause", html=html)
    await ask(world, bot, world.owner, "!ss status")  # everything before it has been handled
    assert await bot.app.store.exempt_users() == frozenset()
    assert not bot.app.reconciler.paused


async def test_edited_command_is_ignored(world, start_bot, make_user):
    space, _, _ = await community(world, make_user)
    bot = await start_bot([{"room": space}])
    await ready(bot)
    original = await world.owner.client.send_text(bot.app.admin_room, "!ss exempt list")
    await reply_for(world, bot, original)
    edit = await world.owner.client.edit_text(bot.app.admin_room, original, "!ss pause")
    plain = await world.owner.client.send_text(bot.app.admin_room, "good morning")
    plain_edit = await world.owner.client.edit_text(bot.app.admin_room, plain, "!ss pause")
    await ask(world, bot, world.owner, "!ss status")  # the edits came before it: they were seen
    assert not bot.app.reconciler.paused
    assert len(await replies_to(world, bot, original)) == 1
    for event_id in (edit, plain, plain_edit):
        assert await replies_to(world, bot, event_id) == []


async def test_no_command_grants_power(world, start_bot, make_user):
    space, _, _ = await community(world, make_user)
    listed = await make_user("listed")
    other = await world.space("Other")  # the owner's; `listed` holds no power there
    bot = await start_bot([{"room": space}], admins=[listed.user_id])
    await ready(bot)
    await join_admin_room(world, bot, listed)
    body = await ask(world, bot, listed, f"!ss spaces add {other}")
    assert "you have power level 0" in body and "needs 100" in body
    assert await bot.app.store.managed_spaces() == []
    assert "Now managing Space" in await ask(world, bot, world.owner, f"!ss spaces add {other}")
    assert await bot.app.store.managed_spaces() == [other]


# endregion


# region reading and settings


async def test_read_commands(world, start_bot, make_user):
    space = await world.space("Community")
    sub = await world.space("Team", parent=space)
    room = await world.room(sub, "Team chat")
    lobby = await world.room(space, "Lobby", join_rule="public")  # listed, but not opted in
    alice = await make_user("alice")
    for r in (space, sub, room):
        await alice.client.join(r)
    bot = await start_bot([{"room": space}])
    await ready(bot)

    status = await ask(world, bot, world.owner, "!ss status")
    assert "Rooms: 3 managed, 1 not opted in, 0 unreachable" in status
    assert "Last reconcile:" in status and "rate limits" in status

    tree = await ask(world, bot, world.owner, "!ss tree")
    assert re.search(r"Community \(!\S+\) — Space, managed, 3 joined", tree), tree
    assert re.search(r"  - Team chat \(!\S+\) — managed, 3 joined", tree), tree
    assert re.search(r"Lobby \(!\S+\) — not opted in", tree), tree
    branch = await ask(world, bot, world.owner, f"!ss tree {sub}")
    assert "Lobby" not in branch and "Team chat" in branch

    whois = await ask(world, bot, world.owner, f"!ss whois {alice.user_id}")
    assert "joined to 3 managed rooms" in whois
    assert re.search(r"Team chat \(!\S+\): join — entitled by Team", whois), whois

    plan = await ask(world, bot, world.owner, "!ss plan")
    assert plan.startswith("Plan: 3 managed rooms, 0 actions")
    assert "not opted in" in plan
    assert (await ask(world, bot, world.owner, "!ss joinrules")).startswith("Join rules:")
    assert (await ask(world, bot, world.owner, f"!ss powerlevels {space}")).startswith("Power levels for Community")
    assert "Audit log" in await ask(world, bot, world.owner, "!ss audit 5")
    spaces = await ask(world, bot, world.owner, "!ss spaces list")
    assert "Community" in spaces and "config" in spaces

    assert "is not a room" in await ask(world, bot, world.owner, f"!ss tree {alice.user_id}")
    assert "does not resolve" in await ask(
        world, bot, world.owner, "!ss tree #nowhere:" + world.owner.client.server_name
    )
    assert "is not a managed Space" in await ask(world, bot, world.owner, f"!ss plan {lobby}")
    assert "configured in the config file" in await ask(world, bot, world.owner, f"!ss spaces remove {space}")
    assert "is not a Space" in await ask(world, bot, world.owner, f"!ss spaces add {lobby}")

    # Explicit opt-in: the lobby becomes managed.
    assert "now managed under" in await ask(world, bot, world.owner, f"!ss rooms add {lobby}")
    assert "already opted in" in await ask(world, bot, world.owner, f"!ss rooms add {lobby}")
    assert "1 room opted in explicitly" in await ask(world, bot, world.owner, "!ss rooms list")
    synced = await ask(world, bot, world.owner, "!ss sync")
    assert synced.startswith("Reconciled in") and "4 managed rooms" in synced
    assert lobby in bot.app.reconciler.last_plan.managed
    assert "no longer explicitly opted in" in await ask(world, bot, world.owner, f"!ss rooms remove {lobby}")
    assert "was not added" in await ask(world, bot, world.owner, f"!ss rooms remove {lobby}")


async def test_a_room_in_the_config_extra_rooms_is_not_added_twice(world, start_bot, make_user):
    space, room, _ = await community(world, make_user)
    bot = await start_bot([{"room": space, "extra_rooms": [room]}])
    await ready(bot)
    assert "already opted in" in await ask(world, bot, world.owner, f"!ss rooms add {room}")
    listed = await ask(world, bot, world.owner, "!ss rooms list")
    assert "1 room opted in explicitly" in listed and "in the config" in listed, listed
    assert await bot.app.store.extra_rooms() == {}


async def test_exempt_keeps_a_leaver(world, start_bot, make_user):
    space, room, (user,) = await community(world, make_user)
    bot = await start_bot([{"room": space}])
    await ready(bot)
    assert "is exempt" in await ask(world, bot, world.owner, f"!ss exempt add https://matrix.to/#/{user.user_id}")
    assert "added in the admin room" in await ask(world, bot, world.owner, "!ss exempt list")
    await user.client.leave(space)
    await ask(world, bot, world.owner, "!ss sync")
    await bot.idle()
    assert user.user_id in await joined(world, room)
    whois = await ask(world, bot, world.owner, f"!ss whois {user.user_id}")
    assert "protected: exempt" in whois

    # Lifting the exemption lets the next reconcile evict.
    assert "no longer exempt" in await ask(world, bot, world.owner, f"!ss exempt remove {user.user_id}")
    await wait_for(lambda: _not_in(world, room, user.user_id), timeout=20)
    await bot.idle()
    whois = await ask(world, bot, world.owner, f"!ss whois {user.user_id}")
    assert "joined to 0 managed rooms" in whois and "leave by spacesync" in whois, whois


async def _not_in(world, room: str, user_id: str) -> bool:
    return user_id not in await joined(world, room)


async def test_pause_and_resume(world, start_bot, make_user):
    space, room, (user,) = await community(world, make_user)
    bot = await start_bot([{"room": space}])
    await ready(bot)
    assert (await ask(world, bot, world.owner, "!ss pause")).startswith("Paused")
    await user.client.leave(space)
    assert "Paused: nothing was queued" in await ask(world, bot, world.owner, "!ss sync")
    assert "PAUSED" in await ask(world, bot, world.owner, "!ss status")
    assert user.user_id in await joined(world, room)
    assert (await ask(world, bot, world.owner, "!ss resume")).startswith("Resumed")
    await wait_for(lambda: _not_in(world, room, user.user_id), timeout=20)


# endregion


# region batches


async def _held_batch(bot, timeout: float = 20) -> str:
    async def held() -> str | None:
        batches = await bot.app.store.journal.batches(status="held")
        return batches[0].id if batches else None

    return await wait_for(held, timeout=timeout)


async def test_confirm_and_cancel_a_held_mass_eviction(world, start_bot, make_user):
    space, room, users = await community(world, make_user, 2)
    bot = await start_bot([{"room": space, "max_evictions_without_confirmation": 1}])
    await ready(bot)
    await ask(world, bot, world.owner, "!ss pause")  # both leaves must reach one plan
    for user in users:
        await user.client.leave(space)
    await ask(world, bot, world.owner, "!ss resume")
    first = await _held_batch(bot)
    review = await ask(world, bot, world.owner, f"!ss batch {first}")
    assert f"Batch {first}" in review and "2 held" in review and review.count("kick @") == 2
    status = await ask(world, bot, world.owner, "!ss status")
    assert first in status and "2 held" in status

    assert "Unknown batch 'ffffff'" in await ask(world, bot, world.owner, "!ss confirm ffffff")
    assert "is not a batch id" in await ask(world, bot, world.owner, "!ss cancel ../x")
    cancelled = await ask(world, bot, world.owner, f"!ss cancel {first}")
    assert cancelled.startswith(f"Cancelled batch {first}: 2 evictions dropped")
    assert (await bot.app.store.journal.batch(first)).status == "cancelled"
    assert "is not held" in await ask(world, bot, world.owner, f"!ss confirm {first}")
    assert {u.user_id for u in users} <= await joined(world, room)

    # Still not entitled: the next reconcile holds them again; this time confirm.
    synced = await ask(world, bot, world.owner, "!ss sync")
    match = re.search(r"Held batch ([0-9a-f]{8})\b", synced)
    assert match, synced
    second = match.group(1)
    assert second != first
    # A unique start of the id is enough (the reply names the whole id); a shared start is refused.
    await bot.app.store.journal.add_batch(
        second[:5] + "zzz", "test", None, [Action(ActionKind.KICK, room, users[0].user_id)], Status.CANCELLED
    )
    ambiguous = await ask(world, bot, world.owner, f"!ss confirm {second[:5]}")
    assert "start of several batches" in ambiguous and second in ambiguous, ambiguous
    assert f"Confirmed batch {second}: 2 evictions" in await ask(world, bot, world.owner, f"!ss confirm {second[:6]}")

    async def evicted() -> bool:
        members = await joined(world, room)
        return not any(u.user_id in members for u in users)

    await wait_for(evicted, timeout=20)


async def test_undo_reinvites_an_evicted_user(world, start_bot, make_user):
    space, room, (user,) = await community(world, make_user)
    bot = await start_bot([{"room": space}])
    await ready(bot)
    await user.client.leave(space)
    await wait_for(lambda: _not_in(world, room, user.user_id), timeout=20)

    async def kick_batch() -> str | None:
        records = await bot.app.store.audit_log(10, target=user.user_id)
        return next((r.batch for r in records if r.kind == "kick" and r.outcome == "done"), None)

    batch = await wait_for(kick_batch, timeout=10)

    body = await ask(world, bot, world.owner, f"!ss undo {batch}")
    assert f"Undo of batch {batch} queued as batch" in body and "1 re-invite" in body
    assert "exempt" in body  # says that the next reconcile re-plans unless exempted

    async def invited() -> bool:
        return await membership(world, room, user.user_id) == "invite"

    await wait_for(invited, timeout=20)
    assert "already undone" in await ask(world, bot, world.owner, f"!ss undo {batch}")
    assert "Unknown batch" in await ask(world, bot, world.owner, "!ss undo abcdef")


# endregion


# region exactly once, robustness


async def test_restart_does_not_run_a_command_twice(world, start_bot, make_user, tmp_path, monkeypatch):
    space, _, (user,) = await community(world, make_user)
    bot = await start_bot([{"room": space}])
    await ready(bot)
    before = await bot.app.store.get("next_batch")
    assert before
    command = await world.owner.client.send_text(bot.app.admin_room, f"!ss exempt add {user.user_id}")
    await reply_for(world, bot, command)
    await bot.stop()

    # Make the next bot sync from before the command, so that it sees the command again.
    store = Store(f"sqlite:{tmp_path}/bot.db")
    await store.start()
    await store.put("next_batch", before)
    await store.stop()
    seen: list[tuple[str, bool]] = []
    queue_command = Store.queue_command

    async def spy(self: Store, room_id: str, event: dict[str, Any]) -> bool:
        result = await queue_command(self, room_id, event)
        seen.append((event["event_id"], result))
        return result

    monkeypatch.setattr(Store, "queue_command", spy)

    bot = await start_bot([{"room": space}])
    await ready(bot)
    await ask(world, bot, world.owner, "!ss status")
    assert (command, False) in seen  # delivered again, and recognised
    assert len(await replies_to(world, bot, command)) == 1


def _fuzz_texts() -> st.SearchStrategy[str]:
    words = st.sampled_from(
        REGISTRY.names()
        + [
            "add",
            "remove",
            "list",
            "@a:hs",
            "@",
            "!r:hs",
            "#x:hs",
            '"',
            "'",
            "ffffff",
            "0",
            "-1",
            "99999999",
            "https://matrix.to/#/@x:y",
            "matrix:u/x:y",
            "<b>",
            "\u00a0",
            "\\",
        ]
    )
    token = st.one_of(words, st.text(max_size=12))
    commandish = st.builds(
        lambda prefix, rest: prefix + " " + " ".join(rest),
        st.sampled_from(["!ss", "!spacesync", "!SS"]),
        st.lists(token, max_size=5),
    )
    return st.one_of(st.text(max_size=200), commandish)


class _CountingHandler(CommandHandler):
    def __init__(self, app) -> None:
        super().__init__(app)
        self.replies = 0

    async def _reply(self, room_id, event_id, reply) -> None:
        self.replies += 1
        await super()._reply(room_id, event_id, reply)


async def test_fuzzed_commands_never_stop_the_bot(world, start_bot, make_user):
    space, _, _ = await community(world, make_user)
    bot = await start_bot([{"room": space}])
    await ready(bot)
    loop = asyncio.get_running_loop()
    handler = _CountingHandler(bot.app)
    ids = itertools.count()
    run = secrets.token_hex(4)

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(text=_fuzz_texts(), as_html=st.booleans())
    def send_one(text: str, as_html: bool) -> None:
        content: dict[str, Any] = {"msgtype": "m.text", "body": text}
        if as_html:
            content.update(format="org.matrix.custom.html", formatted_body=text)
        event = {
            "type": "m.room.message",
            "sender": world.owner.user_id,
            "event_id": f"$fuzz{run}.{next(ids)}",
            "content": content,
        }
        before = handler.replies
        asyncio.run_coroutine_threadsafe(handler.handle(bot.app.admin_room, event), loop).result(120)
        assert handler.replies - before <= 1
        assert not bot.task.done()

    await asyncio.to_thread(send_one)
    bot.app.reconciler.paused = False  # a fuzzed "pause" is legitimate
    assert "State: running" in await ask(world, bot, world.owner, "!spacesync status")


# endregion


# region escaping and admin rooms


async def ask_html(world, bot, user: TestUser, text: str) -> str:
    event_id = await user.client.send_text(bot.app.admin_room, text)
    return (await reply_for(world, bot, event_id))["formatted_body"]


async def test_replies_and_notices_escape_room_names(world, start_bot, make_user):
    raw = '<b>&"x'
    escaped = "&lt;b&gt;&amp;&quot;x"
    space = await world.space("Community")
    room = await world.room(space, raw)
    user = await make_user("member")
    await user.client.join(space)
    await user.client.join(room)
    bot = await start_bot([{"room": space}])
    await ready(bot)

    await user.client.leave(space)
    await wait_for(lambda: _not_in(world, room, user.user_id), timeout=20)

    async def notice() -> dict[str, Any] | None:
        return next(
            (e["content"] for e in await bot_notices(world, bot) if e["content"].get("body", "").startswith("Batch ")),
            None,
        )

    summary = await wait_for(notice, timeout=20)
    bodies = {"notice": summary["formatted_body"]}
    batch = re.search(r"Batch ([0-9a-f]{6})", summary["body"]).group(1)
    for command in (f"whois {user.user_id}", f"batch {batch}", "audit 5", "tree"):
        bodies[command] = await ask_html(world, bot, world.owner, f"!ss {command}")
    for where, html in bodies.items():
        assert escaped in html, (where, html)
        assert raw not in html, (where, html)


async def test_v12_admin_room_creator_is_an_admin(world, start_bot, make_user):
    """In room version 12 the creator has unlimited power without a `users` entry."""
    space, _, _ = await community(world, make_user)
    admin_room = await world.room(None, "admin", join_rule="invite", version="12")
    assert world.owner.user_id not in (await world.owner.client.get_power_levels(admin_room))["users"]
    mallory = await make_user("mallory")
    bot = await start_bot([{"room": space}], admin_room=admin_room)
    await ready(bot)
    await join_admin_room(world, bot, mallory)

    assert "State: running" in await ask(world, bot, world.owner, "!ss status")
    assert await ask(world, bot, mallory, "!ss status") == REFUSAL


# endregion


async def test_status_shows_the_expected_finish_of_a_queue_and_nothing_without_one(
    world, start_bot, make_user, fault_proxy
):
    space, user, bot = await one_at_a_time_behind(world, make_user, start_bot, fault_proxy)
    assert "Queue:" not in await ask(world, bot, world.owner, "!ss status")

    # The first kick goes through; the next one hangs, so one is running and one waits behind it.
    fault_proxy.delay_response(r"/kick$", 0.0, method="POST", times=1)
    fault_proxy.hang(r"/kick$", method="POST")
    await user.client.leave(space)

    async def one_done() -> bool:
        records = await bot.app.store.audit_log(10, target=user.user_id)
        return any(r.outcome == "done" for r in records)

    await wait_for(one_done, timeout=20)
    status = await ask(world, bot, world.owner, "!ss status")
    assert "Actions: 1 pending, 1 running" in status
    assert re.search(r"Queue: 2 actions, expected to finish in ~\d+ s \(at [\d.]+/s\)", status), status

    fault_proxy.clear()  # the held kick is forwarded; the last one follows
    await bot.idle()
    assert "Queue:" not in await ask(world, bot, world.owner, "!ss status")
