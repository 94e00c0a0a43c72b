"""Stage 2 worker: a hidden-state segment → denoising adapter → echo decoder → deduplicated
speech units, through the unit_generator model backend."""

from __future__ import annotations

import asyncio

from echox.streaming.stages import HiddenSegment
from services.common import messages
from services.common.backends.base import UnitBackend
from services.common.bus import Bus
from services.common.worker import StageWorker, TurnFailed
from services.proto import stages_pb2 as pb


class UnitGeneratorWorker(StageWorker[pb.HiddenSegment]):
    stage = "unit_generator"
    input_stream = messages.SEGMENTS
    message_type = pb.HiddenSegment

    def __init__(self, bus: Bus, backend: UnitBackend, *, hidden_size: int | None = None, **kwargs: object) -> None:
        super().__init__(bus, **kwargs)  # type: ignore[arg-type]
        self.backend = backend
        self.hidden_size = hidden_size

    async def process(self, message: pb.HiddenSegment, cancel: asyncio.Event) -> None:
        try:
            hidden = messages.tensor_from_proto(message.hidden)
        except messages.MessageError as exc:
            raise TurnFailed(exc.code, f"segment {message.index}: {exc}") from None
        shape_ok = hidden.dim() == 2 and hidden.shape[0] == len(message.token_ids)
        if not shape_ok or (self.hidden_size is not None and hidden.shape[1] != self.hidden_size):
            raise TurnFailed("malformed", f"segment {message.index}: hidden states of shape {tuple(hidden.shape)} "
                             f"do not fit {len(message.token_ids)} tokens of width {self.hidden_size}")
        segment = HiddenSegment(message.index, message.start, tuple(message.token_ids), message.text, hidden)
        units = await self.unless_cancelled(self.backend.generate(segment), cancel)
        if units is None or cancel.is_set():
            return
        out = pb.UnitSegment(header=messages.child_header(message.header), index=message.index,
                             unit_tokens=list(units.unit_tokens), units=list(units.units), text=message.text)
        await self.bus.publish(messages.UNITS, out.SerializeToString())
