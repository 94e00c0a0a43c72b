"""The cosine-peak trigger: table-driven cases, streaming == offline, config and cosine helper."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from echox.errors import ConfigError
from echox.streaming import CosinePeakSegmenter, Segment, SegmenterConfig, cosine_scores, segment_offline

pytestmark = pytest.mark.unit

# Small numbers keep the tables readable: look 2 tokens ahead, threshold cuts from span 3,
# max_len cuts from span 6 (span = c − start, so a segment cut at c is span + 1 tokens long).
SMALL = SegmenterConfig(lag=2, max_len=6, min_len=3, threshold=0.1)


def _zeros_with(n: int, **peaks: float) -> list[float]:
    """n zero scores with s[i] = value for each p<i>=value."""
    scores = [0.0] * n
    for name, value in peaks.items():
        scores[int(name[1:])] = value
    return scores


def _streamed(scores: list[float], config: SegmenterConfig) -> list[Segment]:
    segmenter = CosinePeakSegmenter(config)
    cuts = [cut for s in scores if (cut := segmenter.push(s)) is not None]
    last = segmenter.finish()
    return cuts if last is None else [*cuts, last]


def _spans(segments: list[Segment]) -> list[tuple[int, int]]:
    return [(s.start, s.end) for s in segments]


CASES: list[Any] = [
    # --- very short answers ---
    pytest.param([], SMALL, [], id="empty-no-segments"),
    pytest.param([0.9], SMALL, [(0, 1)], id="shorter-than-lag-one-segment"),
    pytest.param([0.9, 0.0], SMALL, [(0, 2)], id="n-equals-lag-one-segment"),
    pytest.param([0.9, 0.0, 0.0], SMALL, [(0, 3)], id="n-equals-lag-plus-one"),
    # --- no peak at all ---
    pytest.param([0.0] * 20, SMALL, [(0, 7), (7, 14), (14, 20)], id="flat-low-cut-by-max_len"),
    pytest.param([0.5] * 20, SMALL, [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)], id="flat-high-every-min_len"),
    pytest.param([i / 100 for i in range(20)], SMALL, [(0, 20)], id="rising-never-a-peak"),
    pytest.param([1 - i / 100 for i in range(20)], SMALL, [(0, 20)], id="falling-never-a-peak"),
    # --- ties in the window count as the maximum ---
    pytest.param(_zeros_with(12, p4=0.5, p5=0.5), SMALL, [(0, 5), (5, 12)], id="tie-first-of-pair-cuts"),
    pytest.param(_zeros_with(12, p2=0.5, p3=0.5), SMALL, [(0, 4), (4, 12)], id="tie-second-of-pair-cuts"),
    # --- a peak whose right window was never seen is never evaluated ---
    pytest.param(_zeros_with(10, p8=0.9), SMALL, [(0, 10)], id="peak-near-end-not-evaluated"),
    pytest.param(_zeros_with(11, p8=0.9), SMALL, [(0, 9), (9, 11)], id="peak-near-end-just-evaluated"),
    # --- min_len ---
    pytest.param(_zeros_with(12, p2=0.9), SMALL, [(0, 7), (7, 12)], id="peak-before-min_len-ignored"),
    pytest.param(_zeros_with(12, p3=0.9), SMALL, [(0, 4), (4, 12)], id="peak-at-min_len-cuts"),
    # --- max_len: a cut without the threshold, but only at a local maximum ---
    pytest.param(
        [0, 0, 0, 0, 0, 0, 0.01, 0.02, 0.05, 0.02, 0.01, 0, 0, 0], SMALL, [(0, 9), (9, 14)], id="max_len-waits-for-peak"
    ),
    pytest.param([0.0] * 120, SegmenterConfig(), [(0, 51), (51, 102), (102, 120)], id="max_len-defaults"),
    # --- threshold is strict ---
    pytest.param(_zeros_with(12, p4=0.1), SMALL, [(0, 8), (8, 12)], id="threshold-equal-does-not-cut"),
    pytest.param(_zeros_with(12, p4=0.1000001), SMALL, [(0, 5), (5, 12)], id="threshold-just-above-cuts"),
    # --- defaults from the spec, and odd inputs ---
    pytest.param(_zeros_with(60, p24=0.8, p45=0.8), SegmenterConfig(), [(0, 25), (25, 46), (46, 60)], id="defaults"),
    pytest.param(_zeros_with(12, p4=math.nan), SMALL, [(0, 7), (7, 12)], id="nan-never-a-peak"),
    pytest.param(
        [0, 1, 0, 1, 0, 1, 0],
        SegmenterConfig(lag=1, max_len=0, min_len=0),
        [(0, 2), (2, 4), (4, 6), (6, 7)],
        id="zero-lengths-cut-every-peak",
    ),
]


@pytest.mark.parametrize(("scores", "config", "expected"), CASES)
def test_cuts(scores: list[float], config: SegmenterConfig, expected: list[tuple[int, int]]) -> None:
    offline = segment_offline(scores, config)
    assert _spans(offline) == expected
    assert _streamed(scores, config) == offline
    assert [s.index for s in offline] == list(range(len(offline)))


def test_push_cuts_exactly_lag_tokens_after_the_peak() -> None:
    segmenter = CosinePeakSegmenter(SMALL)
    scores = _zeros_with(12, p4=0.9)
    results = [segmenter.push(s) for s in scores]
    assert [i for i, r in enumerate(results) if r is not None] == [4 + SMALL.lag]
    assert results[6] == Segment(0, 0, 5) and results[6].length == 5
    assert segmenter.num_scores == 12
    assert segmenter.finish() == Segment(1, 5, 12)
    assert segmenter.finish() is None  # nothing left after the remainder


def test_reset_starts_a_new_answer() -> None:
    segmenter = CosinePeakSegmenter(SMALL)
    for s in _zeros_with(12, p4=0.9):
        segmenter.push(s)
    segmenter.reset()
    assert segmenter.num_scores == 0 and segmenter.finish() is None
    assert _streamed(_zeros_with(12, p4=0.9), SMALL) == segment_offline(_zeros_with(12, p4=0.9), SMALL)
    for s in [0.9, 0.0]:
        segmenter.push(s)
    assert segmenter.finish() == Segment(0, 0, 2)


def test_default_config_is_the_spec() -> None:
    assert SegmenterConfig() == SegmenterConfig(lag=5, max_len=50, min_len=20, threshold=0.1)
    assert CosinePeakSegmenter().config == SegmenterConfig()
    assert segment_offline([0.0] * 3) == [Segment(0, 0, 3)]


# --- streaming == offline, and segments tile the answer ---------------------------------------

configs = st.builds(
    lambda lag, min_len, extra, threshold: SegmenterConfig(lag, min_len + extra, min_len, threshold),
    st.integers(1, 6),
    st.integers(0, 10),
    st.integers(0, 12),
    st.sampled_from([-1.0, 0.0, 0.1, 0.3, 1.0]),
)
# Few distinct values make ties and exact-threshold scores common.
score_values = st.one_of(st.sampled_from([0.0, 0.1, 0.2, 0.5]), st.floats(-1.0, 1.0))


@settings(max_examples=300, deadline=None)
@given(st.lists(score_values, max_size=80), configs)
def test_streaming_equals_offline_and_tiles(scores: list[float], config: SegmenterConfig) -> None:
    offline = segment_offline(scores, config)
    assert _streamed(scores, config) == offline
    assert [s.index for s in offline] == list(range(len(offline)))
    bounds = [0, *(s.end for s in offline)]
    assert [(s.start, s.end) for s in offline] == list(itertools.pairwise(bounds))
    assert bounds[-1] == len(scores)
    assert all(s.length >= 1 for s in offline)
    for seg in offline[:-1]:  # each cut obeys the rule, judged independently here
        c = seg.end - 1
        assert c + config.lag <= len(scores) - 1
        assert scores[c] == max(scores[max(0, c - config.lag) : c + config.lag + 1])
        span = c - seg.start
        assert span >= config.max_len or (scores[c] > config.threshold and span >= config.min_len)


# --- config and the cosine helper -------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"lag": 0},
        {"min_len": -1},
        {"min_len": 30, "max_len": 20},
        {"threshold": 1.5},
        {"threshold": math.nan},
        {"lag": 2.5},
        {"lag": True},
        {"threshold": "0.1"},
    ],
    ids=[
        "lag-zero",
        "min-negative",
        "min-above-max",
        "threshold-above-1",
        "threshold-nan",
        "lag-float",
        "lag-bool",
        "threshold-string",
    ],
)
def test_invalid_config_raises(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="segmenter"):
        SegmenterConfig(**changes)
    with pytest.raises(ConfigError):
        SegmenterConfig.from_dict({**SegmenterConfig().to_dict(), **changes})


def test_config_dict_round_trip() -> None:
    assert SegmenterConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ConfigError, match="unknown keys"):
        SegmenterConfig.from_dict({"lags": 3})


def test_cosine_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden, row = torch.randn(7, 16, generator=gen), torch.randn(16, generator=gen)
    expected = torch.stack([torch.dot(h, row) / (h.norm() * row.norm()) for h in hidden])
    assert torch.allclose(cosine_scores(hidden, row), expected, atol=1e-6)
    half = cosine_scores(hidden.to(torch.bfloat16), row.to(torch.bfloat16))
    assert half.dtype == torch.float32 and half.shape == (7,)
    assert torch.allclose(cosine_scores(torch.stack([row, -row, 2 * row]), row), torch.tensor([1.0, -1.0, 1.0]))
    assert cosine_scores(torch.zeros(0, 16), row).shape == (0,)


@pytest.mark.parametrize(
    ("hidden_shape", "row_shape"), [((16,), (16,)), ((3, 16), (8,)), ((3, 16), (1, 16))], ids=["1d", "width", "2d-row"]
)
def test_cosine_scores_rejects_bad_shapes(hidden_shape: tuple[int, ...], row_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="cosine_scores"):
        cosine_scores(torch.zeros(hidden_shape), torch.zeros(row_shape))
