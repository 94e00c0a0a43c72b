"""The cosine-peak streaming trigger (method spec, "Streaming inference").

For generated token i, s_i = cos(h_i, W_lm[period]) where h_i is the hidden state that
predicted token i. With lag L, at step i the trigger looks at c = i − L and cuts after c when
s_c is the maximum of s[max(0, c−L) … c+L] (a tie counts as the maximum) and either
c − start ≥ max_len, or s_c > threshold and c − start ≥ min_len. Whatever remains at the end
of the answer is the last segment. Positions whose right window was never seen (c > n−1−L)
are never judged, so a streaming run and an offline run give identical cuts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from numbers import Real

import torch

from echox.config import ConfigBase
from echox.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SegmenterConfig(ConfigBase):
    """Trigger settings; a tiny model with short answers wants smaller min_len / max_len."""

    lag: int = 5  # tokens of look-ahead: the right half of the peak window
    max_len: int = 50  # cut at any local maximum once the segment is this long
    min_len: int = 20  # a peak above threshold cuts only once the segment is this long
    threshold: float = 0.1  # cosine a peak must strictly exceed (before max_len)

    def __post_init__(self) -> None:
        def fail(reason: str) -> None:
            raise ConfigError(f"segmenter: {reason}")

        for name in ("lag", "max_len", "min_len"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                fail(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not isinstance(self.threshold, Real) or isinstance(self.threshold, bool):
            fail(f"threshold must be a number, got {self.threshold!r}")
        if self.lag < 1:
            fail("lag must be >= 1")
        if not 0 <= self.min_len <= self.max_len:
            fail(f"need 0 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}")
        if not -1.0 <= self.threshold <= 1.0:  # also rejects NaN
            fail(f"threshold is a cosine, within [-1, 1], got {self.threshold}")


@dataclasses.dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of the answer; `index` counts segments from 0."""

    index: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def cosine_scores(hidden: torch.Tensor, period_row: torch.Tensor) -> torch.Tensor:
    """cos(h_i, period_row) for each row of hidden [n, H] → [n], computed in float32.

    float32 because bf16 cosines near the threshold would flip cuts between devices.
    """
    if hidden.ndim != 2 or period_row.ndim != 1 or hidden.shape[1] != period_row.shape[0]:
        raise ValueError(
            f"cosine_scores: expected hidden [n, H] and period_row [H], "
            f"got {tuple(hidden.shape)} and {tuple(period_row.shape)}"
        )
    row = period_row.to(device=hidden.device, dtype=torch.float32).unsqueeze(0)
    return torch.nn.functional.cosine_similarity(hidden.float(), row, dim=-1)


def _clean(score: float) -> float:
    """A NaN score (a broken hidden state) can never be a peak and never hides one."""
    value = float(score)
    return -math.inf if math.isnan(value) else value


def _is_cut(scores: Sequence[float], c: int, start: int, config: SegmenterConfig) -> bool:
    """The one rule both modes share. `scores` must hold at least up to c + lag."""
    window = scores[max(0, c - config.lag) : c + config.lag + 1]
    if scores[c] < max(window):  # ties count as the maximum
        return False
    span = c - start
    return span >= config.max_len or (scores[c] > config.threshold and span >= config.min_len)


class CosinePeakSegmenter:
    """Streaming use: push one score per generated token; a returned Segment is cut now.

    Call `finish()` at end of sequence for the remainder, `reset()` before the next answer.
    """

    def __init__(self, config: SegmenterConfig | None = None) -> None:
        self.config = config or SegmenterConfig()
        self._scores: list[float] = []
        self._start = 0
        self._index = 0

    def reset(self) -> None:
        self._scores = []
        self._start = 0
        self._index = 0

    @property
    def num_scores(self) -> int:
        """Scores pushed since the last reset (= tokens generated)."""
        return len(self._scores)

    def push(self, score: float) -> Segment | None:
        """Adds s_i for the newest token i; judges c = i − lag once its right window is complete."""
        self._scores.append(_clean(score))
        c = len(self._scores) - 1 - self.config.lag
        if c < 0 or not _is_cut(self._scores, c, self._start, self.config):
            return None
        return self._emit(c + 1)

    def finish(self) -> Segment | None:
        """The remainder [start, n) at end of sequence, if non-empty."""
        if self._start >= len(self._scores):
            return None
        return self._emit(len(self._scores))

    def _emit(self, end: int) -> Segment:
        segment = Segment(self._index, self._start, end)
        self._start, self._index = end, self._index + 1
        return segment


def segment_offline(scores: Sequence[float], config: SegmenterConfig | None = None) -> list[Segment]:
    """Offline use: the cuts a streaming run over the same scores makes, then the remainder."""
    config = config or SegmenterConfig()
    values = [_clean(s) for s in scores]
    segments: list[Segment] = []
    start = 0
    for c in range(len(values) - config.lag):  # only c whose window up to c + lag was seen
        if _is_cut(values, c, start, config):
            segments.append(Segment(len(segments), start, c + 1))
            start = c + 1
    if start < len(values):
        segments.append(Segment(len(segments), start, len(values)))
    return segments
