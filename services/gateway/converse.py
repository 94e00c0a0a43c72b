"""The public gRPC API: `echox.v1.Converse/Converse`, one bidirectional stream per
conversation, plus the standard grpc.health.v1 service.

The client opens with a SessionConfig, then per turn sends audio chunks and an EndOfTurn; it
may send a CancelTurn at any time (barge-in). The server answers with SessionStarted, then per
turn TurnStarted, the turn's events (transcript, text deltas, segment cuts, error, done) and
its audio in segment order. Bad input gets an error event and the stream stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import messages
from services.common.bus import BusError
from services.common.logs import log
from services.common.metrics import ACTIVE_SESSIONS
from services.common.state import UnknownSession
from services.gateway.session import ConversationEdge, TurnRun
from services.proto import converse_pb2 as api
from services.proto import converse_pb2_grpc as api_grpc
from services.proto import stages_pb2 as pb

logger = logging.getLogger("echox.converse")
SERVICE_NAME = "echox.v1.Converse"
_BYTES_PER_SAMPLE = {pb.PCM_S16LE: 2, pb.AUDIO_ENCODING_UNSPECIFIED: 2, pb.PCM_F32LE: 4}
_DONE = object()


class ConverseService(api_grpc.ConverseServicer):
    def __init__(self, edge: ConversationEdge, max_turn_audio_s: float = 30.0) -> None:
        self.edge = edge
        self.max_turn_audio_s = max_turn_audio_s

    async def Converse(
        self, request_iterator: object, context: grpc.aio.ServicerContext
    ) -> object:
        out: asyncio.Queue[api.ConverseResponse | object] = asyncio.Queue()
        call = _Call(self, out)
        reader = asyncio.create_task(call.read(request_iterator, context))
        ACTIVE_SESSIONS.inc()
        try:
            while (item := await out.get()) is not _DONE:
                yield item
            await reader  # re-raises an abort
        finally:
            ACTIVE_SESSIONS.dec()
            reader.cancel()
            await call.stop()


class _Call:
    """One Converse stream: reads client messages, runs one turn at a time."""

    def __init__(self, service: ConverseService, out: asyncio.Queue[api.ConverseResponse | object]) -> None:
        self.service = service
        self.edge = service.edge
        self.out = out
        self.session_id = ""
        self.config = api.SessionConfig()
        self.audio = bytearray()
        self.run: TurnRun | None = None
        self.turn_task: asyncio.Task[None] | None = None

    async def read(self, requests: object, context: grpc.aio.ServicerContext) -> None:
        try:
            async for request in requests:  # type: ignore[attr-defined]
                await self._on_request(request, context)
            if self.turn_task is not None:
                await self.turn_task  # the client half-closed: finish the turn in flight
        finally:
            await self.out.put(_DONE)

    async def _on_request(self, request: api.ConverseRequest, context: grpc.aio.ServicerContext) -> None:
        kind = request.WhichOneof("kind")
        if kind == "config":
            await self._open(request.config, context)
        elif not self.session_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be a SessionConfig")
        elif kind == "audio":
            self._add_audio(request.audio.data)
        elif kind == "end_of_turn":
            await self._end_of_turn()
        elif kind == "cancel" and self.run is not None:
            await self.run.cancel(request.cancel.played_segments)

    async def _open(self, config: api.SessionConfig, context: grpc.aio.ServicerContext) -> None:
        if self.session_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "SessionConfig may only be sent once")
        if config.encoding not in _BYTES_PER_SAMPLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown audio encoding {config.encoding}")
        if config.sample_rate and not 8000 <= config.sample_rate <= 48000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"sample rate {config.sample_rate} Hz is outside 8000..48000")
        try:
            self.session_id = await self.edge.open(config.session_id or None)
        except UnknownSession:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {config.session_id!r}")
        except BusError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"conversation state unavailable: {exc}")
        self.config = config
        started = api.SessionStarted(session_id=self.session_id, schema_version=messages.SCHEMA_VERSION)
        await self.out.put(api.ConverseResponse(session=started))

    def _add_audio(self, data: bytes) -> None:
        rate = self.config.sample_rate or 16000
        limit = int(self.service.max_turn_audio_s * rate) * _BYTES_PER_SAMPLE[self.config.encoding]
        if len(self.audio) + len(data) > limit:
            self.audio = bytearray(b"\0" * (limit + 1))  # remembered as too long; reported at EndOfTurn
            return
        self.audio.extend(data)

    async def _end_of_turn(self) -> None:
        if self.turn_task is not None and not self.turn_task.done():
            # A new turn while the agent still speaks: the caller talked over it.
            assert self.run is not None
            await self.run.cancel()
            await self.turn_task
        audio, self.audio = bytes(self.audio), bytearray()
        problem = self._check_audio(audio)
        if problem:
            await self._error("bad_audio", problem)
            return
        try:
            self.run = await self.edge.turn(self.session_id, audio, self.config.sample_rate or 16000,
                                            self.config.encoding or pb.PCM_S16LE)
        except BusError as exc:
            await self._error("bus_unavailable", f"cannot start the turn: {exc}")
            return
        await self.out.put(api.ConverseResponse(turn=api.TurnStarted(turn_id=self.run.turn_id)))
        self.turn_task = asyncio.create_task(self._relay(self.run))

    def _check_audio(self, audio: bytes) -> str:
        rate = self.config.sample_rate or 16000
        width = _BYTES_PER_SAMPLE[self.config.encoding]
        if not audio:
            return "the turn has no audio"
        if len(audio) > int(self.service.max_turn_audio_s * rate) * width:
            return f"the turn is longer than {self.service.max_turn_audio_s:.0f} s"
        if len(audio) % width:
            return f"the audio is not a whole number of {width}-byte samples"
        return ""

    async def _relay(self, run: TurnRun) -> None:
        async for item in run:
            if isinstance(item, pb.AudioSegment):
                audio = api.AudioOut(turn_id=run.turn_id, index=item.index, pcm=item.pcm,
                                     sample_rate=item.sample_rate, text=item.text)
                await self.out.put(api.ConverseResponse(audio=audio))
            else:
                await self.out.put(api.ConverseResponse(event=item))

    async def _error(self, code: str, message: str) -> None:
        log(logger, logging.INFO, "turn refused", session_id=self.session_id, code=code, error=message)
        event = pb.TurnEvent(stage="gateway", error=pb.Error(code=code, message=message))
        event.header.session_id = self.session_id
        await self.out.put(api.ConverseResponse(event=event))

    async def stop(self) -> None:
        if self.turn_task is not None and not self.turn_task.done():
            if self.run is not None:
                await self.run.cancel()  # the caller hung up mid-answer
            self.turn_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.turn_task


async def start_grpc_server(edge: ConversationEdge, host: str, port: int,
                            max_turn_audio_s: float = 30.0) -> tuple[grpc.aio.Server, int]:
    """Starts Converse + health on host:port (0 = a free port); returns the server and port."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ])
    api_grpc.add_ConverseServicer_to_server(ConverseService(edge, max_turn_audio_s), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
