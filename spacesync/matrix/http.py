"""mautrix's HTTP layer with what it lacks: retry_after_ms on 429 answers and request-latency metrics."""

from __future__ import annotations

import json
import time
from contextvars import ContextVar
from json import JSONDecodeError
from typing import Any

import attrs
import orjson
from aiohttp import ClientResponse, ContentTypeError
from mautrix.api import HTTPAPI, Method
from mautrix.errors import MatrixRequestError, make_request_error
from mautrix.types import JSON
from yarl import URL

from ..metrics import BYTES_READ, REQUEST_LATENCY


def loads(body: bytes) -> Any:
    """A homeserver's JSON answer. orjson reads a big /state answer in about half the standard library's time;
    what it refuses and the standard library reads (a lone surrogate escape in someone's display name, NaN)
    is read the standard library's way, so no answer readable before becomes unreadable."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def retry_after_ms(error: BaseException) -> int | None:
    """The wait a 429 asked for, when the homeserver said one."""
    return getattr(error, "retry_after_ms", None)


@attrs.define
class ReadMeter:
    """Bytes and requests of the answers read while it is current (see METER)."""

    bytes: int = 0
    requests: int = 0


METER: ContextVar[ReadMeter | None] = ContextVar("spacesync_read_meter", default=None)
"""Set around a piece of work (a reconcile's walk): every answer read by it, and by the tasks it starts, counts."""


def request_kind(path: str) -> str:
    """The class of a request for the bytes-read metric."""
    if path.endswith("/sync"):
        return "sync"
    if path.endswith("/joined_rooms"):
        return "joined_rooms"
    if path.endswith("/hierarchy"):
        return "hierarchy"
    if path.endswith("/state"):
        return "state"
    return "other"


def count_read(path: str, size: int) -> None:
    BYTES_READ.labels(kind=request_kind(path)).inc(size)
    meter = METER.get()
    if meter is not None:
        meter.bytes += size
        meter.requests += 1


class SpacesyncHTTPAPI(HTTPAPI):
    """Keeps the 429 body's `retry_after_ms` (or the Retry-After header) on the raised error, and counts the
    bytes of every answer."""

    async def _send(
        self,
        method: Method,
        url: URL,
        content,
        query_params: dict[str, str],
        headers: dict[str, str],
    ) -> tuple[JSON, ClientResponse]:
        start = time.monotonic()
        status = "error"
        try:
            async with self.session.request(
                str(method), url, data=content, params=query_params, headers=headers
            ) as response:
                status = f"{response.status // 100}xx"
                body = await response.read()
                count_read(url.path, len(body))
                if 200 <= response.status < 300:
                    try:
                        return loads(body), response
                    except ValueError as e:  # a transport-class failure, as aiohttp's response.json() gives
                        raise ContentTypeError(
                            response.request_info, response.history, message=f"answer is not JSON: {e}"
                        ) from e
                text = body.decode("utf-8", "replace")
                errcode = message = unstable = None
                data: dict = {}
                try:
                    data = json.loads(text)
                    errcode, message = data["errcode"], data["error"]
                    unstable = data.get("org.matrix.msc3848.unstable.errcode")
                except (JSONDecodeError, ContentTypeError, KeyError, TypeError):
                    pass
                error: MatrixRequestError = make_request_error(
                    http_status=response.status,
                    text=text,
                    errcode=errcode,
                    message=message,
                    unstable_errcode=unstable,
                )
                if response.status == 429:
                    wait = data.get("retry_after_ms") if isinstance(data, dict) else None
                    if not isinstance(wait, int):
                        header = response.headers.get("Retry-After", "")
                        wait = int(header) * 1000 if header.isdigit() else None
                    error.retry_after_ms = wait  # type: ignore[attr-defined]
                raise error
        finally:
            REQUEST_LATENCY.labels(method=str(method), status=status).observe(time.monotonic() - start)
