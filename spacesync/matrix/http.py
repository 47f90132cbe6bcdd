"""mautrix's HTTP layer with what it lacks: retry_after_ms on 429 answers and request-latency metrics."""

from __future__ import annotations

import json
import time
from json import JSONDecodeError

from aiohttp import ClientResponse, ContentTypeError
from mautrix.api import HTTPAPI, Method
from mautrix.errors import MatrixRequestError, make_request_error
from mautrix.types import JSON
from yarl import URL

from ..metrics import REQUEST_LATENCY


def retry_after_ms(error: BaseException) -> int | None:
    """The wait a 429 asked for, when the homeserver said one."""
    return getattr(error, "retry_after_ms", None)


class SpacesyncHTTPAPI(HTTPAPI):
    """Keeps the 429 body's `retry_after_ms` (or the Retry-After header) on the raised error."""

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
                if 200 <= response.status < 300:
                    return await response.json(), response
                text = await response.text()
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
