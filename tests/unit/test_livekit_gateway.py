"""The LiveKit gateway without a LiveKit server: the caller's and the agent's audio travel
through real livekit `rtc` local tracks (AudioSource → LocalAudioTrack → AudioStream), the
call core runs silero VAD, and the stages run embedded. Turn detection, ordered playback,
barge-in, a caller who leaves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import rtc
from prometheus_client import REGISTRY

from echox.espeak import speak
from services.common.settings import get_settings
from services.common.stack import DataPlane, embedded_data_plane
from services.gateway.call import Call, CallConfig, Playback
from services.gateway.livekit_agent import LiveKitTransport, serve_caller
from services.gateway.session import ConversationEdge
from services.gateway.vad import SAMPLE_RATE, SileroVad

pytestmark = pytest.mark.unit
FRAME = SAMPLE_RATE // 50  # 20 ms


class RecordingTransport(LiveKitTransport):
    def __init__(self, source: rtc.AudioSource) -> None:
        super().__init__(source)
        self.events: list[dict[str, Any]] = []
        self.played: list[tuple[str, int]] = []
        self.stops: list[tuple[str, float]] = []

    async def send_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    async def play(self, segment: Playback) -> None:
        self.played.append((segment.turn_id, segment.index))
        await super().play(segment)

    async def stop_playback(self, turn_id: str) -> None:
        await super().stop_playback(turn_id)
        self.stops.append((turn_id, self.source.queued_duration))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


class Room:
    """A caller and the agent joined by local tracks, as a room would join them."""

    def __init__(self, plane: DataPlane) -> None:
        self.caller_source = rtc.AudioSource(SAMPLE_RATE, 1)
        caller_track = rtc.LocalAudioTrack.create_audio_track("caller", self.caller_source)
        self.agent_source = rtc.AudioSource(SAMPLE_RATE, 1)
        agent_track = rtc.LocalAudioTrack.create_audio_track("agent", self.agent_source)
        self.transport = RecordingTransport(self.agent_source)
        edge = ConversationEdge.from_settings(plane.bus, plane.sessions, plane.settings, "livekit")
        self.edge = edge
        config = CallConfig(end_of_turn_ms=500, barge_in_ms=200, max_turn_audio_s=10.0)
        self.call_args = (edge, self.transport, config)
        self.caller_stream = rtc.AudioStream(caller_track, sample_rate=SAMPLE_RATE, num_channels=1)
        self.agent_stream = rtc.AudioStream(agent_track, sample_rate=SAMPLE_RATE, num_channels=1)
        self.heard: list[float] = []  # peak of each agent frame the caller receives
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> Call:
        edge, transport, config = self.call_args
        call = Call(edge, await edge.open(), transport, config, SileroVad())
        await call.start()
        self.tasks = [asyncio.create_task(serve_caller(call, self.caller_stream)),
                      asyncio.create_task(self._listen())]
        return call

    async def _listen(self) -> None:
        async for event in self.agent_stream:
            samples = np.frombuffer(event.frame.data, dtype=np.int16)
            self.heard.append(float(np.abs(samples).max()) if samples.size else 0.0)

    async def say(self, audio: np.ndarray) -> None:
        """The caller speaks (in real time: the source paces capture)."""
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        for start in range(0, len(pcm), FRAME):
            chunk = pcm[start : start + FRAME]
            await self.caller_source.capture_frame(rtc.AudioFrame(chunk.tobytes(), SAMPLE_RATE, 1, len(chunk)))

    async def close(self) -> None:
        await self.caller_stream.aclose()
        await self.agent_stream.aclose()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.transport.aclose()


async def until(condition: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _room(model_dir: Path | None) -> AsyncIterator[Room]:
    settings = get_settings().model_copy(update={"model_dir": model_dir})
    async with embedded_data_plane(settings) as plane:
        room = Room(plane)
        yield room
        await room.close()


@pytest.fixture
async def room() -> AsyncIterator[Room]:
    async for r in _room(None):
        yield r


@pytest.fixture
async def talkative_room(random_tiny_model: Path) -> AsyncIterator[Room]:
    async for r in _room(random_tiny_model):
        yield r


def question() -> np.ndarray:
    return speak("What is the capital of France?", voice="en-us+m5")


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


async def test_a_spoken_turn_is_detected_answered_and_played_in_order(room: Room) -> None:
    await room.start()
    await room.say(np.concatenate([silence(0.5), question(), silence(1.0)]))
    transport = room.transport
    await until(lambda: transport.of_type("done"))
    assert len(transport.of_type("turn_started")) == 1, "one utterance, one turn"
    assert transport.of_type("turn_started")[0]["reason"] == "silence"
    done = transport.of_type("done")[0]
    assert "paris" in done["text"].lower() and not done["cancelled"]
    indices = [index for _, index in transport.played]
    assert indices == sorted(indices) == list(range(len(indices))) and indices
    await until(lambda: sum(peak > 1000 for peak in room.heard) > 10)  # the caller hears the answer


async def test_speaking_over_the_agent_stops_it(talkative_room: Room) -> None:
    room = talkative_room
    measured = REGISTRY.get_sample_value("echox_barge_in_seconds_count", {"transport": "livekit"}) or 0.0
    await room.start()
    await room.say(np.concatenate([question(), silence(0.8)]))
    transport = room.transport
    await until(lambda: transport.played)  # the agent is speaking (a 128-token answer)
    await room.say(np.concatenate([question(), silence(0.8)]))  # the caller talks over it
    await until(lambda: transport.of_type("barge_in"))
    turn_id, queued = transport.stops[0]
    assert queued == 0.0, "playback stopped at once: nothing left queued in the source"
    assert transport.of_type("barge_in")[0]["turn_id"] == turn_id
    assert REGISTRY.get_sample_value("echox_barge_in_seconds_count", {"transport": "livekit"}) == measured + 1
    await until(lambda: [e for e in transport.of_type("done") if e["turn_id"] == turn_id])
    first = [e for e in transport.of_type("done") if e["turn_id"] == turn_id]
    assert first[0]["cancelled"]
    await until(lambda: len(transport.of_type("turn_started")) >= 2)  # the interruption is the next turn


async def test_a_caller_who_leaves_ends_the_call(room: Room) -> None:
    await room.start()
    await room.say(question()[: SAMPLE_RATE // 2])
    await room.caller_stream.aclose()  # the track ends: the caller left
    serving = room.tasks[0]
    await until(serving.done, timeout_s=30)
    assert serving.exception() is None  # serve_caller ended and closed the call
