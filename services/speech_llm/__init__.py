"""Stage 1 worker: a turn's audio (+ the session's history) → transcript, streamed text, and
hidden-state segments for the unit generator, through the speech_llm model backend."""

from __future__ import annotations

import asyncio

from echox.audio import FloatArray, prepare_audio
from echox.errors import AudioInputError
from echox.events import TextDeltaEvent, TranscriptEvent
from echox.streaming.stages import AnswerEnd, HiddenSegment
from services.common import messages
from services.common.backends.base import SpeechLLMBackend
from services.common.bus import Bus
from services.common.state import SessionStore, UnknownSession
from services.common.worker import StageWorker, TurnFailed
from services.proto import stages_pb2 as pb


class SpeechLLMWorker(StageWorker[pb.TurnRequest]):
    stage = "speech_llm"
    input_stream = messages.TURNS
    message_type = pb.TurnRequest

    def __init__(
        self,
        bus: Bus,
        backend: SpeechLLMBackend,
        sessions: SessionStore,
        *,
        hidden_dtype: str = "float16",
        max_audio_s: float = 30.0,
        **kwargs: object,
    ) -> None:
        super().__init__(bus, **kwargs)  # type: ignore[arg-type]
        self.backend = backend
        self.sessions = sessions
        self.hidden_dtype = hidden_dtype
        self.max_audio_s = min(max_audio_s, backend.max_audio_seconds)

    async def process(self, message: pb.TurnRequest, cancel: asyncio.Event) -> None:
        header = message.header
        try:
            history = await self.sessions.history(header.session_id)
        except UnknownSession:
            raise TurnFailed("unknown_session", f"unknown session {header.session_id!r}") from None
        audio = self._audio(message)
        done = pb.Done(first_segment_tokens=-1)
        segments = 0
        async for item in self.backend.stream(audio, history, cancel):
            if isinstance(item, TranscriptEvent):
                done.transcript = item.text
                await self.emit(header, pb.TurnEvent(transcript=pb.Transcript(text=item.text)))
            elif isinstance(item, TextDeltaEvent):
                delta = pb.TextDelta(index=item.index, token_id=item.token_id, text=item.text)
                await self.emit(header, pb.TurnEvent(text_delta=delta))
            elif isinstance(item, HiddenSegment):
                await self._publish_segment(header, item)
                if done.first_segment_tokens < 0:
                    done.first_segment_tokens = item.start + len(item.token_ids)
                segments += 1
            elif isinstance(item, AnswerEnd):
                done.text, done.num_tokens, done.cancelled = item.text, len(item.token_ids), item.cancelled
        done.num_segments = segments
        done.cancelled = done.cancelled or cancel.is_set()
        await self.emit(header, pb.TurnEvent(done=done))

    def _audio(self, message: pb.TurnRequest) -> FloatArray:
        try:
            samples = messages.decode_audio(message.audio, message.encoding)
            return prepare_audio(samples, message.sample_rate, max_seconds=self.max_audio_s)
        except messages.MessageError as exc:
            raise TurnFailed(exc.code, str(exc)) from None
        except AudioInputError as exc:
            raise TurnFailed("bad_audio", str(exc)) from None

    async def _publish_segment(self, header: pb.Header, segment: HiddenSegment) -> None:
        out = pb.HiddenSegment(
            header=messages.child_header(header), index=segment.index, start=segment.start,
            token_ids=list(segment.token_ids), text=segment.text,
            hidden=messages.tensor_to_proto(segment.hidden, self.hidden_dtype),
        )
        await self.bus.publish(messages.SEGMENTS, out.SerializeToString())
        cut = pb.SegmentCut(index=segment.index, start=segment.start, tokens=len(segment.token_ids), text=segment.text)
        await self.emit(header, pb.TurnEvent(segment=cut))
