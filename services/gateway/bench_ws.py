"""`echox bench ws` (also `python -m services.gateway.bench_ws`): the WebSocket path measured
the way a phone caller meets it. A scripted Twilio Media Streams client streams dev-voice
questions as μ-law in real time (20 ms frames, silence in between, as Twilio does), plays the
answer on a simulated clock and echoes marks when their audio has played. Prints:

- time to first audio: from the end of the caller's speech (the last speech frame sent) to the
  first answer audio received; it includes the end-of-turn silence (ECHOX_VAD_END_OF_TURN_MS);
- barge-in latency: from the onset of speech over a playing answer (the frame sent) to the
  `clear` received, which includes the speech needed to decide (ECHOX_VAD_BARGE_IN_MS).

`TwilioCaller` and `embedded_stack` are also what the integration test drives.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from services.gateway.codecs import FloatArray, float_to_mulaw, mulaw_to_float, resample

FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz
FRAME_S = 0.02
QUESTIONS = ("What is the capital of France?", "What is two plus three?", "What is the capital of Sweden?")
VOICE = "en-us+m5"


@dataclasses.dataclass
class Utterance:
    """Speech the caller says; the sender stamps when its first and last loud frames went out."""

    frames: int
    onset_frame: int
    end_frame: int
    onset_sent_at: float | None = None
    end_sent_at: float | None = None


class TwilioCaller:
    """A scripted phone on /twilio, in real time."""

    def __init__(self, url: str, token: str, stream_sid: str = "MZbench") -> None:
        self.url = url
        self.token = token
        self.stream_sid = stream_sid
        self.media: list[tuple[float, bytes]] = []  # (received at, μ-law)
        self.marks: list[tuple[float, str]] = []  # (received at, name)
        self.echoed: list[str] = []
        self.clears: list[float] = []
        self.closed: tuple[int, str] | None = None
        self._outbox: deque[tuple[bytes, Utterance | None, int]] = deque()
        self._pending_marks: list[tuple[float, str]] = []  # (due, name): echoed when played
        self._playhead = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._ws: Any = None

    async def __aenter__(self) -> TwilioCaller:
        from websockets.asyncio.client import connect

        self._ws = await connect(self.url, max_size=2**22)
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        start = {"streamSid": self.stream_sid, "callSid": "CAbench", "accountSid": "ACbench", "tracks": ["inbound"],
                 "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                 "customParameters": {"token": self.token}}
        await self._send({"event": "start", "sequenceNumber": "1", "streamSid": self.stream_sid, "start": start})
        self._tasks = [asyncio.create_task(self._sender()), asyncio.create_task(self._receiver())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self._send({"event": "stop", "streamSid": self.stream_sid, "stop": {"callSid": "CAbench"}})
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._ws.close()

    def say(self, audio_16k: FloatArray) -> Utterance:
        """Queues speech (16 kHz float) after what is queued; silence flows when nothing is."""
        ulaw = float_to_mulaw(resample(audio_16k, 16000, 8000))
        frames = [ulaw[i:i + FRAME_BYTES].ljust(FRAME_BYTES, b"\xff") for i in range(0, len(ulaw), FRAME_BYTES)]
        loud = [i for i, f in enumerate(frames) if np.max(np.abs(mulaw_to_float(f))) > 0.02] or [0]
        utterance = Utterance(len(frames), loud[0], loud[-1])
        self._outbox.extend((frame, utterance, i) for i, frame in enumerate(frames))
        return utterance

    def answer_audio(self, since: float = 0.0, until: float = float("inf")) -> FloatArray:
        """The answer audio received in [since, until), at 16 kHz."""
        data = b"".join(m for t, m in self.media if since <= t < until)
        return resample(mulaw_to_float(data), 8000, 16000)

    def first_media_after(self, instant: float) -> float | None:
        return next((t for t, _ in self.media if t >= instant), None)

    async def wait_for(self, condition: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.closed is not None:
                raise RuntimeError(f"the server closed the stream {self.closed} while waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout_s:.0f} s")
            await asyncio.sleep(0.01)

    async def wait_answer_played(self, since: float, timeout_s: float = 60.0, quiet_s: float = 1.5) -> None:
        """Until an answer arrived after `since`, has played, and nothing came for quiet_s."""
        def finished() -> bool:
            now = time.monotonic()
            last = max((t for t, _ in self.media), default=0.0)
            return last >= since and now - last > quiet_s and now > self._playhead and not self._pending_marks

        await self.wait_for(finished, timeout_s, "answer")

    async def _send(self, message: dict[str, Any]) -> None:
        await self._ws.send(json.dumps(message))

    async def _sender(self) -> None:
        """One 20 ms frame per tick on an absolute schedule; marks echoed when their audio has played."""
        silence = b"\xff" * FRAME_BYTES  # μ-law silence
        tick = time.monotonic()
        while True:
            frame, utterance, index = self._outbox.popleft() if self._outbox else (silence, None, -1)
            payload = base64.b64encode(frame).decode()
            await self._send({"event": "media", "streamSid": self.stream_sid,
                              "media": {"track": "inbound", "payload": payload}})
            now = time.monotonic()
            if utterance is not None and index == utterance.onset_frame:
                utterance.onset_sent_at = now
            if utterance is not None and index == utterance.end_frame:
                utterance.end_sent_at = now
            while self._pending_marks and self._pending_marks[0][0] <= now:
                await self._echo(self._pending_marks.pop(0)[1])
            tick += FRAME_S
            await asyncio.sleep(max(0.0, tick - time.monotonic()))

    async def _echo(self, name: str) -> None:
        self.echoed.append(name)
        await self._send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    async def _receiver(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in self._ws:
                self._on_message(json.loads(raw), time.monotonic())
        except ConnectionClosed as exc:
            self.closed = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
        else:
            close = self._ws.close_code, self._ws.close_reason
            self.closed = (close[0] or 1006, close[1] or "")

    def _on_message(self, message: dict[str, Any], now: float) -> None:
        event = message.get("event")
        if event == "media":
            data = base64.b64decode(message["media"]["payload"])
            self.media.append((now, data))
            self._playhead = max(now, self._playhead) + len(data) / 8000
        elif event == "mark":
            name = message["mark"]["name"]
            self.marks.append((now, name))
            self._pending_marks.append((self._playhead, name))
        elif event == "clear":
            # Twilio empties its buffer and sends back the marks still pending.
            self.clears.append(now)
            self._playhead = now
            self._pending_marks = [(now, name) for _, name in self._pending_marks]


async def new_session(base_url: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.post("/web/session")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


@contextlib.asynccontextmanager
async def embedded_stack(**overrides: Any) -> AsyncIterator[str]:
    """serve_embedded in this process on free ports; yields the HTTP base URL."""
    from services.common.processes import free_port
    from services.common.settings import get_settings
    from services.serve import serve_embedded

    settings = get_settings().model_copy(update={"grpc_port": free_port(), "http_port": free_port(), **overrides})
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve_embedded(settings, stop, ready))
    await asyncio.wait({task, asyncio.ensure_future(ready.wait())}, timeout=180, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    if not ready.is_set():
        stop.set()
        raise TimeoutError("the embedded stack did not start within 180 s")
    try:
        yield f"http://{settings.http_host}:{settings.http_port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


async def measure(base_url: str, turns: int, barge_ins: int) -> dict[str, Any]:
    from echox.espeak import speak

    questions = [speak(q, voice=VOICE) for q in QUESTIONS]
    session = await new_session(base_url)
    ws_url = base_url.replace("http", "ws", 1) + "/twilio"
    ttfa, barge = [], []
    async with TwilioCaller(ws_url, session["token"]) as caller:
        await asyncio.sleep(0.5)
        for i in range(turns):
            asked = caller.say(questions[i % len(questions)])
            await caller.wait_for(lambda u=asked: u.end_sent_at is not None, 30, "the question sent")
            assert asked.end_sent_at is not None
            await caller.wait_answer_played(asked.end_sent_at)
            first = caller.first_media_after(asked.end_sent_at)
            ttfa.append((first - asked.end_sent_at) * 1000.0 if first else float("nan"))
        for i in range(barge_ins):
            asked = caller.say(questions[i % len(questions)])
            await caller.wait_for(lambda u=asked: u.end_sent_at is not None, 30, "the question sent")
            assert asked.end_sent_at is not None
            await caller.wait_for(lambda u=asked: caller.first_media_after(u.end_sent_at or 0) is not None, 60,
                                  "answer audio")
            clears = len(caller.clears)
            interruption = caller.say(questions[(i + 1) % len(questions)])
            await caller.wait_for(lambda n=clears: len(caller.clears) > n, 30, "clear")
            assert interruption.onset_sent_at is not None
            barge.append((caller.clears[clears] - interruption.onset_sent_at) * 1000.0)
            await caller.wait_answer_played(caller.clears[clears])
    return {"time_to_first_audio_ms": ttfa, "barge_in_ms": barge}


def _summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(values):.0f} ms, p95 {p95:.0f} ms, n={len(values)}"


async def run_against_cli(turns: int, barge_ins: int, log_path: Path) -> dict[str, Any]:
    """`echox serve --embedded` as its own process (the client's timing stays out of its loop)."""
    from services.common.processes import free_port, stop_process

    http_port = free_port()
    args = [sys.executable, "-m", "echox.cli.main", "serve", "--embedded", "--grpc-port", str(free_port()),
            "--http-port", str(http_port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 240
        while "the page on http://" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"echox serve --embedded did not start:\n{log_path.read_text()[-2000:]}")
            await asyncio.sleep(0.2)
        return await measure(f"http://127.0.0.1:{http_port}", turns, barge_ins)
    finally:
        stop_process(process)


def register(bench_sub: Any) -> None:
    p = bench_sub.add_parser("ws", help="WebSocket (Twilio) path: time to first audio and barge-in latency")
    p.add_argument("--url", help="an already running server's HTTP address (default: start echox serve --embedded)")
    p.add_argument("--turns", type=int, default=6, help="questions answered to the end (default: 6)")
    p.add_argument("--barge-ins", type=int, default=6, help="answers interrupted (default: 6)")
    p.add_argument("--log", default="runs/bench-ws-serve.log", help="the started server's log")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_bench_ws)


def run_bench_ws(args: argparse.Namespace) -> int:
    from services.common.settings import get_settings

    if args.url:
        result = asyncio.run(measure(args.url.rstrip("/"), args.turns, args.barge_ins))
    else:
        result = asyncio.run(run_against_cli(args.turns, args.barge_ins, Path(args.log)))
    settings = get_settings()
    result["end_of_turn_ms"], result["barge_in_speech_ms"] = settings.vad_end_of_turn_ms, settings.vad_barge_in_ms
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"time to first audio (end of caller speech → first answer audio, Twilio WebSocket): "
          f"{_summary(result['time_to_first_audio_ms'])}; "
          f"includes {settings.vad_end_of_turn_ms} ms end-of-turn silence")
    print(f"barge-in latency (speech onset over the answer → clear received): {_summary(result['barge_in_ms'])}; "
          f"includes {settings.vad_barge_in_ms} ms of speech to decide")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway.bench_ws", description=__doc__.split("\n\n")[0])
    register(parser.add_subparsers(dest="command", required=False))
    args = parser.parse_args(["ws", *sys.argv[1:]])
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
