"""A client of the Converse API: what `echox call`, the tests and `echox bench serve` use."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np

from echox.audio import SAMPLE_RATE, FloatArray
from services.common import messages
from services.proto import converse_pb2 as api
from services.proto import converse_pb2_grpc as api_grpc
from services.proto import stages_pb2 as pb

CHUNK_SECONDS = 0.1


class CallError(Exception):
    """The server refused the call, or a turn ended in an error event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclasses.dataclass
class TurnResult:
    session_id: str
    turn_id: str = ""
    transcript: str = ""
    text: str = ""
    segments: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    audio: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)  # (index, PCM16) in arrival order
    first_segment_tokens: int | None = None
    first_text_ms: float | None = None
    first_audio_ms: float | None = None
    total_ms: float = 0.0
    cancelled: bool = False
    error: pb.Error | None = None

    def pcm(self) -> FloatArray:
        joined = b"".join(chunk for _, chunk in self.audio)
        return (np.frombuffer(joined, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """The JSON `echox respond` prints, plus the session and turn ids."""
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return {
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "transcript": self.transcript,
            "text": self.text,
            "segments": [self.segments[i] for i in sorted(self.segments)],
            "first_segment_tokens": self.first_segment_tokens,
            "timings_ms": {"first_text": ms(self.first_text_ms), "first_audio": ms(self.first_audio_ms),
                           "total": ms(self.total_ms)},
            "audio_seconds": round(len(self.pcm()) / SAMPLE_RATE, 3),
            "cancelled": self.cancelled,
            "error": None if self.error is None else {"code": self.error.code, "message": self.error.message},
        }


class ConverseClient:
    """One conversation over one Converse stream; turns run one after another."""

    def __init__(self, target: str, session_id: str = "", timeout_s: float = 120.0,
                 encoding: int = pb.PCM_S16LE) -> None:
        self.target = target.removeprefix("grpc://")
        self.encoding = encoding  # of raw bytes given to turn(); float arrays are sent as it says
        self.requested_session = session_id
        self.timeout_s = timeout_s
        self.session_id = ""
        self._channel: grpc.aio.Channel | None = None
        self._requests: asyncio.Queue[api.ConverseRequest | None] = asyncio.Queue()
        self._responses: AsyncIterator[api.ConverseResponse] | None = None

    async def __aenter__(self) -> ConverseClient:
        self._channel = grpc.aio.insecure_channel(self.target)
        stub = api_grpc.ConverseStub(self._channel)
        call = stub.Converse(self._request_stream(), timeout=self.timeout_s)
        self._responses = call.__aiter__()
        config = api.SessionConfig(session_id=self.requested_session, sample_rate=SAMPLE_RATE, encoding=self.encoding)
        await self._requests.put(api.ConverseRequest(config=config))
        first = await self._next()
        if first.WhichOneof("kind") != "session":
            raise CallError("protocol", f"expected SessionStarted, got {first.WhichOneof('kind')}")
        self.session_id = first.session.session_id
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._requests.put(None)
        if self._channel is not None:
            await self._channel.close()

    async def _request_stream(self) -> AsyncIterator[api.ConverseRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _next(self) -> api.ConverseResponse:
        assert self._responses is not None
        try:
            return await asyncio.wait_for(self._responses.__anext__(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise CallError(exc.code().name.lower(), exc.details() or "") from None
        except StopAsyncIteration:
            raise CallError("closed", "the server ended the conversation") from None
        except TimeoutError:
            raise CallError("deadline", f"no answer from the server within {self.timeout_s:.0f} s") from None

    async def send_audio(self, audio: FloatArray | bytes) -> None:
        float32 = self.encoding == pb.PCM_F32LE
        if isinstance(audio, bytes):
            data = audio
        else:
            data = audio.astype("<f4").tobytes() if float32 else messages.pcm16_bytes(audio)
        step = int(CHUNK_SECONDS * SAMPLE_RATE) * (4 if float32 else 2)
        for start in range(0, len(data), step):
            await self._requests.put(api.ConverseRequest(audio=api.AudioChunk(data=data[start : start + step])))

    async def turn(
        self, audio: FloatArray | bytes, on_audio: Callable[[TurnResult, int], Any] | None = None
    ) -> TurnResult:
        """Sends one turn and collects its answer. `on_audio(result, index)` runs as each audio
        segment arrives; it may call `cancel()` (barge-in)."""
        await self.send_audio(audio)
        await self._requests.put(api.ConverseRequest(end_of_turn=api.EndOfTurn()))
        started = time.perf_counter()
        result = TurnResult(self.session_id)
        while True:
            response = await self._next()
            kind = response.WhichOneof("kind")
            elapsed = (time.perf_counter() - started) * 1000.0
            if kind == "turn":
                result.turn_id = response.turn.turn_id
            elif kind == "audio":
                self._on_audio(result, response.audio, elapsed)
                if on_audio is not None:
                    outcome = on_audio(result, response.audio.index)
                    if asyncio.iscoroutine(outcome):
                        await outcome
            elif kind == "event" and self._on_event(result, response.event, elapsed):
                result.total_ms = elapsed
                return result

    async def cancel(self, played_segments: int = -1) -> None:
        await self._requests.put(api.ConverseRequest(cancel=api.CancelTurn(played_segments=played_segments)))

    @staticmethod
    def _on_audio(result: TurnResult, audio: api.AudioOut, elapsed: float) -> None:
        result.first_audio_ms = result.first_audio_ms if result.first_audio_ms is not None else elapsed
        result.audio.append((audio.index, audio.pcm))
        segment = result.segments.setdefault(audio.index, {"index": audio.index, "text": audio.text})
        segment["audio_seconds"] = round(len(audio.pcm) / 2 / (audio.sample_rate or SAMPLE_RATE), 3)

    @staticmethod
    def _on_event(result: TurnResult, event: pb.TurnEvent, elapsed: float) -> bool:
        """Records the event; True when it ends the turn."""
        kind = event.WhichOneof("kind")
        if kind == "transcript":
            result.transcript = event.transcript.text
        elif kind == "text_delta":
            result.first_text_ms = result.first_text_ms if result.first_text_ms is not None else elapsed
            result.text += event.text_delta.text
        elif kind == "segment":
            cut = event.segment
            entry = result.segments.setdefault(cut.index, {"index": cut.index})
            entry.update(tokens=cut.tokens, text=cut.text)
            if result.first_segment_tokens is None:
                result.first_segment_tokens = cut.start + cut.tokens
        elif kind == "error":
            result.error = event.error
            return True
        elif kind == "done":
            result.text = event.done.text or result.text
            result.cancelled = event.done.cancelled
            return True
        return False


async def call_once(target: str, audio: FloatArray, session_id: str = "", timeout_s: float = 120.0) -> TurnResult:
    async with ConverseClient(target, session_id, timeout_s) as client:
        return await client.turn(audio)
