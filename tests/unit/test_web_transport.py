"""The WebSocket transports and the page's routes (services.gateway.web) on a bare FastAPI app,
a scripted edge and the energy VAD: both protocols end to end, and every kind of bad input
(malformed frames, wrong audio formats, missing/expired/forged tokens, unknown sessions, a
caller who hangs up mid-answer) gets a clear error or close code."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from services.common.settings import Settings
from services.common.tokens import mint_session_token
from services.gateway.codecs import float_to_mulaw, float_to_pcm16, mulaw_to_float
from services.gateway.vad import EnergyVad
from services.gateway.web import MAX_BAD_FRAMES, build_web_router
from tests.unit.test_call_core import FakeEdge, silence, tone

SECRET = "test-secret"


def make_client(edge: FakeEdge, **overrides: Any) -> TestClient:
    settings = Settings(token_secret=SECRET, vad_end_of_turn_ms=300, **overrides)
    app = FastAPI()
    app.include_router(build_web_router(edge, settings, vad=EnergyVad))  # type: ignore[arg-type]
    return TestClient(app)


@pytest.fixture
def edge() -> FakeEdge:
    return FakeEdge(segments=3, delay_s=0.02)


@pytest.fixture
def client(edge: FakeEdge) -> Iterator[TestClient]:
    with make_client(edge) as client:
        yield client


def new_token(client: TestClient) -> str:
    response = client.post("/web/session")
    assert response.status_code == 200
    body = response.json()
    assert body["ws_path"] == f"/ws?token={body['token']}"
    return str(body["token"])


def receive_until(ws: Any, kind: str, limit: int = 200, ack: bool = False) -> list[Any]:
    """Frames (JSON dicts and audio bytes) up to and including the first event of `kind`; with
    `ack`, each audio segment is reported played as soon as it arrives (an instant player)."""
    seen: list[Any] = []
    for _ in range(limit):
        message = ws.receive()
        if message["type"] == "websocket.close":
            raise WebSocketDisconnect(message.get("code", 1000), message.get("reason", ""))
        frame = message.get("bytes") if message.get("bytes") is not None else json.loads(message["text"])
        if ack and isinstance(frame, bytes) and seen and isinstance(seen[-1], dict):
            ws.send_json({"type": "played", "turn_id": seen[-1]["turn_id"], "index": seen[-1]["index"]})
        seen.append(frame)
        if isinstance(frame, dict) and frame.get("type", frame.get("event")) == kind:
            return seen
    raise AssertionError(f"no {kind!r} in {limit} frames: {seen[-5:]}")


def close_code(ws: Any) -> tuple[int, str]:
    with pytest.raises(WebSocketDisconnect) as info:
        for _ in range(100):
            receive_until(ws, "never")
    return info.value.code, info.value.reason


def test_the_page_and_its_assets(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="talk"' in page.text and "/static/app.js" in page.text
    for name in ("app.js", "style.css", "capture-worklet.js"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/nope.js").status_code == 404
    assert client.get("/static/..%2Fweb.py").status_code == 404


def test_no_public_session_route_when_the_page_is_not_public(edge: FakeEdge) -> None:
    with make_client(edge, public_page=False) as client:
        assert client.post("/web/session").status_code in (404, 405)
        assert client.get("/").status_code == 200


def test_a_browser_turn(client: TestClient, edge: FakeEdge) -> None:
    with client.websocket_connect(f"/ws?token={new_token(client)}") as ws:
        ready = ws.receive_json()
        assert ready["type"] == "ready" and ready["sample_rate"] == 16000
        for start in range(0, 16000, 320):  # 20 ms frames, as the page sends them
            chunk = np.concatenate([tone(0.6), silence(0.4)])[start:start + 320]
            ws.send_bytes(float_to_pcm16(chunk))
        frames = receive_until(ws, "done", ack=True)
        events = [f for f in frames if isinstance(f, dict)]
        kinds = [e["type"] for e in events]
        assert kinds[0] == "speech_started" and "transcript" in kinds and "latency" in kinds
        audio_headers = [e for e in events if e["type"] == "audio"]
        assert [h["index"] for h in audio_headers] == [0, 1, 2]
        for i, frame in enumerate(frames):  # each header is followed by its audio
            if isinstance(frame, dict) and frame["type"] == "audio":
                assert isinstance(frames[i + 1], bytes) and len(frames[i + 1]) == 2 * frame["samples"]
        ws.send_json({"type": "ping"})
        assert receive_until(ws, "pong")


def test_other_rates_and_float_audio_after_start(client: TestClient, edge: FakeEdge) -> None:
    with client.websocket_connect(f"/ws?token={new_token(client)}") as ws:
        ws.receive_json()
        ws.send_json({"type": "start", "sample_rate": 48000, "encoding": "pcm_f32le"})
        audio = np.concatenate([tone(0.6, 48000), silence(0.5, 48000)])
        for start in range(0, audio.size, 4800):
            ws.send_bytes(audio[start:start + 4800].astype("<f4").tobytes())
        receive_until(ws, "done", ack=True)
        assert 0.6 <= len(edge.runs[0].audio) / 2 / 16000 <= 1.3


def test_malformed_frames_get_errors_then_a_close(client: TestClient) -> None:
    with client.websocket_connect(f"/ws?token={new_token(client)}") as ws:
        ws.receive_json()
        ws.send_text("not json")
        assert receive_until(ws, "error")[-1]["code"] == "bad_message"
        ws.send_bytes(b"\x01\x02\x03")
        assert receive_until(ws, "error")[-1]["code"] == "bad_audio"
        ws.send_json({"type": "played", "turn_id": 5})
        assert receive_until(ws, "error")[-1]["code"] == "bad_message"
        ws.send_bytes(float_to_pcm16(np.full(100, 0.1, np.float32)))  # the call still goes on
        for _ in range(MAX_BAD_FRAMES):
            ws.send_text("[1, 2]")
        assert close_code(ws)[0] == 1007


def test_nan_audio_is_refused(client: TestClient) -> None:
    with client.websocket_connect(f"/ws?token={new_token(client)}") as ws:
        ws.receive_json()
        ws.send_json({"type": "start", "sample_rate": 16000, "encoding": "pcm_f32le"})
        ws.send_bytes(np.full(320, np.nan, dtype="<f4").tobytes())
        error = receive_until(ws, "error")[-1]
        assert error["code"] == "bad_audio" and "NaN" in error["message"]


@pytest.mark.parametrize("start", [{"type": "start", "sample_rate": 44100, "encoding": "opus"},
                                   {"type": "start", "sample_rate": 96000, "encoding": "pcm_s16le"},
                                   {"type": "start", "sample_rate": "fast"}])
def test_an_unsupported_audio_format_closes_with_1003(client: TestClient, start: dict[str, Any]) -> None:
    with client.websocket_connect(f"/ws?token={new_token(client)}") as ws:
        ws.receive_json()
        ws.send_json(start)
        code, reason = close_code(ws)
        assert code == 1003 and "unsupported audio format" in reason


def test_tokens_missing_forged_expired_or_for_an_unknown_session(client: TestClient) -> None:
    good = new_token(client)
    cases = {
        "/ws": (4401, "required"),
        f"/ws?token={good[:-3]}abc": (4401, "invalid"),
        f"/ws?token={mint_session_token('other-secret', 's0', 60)}": (4401, "invalid"),
        f"/ws?token={mint_session_token(SECRET, 's0', 60, now=time.time() - 120)}": (4401, "expired"),
        f"/ws?token={mint_session_token(SECRET, 'nobody', 60)}": (4404, "unknown session"),
    }
    for path, (expected, words) in cases.items():
        with client.websocket_connect(path) as ws:
            code, reason = close_code(ws)
            assert code == expected and words in reason, (path, code, reason)


def test_hanging_up_mid_answer_cancels_the_turn(client: TestClient) -> None:
    slow = FakeEdge(segments=100, delay_s=0.05)
    with make_client(slow) as client, client.websocket_connect(f"/ws?token={new_token(client)}") as ws:
        ws.receive_json()
        ws.send_bytes(float_to_pcm16(np.concatenate([tone(0.6), silence(0.4)])))
        receive_until(ws, "audio")
    deadline = time.monotonic() + 5
    while slow.runs[0].cancelled_with is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow.runs[0].cancelled_with is not None


def twilio_start(token: str = "", fmt: dict[str, Any] | None = None) -> dict[str, Any]:
    media_format = fmt or {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    return {"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
            "start": {"streamSid": "MZ1", "callSid": "CA1", "accountSid": "AC1", "tracks": ["inbound"],
                      "mediaFormat": media_format, "customParameters": {"token": token} if token else {}}}


def media(audio: np.ndarray) -> list[dict[str, Any]]:
    ulaw = float_to_mulaw(audio)
    return [{"event": "media", "streamSid": "MZ1",
             "media": {"track": "inbound", "payload": base64.b64encode(ulaw[i:i + 160]).decode()}}
            for i in range(0, len(ulaw), 160)]


def test_a_twilio_call_with_marks_and_a_barge_in(client: TestClient) -> None:
    slow = FakeEdge(segments=30, delay_s=0.05)
    with make_client(slow) as client, client.websocket_connect("/twilio") as ws:
        ws.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        ws.send_json(twilio_start(new_token(client)))
        for message in media(np.concatenate([tone(0.6, 8000), silence(0.4, 8000)])):
            ws.send_json(message)
        frames = receive_until(ws, "mark")
        sent = [f for f in frames if f.get("event") == "media"]
        assert sent and all(f["streamSid"] == "MZ1" for f in frames)
        assert mulaw_to_float(base64.b64decode(sent[0]["media"]["payload"])).size == 800
        mark = frames[-1]["mark"]["name"]
        assert mark == f"{slow.runs[0].turn_id}:0"
        ws.send_json({"event": "mark", "streamSid": "MZ1", "mark": {"name": mark}})
        for message in media(tone(0.4, 8000)):
            ws.send_json(message)
        receive_until(ws, "clear")
        assert slow.runs[0].cancelled_with == 1
        ws.send_json({"event": "stop", "streamSid": "MZ1"})
        assert close_code(ws)[0] == 1000


@pytest.mark.parametrize(("first", "expected"), [
    (twilio_start(fmt={"encoding": "audio/l16", "sampleRate": 16000}), 1003),
    (twilio_start(fmt={"encoding": "audio/x-mulaw", "sampleRate": "x"}), 1003),
    (twilio_start(token="forged.token"), 4401),
    (twilio_start(), 4401),
    ({"event": "media", "media": {"payload": ""}}, 4400),
])
def test_twilio_refusals(client: TestClient, first: dict[str, Any], expected: int) -> None:
    with client.websocket_connect("/twilio") as ws:
        ws.send_json(first)
        assert close_code(ws)[0] == expected


def test_twilio_token_in_the_query_and_malformed_frames(client: TestClient) -> None:
    with client.websocket_connect(f"/twilio?token={new_token(client)}") as ws:
        ws.send_json(twilio_start())
        ws.send_json({"event": "media", "media": {"payload": "***"}})
        ws.send_bytes(b"\x00\x01")
        for _ in range(MAX_BAD_FRAMES):
            ws.send_text("{")
        assert close_code(ws)[0] == 1007
