"""The LiveKit transport: a livekit-agents worker that joins a room on dispatch and serves each
caller in it through the call core (services.gateway.call).

Per caller: the caller's audio track is read as 16 kHz mono (`rtc.AudioStream` resamples), fed
to the call core (VAD, end of turn, barge-in); the answer's audio segments are played in order
through one `rtc.AudioSource` track the agent publishes; transcript, answer text and timings go
to the room as JSON data messages on the `echox.events` topic (the answer text also as a
`lk.transcription` text stream, which LiveKit's client SDKs render as captions). Barge-in clears
the source's queue at once. A caller who leaves ends their call (the turn in flight is
cancelled). The room's name is the session id when the control plane created it, so the
conversation's history carries over; any other room gets a new session.

Everything that touches a room goes through `LiveKitTransport` and `serve_caller`, which work on
local tracks too: the tests run them without a LiveKit server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from livekit import rtc

from services.common.logs import log
from services.common.settings import Settings
from services.gateway.call import Call, CallConfig, Event, Playback
from services.gateway.session import ConversationEdge
from services.gateway.vad import SAMPLE_RATE, vad_factory

logger = logging.getLogger("echox.livekit")
EVENTS_TOPIC = "echox.events"
CAPTIONS_TOPIC = "lk.transcription"
FRAME_MS = 20


class LiveKitTransport:
    """Plays answer segments through an AudioSource and sends events as data messages."""

    reports_playback = False  # the core estimates what was heard from the audio's length

    def __init__(self, source: rtc.AudioSource, participant: rtc.LocalParticipant | None = None) -> None:
        self.source = source
        self.participant = participant
        self._queue: asyncio.Queue[Playback] = asyncio.Queue()
        self._pump = asyncio.create_task(self._play_queued())
        self._generation = 0  # bumped by stop_playback: frames of an older generation are dropped

    async def play(self, segment: Playback) -> None:
        self._queue.put_nowait(segment)

    async def stop_playback(self, turn_id: str) -> None:
        self._generation += 1
        while not self._queue.empty():
            self._queue.get_nowait()
        self.source.clear_queue()

    async def send_event(self, event: Event) -> None:
        if self.participant is None:
            return
        await self.participant.publish_data(json.dumps(event), topic=EVENTS_TOPIC)
        if event.get("type") == "done" and event.get("text"):
            await self.participant.send_text(str(event["text"]), topic=CAPTIONS_TOPIC)

    async def _play_queued(self) -> None:
        samples_per_frame = SAMPLE_RATE * FRAME_MS // 1000
        while True:
            segment = await self._queue.get()
            generation = self._generation
            pcm = np.frombuffer(segment.pcm, dtype="<i2")
            for start in range(0, len(pcm), samples_per_frame):
                if generation != self._generation:
                    break  # barge-in: the rest of this segment is not played
                chunk = pcm[start : start + samples_per_frame]
                frame = rtc.AudioFrame(chunk.tobytes(), segment.sample_rate, 1, len(chunk))
                await self.source.capture_frame(frame)  # waits while the source's queue is full

    async def aclose(self) -> None:
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump


async def serve_caller(call: Call, frames: AsyncIterator[rtc.AudioFrameEvent]) -> None:
    """Feeds a caller's audio frames to the call core until the track ends, then closes the call."""
    try:
        async for event in frames:
            frame = event.frame
            samples = np.frombuffer(frame.data, dtype=np.int16)
            if frame.num_channels > 1:
                samples = samples.reshape(-1, frame.num_channels).mean(axis=1)
            await call.feed((samples / 32768.0).astype(np.float32), frame.sample_rate)
    finally:
        await call.close()


class RoomAgent:
    """One room: a published agent track, and a call per caller who publishes audio."""

    def __init__(self, room: rtc.Room, edge: ConversationEdge, settings: Settings) -> None:
        self.room = room
        self.edge = edge
        self.settings = settings
        self.source = rtc.AudioSource(SAMPLE_RATE, 1)
        self.transport = LiveKitTransport(self.source, room.local_participant)
        self.callers: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        track = rtc.LocalAudioTrack.create_audio_track("echox-agent", self.source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await self.room.local_participant.publish_track(track, options)
        self.room.on("track_subscribed", self._on_track)
        self.room.on("participant_disconnected", self._on_left)

    def _on_track(self, track: rtc.Track, _pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO and who.identity not in self.callers:
            self.callers[who.identity] = asyncio.create_task(self._serve(track, who.identity))

    def _on_left(self, who: rtc.RemoteParticipant) -> None:
        task = self.callers.pop(who.identity, None)
        if task is not None:
            task.cancel()

    async def _serve(self, track: rtc.Track, identity: str) -> None:
        session_id = await self._session()
        call = Call(self.edge, session_id, self.transport, CallConfig.from_settings(self.settings),
                    vad_factory("silero")())
        await call.start()
        log(logger, logging.INFO, "caller joined", room=self.room.name, identity=identity, session_id=session_id)
        stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)
        try:
            await serve_caller(call, stream)
        finally:
            await stream.aclose()

    async def _session(self) -> str:
        """The room's session when the control plane made the room for one, else a new one."""
        with contextlib.suppress(Exception):
            if self.room.name and await self.edge.sessions.exists(self.room.name):
                return self.room.name
        return await self.edge.open()

    async def aclose(self) -> None:
        for task in self.callers.values():
            task.cancel()
        await asyncio.gather(*self.callers.values(), return_exceptions=True)
        await self.transport.aclose()
        await self.source.aclose()


def build_agent_server(settings: Settings) -> Any:
    """A livekit-agents AgentServer whose jobs serve rooms through the bus `settings` name.
    Jobs run as threads of this process, each on its own event loop with its own bus client."""
    from livekit import agents

    from services.common.stack import open_bus, open_sessions

    async def entrypoint(ctx: agents.JobContext) -> None:
        await ctx.connect(auto_subscribe=agents.AutoSubscribe.AUDIO_ONLY)
        bus, sessions = open_bus(settings), open_sessions(settings)
        agent = RoomAgent(ctx.room, ConversationEdge.from_settings(bus, sessions, settings, "livekit"), settings)
        await agent.start()
        done = asyncio.Event()

        async def on_shutdown() -> None:
            done.set()

        ctx.add_shutdown_callback(on_shutdown)
        try:
            await done.wait()
        finally:
            await agent.aclose()
            await sessions.close()
            await bus.close()

    return agents.AgentServer.from_server_options(agents.WorkerOptions(
        entrypoint_fnc=entrypoint, ws_url=settings.livekit_url, api_key=settings.livekit_api_key,
        api_secret=settings.livekit_api_secret, job_executor_type=agents.JobExecutorType.THREAD,
        port=0,
    ))

