"""The local HTTP status endpoint (SYNC_STATUS_ADDRESS): /health, /status, /metrics.

It reads the app's in-memory state only, never the database, so it answers even while
the database is down, which is exactly when an operator asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon import health
from daemon.errors import ConfigError
from daemon.metrics import Metrics

SNAPSHOT: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("snapshot")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")


async def _health(request: web.Request) -> web.Response:
    snapshot = request.app[SNAPSHOT]()
    # healthy and warning answer 200; degraded, unhealthy and stopped 503 (daemon.health).
    code = 200 if snapshot["health"] in health.SERVING else 503
    return web.json_response(
        {"health": snapshot["health"], "reasons": snapshot["health_reasons"]}, status=code
    )


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[SNAPSHOT](), dumps=_dumps)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, default=str)


async def start(
    address: tuple[str, int], snapshot: Callable[[], dict[str, Any]], metrics: Metrics
) -> tuple[web.AppRunner, int]:
    """Bind the status server; an address that cannot be bound is a configuration error."""
    app = web.Application()
    app[SNAPSHOT] = snapshot
    app[METRICS] = metrics
    app.router.add_get("/health", _health)
    app.router.add_get("/status", _status)
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, address[0], address[1])
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"SYNC_STATUS_ADDRESS: cannot listen on {address[0]}:{address[1]}: {exc.strerror}"
        ) from None
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else address[1]
    return runner, port
