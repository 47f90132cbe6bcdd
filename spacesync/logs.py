"""structlog setup: JSON lines in containers, a readable console on a TTY, stdlib loggers routed through it."""

from __future__ import annotations

import logging
import sys

import structlog

_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def setup_logging(level: str = "INFO", fmt: str = "auto", stream=None) -> None:
    """Configure structlog and the stdlib root logger (mautrix, aiohttp) to share one renderer."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder(allow={"matrix_http_request"})],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("spacesync.http", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
    # asyncpg's pool logs a traceback every retry while the database is away; spacesync says it once.
    logging.getLogger("asyncpg.pool").setLevel(max(logging.ERROR, root.level))
