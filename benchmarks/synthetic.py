"""A synthetic homeserver for the scale benchmark, and a recording proxy in front of a real one.

    python benchmarks/synthetic.py serve --rooms 1000 --members 1000 --users 10000 --bot-token T --owner-token O
    python benchmarks/synthetic.py proxy --upstream http://127.0.0.1:8008 --bot-token T

`serve` speaks the client-server endpoints spacesync calls, over a generated, Synapse-shaped world: a root
Space (room version 10) with N `m.space.child` entries, every child restricted to the Space, each child
joined by M users drawn (seeded) from U users who are all in the Space, a small admin room, and the bot
and an owner at power level 100 everywhere. Events look like Synapse's: `$` + 43 url-safe base64 ids,
`origin_server_ts`, `unsigned` (with `replaces_state`, `prev_content` and `prev_sender` on replacing state),
compact JSON. /sync honours the filter (inline JSON or an uploaded filter id) as Synapse does for what
spacesync can ask of it: `room.timeline.limit`, `room.timeline.types`/`not_types`, `room.state.types`/
`not_types`, `room.state.lazy_load_members`, `room.rooms`/`not_rooms`; without lazy loading an initial
sync carries every room's full state. Incremental /sync long-polls (`timeout`) and returns what happened
since `since`, limited (with the skipped state changes in `state`) beyond the timeline limit, and a room
the syncing user left or was kicked from under `rooms.leave`. Kicks, bans, state writes and notices change
the world and come back through /sync.

`proxy` forwards every request to a real homeserver and records it the same way, so the benchmark's
request counts compare one to one.

Both record every request (`/_bench/requests`): method, endpoint class, whether the bot made it, status,
response bytes, start and end (CLOCK_MONOTONIC, the same clock in every process). `/_bench/*` is the
benchmark's own control API (world facts, injected leaves and messages; through the proxy, holding the
bot's /sync); the bot never calls it.

Each /state answer is kept serialised per room until the room's state changes, so serving 1000 rooms of
1000 members costs the server little CPU next to the bot it measures. Benchmark-only code.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fnmatch
import hashlib
import json
import random
import re
import sys
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from aiohttp import ClientSession, ClientTimeout, web

SERVER_NAME = "synth.local"
ROOM_VERSION = "10"
BASE_TS = 1_764_000_000_000
"""origin_server_ts of the generated world's first event (2025-11-24)."""


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# region request classes and the recorder
_CLIENT = re.compile(r"^/_matrix/client/(?:v3|r0|v1|unstable)(/.*)$")
_CLASSES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p), c)
    for m, p, c in [
        ("GET", r"^/account/whoami$", "whoami"),
        ("POST", r"^/login$", "login"),
        ("GET", r"^/login$", "login"),
        ("GET", r"^/sync$", "sync"),
        ("GET", r"^/joined_rooms$", "joined_rooms"),
        ("GET", r"^/rooms/[^/]+/state$", "state"),
        ("GET", r"^/rooms/[^/]+/state/.+$", "state_event"),
        ("PUT", r"^/rooms/[^/]+/state/.+$", "put_state"),
        ("GET", r"^/rooms/[^/]+/members$", "members"),
        ("GET", r"^/rooms/[^/]+/joined_members$", "joined_members"),
        ("GET", r"^/rooms/[^/]+/event/[^/]+$", "event"),
        ("GET", r"^/rooms/[^/]+/messages$", "messages"),
        ("GET", r"^/rooms/[^/]+/hierarchy$", "hierarchy"),
        ("POST", r"^/rooms/[^/]+/(kick|ban|unban|invite|leave|join)$", r"\1"),
        ("POST", r"^/join/[^/]+$", "join"),
        ("PUT", r"^/rooms/[^/]+/send/[^/]+/[^/]+$", "send"),
        ("PUT", r"^/rooms/[^/]+/redact/[^/]+/[^/]+$", "redact"),
        ("POST", r"^/user/[^/]+/filter$", "filter"),
        ("GET", r"^/user/[^/]+/filter/[^/]+$", "filter"),
        ("GET", r"^/directory/room/[^/]+$", "directory"),
    ]
]


def path_class(method: str, raw_path: str, query: Any = None) -> str:
    """The endpoint class of a request: `sync`/`sync (initial)`, `state`, `kick`, ... or `other METHOD /path`."""
    if raw_path == "/_matrix/client/versions":
        return "versions"
    m = _CLIENT.match(raw_path)
    if m:
        rest = m.group(1)
        for method_, pattern, cls in _CLASSES:
            if method == method_ and (hit := pattern.match(rest)):
                cls = hit.expand(cls)
                if cls == "sync" and query is not None and not query.get("since"):
                    return "sync (initial)"
                return cls
        rest = re.sub(r"/(![^/]+|%21[^/]+|@[^/]+|%40[^/]+|\$[^/]+|%24[^/]+)", "/{}", rest)
        return f"other {method} {rest}"
    return f"other {method} {raw_path}"


def _room_in(raw_path: str) -> str | None:
    m = re.search(r"/rooms/([^/]+)", raw_path)
    return unquote(m.group(1)) if m else None


class Recorder:
    """Every request: (index, start, end, method, class, who, status, bytes, room, note)."""

    def __init__(self, bot_token: str) -> None:
        self.bot_token = bot_token
        self.records: list[list[Any]] = []

    def who(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else request.query.get("access_token", "")
        return "bot" if token == self.bot_token else "other"

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_bench/"):
            return await handler(request)  # type: ignore[no-any-return]
        started = time.monotonic()
        status, size = 500, 0
        note = ""
        try:
            if request.method == "PUT" and "/send/" in request.raw_path and request.can_read_body:
                body = await request.read()
                try:
                    note = str((json.loads(body) or {}).get("body", ""))[:300]
                except (ValueError, AttributeError):
                    note = ""
            response: web.StreamResponse = await handler(request)
            status = response.status
            if isinstance(response, web.Response) and response.body is not None:
                size = len(response.body)  # type: ignore[arg-type]
            else:
                size = request.get("bytes", 0)
            return response
        except web.HTTPException as e:
            status = e.status
            size = len(e.body or b"")  # type: ignore[arg-type]
            raise
        finally:
            self.records.append(
                [
                    len(self.records),
                    started,
                    time.monotonic(),
                    request.method,
                    path_class(request.method, request.raw_path.split("?")[0], request.query),
                    self.who(request),
                    status,
                    size,
                    _room_in(request.raw_path),
                    note,
                ]
            )

    def routes(self) -> list[web.RouteDef]:
        async def requests(request: web.Request) -> web.Response:
            after = int(request.query.get("after", "0"))
            return web.json_response({"records": self.records[after:], "next": len(self.records)})

        return [web.get("/_bench/requests", requests)]


# endregion


# region events and rooms
def event_id(seed: str) -> str:
    """A Synapse-shaped event id: `$` and 43 url-safe base64 characters (a 32-byte hash)."""
    digest = hashlib.blake2b(seed.encode(), digest_size=32).digest()
    return "$" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


class Event:
    """One event, kept as its serialised form (without room_id, as /sync shows it) plus what lookups need."""

    __slots__ = ("event_id", "frag", "key", "membership", "pos", "sender", "type")

    def __init__(
        self, pos: int, type_: str, key: str | None, sender: str, eid: str, frag: bytes, membership: str | None
    ) -> None:
        self.pos = pos
        self.type = type_
        self.key = key
        self.sender = sender
        self.event_id = eid
        self.frag = frag
        self.membership = membership

    @property
    def content(self) -> dict[str, Any]:
        return json.loads(self.frag)["content"]  # type: ignore[no-any-return]

    def full(self, room_id: str) -> bytes:
        """The event as /state and /event show it (with room_id)."""
        return b'{"room_id":"' + room_id.encode() + b'",' + self.frag[1:]


class Room:
    def __init__(self, room_id: str, name: str) -> None:
        self.room_id = room_id
        self.name = name
        self.history: list[Event] = []
        self.state: dict[tuple[str, str], Event] = {}
        self._state_bytes: bytes | None = None

    def joined(self) -> list[str]:
        return [k for (t, k), e in self.state.items() if t == "m.room.member" and e.membership == "join"]

    def membership(self, user_id: str) -> str | None:
        event = self.state.get(("m.room.member", user_id))
        return event.membership if event else None

    def state_bytes(self) -> bytes:
        """The /state answer, kept until the state changes. Synapse formats these events for the legacy
        client API: with a top-level `age` and `user_id` besides what /sync shows."""
        if self._state_bytes is None:
            head = b'{"room_id":"' + self.room_id.encode() + b'","age":1000,"user_id":"'
            events = (head + e.sender.encode() + b'",' + e.frag[1:] for e in self.state.values())
            self._state_bytes = b"[" + b",".join(events) + b"]"
        return self._state_bytes

    def add(self, event: Event) -> None:
        self.history.append(event)
        if event.key is not None:
            self.state[(event.type, event.key)] = event
            self._state_bytes = None


def _levels(owner: str, bot: str) -> dict[str, Any]:
    """Synapse's default power levels for a private room, with the owner and the bot at 100."""
    return {
        "users": {owner: 100, bot: 100},
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 0,
        "historical": 100,
    }


class World:
    """The rooms, their histories, the stream position and who is who."""

    def __init__(self, rooms: int, members: int, users: int, seed: int, bot_token: str, owner_token: str) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.pos = 0
        self.ts = BASE_TS
        self.rooms: dict[str, Room] = {}
        self.bot = f"@spacesync:{SERVER_NAME}"
        self.owner = f"@owner:{SERVER_NAME}"
        self.tokens = {bot_token: self.bot, owner_token: self.owner}
        self.users = [f"@user{i:05d}:{SERVER_NAME}" for i in range(users)]
        self.changed = asyncio.Event()
        self.filters: dict[str, dict[str, Any]] = {}
        self.txns: dict[tuple[str, str], str] = {}
        self.built_pos = 0
        self.log: list[tuple[int, Room]] = []
        """(position, room) of every event after the world was built, in order: what incremental /sync reads."""
        started = time.monotonic()
        self.space = self._create("bench", space=True, join_rule={"join_rule": "public"})
        self.admin = self._create("admin", join_rule={"join_rule": "invite"})
        self._member(self.admin, self.bot, "join", self.bot, displayname="spacesync")
        # Restricted children: the allow list names the Space; members joined through it.
        allow = {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": self.space.room_id}]}
        self.children = [self._create(f"bench-{i}", join_rule=allow) for i in range(rooms)]
        for child in self.children:
            self._state(
                self.space, "m.space.child", child.room_id, self.owner, {"via": [SERVER_NAME], "suggested": False}
            )
        self._member(self.space, self.bot, "join", self.bot, displayname="spacesync")
        for user in self.users:
            self._member(self.space, user, "join", user, displayname=user[1:10])
        picker = random.Random(seed + 1)
        for child in self.children:
            self._member(child, self.bot, "join", self.bot, displayname="spacesync", via=self.owner)
            for index in sorted(picker.sample(range(users), min(members, users))):
                user = self.users[index]
                self._member(child, user, "join", user, displayname=user[1:10], via=self.owner, fast=True)
        self.built_pos = self.pos
        self.build_s = time.monotonic() - started

    # region building
    def _room_id(self) -> str:
        return "!" + "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(18))

    def _create(self, name: str, *, space: bool = False, join_rule: dict[str, Any]) -> Room:
        room = Room(self._room_id() + ":" + SERVER_NAME, name)
        self.rooms[room.room_id] = room
        create: dict[str, Any] = {"room_version": ROOM_VERSION, "creator": self.owner}
        if space:
            create["type"] = "m.space"
        self._state(room, "m.room.create", "", self.owner, create)
        self._member(room, self.owner, "join", self.owner, displayname="owner")
        self._state(room, "m.room.power_levels", "", self.owner, _levels(self.owner, self.bot))
        self._state(room, "m.room.join_rules", "", self.owner, join_rule)
        self._state(room, "m.room.history_visibility", "", self.owner, {"history_visibility": "shared"})
        self._state(room, "m.room.name", "", self.owner, {"name": name})
        return room

    def _next(self) -> tuple[int, int, str]:
        self.pos += 1
        if self.built_pos:
            self.ts = max(self.ts + 1, int(time.time() * 1000))
        else:
            self.ts += 7
        return self.pos, self.ts, event_id(f"{self.seed}:{self.pos}")

    def _member(
        self,
        room: Room,
        user: str,
        membership: str,
        sender: str,
        *,
        displayname: str | None = None,
        via: str | None = None,
        reason: str | None = None,
        fast: bool = False,
    ) -> Event:
        if fast:  # the common case while building: one f-string instead of json.dumps
            pos, ts, eid = self._next()
            frag = (
                f'{{"type":"m.room.member","sender":"{user}","content":{{"membership":"join",'
                f'"displayname":"{displayname}","join_authorised_via_users_server":"{via}"}},'
                f'"state_key":"{user}","origin_server_ts":{ts},"unsigned":{{"age":1000}},"event_id":"{eid}"}}'
            ).encode()
            event = Event(pos, "m.room.member", user, user, eid, frag, "join")
            room.add(event)
            return event
        content: dict[str, Any] = {"membership": membership}
        if displayname is not None:
            content["displayname"] = displayname
        if via is not None:
            content["join_authorised_via_users_server"] = via
        if reason:
            content["reason"] = reason
        return self._state(room, "m.room.member", user, sender, content)

    def _state(self, room: Room, type_: str, key: str, sender: str, content: dict[str, Any]) -> Event:
        return self._append(room, type_, sender, content, key)

    def _append(self, room: Room, type_: str, sender: str, content: dict[str, Any], key: str | None = None) -> Event:
        pos, ts, eid = self._next()
        event: dict[str, Any] = {"type": type_, "sender": sender, "content": content}
        if key is not None:
            event["state_key"] = key
        event["origin_server_ts"] = ts
        unsigned: dict[str, Any] = {"age": 0}
        previous = room.state.get((type_, key)) if key is not None else None
        if previous is not None:
            unsigned.update(
                replaces_state=previous.event_id, prev_content=previous.content, prev_sender=previous.sender
            )
        event["unsigned"] = unsigned
        event["event_id"] = eid
        membership = content.get("membership") if type_ == "m.room.member" else None
        stored = Event(pos, type_, key, sender, eid, dumps(event).encode(), membership)
        room.add(stored)
        if self.built_pos:
            self.log.append((pos, room))
            self.changed.set()
            self.changed = asyncio.Event()
        return stored

    # endregion

    # region acting
    def member_change(self, room: Room, sender: str, target: str, membership: str, reason: str | None = None) -> Event:
        return self._member(room, target, membership, sender, reason=reason)

    def send(self, room: Room, sender: str, type_: str, content: dict[str, Any], txn: str | None = None) -> str:
        if txn is not None and (sender, txn) in self.txns:
            return self.txns[sender, txn]
        eid = self._append(room, type_, sender, content).event_id
        if txn is not None:
            self.txns[sender, txn] = eid
        return eid

    # endregion

    def member_entries(self) -> int:
        return sum(1 for room in self.rooms.values() for (t, _) in room.state if t == "m.room.member")


# endregion


# region filters
def _matches(event_type: str, section: dict[str, Any]) -> bool:
    types = section.get("types")
    if isinstance(types, list) and not any(fnmatch.fnmatchcase(event_type, t) for t in types):
        return False
    not_types = section.get("not_types")
    return not (isinstance(not_types, list) and any(fnmatch.fnmatchcase(event_type, t) for t in not_types))


class Filter:
    """The parts of a sync filter that decide what spacesync gets."""

    def __init__(self, raw: dict[str, Any]) -> None:
        room = raw.get("room") if isinstance(raw.get("room"), dict) else {}
        self.timeline = room.get("timeline") if isinstance(room.get("timeline"), dict) else {}
        self.state = room.get("state") if isinstance(room.get("state"), dict) else {}
        limit = self.timeline.get("limit", 10)
        self.limit = limit if isinstance(limit, int) and limit >= 0 else 10
        self.lazy = self.state.get("lazy_load_members") is True
        self.rooms = room.get("rooms") if isinstance(room.get("rooms"), list) else None
        self.not_rooms = set(room.get("not_rooms") or [])

    def room_ok(self, room_id: str) -> bool:
        return (self.rooms is None or room_id in self.rooms) and room_id not in self.not_rooms

    def timeline_ok(self, event: Event) -> bool:
        return _matches(event.type, self.timeline)

    def state_ok(self, event: Event) -> bool:
        return _matches(event.type, self.state)


# endregion


# region the server
def _error(status: int, errcode: str, message: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": message}, status=status)


class SyntheticServer:
    def __init__(self, world: World, recorder: Recorder) -> None:
        self.world = world
        self.recorder = recorder

    def user(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else request.query.get("access_token", "")
        user = self.world.tokens.get(token)
        if user is None:
            raise web.HTTPUnauthorized(
                text=dumps({"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown access token"}),
                content_type="application/json",
            )
        return user

    def room(self, request: web.Request, user: str | None = None) -> Room:
        room = self.world.rooms.get(request.match_info["room"])
        if room is None or (user is not None and room.membership(user) != "join"):
            raise web.HTTPForbidden(
                text=dumps({"errcode": "M_FORBIDDEN", "error": "You are not in this room"}),
                content_type="application/json",
            )
        return room

    # region reading
    async def versions(self, request: web.Request) -> web.Response:
        versions = ["r0.6.1", *(f"v1.{i}" for i in range(1, 13))]
        return web.json_response({"versions": versions, "unstable_features": {}})

    async def whoami(self, request: web.Request) -> web.Response:
        return web.json_response({"user_id": self.user(request), "device_id": "SYNTHETIC", "is_guest": False})

    async def login(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.json_response({"flows": [{"type": "m.login.password"}]})
        body = await request.json()
        ident = body.get("identifier") or {}
        user = ident.get("user") or body.get("user")
        token = next((t for t, u in self.world.tokens.items() if u == user or u[1:].split(":")[0] == user), None)
        if token is None:
            return _error(403, "M_FORBIDDEN", "Invalid username or password")
        return web.json_response({"user_id": self.world.tokens[token], "access_token": token, "device_id": "SYNTHETIC"})

    async def joined_rooms(self, request: web.Request) -> web.Response:
        user = self.user(request)
        return web.json_response(
            {"joined_rooms": [r for r, room in self.world.rooms.items() if room.membership(user) == "join"]}
        )

    async def state(self, request: web.Request) -> web.Response:
        room = self.room(request, self.user(request))
        return web.Response(body=room.state_bytes(), content_type="application/json")

    async def state_event(self, request: web.Request) -> web.Response:
        room = self.room(request, self.user(request))
        event = room.state.get((request.match_info["type"], request.match_info.get("key", "")))
        if event is None:
            return _error(404, "M_NOT_FOUND", "Event not found")
        return web.Response(body=dumps(event.content).encode(), content_type="application/json")

    async def event(self, request: web.Request) -> web.Response:
        room = self.room(request, self.user(request))
        wanted = request.match_info["event"]
        for event in reversed(room.history):
            if event.event_id == wanted:
                return web.Response(body=event.full(room.room_id), content_type="application/json")
        return _error(404, "M_NOT_FOUND", "Event not found")

    async def members(self, request: web.Request) -> web.Response:
        room = self.room(request, self.user(request))
        only, not_ = request.query.get("membership"), request.query.get("not_membership")
        chunk = [
            e.full(room.room_id)
            for (t, _), e in room.state.items()
            if t == "m.room.member"
            and (only is None or e.membership == only)
            and (not_ is None or e.membership != not_)
        ]
        return web.Response(body=b'{"chunk":[' + b",".join(chunk) + b"]}", content_type="application/json")

    async def joined_members(self, request: web.Request) -> web.Response:
        room = self.room(request, self.user(request))
        joined = {u: {"display_name": u[1:10], "avatar_url": None} for u in room.joined()}
        return web.json_response({"joined": joined})

    async def hierarchy(self, request: web.Request) -> web.Response:
        root = self.room(request, self.user(request))
        limit = min(int(request.query.get("limit", "50")), 50)
        start = int(request.query.get("from", "0"))
        order = [
            root,
            *(self.world.rooms[k] for (t, k) in root.state if t == "m.space.child" and k in self.world.rooms),
        ]
        out = []
        for room in order[start : start + limit]:
            rules = room.state[("m.room.join_rules", "")].content
            entry: dict[str, Any] = {
                "room_id": room.room_id,
                "name": room.name,
                "num_joined_members": len(room.joined()),
                "world_readable": False,
                "guest_can_join": False,
                "join_rule": rules.get("join_rule"),
                "children_state": [
                    {"type": t, "state_key": k, "content": e.content, "sender": e.sender, "origin_server_ts": BASE_TS}
                    for (t, k), e in room.state.items()
                    if t == "m.space.child"
                ],
            }
            create = room.state[("m.room.create", "")].content
            if create.get("type"):
                entry["room_type"] = create["type"]
            allowed = [a.get("room_id") for a in rules.get("allow") or [] if isinstance(a, dict)]
            if allowed:
                entry["allowed_room_ids"] = allowed
            out.append(entry)
        body: dict[str, Any] = {"rooms": out}
        if start + limit < len(order):
            body["next_batch"] = str(start + limit)
        return web.json_response(body)

    async def directory(self, request: web.Request) -> web.Response:
        return _error(404, "M_NOT_FOUND", "Room alias not found")

    async def upload_filter(self, request: web.Request) -> web.Response:
        self.user(request)
        filter_id = str(len(self.world.filters))
        self.world.filters[filter_id] = await request.json()
        return web.json_response({"filter_id": filter_id})

    async def get_filter(self, request: web.Request) -> web.Response:
        raw = self.world.filters.get(request.match_info["id"])
        return web.json_response(raw) if raw is not None else _error(404, "M_NOT_FOUND", "No such filter")

    # endregion

    # region /sync
    def _filter(self, raw: str | None) -> Filter:
        if not raw:
            return Filter({})
        if raw.lstrip().startswith("{"):
            return Filter(json.loads(raw))
        if raw not in self.world.filters:
            raise web.HTTPBadRequest(
                text=dumps({"errcode": "M_UNKNOWN", "error": "No such filter"}), content_type="application/json"
            )
        return Filter(self.world.filters[raw])

    async def sync(self, request: web.Request) -> web.StreamResponse:
        user = self.user(request)
        flt = self._filter(request.query.get("filter"))
        since = request.query.get("since")
        world = self.world
        if since is None:
            rooms = [(room, room.history, "join") for room in world.rooms.values() if room.membership(user) == "join"]
            return await self._write(request, user, flt, rooms, initial=True, since=0)
        try:
            since_pos = int(since.lstrip("s"))
        except ValueError:
            return _error(400, "M_INVALID_PARAM", "Bad since token")
        timeout = min(int(request.query.get("timeout", "0")), 60_000) / 1000
        deadline = time.monotonic() + timeout
        while True:
            changed = self._since(since_pos, user)
            left = deadline - time.monotonic()
            if changed or left <= 0:
                break
            waiter = world.changed
            try:
                await asyncio.wait_for(waiter.wait(), left)
            except TimeoutError:
                pass
        return await self._write(request, user, flt, changed, initial=False, since=since_pos)

    def _since(self, since: int, user: str) -> list[tuple[Room, list[Event], str]]:
        """Per room the user is joined to, or has left since `since`, its events after `since` and its section."""
        log = self.world.log
        lo, hi = 0, len(log)
        while lo < hi:  # first entry after `since`
            mid = (lo + hi) // 2
            if log[mid][0] <= since:
                lo = mid + 1
            else:
                hi = mid
        by_room: dict[str, Room] = {}
        for _, room in log[lo:]:
            by_room.setdefault(room.room_id, room)
        out = []
        for room in by_room.values():
            events = [e for e in room.history[-(len(log) - lo) :] if e.pos > since]
            if room.membership(user) == "join":
                out.append((room, events, "join"))
                continue
            own = [i for i, e in enumerate(events) if e.type == "m.room.member" and e.key == user]
            if own:  # left, kicked or banned meanwhile: the room shows under `leave`, up to that event
                out.append((room, events[: own[-1] + 1], "leave"))
        return out

    async def _write(
        self,
        request: web.Request,
        user: str,
        flt: Filter,
        rooms: list[tuple[Room, list[Event], str]],
        *,
        initial: bool,
        since: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        written = 0

        async def out(chunk: bytes) -> None:
            nonlocal written
            written += len(chunk)
            await response.write(chunk)

        next_batch = f"s{self.world.pos}"
        await out(b'{"next_batch":"' + next_batch.encode() + b'"')
        sections = {
            name: [(room, events) for room, events, section in rooms if section == name and flt.room_ok(room.room_id)]
            for name in ("join", "leave")
        }
        opened = False
        for name, entries in sections.items():
            if not entries:
                continue
            await out((b"," if opened else b',"rooms":{') + b'"' + name.encode() + b'":{')
            opened = True
            for i, (room, events) in enumerate(entries):
                chunk = self._room_sync(room, events, user, flt, initial=initial, since=since)
                await out((b"," if i else b"") + chunk)  # one room at a time: the answer is streamed
            await out(b"}")
        if opened:
            await out(b"}")
        await out(
            b',"device_one_time_keys_count":{"signed_curve25519":0},'
            b'"org.matrix.msc2732.device_unused_fallback_key_types":[],"device_unused_fallback_key_types":[]}'
        )
        await response.write_eof()
        request["bytes"] = written
        return response

    def _room_sync(
        self, room: Room, events: list[Event], user: str, flt: Filter, *, initial: bool, since: int
    ) -> bytes:
        visible = [e for e in events if flt.timeline_ok(e)]
        timeline = visible[-flt.limit :] if flt.limit else []
        limited = len(visible) > len(timeline)
        in_timeline = {id(e) for e in timeline}
        senders = {e.sender for e in timeline} | {user}
        if initial:
            candidates: Iterable[Event] = room.state.values()
        elif limited:  # the state changes the timeline skipped, as they are now
            skipped = {(e.type, e.key) for e in visible[: len(visible) - len(timeline)] if e.key is not None}
            skipped |= {(e.type, e.key) for e in events if e.key is not None and not flt.timeline_ok(e)}
            candidates = (room.state[k] for k in skipped if k in room.state)
        else:
            candidates = (room.state[(e.type, e.key)] for e in events if e.key is not None and not flt.timeline_ok(e))
        state: list[bytes] = []
        for event in candidates:
            if id(event) in in_timeline or not flt.state_ok(event):
                continue
            if flt.lazy and event.type == "m.room.member" and event.key not in senders:
                continue
            state.append(event.frag)
        if flt.lazy and not initial:  # members of the timeline's senders, when not already shown
            shown = {e.key for e in timeline if e.type == "m.room.member"}
            for sender in sorted(senders - shown):
                member = room.state.get(("m.room.member", sender))
                if member is not None and member.pos <= since and flt.state_ok(member):
                    state.append(member.frag)
        prev = f"t{timeline[0].pos - 1 if timeline else self.world.pos}"
        parts = [
            b'"' + room.room_id.encode() + b'":{"timeline":{"events":[',
            b",".join(e.frag for e in timeline),
            b'],"prev_batch":"' + prev.encode() + b'","limited":' + (b"true" if limited else b"false"),
            b'},"state":{"events":[',
            b",".join(state),
            b']},"account_data":{"events":[]},"ephemeral":{"events":[]},',
            b'"unread_notifications":{"notification_count":0,"highlight_count":0}',
        ]
        if flt.lazy:
            joined = room.joined()
            heroes = [u for u in joined if u != user][:5]
            parts.append(
                b',"summary":'
                + dumps(
                    {"m.heroes": heroes, "m.joined_member_count": len(joined), "m.invited_member_count": 0}
                ).encode()
            )
        parts.append(b"}")
        return b"".join(parts)

    # endregion

    # region acting
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(
                text=dumps({"errcode": "M_NOT_JSON", "error": "Content not JSON."}), content_type="application/json"
            )
        return body

    async def membership(self, request: web.Request) -> web.Response:
        user = self.user(request)
        action = request.match_info["action"]
        room = self.room(request)
        body = await self._body(request)
        reason = body.get("reason") if isinstance(body.get("reason"), str) else None
        if action in ("leave", "join"):
            target = user
        else:
            target = body.get("user_id")
            if room.membership(user) != "join":
                return _error(403, "M_FORBIDDEN", "You are not in this room")
        if not isinstance(target, str):
            return _error(400, "M_MISSING_PARAM", "Missing user_id")
        current = room.membership(target)
        if action == "kick":
            if current not in ("join", "invite", "knock"):
                return _error(403, "M_FORBIDDEN", "The target user is not in the room")
            self.world.member_change(room, user, target, "leave", reason)
        elif action == "ban":
            if current != "ban":
                self.world.member_change(room, user, target, "ban", reason)
        elif action == "unban":
            if current == "ban":
                self.world.member_change(room, user, target, "leave", reason)
        elif action == "invite":
            if current == "join":
                return _error(403, "M_FORBIDDEN", f"{target} is already in the room.")
            self.world.member_change(room, user, target, "invite", reason)
        elif action == "leave":
            if current in ("join", "invite", "knock"):
                self.world.member_change(room, user, target, "leave", reason)
        elif action == "join" and current != "join":
            self.world.member_change(room, user, target, "join", reason)
        if action == "join":
            return web.json_response({"room_id": room.room_id})
        return web.json_response({})

    async def join_alias(self, request: web.Request) -> web.Response:
        user = self.user(request)
        room = self.world.rooms.get(request.match_info["room"])
        if room is None:
            return _error(404, "M_NOT_FOUND", "No known servers")
        if room.membership(user) != "join":
            self.world.member_change(room, user, user, "join")
        return web.json_response({"room_id": room.room_id})

    async def put_state(self, request: web.Request) -> web.Response:
        user = self.user(request)
        room = self.room(request, user)
        body = await self._body(request)
        key = request.match_info.get("key", "")
        event = self.world._state(room, request.match_info["type"], key, user, body)
        return web.json_response({"event_id": event.event_id})

    async def send(self, request: web.Request) -> web.Response:
        user = self.user(request)
        room = self.room(request, user)
        body = await self._body(request)
        eid = self.world.send(room, user, request.match_info["type"], body, request.match_info["txn"])
        return web.json_response({"event_id": eid})

    async def redact(self, request: web.Request) -> web.Response:
        user = self.user(request)
        room = self.room(request, user)
        body = await self._body(request)
        content = {"redacts": request.match_info["event"], **body}
        eid = self.world.send(room, user, "m.room.redaction", content, request.match_info["txn"])
        return web.json_response({"event_id": eid})

    async def messages(self, request: web.Request) -> web.Response:
        room = self.room(request, self.user(request))
        limit = min(int(request.query.get("limit", "10")), 1000)
        start = int(request.query.get("from", str(len(room.history))).lstrip("m"))
        chunk = list(reversed(room.history[max(0, start - limit) : start]))
        end = max(0, start - limit)
        body = b'{"chunk":[' + b",".join(e.full(room.room_id) for e in chunk) + b'],"start":"m' + str(start).encode()
        body += (b'","end":"m' + str(end).encode() + b'"}') if end > 0 else b'"}'
        return web.Response(body=body, content_type="application/json")

    # endregion

    # region the benchmark's control API
    async def bench_info(self, request: web.Request) -> web.Response:
        w = self.world
        return web.json_response(
            {
                "space": w.space.room_id,
                "admin": w.admin.room_id,
                "children": [r.room_id for r in w.children],
                "bot": w.bot,
                "owner": w.owner,
                "users": len(w.users),
                "member_entries": w.member_entries(),
                "build_s": w.build_s,
            }
        )

    async def bench_user(self, request: web.Request) -> web.Response:
        """A world user's id and the children it is joined to."""
        user = self.world.users[int(request.query["index"])]
        rooms = [r.room_id for r in self.world.children if r.membership(user) == "join"]
        return web.json_response({"user_id": user, "rooms": rooms})

    async def bench_leave(self, request: web.Request) -> web.Response:
        """Users leave a room by themselves (POST {room, users})."""
        body = await request.json()
        room = self.world.rooms[body["room"]]
        for user in body["users"]:
            if room.membership(user) == "join":
                self.world.member_change(room, user, user, "leave")
        return web.json_response({"t": time.monotonic(), "pos": self.world.pos})

    async def bench_send(self, request: web.Request) -> web.Response:
        """A user says something (POST {room, sender, body})."""
        body = await request.json()
        room = self.world.rooms[body["room"]]
        eid = self.world.send(room, body["sender"], "m.room.message", {"msgtype": "m.text", "body": body["body"]})
        return web.json_response({"t": time.monotonic(), "event_id": eid})

    async def bench_membership(self, request: web.Request) -> web.Response:
        room = self.world.rooms[request.query["room"]]
        return web.json_response({"membership": room.membership(request.query["user"])})

    # endregion

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.recorder.middleware], client_max_size=64 * 1024 * 1024)
        c = "/_matrix/client/{version:(?:v3|r0|v1)}"
        room = c + "/rooms/{room}"
        app.add_routes(
            [
                web.get("/_matrix/client/versions", self.versions),
                web.get(c + "/account/whoami", self.whoami),
                web.get(c + "/login", self.login),
                web.post(c + "/login", self.login),
                web.get(c + "/sync", self.sync),
                web.get(c + "/joined_rooms", self.joined_rooms),
                web.get(room + "/state", self.state),
                web.get(room + "/state/{type}", self.state_event),
                web.get(room + "/state/{type}/{key:.*}", self.state_event),
                web.put(room + "/state/{type}", self.put_state),
                web.put(room + "/state/{type}/{key:.*}", self.put_state),
                web.get(room + "/event/{event}", self.event),
                web.get(room + "/members", self.members),
                web.get(room + "/joined_members", self.joined_members),
                web.get(room + "/messages", self.messages),
                web.get(room + "/hierarchy", self.hierarchy),
                web.post(room + "/{action:(?:kick|ban|unban|invite|leave|join)}", self.membership),
                web.post(c + "/join/{room}", self.join_alias),
                web.put(room + "/send/{type}/{txn}", self.send),
                web.put(room + "/redact/{event}/{txn}", self.redact),
                web.post(c + "/user/{user}/filter", self.upload_filter),
                web.get(c + "/user/{user}/filter/{id}", self.get_filter),
                web.get(c + "/directory/room/{alias}", self.directory),
                web.get("/_bench/info", self.bench_info),
                web.get("/_bench/user", self.bench_user),
                web.post("/_bench/leave", self.bench_leave),
                web.post("/_bench/send", self.bench_send),
                web.get("/_bench/membership", self.bench_membership),
                *self.recorder.routes(),
            ]
        )

        async def unknown(request: web.Request) -> web.Response:
            return _error(404, "M_UNRECOGNIZED", "Unrecognized request")

        app.router.add_route("*", "/{tail:.*}", unknown)
        return app


# endregion


# region the recording proxy
def proxy_app(upstream: str, recorder: Recorder) -> web.Application:
    """Forwards everything to `upstream` and records it as the synthetic server does.

    `POST /_bench/hold_sync` holds the bot's /sync until `POST /_bench/release_sync`: an answer that arrives
    meanwhile is dropped and the same request (same `since`) is sent again after the release, so what
    happened in between reaches the bot in one answer, as an injected change does on the synthetic server."""
    state: dict[str, ClientSession] = {}
    released = asyncio.Event()
    released.set()

    async def start(_: web.Application) -> None:
        state["session"] = ClientSession(timeout=ClientTimeout(total=None, sock_connect=10), auto_decompress=False)

    async def stop(_: web.Application) -> None:
        await state["session"].close()

    async def hold(_: web.Request) -> web.Response:
        released.clear()
        return web.json_response({})

    async def release(_: web.Request) -> web.Response:
        released.set()
        return web.json_response({"t": time.monotonic()})

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.read() if request.can_read_body else None
        gated = request.raw_path.split("?")[0].endswith("/sync") and recorder.who(request) == "bot"
        path = request.raw_path
        while True:
            if gated:
                await released.wait()
            async with state["session"].request(request.method, upstream + path, headers=headers, data=body) as resp:
                data = await resp.read()
                if gated and not released.is_set():
                    # Held meanwhile: ask again, with the same since, after the release. Synapse keeps a /sync
                    # answer for its (since, timeout, ...) for a while: another timeout gets a fresh one.
                    timeout = "1" if request.query.get("timeout") == "0" else "0"
                    path = str(request.rel_url.update_query(timeout=timeout))
                    continue
                hop = ("content-length", "transfer-encoding", "connection")
                keep = {k: v for k, v in resp.headers.items() if k.lower() not in hop}
                return web.Response(status=resp.status, body=data, headers=keep)

    app = web.Application(middlewares=[recorder.middleware], client_max_size=64 * 1024 * 1024)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.add_routes([*recorder.routes(), web.post("/_bench/hold_sync", hold), web.post("/_bench/release_sync", release)])
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


# endregion


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="mode", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--rooms", type=int, default=1000)
    serve.add_argument("--members", type=int, default=1000)
    serve.add_argument("--users", type=int, default=10000)
    serve.add_argument("--seed", type=int, default=1)
    serve.add_argument("--owner-token", required=True)
    proxy = sub.add_parser("proxy")
    proxy.add_argument("--upstream", required=True)
    for p in (serve, proxy):
        p.add_argument("--bot-token", required=True)
        p.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode == "serve" and (args.members > args.users or min(args.rooms, args.members, args.users) < 0):
        parser.error("--members must be at most --users, and none negative")

    async def run() -> None:
        recorder = Recorder(args.bot_token)
        if args.mode == "serve":
            world = World(args.rooms, args.members, args.users, args.seed, args.bot_token, args.owner_token)
            for room in world.rooms.values():
                room.state_bytes()  # serialised once now, not during the measurement
            app = SyntheticServer(world, recorder).app()
        else:
            app = proxy_app(args.upstream.rstrip("/"), recorder)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
        await site.start()
        port = runner.addresses[0][1]
        print(f"ready http://127.0.0.1:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    _main(sys.argv[1:])
