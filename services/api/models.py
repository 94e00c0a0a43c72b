"""/v1/models: the registered checkpoints, and publishing one to Triton (admin only; see
publish.py for what a published version is)."""

from __future__ import annotations

import httpx
from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from services.api import publish
from services.api.auth import require_admin
from services.api.deps import AUTH_ERRORS, State, errors

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_admin)],
                   responses=errors(*AUTH_ERRORS))


class ModelInfo(BaseModel):
    id: str = Field(description="`default`, or `run:<run>` for the model of a finished training run")
    source: str
    path: str
    bytes: int
    created_at: float
    published_versions: list[int] = Field(description="Versions of the Triton model repository serving it")


class PublishRequest(BaseModel):
    model: str = Field(min_length=1, max_length=128, examples=["default"], description="A model id from the list")


class Published(BaseModel):
    model: str
    version: int
    repository: str
    triton: dict[str, str] = Field(description="Per stage: loaded, not served by this Triton, or no Triton configured")


def _info(entry: publish.ModelEntry, versions: list[int]) -> ModelInfo:
    return ModelInfo(id=entry.id, source=entry.source, path=str(entry.folder), bytes=entry.bytes,
                     created_at=entry.created_at, published_versions=versions)


@router.get("", response_model=list[ModelInfo], summary="The registered checkpoints")
async def list_models(state: State) -> list[ModelInfo]:
    settings = state.settings

    def scan() -> list[ModelInfo]:
        repository = settings.triton_model_repository
        return [_info(entry, publish.published_versions(repository, entry.id))
                for entry in publish.registered_models(settings.runs_root, settings.model_dir)]

    return await run_in_threadpool(scan)


@router.post("/publish", status_code=201, response_model=Published, responses=errors(400, 404, 413, 502),
             summary="Publish a checkpoint into the Triton model repository as a new version")
async def publish_model(state: State, body: PublishRequest) -> Published:
    from services.common.triton_server import MODEL_REPOSITORY  # the shipped stage adapters

    settings = state.settings
    entry = await run_in_threadpool(publish.find_model, settings.runs_root, settings.model_dir, body.model)
    if entry is None:
        raise HTTPException(404, f"no registered model {body.model!r} (see GET /v1/models)")
    repository = settings.triton_model_repository
    try:
        if settings.triton_http_url:
            async with httpx.AsyncClient(base_url=settings.triton_http_url, timeout=300.0) as client:
                version, outcome = await publish.publish(entry, repository, MODEL_REPOSITORY, client)
        else:
            version, outcome = await publish.publish(entry, repository, MODEL_REPOSITORY, None)
    except publish.PublishError as exc:
        raise HTTPException(400, str(exc)) from None
    except publish.TritonLoadError as exc:
        raise HTTPException(502, str(exc)) from None
    return Published(model=entry.id, version=version, repository=str(repository), triton=outcome)
