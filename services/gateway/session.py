"""The session core of every edge (gRPC Converse, WebSocket, LiveKit): one caller turn in,
its events and audio out, in order, exactly once.

A turn is published on `turns`; its results come back on the session's `events:` and `audio:`
streams, possibly more than once (a worker that died after publishing is replaced by one that
serves the message again), and the audio of different segments possibly out of order
(different workers). This module drops duplicates by (turn, kind, index), releases audio in
segment order, ends every turn by its deadline, and writes the history: after a barge-in only
what the caller actually heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator

from echox.tokenizer import Turn
from services.common import messages
from services.common.bus import Bus, BusError
from services.common.logs import log, turn_context
from services.common.metrics import TIME_TO_FIRST_AUDIO, TURNS
from services.common.settings import Settings
from services.common.state import SessionStore
from services.proto import stages_pb2 as pb

logger = logging.getLogger("echox.gateway")
TurnOutput = pb.TurnEvent | pb.AudioSegment


@dataclasses.dataclass
class TurnSummary:
    turn_id: str
    transcript: str = ""
    text: str = ""  # the whole answer the model produced
    heard: str = ""  # what the caller heard (all of it unless the turn was cancelled)
    played_segments: int = 0
    cancelled: bool = False
    error: pb.Error | None = None
    first_text_ms: float | None = None
    first_audio_ms: float | None = None
    total_ms: float = 0.0


class ConversationEdge:
    """Opens conversations and runs their turns over the bus."""

    def __init__(self, bus: Bus, sessions: SessionStore, *, deadline_s: float = 60.0, transport: str = "grpc",
                 poll_ms: int = 200, stream_ttl_s: float = 3600.0) -> None:
        self.bus = bus
        self.sessions = sessions
        self.deadline_s = deadline_s
        self.transport = transport
        self.poll_ms = poll_ms
        self.stream_ttl_s = stream_ttl_s  # the session's output streams outlive its last turn this long

    @classmethod
    def from_settings(cls, bus: Bus, sessions: SessionStore, settings: Settings, transport: str = "grpc"
                      ) -> ConversationEdge:
        return cls(bus, sessions, deadline_s=settings.turn_deadline_s, transport=transport,
                   stream_ttl_s=settings.session_ttl_s)

    async def open(self, session_id: str | None = None) -> str:
        """A new conversation, or an existing one to continue (UnknownSession if it is not)."""
        if session_id:
            await self.sessions.history(session_id)  # raises UnknownSession
            return session_id
        return await self.sessions.create()

    async def end(self, session_id: str) -> None:
        await self.sessions.end(session_id)
        for stream in (messages.events_stream(session_id), messages.audio_stream(session_id)):
            await self.bus.delete(stream)

    async def turn(self, session_id: str, audio: bytes, sample_rate: int, encoding: int = pb.PCM_S16LE) -> TurnRun:
        """Publishes the turn; iterate the returned run for its events and audio."""
        if not await self.sessions.exists(session_id):
            # The state store lost it (e.g. a Redis restart): carry on with an empty history.
            log(logger, logging.WARNING, "session state lost; continuing without history", session_id=session_id)
            await self.sessions.create(session_id)
        run = TurnRun(self, session_id, uuid.uuid4().hex)
        await run.start(audio, sample_rate, encoding)
        return run


class TurnRun:
    """One turn in flight: `async for item in run` yields its events and audio, deduplicated,
    audio in segment order; `cancel()` is barge-in."""

    def __init__(self, edge: ConversationEdge, session_id: str, turn_id: str) -> None:
        self.edge = edge
        self.session_id = session_id
        self.turn_id = turn_id
        self.summary = TurnSummary(turn_id)
        self.header = messages.new_header(session_id, turn_id, edge.deadline_s)
        self._started = time.perf_counter()
        self._cursors: dict[str, str] = {}
        self._seen: set[tuple[str, int]] = set()
        self._pending_audio: dict[int, pb.AudioSegment] = {}
        self._segment_text: dict[int, str] = {}
        self._next_audio = 0
        self._done: pb.Done | None = None
        self._done_event: pb.TurnEvent | None = None
        self._cancelled = asyncio.Event()
        self._finished = False
        self._own_error = False

    async def start(self, audio: bytes, sample_rate: int, encoding: int) -> None:
        # Read from the streams' current ends: results of this turn come after them.
        for stream in (messages.events_stream(self.session_id), messages.audio_stream(self.session_id)):
            self._cursors[stream] = await self.edge.bus.last_id(stream)
        request = pb.TurnRequest(header=self.header, audio=audio, sample_rate=sample_rate, encoding=encoding)
        await self.edge.bus.publish(messages.TURNS, request.SerializeToString())

    async def cancel(self, played_segments: int | None = None) -> None:
        """Barge-in: nothing more is played, every stage drops the turn. `played_segments`:
        how many segments the caller really heard (default: all that were handed out)."""
        if played_segments is not None and played_segments >= 0:
            self.summary.played_segments = min(played_segments, self.summary.played_segments)
        if self._finished and not self.summary.cancelled and self.summary.error is None:
            await self._amend_heard()  # the turn was delivered in full but not all of it was heard
            return
        self._cancelled.set()
        cancel = pb.Cancel(header=messages.child_header(self.header), reason="barge-in")
        with contextlib.suppress(BusError):
            await self.edge.bus.publish(messages.CANCELS, cancel.SerializeToString())

    def __aiter__(self) -> AsyncIterator[TurnOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[TurnOutput]:
        queue: asyncio.Queue[TurnOutput | BusError] = asyncio.Queue()
        readers = [asyncio.create_task(self._read(stream, queue)) for stream in self._cursors]
        deadline = time.monotonic() + self.edge.deadline_s
        try:
            while not self._complete():
                item = await self._next(queue, deadline)
                if item is None:
                    break
                for output in self._accept(item):
                    yield output
            await self._finish()
            for closing in self._closing_events():
                yield closing
        finally:
            for reader in readers:
                reader.cancel()
            await self._finish()

    async def _next(self, queue: asyncio.Queue[TurnOutput | BusError], deadline: float) -> TurnOutput | None:
        """The next raw item, or None when the turn ends without one (cancel, deadline, bus)."""
        getter = asyncio.ensure_future(queue.get())
        cancelled = asyncio.ensure_future(self._cancelled.wait())
        try:
            done, _ = await asyncio.wait({getter, cancelled}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done:
            item = getter.result()
            if isinstance(item, BusError):
                self._fail("bus_unavailable", f"lost the message bus mid-turn: {item}")
                return None
            return item
        if self._cancelled.is_set():
            self.summary.cancelled = True
            return None
        self._fail("deadline", f"the turn did not finish within {self.edge.deadline_s:.0f} s")
        return None

    async def _read(self, stream: str, queue: asyncio.Queue[TurnOutput | BusError]) -> None:
        parser: type[pb.TurnEvent] | type[pb.AudioSegment] = (
            pb.AudioSegment if stream.startswith("audio:") else pb.TurnEvent)
        while True:
            try:
                entries = await self.edge.bus.read(stream, after=self._cursors[stream], block_ms=self.edge.poll_ms)
            except BusError as exc:
                await queue.put(exc)
                return
            for entry in entries:
                self._cursors[stream] = entry.id
                try:
                    message = messages.parse(parser, entry.payload)
                except messages.MessageError:
                    continue  # not ours to judge: the producer already reported it
                if message.header.turn_id == self.turn_id:
                    await queue.put(message)

    def _accept(self, item: TurnOutput) -> list[TurnOutput]:
        """What this item releases to the caller, after dedup and reordering."""
        if isinstance(item, pb.AudioSegment):
            if ("audio", item.index) in self._seen or self._cancelled.is_set():
                return []
            self._seen.add(("audio", item.index))
            self._pending_audio[item.index] = item
            return list(self._release_audio())
        kind = item.WhichOneof("kind") or ""
        index = item.text_delta.index if kind == "text_delta" else item.segment.index if kind == "segment" else 0
        if (kind, index) in self._seen:
            return []
        self._seen.add((kind, index))
        if kind == "transcript":
            self.summary.transcript = item.transcript.text
        elif kind == "text_delta":
            self.summary.first_text_ms = self.summary.first_text_ms or self._elapsed_ms()
        elif kind == "segment":
            self._segment_text[item.segment.index] = item.segment.text
        elif kind == "done":
            # Held back until the turn's last audio is out: Done is the caller's last event.
            self._done, self._done_event = item.done, item
            self.summary.text = item.done.text
            self.summary.transcript = self.summary.transcript or item.done.transcript
            return []
        elif kind == "error":
            self.summary.error = item.error
        return [item]

    def _release_audio(self) -> list[pb.AudioSegment]:
        released = []
        while self._next_audio in self._pending_audio:
            segment = self._pending_audio.pop(self._next_audio)
            self._next_audio += 1
            if self.summary.first_audio_ms is None:
                self.summary.first_audio_ms = self._elapsed_ms()
                TIME_TO_FIRST_AUDIO.labels(self.edge.transport).observe(self.summary.first_audio_ms / 1000.0)
            self.summary.played_segments = self._next_audio
            released.append(segment)
        return released

    def _complete(self) -> bool:
        if self.summary.error is not None or self._cancelled.is_set():
            self.summary.cancelled = self.summary.cancelled or self._cancelled.is_set()
            return True
        return self._done is not None and self._next_audio >= self._done.num_segments

    def _fail(self, code: str, message: str) -> None:
        self._own_error = True
        self.summary.error = pb.Error(code=code, message=message)

    def _elapsed_ms(self) -> float:
        return (time.perf_counter() - self._started) * 1000.0

    async def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        summary = self.summary
        summary.total_ms = self._elapsed_ms()
        if summary.cancelled:
            texts = [self._segment_text.get(i, "").strip() for i in range(summary.played_segments)]
            summary.heard = " ".join(t for t in texts if t)
        elif summary.error is None:
            summary.heard = summary.text
        outcome = "cancelled" if summary.cancelled else "error" if summary.error is not None else "ok"
        TURNS.labels(outcome).inc()
        with turn_context(self.session_id, self.turn_id, self.header.trace.traceparent):
            log(logger, logging.INFO, "turn finished", outcome=outcome, first_text_ms=summary.first_text_ms,
                first_audio_ms=summary.first_audio_ms, total_ms=round(summary.total_ms, 1),
                segments_played=summary.played_segments, error=summary.error.code if summary.error else None)
        with contextlib.suppress(Exception):  # the turn's outcome stands even if the bookkeeping fails
            if summary.transcript and (summary.heard or summary.error is None):
                await self.edge.sessions.append(self.session_id, Turn(summary.transcript, summary.heard))
            for stream in self._cursors:
                await self.edge.bus.expire(stream, self.edge.stream_ttl_s)

    async def _amend_heard(self) -> None:
        """After delivery, the caller reported hearing only the first segments: history keeps those."""
        summary = self.summary
        texts = [self._segment_text.get(i, "").strip() for i in range(summary.played_segments)]
        heard = " ".join(t for t in texts if t)
        if heard == summary.heard or not summary.transcript:
            return
        summary.heard, summary.cancelled = heard, True
        with contextlib.suppress(Exception):  # the history is bookkeeping: the call goes on
            await self.edge.sessions.amend_last(self.session_id, Turn(summary.transcript, heard))

    def _closing_events(self) -> list[pb.TurnEvent]:
        """What the stages could not say: the edge's own error (deadline, bus), or the end of
        a turn cut short by barge-in."""
        header = messages.child_header(self.header)
        if self._own_error:
            return [pb.TurnEvent(header=header, stage="gateway", error=self.summary.error)]
        if self.summary.error is not None:
            return []  # a stage's error event already went out
        if not self.summary.cancelled and self._done_event is not None:
            return [self._done_event]
        if self.summary.cancelled:
            done = pb.Done(transcript=self.summary.transcript, text=self.summary.heard, cancelled=True,
                           num_segments=self.summary.played_segments, first_segment_tokens=-1)
            return [pb.TurnEvent(header=header, stage="gateway", done=done)]
        return []
