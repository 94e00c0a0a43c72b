"""One model-backend interface per stage, two implementations each.

`local` runs the echox stage in this process (torch, a worker thread so the event loop stays
free); `triton` sends the same work to the stage's model on a Triton server over gRPC
(streaming for speech_llm). Workers and the embedded mode see only these protocols.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from echox.audio import FloatArray
from echox.streaming.stages import AudioSegment, HiddenSegment, SpeechLLMOutput, UnitSegment
from echox.tokenizer import Turn


class BackendError(Exception):
    """The model backend failed or is unreachable (an error event for the turn, not a crash)."""


class SpeechLLMBackend(Protocol):
    max_audio_seconds: float

    def stream(
        self, audio: FloatArray, history: Sequence[Turn], cancel: asyncio.Event
    ) -> AsyncIterator[SpeechLLMOutput]:
        """Transcript, then text deltas and hidden segments as they happen, then AnswerEnd.
        Setting `cancel` stops the model (the in-flight request is cancelled) within a step."""
        ...

    async def close(self) -> None: ...


class UnitBackend(Protocol):
    async def generate(self, segment: HiddenSegment) -> UnitSegment: ...

    async def close(self) -> None: ...


class VocoderBackend(Protocol):
    async def synthesize(self, segment: UnitSegment) -> AudioSegment: ...

    async def close(self) -> None: ...
