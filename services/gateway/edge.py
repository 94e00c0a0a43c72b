"""What every edge process runs, whichever transports it carries: gRPC Converse, HTTP (an app
built around the WebSocket edge: the page and WebSocket transports, with or without the
control plane's API), and LiveKit rooms when settings.livekit_enabled. `echox serve` (embedded
and distributed) and `python -m services.gateway` all start their edge through `edge_running`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from services.common.bus import Bus
from services.common.settings import Settings
from services.common.state import SessionStore
from services.gateway.converse import start_grpc_server
from services.gateway.session import ConversationEdge

HttpApp = Callable[[ConversationEdge], Any]  # the WebSocket edge → an ASGI app


class HostedUvicorn:
    """uvicorn serving in this event loop; the host process keeps its own signal handling."""

    def __init__(self, app: Any, settings: Settings) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
                return contextlib.nullcontext()

        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5,
                                ws_max_size=1024 * 1024)
        self.server = Server(config)
        self.socket = socket.socket(socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((settings.http_host, settings.http_port))  # port 0: a free one
        self.port = int(self.socket.getsockname()[1])
        self.task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self.task.done() or time.monotonic() > deadline:
                self.socket.close()
                if self.task.done():
                    self.task.result()  # its own error says most
                raise RuntimeError(f"the HTTP server did not start on port {self.port}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait_for(self.task, timeout=15)
        self.socket.close()


def api_app(settings: Settings, sessions: SessionStore) -> HttpApp:
    """The control plane's app with the page and WebSocket transports mounted in it."""

    def build(edge: ConversationEdge) -> Any:
        from services.api.app import create_app
        from services.gateway.web import build_web_router

        return create_app(settings, sessions=sessions, routers=[build_web_router(edge, settings)])

    return build


@contextlib.asynccontextmanager
async def edge_running(settings: Settings, bus: Bus, sessions: SessionStore, http_app: HttpApp
                       ) -> AsyncIterator[tuple[int, int]]:
    """Serves Converse, HTTP and (if enabled) LiveKit rooms over `bus` until the block ends;
    yields (gRPC port, HTTP port)."""
    edge = ConversationEdge.from_settings(bus, sessions, settings)
    grpc_server, grpc_port = await start_grpc_server(edge, settings.grpc_host, settings.grpc_port,
                                                     settings.max_turn_audio_s)
    http: HostedUvicorn | None = None
    agent_server: Any = None
    livekit: asyncio.Task[None] | None = None
    try:
        http = HostedUvicorn(http_app(ConversationEdge.from_settings(bus, sessions, settings, "websocket")), settings)
        await http.start()
        if settings.livekit_enabled:
            from services.gateway.livekit_agent import build_agent_server

            agent_server = build_agent_server(settings)
            livekit = asyncio.create_task(agent_server.run())
        yield grpc_port, http.port
    finally:
        if agent_server is not None:
            await agent_server.aclose()
        if livekit is not None:
            livekit.cancel()
            await asyncio.gather(livekit, return_exceptions=True)
        if http is not None:
            await http.stop()
        await grpc_server.stop(grace=2.0)
