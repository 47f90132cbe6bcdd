"""`spacesync demo`: a throwaway Synapse with a sample Space, the bot running against it, and a narrated story."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from .testing import FederatedPair, Synapse, TestbedRequestError, TestClient, TestUser, free_port, join_when_allowed

__all__ = ["run_demo"]

MARKER = ".spacesync-demo"
"""A file in the work directory saying it is the demo's own (and may be wiped)."""
SERVER_NAME = "localhost"
ROOM_VERSION = "10"
STEP_TIMEOUT = 30.0
"""How long the story waits for the bot to react before it calls a step failed."""
BOT_START_TIMEOUT = 60.0
BOT_STOP_TIMEOUT = 15.0
CHILDREN = ("general", "random", "Projects", "project-x")
ROOM_LOCAL_LEVEL = 20
"""bob's level in `random` set by that room's own moderators: mirroring must raise it and give it back."""
PROMOTED_LEVEL = 50


class _Abort(Exception):
    """The demo cannot go on (the homeserver or the bot is gone); the message says why."""


def run_demo(workdir: str, scripted: bool = False, federated: bool = False, appservice: bool = False) -> int:
    """Run the demo in `workdir` (created, and removed at the end). Returns the process exit code.

    Federated: two homeservers that federate over loopback, the Space on the second, its rooms on both,
    the bot on the first (a test bed's settings: see spacesync.testing.federation).

    Interactive: tell the story, then keep everything running until SIGINT/SIGTERM, clean up, exit 0.
    Scripted: tell the story and exit 0 if every step succeeded, 1 otherwise.
    """
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        return asyncio.run(_main(Path(workdir), scripted, federated, appservice))
    except KeyboardInterrupt:  # a Ctrl-C before the handlers were installed
        return 0 if not scripted else 1


async def _main(workdir: Path, scripted: bool, federated: bool = False, appservice: bool = False) -> int:
    if appservice:
        from .demo_appservice import AppserviceDemo

        demo: Demo = AppserviceDemo(workdir, out=sys.stdout)
    else:
        demo = Demo(workdir, out=sys.stdout, federated=federated)
    problem = demo.claim_workdir()
    if problem:
        print(f"spacesync demo: {problem}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    work = asyncio.create_task(demo.play(scripted), name="demo")
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            demo.say(f"({sig.name} again: still cleaning up, a few seconds more)")
            return
        stop.set()
        demo.say(f"\n{sig.name} received: stopping spacesync and Synapse and removing {workdir} …")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        while not work.done():  # repeat: Python 3.11's wait_for can swallow one cancellation
            work.cancel()
            await asyncio.wait({work}, timeout=1)
        if work.cancelled():
            code = 1 if scripted else 0
        elif isinstance(work.exception(), _Abort):
            demo.say(f"\n✗ {work.exception()}")
            code = 1
        elif work.exception() is not None:
            demo.say("\n✗ the demo failed unexpectedly:")
            exc = work.exception()
            assert exc is not None
            traceback.print_exception(exc)
            code = 1
        else:
            code = work.result()
        await demo.cleanup()
        if stop.is_set():
            demo.say("Stopped; everything is cleaned up.")
        return code
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class Demo:
    """The throwaway world (homeserver, accounts, Space tree), the bot, and the story told against them."""

    def __init__(self, workdir: Path, out: TextIO, federated: bool = False) -> None:
        self.workdir = workdir
        self.out = out
        self.pair: FederatedPair | None = None
        # Absolute: Synapse runs with its own directory as the working directory.
        if federated:
            self.pair = FederatedPair(workdir.resolve() / "synapse", default_room_version=ROOM_VERSION)
            self.synapse = self.pair.a
            """The bot's homeserver (the first)."""
            self.space_server = self.pair.b
            """Where the Space, its moderator and most of its rooms live (the second, when federated)."""
        else:
            self.synapse = self.space_server = Synapse(
                workdir.resolve() / "synapse", server_name=SERVER_NAME, default_room_version=ROOM_VERSION
            )
        self.users: dict[str, TestUser] = {}
        self.rooms: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.moderator_password = secrets.token_hex(6)
        self.user_password = secrets.token_hex(6)
        self.app: Any = None
        self.bot_task: asyncio.Task[None] | None = None
        self.web_runner: Any = None
        self.web_port: int | None = None
        self.config_path = workdir / "config.yaml"
        self.results: list[bool] = []
        self._step = 0

    # region output
    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, text: str) -> None:
        self._step += 1
        lines = text.splitlines()
        self.say(f"\n{self._step}. {lines[0]}")
        for line in lines[1:]:
            self.say(f"   {line}")

    def verdict(self, ok: bool, text: str) -> bool:
        self.say(f"   {'✓' if ok else '✗'} {text}")
        self.results.append(ok)
        return ok

    # endregion

    # region work directory
    def claim_workdir(self) -> str | None:
        """Make the work directory ours: new, empty, or left over from an earlier demo. A problem, or None."""
        wd = self.workdir
        if wd.exists() and not wd.is_dir():
            return f"--workdir {wd} is a file; choose a directory"
        if wd.is_dir() and any(wd.iterdir()):
            if not (wd / MARKER).exists():
                return f"--workdir {wd} is not empty and not a spacesync demo directory; choose another one"
            _stop_stale_synapse(wd)
            shutil.rmtree(wd)
        wd.mkdir(parents=True, exist_ok=True)
        (wd / MARKER).write_text("spacesync demo work directory: removed when the demo stops\n")
        return None

    async def cleanup(self) -> None:
        """Stop the bot, the web endpoint and Synapse, and remove the work directory. Never raises."""
        if self.app is not None and self.bot_task is not None:
            self.app.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self.bot_task), BOT_STOP_TIMEOUT)
            except (TimeoutError, asyncio.CancelledError):
                self.bot_task.cancel()
                await asyncio.gather(self.bot_task, return_exceptions=True)
            except Exception:  # the bot failed: already reported, nothing left to stop
                pass
        if self.web_runner is not None:
            with contextlib.suppress(Exception):
                await self.web_runner.cleanup()
        for user in self.users.values():
            with contextlib.suppress(Exception):
                await user.client.close()
        with contextlib.suppress(Exception):
            await (self.pair.stop() if self.pair is not None else self.synapse.stop())
        shutil.rmtree(self.workdir, ignore_errors=True)

    # endregion

    # region the story
    async def play(self, scripted: bool) -> int:
        self.say("spacesync demo: a throwaway homeserver, a sample Space, and the bot keeping its rooms in step.")
        await self.start_homeserver()
        await self.build_space()
        await self.start_bot()
        await self.story()
        failed = self.results.count(False)
        total = len(self.results)
        if failed:
            self.say(f"\n✗ {failed} of {total} steps failed (see the ✗ lines above).")
        else:
            self.say(f"\n✓ All {total} steps succeeded.")
        if scripted:
            return 1 if failed else 0
        self.print_login()
        assert self.bot_task is not None
        await asyncio.wait({self.bot_task})  # until SIGINT/SIGTERM cancels us, or the bot dies
        self._check_bot()
        return 0

    async def start_homeserver(self) -> None:
        if self.pair is None:
            self.say("\nStarting a throwaway Synapse on loopback …")
        else:
            self.say("\nStarting two throwaway Synapses on loopback that federate with each other …")
        try:
            await (self.pair.start() if self.pair is not None else self.synapse.start())
        except (RuntimeError, OSError) as e:
            raise _Abort(f"cannot start Synapse: {e}") from e
        servers = [self.synapse] if self.pair is None else [self.pair.a, self.pair.b]
        (self.workdir / "synapse.pid").write_text("".join(f"{server.pid}\n" for server in servers))
        for server in servers:
            self.say(f"   ✓ {server.url} (server name {server.server_name}, logs in {server.workdir})")
        # bob lives on the bot's server; the moderator, alice and carol on the Space's.
        homes = {"alice": self.space_server, "bob": self.synapse, "carol": self.space_server}
        try:
            # The homeservers run with Synapse's stock rate limits; the people of the story act at full speed.
            self.users["moderator"] = await self.space_server.register(
                "moderator", password=self.moderator_password, admin=True, displayname="Moderator", exempt=True
            )
            if self.pair is not None:  # the host of the room on the bot's server, and that server's admin
                self.users["host"] = await self.synapse.register(
                    "host", password=self.moderator_password, admin=True, displayname="Host", exempt=True
                )
            self.users["bot"] = await self.bot_account()
            for name in ("alice", "bob", "carol"):
                self.users[name] = await homes[name].register(
                    name, password=self.user_password, displayname=name.capitalize(), exempt=True
                )
            await self.exempt_bot()
        except (TestbedRequestError, OSError) as e:
            raise _Abort(f"cannot register the demo accounts: {e}") from e
        self.say(
            f"   ✓ accounts: {self.mod.user_id} (also the server's admin), {self.bot.user_id} (the bot, "
            f"{self.exemption}), alice, bob and carol"
        )

    @property
    def exempt_path(self) -> str:
        """Synapse's admin API path that exempts the bot from rate limits (POST) and shows it (GET)."""
        return f"/_synapse/admin/v1/users/{quote(self.bot.user_id, safe='')}/override_ratelimit"

    exemption = "rate limit lifted with the admin API"
    """How the bot escapes Synapse's rate limits, as the demo tells it."""

    async def bot_account(self) -> TestUser:
        return await self.synapse.register("spacesync", displayname="spacesync")

    async def exempt_bot(self) -> None:
        """The documented way to let the bot act at full speed (Synapse's admin API on the bot's server)."""
        await self.host.request("POST", self.exempt_path, {"messages_per_second": 0, "burst_count": 0})
        self.say(
            f"   ✓ the bot exempt from the stock rate limits, as the README's setup does: POST {self.exempt_path}\n"
            '     {"messages_per_second": 0, "burst_count": 0} with an admin token; GET on the same path shows it'
        )

    def bot_config(self) -> dict[str, Any]:
        """The config's `bot` section, and any other sections the way in needs."""
        bot = self.users["bot"]
        return {"bot": {"user_id": bot.user_id, "access_token": bot.access_token, "pickle_key": secrets.token_hex(32)}}

    @property
    def mod(self) -> TestClient:
        return self.users["moderator"].client

    @property
    def host(self) -> TestClient:
        """An admin of the bot's server, who also creates the room that lives there (the moderator alone
        on one server)."""
        return self.users.get("host", self.users["moderator"]).client

    @property
    def via(self) -> list[str]:
        return list(dict.fromkeys([self.space_server.server_name, self.synapse.server_name]))

    @property
    def bot(self) -> TestClient:
        return self.users["bot"].client

    def client(self, name: str) -> TestClient:
        return self.users[name].client

    def uid(self, name: str) -> str:
        return self.users[name].user_id

    async def build_space(self) -> None:
        self.say("\nThe moderator builds a Space:")
        mod, bot = self.users["moderator"].user_id, self.users["bot"].user_id
        host = self.host.user_id
        try:
            space = await self._create("Demo Community", space=True, join_rule="public", levels={mod: 100, bot: 100})
            await self.mod.set_room_alias(space, f"#demo:{self.space_server.server_name}")
            if self.pair is not None:
                # a restricted room on the bot's server admits the Space's members only once a user of that
                # server, with invite power there, is in the Space to vouch for them
                await self.host.join(space, via=self.via)
                # (the join is a partial-state join at first; /members answers once the full state is in)
                await self.host.members(space)
            for name in ("general", "random"):
                extra = {self.uid("bob"): ROOM_LOCAL_LEVEL, host: 100} if name == "random" else {}
                # random lives on the bot's server (the host creates it there); the rest on the Space's
                creator = self.host if name == "random" else self.mod
                await self._create(name, parent=space, levels={mod: 100, bot: 100, **extra}, creator=creator)
            if self.pair is not None:
                await join_when_allowed(self.users["moderator"], self.rooms["random"], self.via)
            projects = await self._create("Projects", parent=space, space=True, levels={mod: 100, bot: 100})
            await self._create("project-x", parent=projects, levels={mod: 100, bot: 100})
            admin = await self.mod.create_room(
                name="spacesync admin",
                room_version=ROOM_VERSION,
                preset="private_chat",
                power_level_content_override={"users": {mod: 100, bot: 50}},
                # Encrypted, as Element makes every private room: the bot talks end-to-end encrypted there.
                initial_state=[
                    {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
                ],
            )
            self.rooms["admin"], self.names[admin] = admin, "spacesync admin"
            await self.mod.invite(admin, bot)
            for room_id in self.rooms.values():
                await join_when_allowed(self.users["bot"], room_id, self.via)
        except TestbedRequestError as e:
            raise _Abort(f"cannot build the sample Space: {e}") from e
        self.say(
            f"     Demo Community  (Space, #demo:{self.space_server.server_name})\n"
            "     ├── general      restricted to Demo Community\n"
            "     ├── random       restricted to Demo Community"
            f" (its moderators made bob {ROOM_LOCAL_LEVEL} here)\n"
            "     └── Projects     (Space) restricted to Demo Community\n"
            "         └── project-x  restricted to Projects\n"
            '   and "spacesync admin" (end-to-end encrypted), where the bot reports. '
            "The bot is in every room at power level 100."
        )
        if self.pair is not None:
            self.say(
                f"   random lives on {self.synapse.server_name} (the bot's server, with bob); the Space and the other\n"
                f"   rooms on {self.space_server.server_name} (with the moderator, alice and carol)."
            )

    async def _create(
        self,
        name: str,
        *,
        parent: str | None = None,
        space: bool = False,
        join_rule: str = "restricted",
        levels: dict[str, int],
        creator: TestClient | None = None,
    ) -> str:
        creator = creator or self.mod
        room_id = await creator.create_room(
            name=name,
            room_version=ROOM_VERSION,
            space=space,
            join_rule=join_rule,
            allow=[parent] if parent and join_rule == "restricted" else [],
            power_level_content_override={"users": levels},
        )
        if parent:
            await self.mod.add_child(parent, room_id, via=[creator.server_name])
        self.rooms[name] = room_id
        self.names[room_id] = name
        return room_id

    async def start_bot(self) -> None:
        from ruamel.yaml import YAML

        from .config import load_config
        from .logs import setup_logging

        self.web_port = free_port()
        data = {
            "homeserver": {"url": self.synapse.url},
            **self.bot_config(),
            "database": {"url": f"sqlite:{(self.workdir / 'spacesync.db').resolve()}"},
            "admin": {"room": self.rooms["admin"], "users": [self.uid("moderator")]},
            "spaces": [
                {
                    "room": self.rooms["Demo Community"],
                    "on_leave": "kick",
                    "propagate_bans": True,
                    "power_levels": "sync",
                }
            ],
            "web": {"listen": f"127.0.0.1:{self.web_port}"},
            "logging": {"level": "INFO", "format": "console"},
        }
        with self.config_path.open("w", encoding="utf-8") as f:
            f.write("# Written by `spacesync demo` for its throwaway homeserver; see config.example.yaml.\n")
            YAML().dump(data, f)
        config = load_config(self.config_path, env={})
        self.say(f"\nStarting spacesync with {self.config_path} (its logs go to stderr) …")
        setup_logging(config.logging.level, config.logging.format)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_idle_reconciles)
        # Imported after setup_logging, as `spacesync run` does: structlog's logger factory replaces the
        # logger class that mautrix's database layer insists on, unless mautrix sets it again afterwards.
        from .engine.runtime import App
        from .web import start_web

        self.app = App(config)
        try:
            self.web_runner = await start_web(self.app, "127.0.0.1", self.web_port)
        except OSError as e:
            raise _Abort(f"cannot listen on 127.0.0.1:{self.web_port}: {e.strerror}") from e
        self.bot_task = asyncio.create_task(self.app.run(), name="spacesync")
        expected = {self.rooms[n] for n in CHILDREN}

        async def ready() -> tuple[bool, str]:
            plan = self.app.reconciler.last_plan
            if plan is None:
                return False, "no reconcile has finished yet"
            managed = set(plan.managed)
            missing = expected - managed
            if missing:
                return False, f"it does not manage {self._list(missing)}"
            if await self.app.store.journal.runnable():
                return False, "it is still working through its first plan"
            return True, f"it manages {self._list(expected)}, and has nothing to do yet"

        self.step("spacesync starts, finds the Space and takes on the rooms that opted in to it.")
        await self._expect(ready, timeout=BOT_START_TIMEOUT)

        async def signed() -> tuple[bool, str]:
            identity = self.app.crypto.identity
            if identity is None or identity.master_key is None:
                return False, self.app.crypto.problem or "no cross-signing identity yet"
            return (await identity.query()).device_signed, f"master key {identity.master_key[:12]}…, device signed"

        self.step(
            "spacesync cross-signs its own device, so Element (which ignores unverified devices) trusts it.\n"
            f"`spacesync -c {self.config_path.name} crypto recovery-key` prints its recovery key once:\n"
            "keep it with the pickle key; it restores the identity on a new database (docs/deployment.md)."
        )
        await self._expect(signed)

    async def story(self) -> None:
        everyone = ("alice", "bob", "carol")
        all_rooms = ("Demo Community", "general", "random", "Projects", "project-x")

        self.step("alice, bob and carol join the Space and all its rooms (restricted joins: the Space lets them in).")
        try:
            for name in everyone:
                for room in all_rooms:
                    await join_when_allowed(self.users[name], self.rooms[room], self.via)
        except TestbedRequestError as e:
            self.verdict(False, f"a join failed: {e}")
        else:
            await self._expect(self._memberships(everyone, all_rooms, "join"), timeout=10)

        self.step(
            "alice leaves the Space. Nothing in Matrix takes her out of its rooms;\n"
            "spacesync removes her from general, random, Projects and project-x."
        )
        await self._act(self.client("alice").leave(self.rooms["Demo Community"]))
        await self._expect(self._memberships(("alice",), CHILDREN, "leave"), timed=True)

        self.step("The moderator bans carol from the Space; spacesync carries the ban into every room.")
        await self._act(self.mod.ban(self.rooms["Demo Community"], self.uid("carol"), reason="demo"))
        await self._expect(self._memberships(("carol",), CHILDREN, "ban"), timed=True)

        self.step(
            f"The moderator promotes bob to {PROMOTED_LEVEL} in the Space;\n"
            f"spacesync raises him to {PROMOTED_LEVEL} in every room."
        )
        before = {room: await self._level("bob", room) for room in CHILDREN}
        await self._act(self.mod.set_user_level(self.rooms["Demo Community"], self.uid("bob"), PROMOTED_LEVEL))
        await self._expect(self._levels("bob", {room: PROMOTED_LEVEL for room in CHILDREN}), timed=True)

        self.step(
            "The moderator demotes bob in the Space again; spacesync undoes only what it wrote:\n"
            "bob goes back to the default level in general, Projects and project-x,\n"
            f"and to {ROOM_LOCAL_LEVEL} in random, the level random's own moderators gave him."
        )
        await self._act(self._remove_level(self.rooms["Demo Community"], self.uid("bob")))
        await self._expect(self._levels("bob", before), timed=True)

    async def _act(self, request: Awaitable[Any]) -> None:
        try:
            await request
        except TestbedRequestError as e:
            raise _Abort(f"the homeserver refused a step of the story: {e}") from e

    async def _remove_level(self, room_id: str, user_id: str) -> None:
        content = await self.mod.get_power_levels(room_id)
        content["users"] = {u: level for u, level in (content.get("users") or {}).items() if u != user_id}
        await self.mod.send_state(room_id, "m.room.power_levels", content)

    async def _level(self, name: str, room: str) -> int:
        content = await self.mod.get_power_levels(self.rooms[room])
        users = content.get("users") or {}
        return int(users.get(self.uid(name), content.get("users_default") or 0) or 0)

    # endregion

    # region checks
    def _memberships(
        self, names: Iterable[str], rooms: Iterable[str], want: str
    ) -> Callable[[], Awaitable[tuple[bool, str]]]:
        names, rooms = tuple(names), tuple(rooms)
        verb = {"join": "in", "leave": "out of", "ban": "banned from"}[want]

        async def probe() -> tuple[bool, str]:
            wrong: list[str] = []
            for room in rooms:
                members = await self.mod.members(self.rooms[room])
                wrong += [
                    f"{n} in {room} ({members.get(self.uid(n), 'never joined')})"
                    for n in names
                    if members.get(self.uid(n)) != want
                ]
            who = _join(names)
            if wrong:
                return False, f"expected {who} {verb} {_join(rooms)}; still: {', '.join(wrong)}"
            return True, f"{who} {'are' if len(names) > 1 else 'is'} {verb} {_join(rooms)}"

        return probe

    def _levels(self, name: str, want: dict[str, int]) -> Callable[[], Awaitable[tuple[bool, str]]]:
        async def probe() -> tuple[bool, str]:
            got = {room: await self._level(name, room) for room in want}
            if got != want:
                shown = ", ".join(f"{room} {got[room]} (want {want[room]})" for room in want)
                return False, f"{name}'s levels: {shown}"
            groups: dict[int, list[str]] = {}
            for room, level in want.items():
                groups.setdefault(level, []).append(room)
            return True, f"{name} is " + "; ".join(f"{level} in {_join(rooms)}" for level, rooms in groups.items())

        return probe

    async def _expect(
        self, probe: Callable[[], Awaitable[tuple[bool, str]]], *, timeout: float = STEP_TIMEOUT, timed: bool = False
    ) -> bool:
        """Poll `probe` until it holds (✓) or `timeout` passes (✗); stop early if the bot died."""
        started = time.monotonic()
        while True:
            self._check_bot()
            try:
                ok, text = await probe()
            except TestbedRequestError as e:
                ok, text = False, f"cannot read the room state: {e}"
            elapsed = time.monotonic() - started
            if ok:
                return self.verdict(True, text + (f" ({elapsed:.1f} s)" if timed else ""))
            if elapsed >= timeout:
                return self.verdict(False, f"after {timeout:g} s: {text}")
            await asyncio.sleep(0.1)

    def _check_bot(self) -> None:
        task = self.bot_task
        if task is None or not task.done():
            return
        error = None if task.cancelled() else task.exception()
        raise _Abort(
            f"spacesync stopped unexpectedly: {type(error).__name__}: {error}"
            if error
            else "spacesync stopped unexpectedly"
        )

    def _list(self, room_ids: Iterable[str]) -> str:
        order = {room_id: i for i, room_id in enumerate(self.rooms.values())}
        return _join(self.names.get(r, r) for r in sorted(room_ids, key=lambda r: order.get(r, len(order))))

    # endregion

    def print_login(self) -> None:
        port = self.web_port
        self.say(
            "\nEverything keeps running so you can look around with any Matrix client (e.g. Element Desktop):\n"
            + "".join(
                f"  Homeserver  {server.url} ({server.server_name})\n"
                for server in dict.fromkeys([self.synapse, self.space_server])
            )
            + f"  Moderator   user moderator ({self.uid('moderator')}), password {self.moderator_password}\n"
            f"  Users       alice, bob and carol, password {self.user_password}\n"
            f"  Metrics     http://127.0.0.1:{port}/metrics  (health: /health, readiness: /ready)\n"
            f"  Config      {self.config_path}\n"
            "Try leaving the Space as bob, changing levels in the Space as the moderator, or sending\n"
            '!spacesync help in the "spacesync admin" room.\n'
            f"Press Ctrl-C to stop: spacesync and Synapse stop and {self.workdir} is removed."
        )


def _quiet_idle_reconciles(record: logging.LogRecord) -> bool:
    """Keep the demo's console readable: drop "reconciled" lines of passes that found nothing to do."""
    event = record.msg
    return not (
        isinstance(event, dict)
        and event.get("event") == "reconciled"
        and not event.get("queued")
        and not event.get("held")
        and not event.get("findings")
    )


def _join(items: Iterable[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _stop_stale_synapse(workdir: Path) -> None:
    """SIGTERM the homeservers left running by an earlier demo that was killed (only if really ours)."""
    try:
        pids = [int(line) for line in (workdir / "synapse.pid").read_text().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "synapse.app.homeserver" not in cmdline or str(workdir.resolve() / "synapse") not in cmdline:
            continue
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
