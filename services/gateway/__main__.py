"""`python -m services.gateway`: the edge process of a distributed deployment.

It serves callers over every transport, all on the same session core and bus:
- the gRPC Converse API (+ grpc.health.v1) on ECHOX_GRPC_HOST:ECHOX_GRPC_PORT,
- HTTP on ECHOX_HTTP_HOST:ECHOX_HTTP_PORT: the browser page, the WebSocket transports
  (/ws, /twilio), /healthz and Prometheus /metrics,
- the LiveKit agent worker (rooms on ECHOX_LIVEKIT_URL) unless ECHOX_LIVEKIT_ENABLED=false.
The control plane's API runs in its own process (`python -m services.api`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.common.logs import log, setup_logging
from services.common.settings import Settings, get_settings
from services.common.stack import open_bus, open_sessions, stop_on_signals

logger = logging.getLogger("echox.gateway")


def edge_app(settings: Settings, web_router: object) -> object:
    """The gateway's HTTP app: the page and WebSocket transports, liveness and metrics."""
    from fastapi import FastAPI, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = FastAPI(title="EchoX Voice gateway", docs_url=None, redoc_url=None)
    app.include_router(web_router)  # type: ignore[arg-type]

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def run_gateway(settings: Settings, stop: asyncio.Event) -> None:
    from services.gateway.edge import edge_running
    from services.gateway.web import build_web_router

    bus, sessions = open_bus(settings), open_sessions(settings)
    try:
        async with edge_running(settings, bus, sessions,
                                lambda edge: edge_app(settings, build_web_router(edge, settings))) as ports:
            log(logger, logging.INFO, "gateway started", grpc_port=ports[0], http_port=ports[1],
                livekit=settings.livekit_url if settings.livekit_enabled else None)
            await stop.wait()
    finally:
        await sessions.close()
        await bus.close()


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)

    async def run() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await run_gateway(settings, stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
