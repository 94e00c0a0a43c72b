"""/v1/sessions: start a conversation, read its transcript, end it (any key: `client` scope).

Creating a session hands the caller everything it needs to talk, without its API key:
- a LiveKit access token that may join one room only, the one named after the session (no
  room creation, listing or admin grants), valid for `session_token_ttl_s`;
- the LiveKit URL;
- a session token (services/common/tokens.py) and the WebSocket address that accepts it.
Session ids are random uuid4 hex (122 bits): holding one is what lets a key read that session.
"""

from __future__ import annotations

import datetime
import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response
from pydantic import BaseModel, Field

from services.api.auth import require_client
from services.api.deps import AUTH_ERRORS, State, errors
from services.common.settings import Settings
from services.common.state import UnknownSession
from services.common.tokens import mint_session_token

SESSION_ID = Path(pattern=r"^[A-Za-z0-9_-]{1,128}$", description="The id POST /v1/sessions returned")
IDENTITY_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(require_client)],
                   responses=errors(*AUTH_ERRORS, 503))


class SessionRequest(BaseModel):
    identity: str | None = Field(default=None, pattern=IDENTITY_PATTERN,
                                 description="The caller's LiveKit identity (default: caller-<session id>)")
    name: str | None = Field(default=None, max_length=128, description="The caller's display name in the room")


class SessionCreated(BaseModel):
    session_id: str
    room: str = Field(description="The LiveKit room of this session (its token may join this room only)")
    livekit_url: str
    livekit_token: str = Field(description="A LiveKit access token (JWT) for `room`")
    identity: str
    token: str = Field(description="The session token the WebSocket transport accepts")
    websocket_url: str = Field(description="ws(s)://host:port/ws?token=…: the WebSocket of this session")
    expires_in_s: float
    expires_at: float = Field(description="Unix time when both tokens expire")


class TranscriptTurn(BaseModel):
    user: str
    assistant: str


class Transcript(BaseModel):
    session_id: str
    turns: list[TranscriptTurn]


def room_name(session_id: str) -> str:
    """The LiveKit room of a session: the session id itself, so the gateway needs no lookup."""
    return session_id


def livekit_token(settings: Settings, room: str, identity: str, name: str | None, ttl_s: float) -> str:
    from livekit import api as livekit_api  # loaded when a session is made, not at startup

    grants = livekit_api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True,
                                     can_publish_data=True)
    token = (
        livekit_api.AccessToken(settings.livekit_api_key, settings.livekit_api_secret)
        .with_identity(identity)
        .with_ttl(datetime.timedelta(seconds=ttl_s))
        .with_grants(grants)
    )
    if name:
        token = token.with_name(name)
    return token.to_jwt()


def websocket_url(settings: Settings, request: Request, token: str) -> str:
    """The WebSocket address on the public base URL (ECHOX_PUBLIC_URL), else on the one this
    request came in on: a server bound to 0.0.0.0 cannot name itself."""
    base = (settings.public_url or str(request.base_url)).rstrip("/")
    scheme, _, rest = base.partition("://")
    ws_scheme = "wss" if scheme in ("https", "wss") else "ws"
    return f"{ws_scheme}://{rest}/ws?token={token}"


@router.post("", status_code=201, response_model=SessionCreated, responses=errors(400, 413),
             summary="Start a session: LiveKit token, session token and WebSocket address")
async def create_session(state: State, request: Request, body: SessionRequest | None = None) -> SessionCreated:
    body = body or SessionRequest()
    settings = state.settings
    session_id = await state.sessions.create()
    ttl_s = settings.session_token_ttl_s
    identity = body.identity or f"caller-{session_id}"
    room = room_name(session_id)
    token = mint_session_token(state.token_secret, session_id, ttl_s)
    return SessionCreated(
        session_id=session_id, room=room, livekit_url=settings.livekit_url,
        livekit_token=livekit_token(settings, room, identity, body.name, ttl_s), identity=identity,
        token=token, websocket_url=websocket_url(settings, request, token),
        expires_in_s=ttl_s, expires_at=time.time() + ttl_s,
    )


@router.get("/{session_id}/transcript", response_model=Transcript, responses=errors(404),
            summary="The finished turns of a session, oldest first")
async def transcript(state: State, session_id: Annotated[str, SESSION_ID]) -> Transcript:
    try:
        turns = await state.sessions.history(session_id)
    except UnknownSession:
        raise HTTPException(404, f"no session {session_id!r} (never made, ended or expired)") from None
    return Transcript(session_id=session_id, turns=[TranscriptTurn(user=t.user, assistant=t.assistant) for t in turns])


@router.delete("/{session_id}", status_code=204, response_class=Response, responses=errors(404),
               summary="End a session: its state is deleted")
async def end_session(state: State, session_id: Annotated[str, SESSION_ID]) -> Response:
    if not await state.sessions.exists(session_id):
        raise HTTPException(404, f"no session {session_id!r} (never made, ended or expired)")
    await state.sessions.end(session_id)
    return Response(status_code=204)
