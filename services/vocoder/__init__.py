"""Stage 3 worker: deduplicated speech units → 16 kHz PCM16 audio on the session's audio
stream, through the vocoder model backend."""

from __future__ import annotations

import asyncio

from echox.audio import SAMPLE_RATE
from echox.streaming.stages import UnitSegment
from services.common import messages
from services.common.backends.base import VocoderBackend
from services.common.bus import Bus
from services.common.worker import StageWorker, TurnFailed
from services.proto import stages_pb2 as pb


class VocoderWorker(StageWorker[pb.UnitSegment]):
    stage = "vocoder"
    input_stream = messages.UNITS
    message_type = pb.UnitSegment

    def __init__(self, bus: Bus, backend: VocoderBackend, *, num_units: int | None = None, **kwargs: object) -> None:
        super().__init__(bus, **kwargs)  # type: ignore[arg-type]
        self.backend = backend
        self.num_units = num_units

    async def process(self, message: pb.UnitSegment, cancel: asyncio.Event) -> None:
        if self.num_units is not None and any(u >= self.num_units for u in message.units):
            raise TurnFailed("malformed", f"segment {message.index}: a unit is outside 0..{self.num_units - 1}")
        segment = UnitSegment(message.index, tuple(message.unit_tokens), tuple(message.units))
        audio = await self.unless_cancelled(self.backend.synthesize(segment), cancel)
        if audio is None or cancel.is_set():
            return
        out = pb.AudioSegment(header=messages.child_header(message.header), index=message.index,
                              pcm=messages.pcm16_bytes(audio.pcm), sample_rate=SAMPLE_RATE,
                              encoding=pb.PCM_S16LE, text=message.text)
        await self.bus.publish(messages.audio_stream(message.header.session_id), out.SerializeToString())
