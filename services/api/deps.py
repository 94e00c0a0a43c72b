"""What every route reaches through `request.app.state.api`: the settings and the stores the app
built (or was given) at startup, and the shared error bodies of the OpenAPI description."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel

from services.common.settings import Settings
from services.common.state import SessionStore

if TYPE_CHECKING:
    import redis.asyncio as aredis

    from services.api.auth import Authenticator
    from services.api.job_store import JobRunner, JobStore


@dataclasses.dataclass
class ApiState:
    settings: Settings
    auth: Authenticator
    sessions: SessionStore
    jobs: JobStore
    runner: JobRunner
    token_secret: str
    redis: aredis.Redis | None = None  # the client of the keys, limits and jobs (None in embedded mode)
    where: str = "memory://"  # the state URL, without credentials, for error messages


def get_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


State = Annotated[ApiState, Depends(get_state)]


class ErrorBody(BaseModel):
    detail: str


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` entry of a route for these error statuses (all share one body)."""
    described = {
        400: "The request names something unusable (see detail)",
        401: "No API key, or an unknown or revoked one",
        403: "The key's scope does not allow this route",
        404: "No such resource",
        409: "The resource is in a state that does not allow this",
        413: "The request body is too large",
        429: "Too many requests for this key; retry after `Retry-After` seconds",
        502: "An upstream server (Triton) refused",
        503: "A backing service (Redis, the Celery broker) is unavailable",
    }
    return {code: {"model": ErrorBody, "description": described[code]} for code in codes}


AUTH_ERRORS = (401, 403, 429)
