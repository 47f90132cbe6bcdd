"""HTTP endpoints for operators: /health (alive), /ready (able to act) and /metrics (Prometheus)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import REGISTRY, SYNC_LAG

if TYPE_CHECKING:
    from .engine.runtime import App


def make_app(app: App) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "uptime_s": round(time.time() - app.started_at, 1)})

    async def ready(_: web.Request) -> web.Response:
        problems = []
        if not app.leader:
            problems.append(app.standby_reason)
            if app.transport is not None:
                problems.append(
                    "appservice: transactions answered 503 until this instance leads; the homeserver retries"
                )
        elif app.transport is not None and not app.transport.taking:
            problems.append("appservice: not taking transactions yet")
        elif not app.logged_in:
            problems.append("not logged in yet")
        elif not app.homeserver_up:
            problems.append("homeserver unreachable")
        elif not app.synced:
            problems.append("no /sync answer yet")
        if app.crypto.problem:
            problems.append(app.crypto.problem)
        if not await app.store.ping():
            problems.append("database unreachable")
        limited = await app.rate_limit() if not problems else None
        details = {"rate_limited": limited.details()} if limited is not None else {}
        if problems:
            return web.json_response({"status": "unready", "reasons": problems}, status=503)
        return web.json_response({"status": "ready", **details})

    async def metrics(_: web.Request) -> web.Response:
        if app.last_sync_at is not None:
            SYNC_LAG.set(max(0.0, time.time() - app.last_sync_at))
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    web_app = web.Application()
    web_app.router.add_get("/health", health)
    web_app.router.add_get("/ready", ready)
    web_app.router.add_get("/metrics", metrics)
    return web_app


async def start_web(app: App, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(app), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
