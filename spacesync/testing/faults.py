"""Fault-injecting proxies for the test bed: what a real homeserver or database cannot do on demand.

Tests run against a real Synapse and a real PostgreSQL. Some behaviour only shows when those
misbehave: rate-limit storms, 5xx answers, requests that never come back, answers that arrive late,
dropped connections, malformed JSON, a database that goes away. The proxies here sit in front of the
real servers and misbehave on request, passing everything else through untouched.

`FaultProxy` is an HTTP reverse proxy in front of a homeserver. Rules pick requests by method and a
regular expression on the (decoded) path; the first matching rule that still has uses left applies
its fault, every other request is forwarded. The faults:

- `Respond`: answer without forwarding (429 with ``retry_after_ms``, 500/502/503, 403 ``M_FORBIDDEN``)
  to test back-off, retries and error reporting.
- `Hang`: hold the request unanswered for a while, then forward it (or hold it until the client gives
  up or the rule is removed) to test client timeouts and work that stalls.
- `DelayResponse`: forward at once but hold the answer back, so the client gets a read older than
  changes made meanwhile (stale reads, races between a read and a write).
- `Drop`: close the connection without any answer (the client sees a disconnect).
- `Rewrite`: forward, then pass the JSON answer through a function (malformed or surprising answers).

Every request is logged (method, path, rule applied, status) for assertions::

    async with FaultProxy(synapse.url) as proxy:          # or the `fault_proxy` fixture
        rule = proxy.rate_limit(r"/rooms/[^/]+/kick$", retry_after_ms=1500, times=3)
        proxy.delay_response(rf"/rooms/{re.escape(room_id)}/state$", 2.0, method="GET")
        ...                                                # point the client at proxy.url
        assert proxy.count(r"/kick$", method="POST") == 4
        rule.remove()

aiohttp clients (mautrix among them) resend an idempotent request once after a disconnect: to make
them see a `Drop`, drop at least two.

`TcpProxy` is a plain TCP relay in front of a database: `cut()` breaks every live connection, and
`refuse()` makes new connections fail at once until `accept()`.

Only for tests: both proxies bind to 127.0.0.1 on a free port and never to another interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import attrs
import structlog
from aiohttp import web
from yarl import URL

from .service import Service

__all__ = [
    "DelayResponse",
    "Drop",
    "Fault",
    "FaultProxy",
    "Hang",
    "LoggedRequest",
    "Respond",
    "Rewrite",
    "Rule",
    "TcpProxy",
]

log = structlog.get_logger("spacesync.testing")

LOOPBACK: Final = "127.0.0.1"
_CHUNK: Final = 64 * 1024
# Per connection, not end-to-end, so never passed on (RFC 9110 section 7.6.1); plus Host (the
# upstream's own), Content-Length (recomputed) and Content-Encoding (aiohttp decompresses answers).
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
    }
)

JSONValue = Any
Headers = list[tuple[str, str]]


def _end_to_end(headers: Mapping[str, str]) -> Headers:
    """The headers to pass on, repeated ones kept."""
    return [(key, value) for key, value in headers.items() if key.lower() not in _HOP_BY_HOP]


# Faults


@attrs.frozen
class Respond:
    """Answer with `status` and a JSON body without forwarding the request.

    A 429 whose body has ``retry_after_ms`` also gets a ``Retry-After`` header in whole seconds
    (rounded up), unless `headers` sets one.
    """

    status: int
    body: JSONValue = attrs.field(factory=dict)
    headers: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Hang:
    """Hold the request unanswered for `seconds`, then forward it.

    With ``seconds=None`` the request is held until the client gives up, the rule is removed (then it
    is forwarded) or the proxy stops.
    """

    seconds: float | None = None


@attrs.frozen
class DelayResponse:
    """Forward at once, then hold the upstream's answer for `seconds` before returning it."""

    seconds: float


@attrs.frozen
class Drop:
    """Close the client's connection without any answer; nothing is forwarded.

    aiohttp clients (mautrix among them) resend an idempotent request (GET, PUT, DELETE) once when
    the connection drops, so a single drop of those goes unnoticed: use ``times=2`` or more.
    """


@attrs.frozen
class Rewrite:
    """Forward, then return ``fn(upstream JSON)`` instead of the upstream's body.

    `fn` may return any JSON value, or `bytes` to send as they are (e.g. a truncated document).
    The status and headers are the upstream's.
    """

    fn: Callable[[JSONValue], JSONValue | bytes]


Fault = Respond | Hang | DelayResponse | Drop | Rewrite


@attrs.define(eq=False)
class Rule:
    """A fault applied to requests matching `method` (any when None) and the `path` regex.

    Applies to the first `times` matching requests (every one when None); after that it is skipped.
    """

    fault: Fault
    path: re.Pattern[str]
    method: str | None = None
    times: int | None = None
    _proxy: FaultProxy | None = attrs.field(default=None, repr=False)
    hits: int = attrs.field(default=0, init=False)
    """How many requests this rule has been applied to."""
    _removed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False, repr=False)

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and self.path.search(path) is not None

    def remove(self) -> None:
        """Stop applying this rule; requests it holds with `Hang` are forwarded now."""
        if self._proxy is not None:
            self._proxy._rules = [rule for rule in self._proxy._rules if rule is not self]
            self._proxy = None
        self._removed.set()


@attrs.define(eq=False)
class LoggedRequest:
    """One request seen by a `FaultProxy`, logged as soon as it arrives."""

    method: str
    path: str
    """Decoded, without the query string."""
    at: float
    """`time.time()` when the request arrived."""
    rule: Rule | None = None
    """The rule applied, or None when the request was passed through."""
    upstream_status: int | None = None
    """The upstream's status, once it answered; None while waiting or when not forwarded."""
    status: int | None = None
    """The status returned to the client; None while pending, when dropped or abandoned."""


# HTTP proxy


class FaultProxy(Service):
    """A reverse proxy on 127.0.0.1 in front of `upstream` (a homeserver URL) that injects faults."""

    def __init__(self, upstream: str, *, port: int = 0, tls: tuple[Path, Path] | None = None) -> None:
        """`port`: where to listen (0: any free port). `tls`: a certificate and its key, to serve HTTPS (in
        front of a federation listener); an ``https`` upstream's certificate is then not checked."""
        self.upstream = upstream.rstrip("/")
        self.tls = tls
        self.log: list[LoggedRequest] = []
        self._rules: list[Rule] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port: int | None = port or None
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the fault proxy has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    @property
    def in_flight(self) -> int:
        """Requests being handled now: held, waiting for the upstream or being answered."""
        return len(self._handlers)

    async def start(self) -> None:
        # No timeout towards the upstream: /sync long-polls take as long as the client asked for.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Cancel the handler when the client goes away, so a hung request does not outlive it.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.tls)
        site = web.TCPSite(self._runner, LOOPBACK, self._port or 0, ssl_context=context)
        await site.start()
        self._port = self._runner.addresses[0][1]
        log.debug("fault proxy started", url=self.url, upstream=self.upstream)

    async def stop(self) -> None:
        """Abandon held requests, close the listener and the upstream session."""
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # Rules

    def add_rule(
        self, fault: Fault, path: str | re.Pattern[str] = "", *, method: str | None = None, times: int | None = None
    ) -> Rule:
        """Apply `fault` to requests whose path matches the regex `path` (searched, so ``""`` matches all).

        Rules are tried in the order they were added; the first that matches and has uses left wins.
        """
        if times is not None and times < 1:
            raise ValueError(f"times must be a positive number of requests or None, not {times!r}")
        rule = Rule(fault, re.compile(path), method.upper() if method else None, times, proxy=self)
        self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule; held requests are forwarded."""
        for rule in list(self._rules):
            rule.remove()

    def respond(
        self,
        path: str | re.Pattern[str],
        status: int,
        body: JSONValue = None,
        *,
        headers: Mapping[str, str] | None = None,
        method: str | None = None,
        times: int | None = None,
    ) -> Rule:
        return self.add_rule(
            Respond(status, {} if body is None else body, headers or {}), path, method=method, times=times
        )

    def rate_limit(
        self,
        path: str | re.Pattern[str],
        *,
        retry_after_ms: int = 1000,
        method: str | None = None,
        times: int | None = 1,
    ) -> Rule:
        """Answer 429 ``M_LIMIT_EXCEEDED`` with `retry_after_ms` and ``Retry-After``."""
        body = {"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests", "retry_after_ms": retry_after_ms}
        return self.respond(path, 429, body, method=method, times=times)

    def fail(
        self, path: str | re.Pattern[str], *, status: int = 502, method: str | None = None, times: int | None = None
    ) -> Rule:
        """Answer a server error (``M_UNKNOWN``), as an overloaded homeserver or its gateway would."""
        body = {"errcode": "M_UNKNOWN", "error": f"Injected HTTP {status}"}
        return self.respond(path, status, body, method=method, times=times)

    def forbid(
        self,
        path: str | re.Pattern[str],
        *,
        error: str = "Forbidden",
        method: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Answer 403 ``M_FORBIDDEN``."""
        return self.respond(path, 403, {"errcode": "M_FORBIDDEN", "error": error}, method=method, times=times)

    def hang(
        self,
        path: str | re.Pattern[str],
        seconds: float | None = None,
        *,
        method: str | None = None,
        times: int | None = None,
    ) -> Rule:
        return self.add_rule(Hang(seconds), path, method=method, times=times)

    def delay_response(
        self, path: str | re.Pattern[str], seconds: float, *, method: str | None = None, times: int | None = None
    ) -> Rule:
        return self.add_rule(DelayResponse(seconds), path, method=method, times=times)

    def drop(self, path: str | re.Pattern[str], *, method: str | None = None, times: int | None = None) -> Rule:
        return self.add_rule(Drop(), path, method=method, times=times)

    def rewrite(
        self,
        path: str | re.Pattern[str],
        fn: Callable[[JSONValue], JSONValue | bytes],
        *,
        method: str | None = None,
        times: int | None = None,
    ) -> Rule:
        return self.add_rule(Rewrite(fn), path, method=method, times=times)

    # Request log

    def requests(self, path: str | re.Pattern[str] = "", method: str | None = None) -> list[LoggedRequest]:
        """Logged requests whose path matches the regex `path` (and `method`, when given), oldest first."""
        pattern = re.compile(path)
        wanted = method.upper() if method else None
        return [
            entry for entry in self.log if (wanted is None or entry.method == wanted) and pattern.search(entry.path)
        ]

    def count(self, path: str | re.Pattern[str] = "", method: str | None = None) -> int:
        return len(self.requests(path, method))

    def reset_log(self) -> None:
        self.log.clear()

    # Forwarding

    def _pick(self, method: str, path: str) -> Rule | None:
        for rule in self._rules:
            if not rule.exhausted and rule.matches(method, path):
                rule.hits += 1
                return rule
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        entry = LoggedRequest(request.method, request.path, time.time())
        self.log.append(entry)
        try:
            entry.rule = rule = self._pick(request.method, request.path)
            if rule is not None:
                log.debug("fault injected", method=request.method, path=request.path, fault=rule.fault)
            response = await self._apply(request, entry, rule)
            if response is not None:
                entry.status = response.status
                return response
            # Drop: close the connection; aiohttp then fails to write the response and moves on.
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        finally:
            self._handlers.discard(task)

    async def _apply(self, request: web.Request, entry: LoggedRequest, rule: Rule | None) -> web.Response | None:
        fault = rule.fault if rule is not None else None
        match fault:
            case Respond(status=status, body=body, headers=canned):
                extra = dict(canned)
                if (
                    status == 429
                    and isinstance(body, dict)
                    and isinstance(body.get("retry_after_ms"), int | float)
                    and not any(key.lower() == "retry-after" for key in extra)
                ):
                    extra["Retry-After"] = str(math.ceil(body["retry_after_ms"] / 1000))
                return web.json_response(body, status=status, headers=extra)
            case Drop():
                return None
            case Hang(seconds=seconds):
                assert rule is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rule._removed.wait(), seconds)
        status, headers, body = await self._forward(request)
        entry.upstream_status = status
        match fault:
            case DelayResponse(seconds=seconds):
                await asyncio.sleep(seconds)
            case Rewrite(fn=fn):
                try:
                    document = json.loads(body)
                except ValueError:
                    error = (
                        f"fault proxy: cannot rewrite the answer to {request.method} {request.path}: "
                        f"the upstream's HTTP {status} body is not JSON; narrow the rule's path or method"
                    )
                    log.warning("fault proxy rewrite skipped", method=request.method, path=request.path)
                    return web.json_response({"errcode": "M_UNKNOWN", "error": error}, status=502)
                result = fn(document)
                body = result if isinstance(result, bytes) else json.dumps(result).encode()
        return web.Response(status=status, headers=headers, body=body)

    async def _forward(self, request: web.Request) -> tuple[int, Headers, bytes]:
        """Send the request on to the upstream: same method, path, query, headers (Host aside) and body."""
        assert self._session is not None
        headers = _end_to_end(request.headers)
        body = await request.read()
        url = URL(self.upstream + request.raw_path, encoded=True)
        try:
            async with self._session.request(
                request.method, url, headers=headers, data=body or None, allow_redirects=False, ssl=False
            ) as upstream:
                answer = await upstream.read()
                reply = _end_to_end(upstream.headers)
                return upstream.status, reply, answer
        except aiohttp.ClientError as exc:
            log.warning("fault proxy upstream unreachable", upstream=self.upstream, error=repr(exc))
            error = {"errcode": "M_UNKNOWN", "error": f"fault proxy: upstream {self.upstream} unreachable: {exc}"}
            return 502, [("Content-Type", "application/json")], json.dumps(error).encode()


# TCP proxy


@attrs.define(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter

    def cut(self) -> None:
        self.client.transport.abort()
        self.upstream.transport.abort()


class TcpProxy(Service):
    """A TCP relay on 127.0.0.1 in front of `host:port` (e.g. PostgreSQL) that can cut and refuse."""

    def __init__(self, host: str = LOOPBACK, port: int = 5432) -> None:
        self.upstream_host = host
        self.upstream_port = port
        self.refusing = False
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the TCP proxy has not been started yet")
        return self._port

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def connections(self) -> int:
        """Live relayed connections."""
        return len(self._links)

    def dsn(self, url: str) -> str:
        """`url` (e.g. ``postgresql://postgres@127.0.0.1:5432/db``) pointed at this proxy instead."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{self.address}" if userinfo else self.address
        return parts._replace(netloc=netloc).geturl()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self._port = self._server.sockets[0].getsockname()[1]
        log.debug("tcp proxy started", address=self.address, upstream=f"{self.upstream_host}:{self.upstream_port}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._pumps:
            await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def cut(self) -> None:
        """Close every live connection, on both sides, at once (as a crashed server or network would)."""
        for link in list(self._links):
            link.cut()
        self._links.clear()

    def refuse(self) -> None:
        """Make new connections fail: accept, then close at once, until `accept()`."""
        self.refusing = True

    def accept(self) -> None:
        """Relay new connections again."""
        self.refusing = False

    resume = accept

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError as exc:
            log.warning(
                "tcp proxy upstream unreachable", upstream=f"{self.upstream_host}:{self.upstream_port}", error=repr(exc)
            )
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        pumps = [asyncio.create_task(self._pump(reader, up_writer)), asyncio.create_task(self._pump(up_reader, writer))]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            link.cut()
            self._links.discard(link)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps.difference_update(pumps)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
