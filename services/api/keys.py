"""/v1/keys: make, list and revoke API keys (admin only). A new key's secret is in the answer
to its creation and nowhere else."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Response
from pydantic import BaseModel, Field

from services.api.auth import CONFIGURED_KEY_ID, KeyRecord, Scope, new_key, require_admin
from services.api.deps import AUTH_ERRORS, State, errors

router = APIRouter(prefix="/v1/keys", tags=["keys"], dependencies=[Depends(require_admin)],
                   responses=errors(*AUTH_ERRORS, 503))


class KeyRequest(BaseModel):
    name: str = Field(min_length=1, max_length=128, description="What the key is for")
    scope: Scope = Field(Scope.CLIENT, description="client: sessions only; admin: every route")


class KeyInfo(BaseModel):
    id: str
    name: str
    scope: Scope
    created_at: float
    hint: str = Field(description="The first characters of the secret")
    configured: bool = Field(description="The key of ECHOX_API_KEY (changed in configuration, not here)")

    @classmethod
    def of(cls, record: KeyRecord) -> KeyInfo:
        return cls(id=record.id, name=record.name, scope=record.scope, created_at=record.created_at,
                   hint=record.hint, configured=record.configured)


class KeyCreated(KeyInfo):
    key: str = Field(description="The secret: shown this once, only its hash is kept")


@router.post("", status_code=201, response_model=KeyCreated, responses=errors(400, 413), summary="Make an API key")
async def create_key(state: State, body: KeyRequest) -> KeyCreated:
    secret, key_hash, record = new_key(body.name, body.scope)
    await state.auth.store.add(key_hash, record)
    return KeyCreated(**KeyInfo.of(record).model_dump(), key=secret)


@router.get("", response_model=list[KeyInfo], summary="Every API key (without secrets)")
async def list_keys(state: State) -> list[KeyInfo]:
    return [KeyInfo.of(record) for record in await state.auth.list()]


@router.delete("/{key_id}", status_code=204, response_class=Response, responses=errors(404, 409),
               summary="Revoke an API key: it gets 401 from now on")
async def revoke_key(state: State, key_id: Annotated[str, Path(max_length=64)]) -> Response:
    if key_id == CONFIGURED_KEY_ID and state.auth.configured is not None:
        raise HTTPException(409, "the configured key (ECHOX_API_KEY) is retired by changing that setting")
    if not await state.auth.store.revoke(key_id):
        raise HTTPException(404, f"no API key {key_id!r}")
    return Response(status_code=204)
