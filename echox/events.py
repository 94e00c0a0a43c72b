"""Typed events of one spoken turn, in the order a caller meets them."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

from echox.audio import SAMPLE_RATE


@dataclasses.dataclass(frozen=True)
class TranscriptEvent:
    """What the model heard (greedy CTC over the speech adapter)."""

    text: str


@dataclasses.dataclass(frozen=True)
class TextDeltaEvent:
    """New answer text as the LLM decodes it."""

    index: int  # the token's position in the answer
    token_id: int
    text: str


@dataclasses.dataclass(frozen=True)
class SegmentEvent:
    """The streaming trigger cut a segment; its speech is being generated."""

    index: int
    start: int  # first token of the segment in the answer
    token_ids: tuple[int, ...]
    text: str

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class AudioEvent:
    """Speech for segment `index`, in order."""

    index: int
    pcm: npt.NDArray[np.float32]
    sample_rate: int = SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return len(self.pcm) / self.sample_rate


@dataclasses.dataclass(frozen=True)
class Timings:
    first_text_ms: float | None
    first_audio_ms: float | None
    total_ms: float


@dataclasses.dataclass(frozen=True)
class DoneEvent:
    transcript: str
    text: str
    timings: Timings
    first_segment_tokens: int | None  # tokens generated before the first cut
    num_tokens: int
    cancelled: bool = False


Event = TranscriptEvent | TextDeltaEvent | SegmentEvent | AudioEvent | DoneEvent
