"""The WebSocket transports and the browser page: `build_web_router(edge, settings)` is a FastAPI
router the control plane (or `echox serve --embedded`) mounts. Both transports feed the call
core (services.gateway.call): VAD, end of turn, barge-in are decided by the server.

Routes
  GET  /                 the browser page (static/index.html); /static/<file> its assets
  POST /web/session      only when settings.public_page: a new session for the page, no API key:
                         {"session_id", "token", "expires_in_s", "ws_path": "/ws?token=…", "twilio_path"}
  WS   /ws?token=T       the browser protocol
  WS   /twilio[?token=T] Twilio Media Streams (bidirectional)
T is a session token (services.common.tokens) minted for the session, by the API or /web/session.

Browser protocol (/ws)
  server → client, first:  {"type": "ready", "session_id", "sample_rate": 16000, "encoding": "pcm_s16le"}
  client → server:
    binary frames          caller audio, mono; PCM16 LE at 16 kHz unless "start" said otherwise;
                           up to 1 s per frame
    {"type": "start", "sample_rate": 8000..48000, "encoding": "pcm_s16le"|"pcm_f32le"}   optional
    {"type": "played", "turn_id", "index"}   answer segment `index` finished playing (for barge-in
                           bookkeeping: the history keeps only what was heard)
    {"type": "end_turn"}   end the caller's turn now (push-to-talk); otherwise silence ends it
    {"type": "ping"}       answered by {"type": "pong"}
  server → client: the call core's events as JSON (services.gateway.call.EVENTS):
    speech_started, turn_started {turn_id, audio_ms, reason}, transcript {turn_id, text},
    text {turn_id, index, text} (answer tokens as they stream), latency {turn_id, first_audio_ms,
    response_ms}, barge_in {turn_id, played_segments, latency_ms}, done {turn_id, transcript, text,
    cancelled, segments, first_audio_ms, response_ms, total_ms} (once the answer has played; after
    a barge-in, text is what was heard), error {turn_id?, code, message}
    {"type": "audio", "turn_id", "index", "samples", "sample_rate": 16000, "text"} followed by
                           exactly one binary frame: that segment's PCM16 LE 16 kHz audio; play
                           segments in order, report each with "played"
    {"type": "clear", "turn_id"}   barge-in: stop playback now and drop queued audio
    {"type": "error", "code": "bad_message"|"bad_audio", "message"}   a frame was refused; the call goes on

Twilio Media Streams (/twilio), JSON text frames as Twilio sends them:
  connected; start {streamSid, start: {streamSid, callSid, mediaFormat: {encoding: "audio/x-mulaw",
  sampleRate: 8000, channels: 1}, customParameters: {token}}}; media {media: {track, payload:
  base64 μ-law}}; mark {mark: {name}}; stop. The session token comes in customParameters.token
  (TwiML <Stream><Parameter name="token" value="…"/></Stream>) or in the query.
  Server → Twilio: media {streamSid, media: {payload}} (μ-law 8 kHz, 100 ms per message), then a
  mark {streamSid, mark: {name: "<turn_id>:<index>"}} after each answer segment (its echo tells
  what was played), and clear {streamSid} on barge-in.

Close codes: 1000 normal; 1003 unsupported audio format; 1007 too many malformed frames;
1011 internal error; 1013 conversation state unavailable (retry); 4400 the protocol was not
followed (e.g. Twilio media before start); 4401 missing, invalid or expired token; 4404 unknown
session; 4408 idle (no frame for IDLE_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from services.common.bus import BusError
from services.common.logs import log
from services.common.metrics import ACTIVE_SESSIONS
from services.common.settings import Settings
from services.common.state import UnknownSession
from services.common.tokens import TokenError, mint_session_token, new_secret, verify_session_token
from services.gateway.call import Call, CallConfig, Event, Playback, decode_pcm
from services.gateway.codecs import AudioFormatError, float_to_mulaw, mulaw_to_float, pcm16_to_float, resample
from services.gateway.session import ConversationEdge
from services.gateway.vad import SAMPLE_RATE, VadFactory, vad_factory

logger = logging.getLogger("echox.web")
STATIC_DIR = Path(__file__).parent / "static"
MAX_AUDIO_FRAME_BYTES = 48_000 * 4  # one second of the largest format accepted
MAX_TEXT_FRAME_BYTES = 64 * 1024
MAX_BAD_FRAMES = 20  # malformed frames tolerated per connection before it is closed (1007)
IDLE_TIMEOUT_S = 120.0  # a connection with no frame this long is closed (4408)
SEND_TIMEOUT_S = 10.0  # a client that does not take our frames this long is dropped
TWILIO_CHUNK_S = 0.1


class Closed(Exception):
    """Close the connection with this code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Sender:
    """Serialised sends with a deadline: events, audio and clears come from several tasks."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self._lock = asyncio.Lock()

    async def send(self, *frames: str | bytes) -> None:
        """Sends the frames back to back (an audio header and its audio stay together)."""
        async with self._lock:
            for frame in frames:
                if isinstance(frame, bytes):
                    await asyncio.wait_for(self.websocket.send_bytes(frame), SEND_TIMEOUT_S)
                else:
                    await asyncio.wait_for(self.websocket.send_text(frame), SEND_TIMEOUT_S)

    async def json(self, message: dict[str, Any]) -> None:
        await self.send(json.dumps(message, separators=(",", ":")))


class BrowserTransport:
    reports_playback = True

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    async def send_event(self, event: Event) -> None:
        await self.sender.json(event)

    async def play(self, segment: Playback) -> None:
        header = {"type": "audio", "turn_id": segment.turn_id, "index": segment.index,
                  "samples": len(segment.pcm) // 2, "sample_rate": segment.sample_rate, "text": segment.text}
        await self.sender.send(json.dumps(header), segment.pcm)

    async def stop_playback(self, turn_id: str) -> None:
        await self.sender.json({"type": "clear", "turn_id": turn_id})


class TwilioTransport:
    reports_playback = True  # through marks

    def __init__(self, sender: Sender, stream_sid: str) -> None:
        self.sender = sender
        self.stream_sid = stream_sid

    async def send_event(self, event: Event) -> None:
        pass  # a phone call has no screen: events are for logs only

    async def play(self, segment: Playback) -> None:
        audio = resample(pcm16_to_float(segment.pcm), segment.sample_rate, 8000)
        ulaw = float_to_mulaw(audio)
        step = int(8000 * TWILIO_CHUNK_S)
        frames = [json.dumps({"event": "media", "streamSid": self.stream_sid,
                              "media": {"payload": base64.b64encode(ulaw[i:i + step]).decode()}})
                  for i in range(0, len(ulaw), step)]
        frames.append(json.dumps({"event": "mark", "streamSid": self.stream_sid,
                                  "mark": {"name": f"{segment.turn_id}:{segment.index}"}}))
        await self.sender.send(*frames)  # one block: a clear lands before or after a segment, never inside

    async def stop_playback(self, turn_id: str) -> None:
        await self.sender.json({"event": "clear", "streamSid": self.stream_sid})


class WebEdge:
    """What the routes share: the edge, the settings, the token secret, the VAD factory."""

    def __init__(self, edge: ConversationEdge, settings: Settings, vad: VadFactory | None = None) -> None:
        self.edge = edge
        self.settings = settings
        self.config = CallConfig.from_settings(settings)
        self.vad = vad or vad_factory(settings.vad_model)
        self.secret = settings.token_secret or new_secret()
        if settings.token_secret is None:
            log(logger, logging.WARNING, "ECHOX_TOKEN_SECRET is not set: session tokens are valid for this "
                "process only")

    async def open_session(self, token: str) -> str:
        """The session the token grants, opened; Closed(4401/4404/1013) if not."""
        if not token:
            raise Closed(4401, "a session token is required (?token=…)")
        try:
            session_id = verify_session_token(self.secret, token)
        except TokenError as exc:
            raise Closed(4401, str(exc)) from None
        try:
            return await self.edge.open(session_id)
        except UnknownSession:
            raise Closed(4404, f"unknown session {session_id}") from None
        except BusError as exc:
            raise Closed(1013, f"conversation state unavailable: {exc}") from None

    def new_call(self, session_id: str, transport: BrowserTransport | TwilioTransport) -> Call:
        return Call(self.edge, session_id, transport, self.config, self.vad())


def _obj(value: Any) -> dict[str, Any]:
    """A JSON object field, or {} when it is missing or not an object."""
    return value if isinstance(value, dict) else {}


async def receive(websocket: WebSocket) -> dict[str, Any]:
    try:
        return dict(await asyncio.wait_for(websocket.receive(), IDLE_TIMEOUT_S))
    except TimeoutError:
        raise Closed(4408, f"no frame for {IDLE_TIMEOUT_S:.0f} s") from None


async def close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await websocket.close(code=code, reason=reason[:120])  # a close reason is at most 123 bytes


class BadFrames:
    """Counts refused frames; too many closes the connection (1007)."""

    def __init__(self) -> None:
        self.count = 0

    def refuse(self, reason: str) -> None:
        self.count += 1
        if self.count > MAX_BAD_FRAMES:
            raise Closed(1007, f"too many malformed frames (last: {reason})")


class BrowserSession:
    """One /ws connection."""

    def __init__(self, web: WebEdge, websocket: WebSocket) -> None:
        self.web = web
        self.websocket = websocket
        self.sender = Sender(websocket)
        self.bad = BadFrames()
        self.sample_rate = SAMPLE_RATE
        self.encoding = "pcm_s16le"
        self.call: Call | None = None

    async def serve(self) -> None:
        session_id = await self.web.open_session(self.websocket.query_params.get("token", ""))
        self.call = self.web.new_call(session_id, BrowserTransport(self.sender))
        await self.call.start()
        await self.sender.json({"type": "ready", "session_id": session_id, "sample_rate": SAMPLE_RATE,
                                "encoding": "pcm_s16le"})
        while True:
            message = await receive(self.websocket)
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await self.on_audio(message["bytes"])
            elif message.get("text") is not None:
                await self.on_text(message["text"])

    async def on_audio(self, data: bytes) -> None:
        assert self.call is not None
        if len(data) > MAX_AUDIO_FRAME_BYTES:
            return await self.refuse("bad_audio", f"an audio frame is at most {MAX_AUDIO_FRAME_BYTES} bytes")
        try:
            await self.call.feed(decode_pcm(data, self.encoding), self.sample_rate)
        except AudioFormatError as exc:
            await self.refuse("bad_audio", str(exc))

    async def on_text(self, text: str) -> None:
        assert self.call is not None
        try:
            message = json.loads(text) if len(text) <= MAX_TEXT_FRAME_BYTES else None
        except ValueError:
            message = None
        if not isinstance(message, dict):
            return await self.refuse("bad_message", "a text frame must be a JSON object of at most 64 KiB")
        kind = message.get("type")
        if kind == "played" and isinstance(message.get("turn_id"), str) and isinstance(message.get("index"), int):
            self.call.played(message["turn_id"], message["index"])
        elif kind == "end_turn":
            await self.call.end_turn()
        elif kind == "start":
            self.on_start(message)
        elif kind == "ping":
            await self.sender.json({"type": "pong"})
        else:
            await self.refuse("bad_message", f"unknown or incomplete message {str(kind)[:40]!r}")

    def on_start(self, message: dict[str, Any]) -> None:
        rate, encoding = message.get("sample_rate", SAMPLE_RATE), message.get("encoding", "pcm_s16le")
        if encoding not in ("pcm_s16le", "pcm_f32le") or not isinstance(rate, int) or not 8000 <= rate <= 48000:
            raise Closed(1003, f"unsupported audio format {str(encoding)[:20]} at {str(rate)[:10]} Hz "
                         "(pcm_s16le or pcm_f32le, 8000..48000 Hz)")
        self.sample_rate, self.encoding = rate, encoding

    async def refuse(self, code: str, message: str) -> None:
        self.bad.refuse(message)
        await self.sender.json({"type": "error", "code": code, "message": message})


class TwilioSession:
    """One Twilio Media Streams connection."""

    def __init__(self, web: WebEdge, websocket: WebSocket) -> None:
        self.web = web
        self.websocket = websocket
        self.sender = Sender(websocket)
        self.bad = BadFrames()
        self.call: Call | None = None

    async def serve(self) -> None:
        while True:
            message = await receive(self.websocket)
            if message["type"] == "websocket.disconnect":
                return
            try:
                event = json.loads(message.get("text") or "null")
            except ValueError:
                event = None
            if not isinstance(event, dict):
                self.bad.refuse("not a JSON object")
                continue
            kind = event.get("event")
            if kind == "start":
                await self.on_start(event)
            elif kind == "media":
                await self.on_media(event)
            elif kind == "mark" and self.call is not None:
                self.on_mark(event)
            elif kind == "stop":
                return
            elif kind not in ("connected", "dtmf", "mark"):
                self.bad.refuse(f"unknown event {str(kind)[:40]!r}")

    async def on_start(self, event: dict[str, Any]) -> None:
        if self.call is not None:
            return self.bad.refuse("a second start")
        start = _obj(event.get("start"))
        fmt = start.get("mediaFormat")
        if not (isinstance(fmt, dict) and fmt.get("encoding") == "audio/x-mulaw"
                and str(fmt.get("sampleRate")) == "8000" and str(fmt.get("channels", 1)) == "1"):
            raise Closed(1003, f"unsupported media format {str(fmt)[:60]} (audio/x-mulaw, 8000 Hz, mono)")
        params = _obj(start.get("customParameters"))
        token = str(params.get("token") or self.websocket.query_params.get("token", ""))
        session_id = await self.web.open_session(token)
        stream_sid = str(event.get("streamSid") or start.get("streamSid") or "")
        self.call = self.web.new_call(session_id, TwilioTransport(self.sender, stream_sid))
        await self.call.start()
        log(logger, logging.INFO, "twilio stream started", session_id=session_id, stream_sid=stream_sid,
            call_sid=str(start.get("callSid", "")))

    async def on_media(self, event: dict[str, Any]) -> None:
        if self.call is None:
            raise Closed(4400, "media before start")
        media = _obj(event.get("media"))
        if media.get("track", "inbound") not in ("inbound", "inbound_track"):
            return
        try:
            ulaw = base64.b64decode(str(media.get("payload", "")), validate=True)
        except (binascii.Error, ValueError):
            return self.bad.refuse("media payload is not base64")
        if not ulaw or len(ulaw) > 8000:
            return self.bad.refuse("a media payload holds 1 byte to 1 s of μ-law")
        await self.call.feed(mulaw_to_float(ulaw), 8000)

    def on_mark(self, event: dict[str, Any]) -> None:
        assert self.call is not None
        name = str(_obj(event.get("mark")).get("name", ""))
        turn_id, _, index = name.rpartition(":")
        if turn_id and index.isdigit():
            self.call.played(turn_id, int(index))


async def run_connection(session: BrowserSession | TwilioSession, kind: str) -> None:
    """Accept, serve until the caller leaves, then close with a code that says why; the call
    (and its turn in flight) is always closed."""
    websocket = session.websocket
    await websocket.accept()
    ACTIVE_SESSIONS.inc()
    code, reason = 1000, "bye"
    try:
        await session.serve()
    except Closed as exc:
        code, reason = exc.code, exc.reason
        log(logger, logging.INFO, f"{kind} connection refused or closed", code=code, reason=reason)
    except WebSocketDisconnect:
        pass
    except Exception as exc:
        code, reason = 1011, "internal error"
        log(logger, logging.ERROR, f"{kind} connection failed", error=repr(exc))
    finally:
        ACTIVE_SESSIONS.dec()
        if session.call is not None:
            await session.call.close()
        await close(websocket, code, reason)


def build_web_router(edge: ConversationEdge, settings: Settings, *, vad: VadFactory | None = None) -> APIRouter:
    """The page, its assets, /web/session (public page only), /ws and /twilio."""
    web = WebEdge(edge, settings, vad)
    router = APIRouter()
    assets = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()} if STATIC_DIR.is_dir() else {}

    @router.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @router.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in assets:
            raise HTTPException(404, "no such asset")
        return FileResponse(assets[name])

    if settings.public_page:

        @router.post("/web/session", tags=["web"], summary="A session for the public browser page (no API key)")
        async def web_session() -> JSONResponse:
            try:
                session_id = await edge.open()
            except BusError as exc:
                raise HTTPException(503, f"conversation state unavailable: {exc}") from None
            token = mint_session_token(web.secret, session_id, settings.session_token_ttl_s)
            return JSONResponse({"session_id": session_id, "token": token,
                                 "expires_in_s": settings.session_token_ttl_s, "ws_path": f"/ws?token={token}",
                                 "twilio_path": "/twilio"})

    @router.websocket("/ws")
    async def browser_ws(websocket: WebSocket) -> None:
        await run_connection(BrowserSession(web, websocket), "browser")

    @router.websocket("/twilio")
    async def twilio_ws(websocket: WebSocket) -> None:
        await run_connection(TwilioSession(web, websocket), "twilio")

    return router
