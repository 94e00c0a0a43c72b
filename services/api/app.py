"""The control plane's FastAPI app: `create_app(settings)`.

Routes (every one needs an API key except health, readiness and the OpenAPI description):
    GET  /healthz, /readyz                       liveness; readiness (Redis, the session store)
    GET  /metrics                                Prometheus text; admin key unless ECHOX_API_METRICS_PUBLIC
    /v1/keys      admin    make, list, revoke API keys
    /v1/sessions  client   start (LiveKit + WebSocket tokens), transcript, end
    /v1/jobs      admin    training jobs through Celery: submit, progress, cancel, artifacts
    /v1/models    admin    registered checkpoints; publish one to Triton
    /openapi.json, /docs   the OpenAPI description
Other parts of the platform mount their routes through `routers` (the gateway's browser page at
`/` and its WebSocket transports come in that way).

Keys, rate-limit counters and job records live where the bus does (ECHOX_BUS_URL, else
ECHOX_REDIS_URL): Redis under the bus prefix, or memory:// for the embedded mode. A Redis that is
down makes routes answer 503, never 500. Bodies over ECHOX_MAX_REQUEST_BYTES get 413.

/metrics: Prometheus scrapers usually hold no key, and the scrape port should not be public. So
/metrics on this (public) port needs an admin key (a Prometheus `authorization` credential), and
key-less scraping goes to ECHOX_METRICS_PORT, a separate listener meant to stay inside the
cluster; a deployment whose HTTP port is internal anyway may set ECHOX_API_METRICS_PUBLIC=true.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from echox import __version__
from services.api import jobs, keys, models
from services.api import sessions as session_routes
from services.api.auth import Authenticator, MemoryKeyStore, RedisKeyStore, require_admin
from services.api.deps import ApiState, State, errors
from services.api.job_store import CeleryRunner, JobBackendError, JobRunner, JobStore, MemoryJobStore, RedisJobStore
from services.api.limits import MemoryRateLimiter, RedisRateLimiter
from services.common.bus import url_kind
from services.common.bus.base import BusError
from services.common.logs import log
from services.common.metrics import API_LATENCY, API_REQUESTS
from services.common.settings import Settings
from services.common.state import SessionStore
from services.common.tokens import new_secret

if TYPE_CHECKING:
    import redis.asyncio as aredis

logger = logging.getLogger("echox.api")
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unready"]
    checks: dict[str, str]


class RequestMetrics:
    """ASGI middleware: requests and latency per route template (bounded labels: never the raw path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            route = getattr(scope.get("route"), "path", "unmatched")
            API_REQUESTS.labels(method, route, str(status)).inc()
            API_LATENCY.labels(method, route).observe(time.perf_counter() - started)


@dataclasses.dataclass
class _Stores:
    auth: Authenticator
    jobs: JobStore
    redis: aredis.Redis | None = None  # owned: closed with the app
    where: str = "memory://"


def _stores(settings: Settings) -> _Stores:
    """Keys, rate limits and job records, where the bus is."""
    url = settings.bus
    if url_kind(url) == "memory":
        limiter = MemoryRateLimiter(settings.rate_limit_per_minute)
        return _Stores(Authenticator(MemoryKeyStore(), limiter, settings.api_key), MemoryJobStore())
    from services.common.bus.redis import open_client, redact_url

    where = redact_url(url)
    client = open_client(url, settings.redis_socket_timeout_s, settings.redis_socket_timeout_s)
    prefix = settings.bus_prefix
    auth = Authenticator(RedisKeyStore(client, prefix, where),
                         RedisRateLimiter(client, prefix, settings.rate_limit_per_minute, where), settings.api_key)
    return _Stores(auth, RedisJobStore(client, prefix, where), client, where)


def _health_routes(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
    async def healthz() -> Health:
        return Health()

    @router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}},
                summary="Readiness: Redis and the session store answer")
    async def readyz(state: State) -> Response:
        checks: dict[str, str] = {}
        if state.redis is not None:
            from services.common.bus.redis import call

            try:
                await call("PING", state.where, state.redis.ping(), timeout_s=2.0)
                checks["redis"] = "ok"
            except BusError as exc:
                checks["redis"] = str(exc)
        try:
            await state.sessions.exists("readyz-probe")
            checks["sessions"] = "ok"
        except BusError as exc:
            checks["sessions"] = str(exc)
        ready = all(value == "ok" for value in checks.values())
        body = Readiness(status="ready" if ready else "unready", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    guard = [] if settings.api_metrics_public else [Depends(require_admin)]

    @router.get("/metrics", dependencies=guard, response_class=Response, summary="Prometheus metrics",
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
                           **({} if settings.api_metrics_public else errors(401, 403, 429))})
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router


def _allowed(request: Request) -> str:
    """Every method some route of the request's path takes (asked of the router's own matching)."""
    allowed = []
    for method in sorted(_METHODS):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def create_app(settings: Settings, *, sessions: SessionStore | None = None, routers: Sequence[APIRouter] = (),
               runner: JobRunner | None = None) -> FastAPI:
    """The control plane. `sessions`: a session store to share (the caller closes it; default: one
    made from settings and closed with the app); `routers`: more routes to mount; `runner`: where
    training jobs run (default: Celery). With no ECHOX_TOKEN_SECRET, session tokens are signed
    with a secret of this app's own, which nothing else can verify: set it whenever the WebSocket
    transport runs in another process or beside other replicas (echox serve sets it)."""
    token_secret = settings.token_secret or new_secret()
    if not settings.token_secret:
        log(logger, logging.WARNING, "no ECHOX_TOKEN_SECRET: session tokens hold for this app only")
    if not settings.api_key:
        log(logger, logging.WARNING, "no ECHOX_API_KEY: no admin key exists, so no key can be made")
    session_store = sessions
    if session_store is None:
        from services.common.stack import open_sessions  # (stack.py loads torch: only when needed)

        session_store = open_sessions(settings)
    stores = _stores(settings)
    state = ApiState(settings=settings, auth=stores.auth, sessions=session_store,
                     jobs=stores.jobs, runner=runner or CeleryRunner(settings.celery_queue, settings.job_kill_after_s),
                     token_secret=token_secret, redis=stores.redis, where=stores.where)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if runner is None:
            await run_in_threadpool(state.runner.close)
        if sessions is None:
            await state.sessions.close()
        if stores.redis is not None:
            from services.common.bus.redis import close_client

            await close_client(stores.redis)

    app = FastAPI(title="EchoX control plane", version=__version__, lifespan=lifespan,
                  max_body_size=settings.max_request_bytes,
                  description="Sessions, training jobs and models of an EchoX voice-agent deployment.")
    app.state.api = state
    app.add_middleware(RequestMetrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:  # Starlette's Allow names the first route of the path only
            exc = StarletteHTTPException(405, exc.detail, headers={"Allow": _allowed(request)})
        return await http_exception_handler(request, exc)

    @app.exception_handler(BusError)
    async def state_unavailable(_: Request, exc: BusError) -> JSONResponse:
        return JSONResponse({"detail": f"the state store is unavailable: {exc}"}, status_code=503)

    @app.exception_handler(JobBackendError)
    async def jobs_unavailable(_: Request, exc: JobBackendError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    app.include_router(_health_routes(settings))
    for router in (keys.router, session_routes.router, jobs.router, models.router, *routers):
        app.include_router(router)
    return app
