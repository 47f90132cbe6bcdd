"""The exceptions a homeserver request can end in, named once for every retry and error path."""

from __future__ import annotations

from aiohttp import ClientError
from mautrix.errors import MatrixConnectionError, MatrixRequestError

TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (MatrixConnectionError, ClientError, TimeoutError, OSError)
"""The homeserver could not be reached or did not answer in time (no HTTP answer to judge)."""

REQUEST_ERRORS: tuple[type[BaseException], ...] = (MatrixRequestError, *TRANSPORT_ERRORS)
"""Any failed request: an error answer from the homeserver, or no answer at all."""


class StateUnknown(Exception):
    """A room's state could not be read (after a few tries): what depends on it is unknown, never assumed."""
