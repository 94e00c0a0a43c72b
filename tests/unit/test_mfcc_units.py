"""MFCC unit features (`units: {features: {kind: mfcc}}`): the cepstrum and deltas, their
indifference to pitch against log-mel's, and the units stage and extractor with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from echox.audio import read_wav
from echox.errors import ConfigError
from echox.espeak import speak
from echox.units.codec import expand
from tests.unit.test_units_stages import AGENT, write_fake_synth
from training.features import (
    FeatureConfig,
    LogMel,
    Mfcc,
    UnitExtractor,
    build_features,
    dct_matrix,
    deltas,
    feature_stats,
    fit_kmeans,
)
from training.stage import StageContext, run_stage
from training.stages import units

TEXTS = [
    "The capital of France is Paris.",
    "Two plus three is five.",
    "Snow is white and grass is green.",
    "Bees are insects that make honey.",
    "The sun rises in the east.",
    "Which month follows May? June.",
]


def test_dct_matrix_is_orthonormal() -> None:
    full = dct_matrix(20, 20)
    assert torch.allclose(full @ full.T, torch.eye(20), atol=1e-5)
    assert torch.equal(dct_matrix(20, 7), full[:7])
    flat = torch.full((20,), 3.0)  # a flat spectrum is all c0
    assert torch.allclose(full @ flat, torch.tensor([3.0 * 20**0.5] + [0.0] * 19), atol=1e-5)


def test_deltas_are_the_local_slope() -> None:
    ramp = torch.arange(10, dtype=torch.float32)[:, None] * torch.tensor([[2.0, -0.5]])
    slope = deltas(ramp)
    assert slope.shape == ramp.shape
    assert torch.allclose(slope[2:-2], torch.tensor([[2.0, -0.5]]).expand(6, 2))
    assert torch.allclose(deltas(torch.ones(5, 3)), torch.zeros(5, 3))  # edges repeated: flat stays flat


def test_mfcc_frames_line_up_with_log_mel() -> None:
    config = FeatureConfig(kind="mfcc")
    features = build_features(config)
    assert isinstance(features, Mfcc)
    audio = speak(TEXTS[0], AGENT["voice"], AGENT["rate"], AGENT["pitch"])
    mfcc, log_mel = features(audio), LogMel(config)(audio)
    assert mfcc.shape == (log_mel.shape[0], 39)  # 13 cepstra, deltas, delta-deltas
    assert torch.allclose(mfcc[:, :13], log_mel @ dct_matrix(80, 13).T, atol=1e-4)
    assert Mfcc(FeatureConfig(kind="mfcc", num_cepstra=20, delta_order=0))(audio).shape[1] == 20
    assert features(np.zeros(100, dtype=np.float32)).shape == (0, 39)


def test_feature_config_checks_the_cepstrum() -> None:
    with pytest.raises(ConfigError):
        FeatureConfig(kind="mfcc", num_cepstra=0)
    with pytest.raises(ConfigError):
        FeatureConfig(kind="mfcc", num_cepstra=81)
    with pytest.raises(ConfigError):
        FeatureConfig(kind="mfcc", delta_order=3)


def _pitch_agreement(kind: str, fit: list[np.ndarray], low: list[np.ndarray], high: list[np.ndarray]) -> float:
    """Share of frames given the same unit when the same texts are said at two pitches."""
    features = build_features(FeatureConfig(kind=kind))
    frames = torch.cat([features(audio) for audio in fit])
    mean, std = feature_stats(frames)
    extractor = UnitExtractor(FeatureConfig(kind=kind), mean, std, fit_kmeans((frames - mean) / std, 24, seed=0))
    same = total = 0
    for a, b in zip(low, high, strict=True):
        first, second = extractor.frame_units(a), extractor.frame_units(b)
        length = min(len(first), len(second))
        same += sum(x == y for x, y in zip(first[:length], second[:length], strict=True))
        total += length
    return same / total


def test_mfcc_units_follow_the_sounds_not_the_pitch() -> None:
    """The reason for the kind: one text said at espeak-ng pitch 40 and 60 (same timing) keeps far
    more of its MFCC units than of its log-mel units, whose low bins resolve the harmonics."""
    voice, rate = AGENT["voice"], AGENT["rate"]
    fit = [speak(text, voice, rate, 50) for text in TEXTS]
    low = [speak(text, voice, rate, 40) for text in TEXTS]
    high = [speak(text, voice, rate, 60) for text in TEXTS]
    assert max(abs(a.size - b.size) for a, b in zip(low, high, strict=True)) < 320  # same timing, within a frame
    log_mel, mfcc = (_pitch_agreement(kind, fit, low, high) for kind in ("log_mel", "mfcc"))
    assert mfcc > 0.85  # measured 0.95 (log-mel 0.78) at k = 24
    assert mfcc > log_mel + 0.1


def test_units_stage_with_mfcc_saves_an_extractor_that_reproduces_its_units(tmp_path: Path) -> None:
    write_fake_synth(tmp_path)
    settings = {"num_units": 12, "features": {"kind": "mfcc"}}
    run_stage(units.run, StageContext(run_dir=tmp_path, stage="units", settings=settings, seed=3))
    extractor = UnitExtractor.load(tmp_path / "units")
    assert extractor.config.kind == "mfcc" and extractor.centroids.shape == (12, 39)
    saved = json.loads((tmp_path / "units" / "units.json").read_text())["features"]
    assert (saved["kind"], saved["num_cepstra"], saved["delta_order"]) == ("mfcc", 13, 2)
    rows = [json.loads(line) for line in (tmp_path / "units" / "units.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (tmp_path / "synth" / "answers.jsonl").read_text().splitlines()]
    for row, answer in zip(rows, answers, strict=True):
        audio = read_wav(tmp_path / "synth" / answer["path"])
        assert expand(row["units"], row["durations"]) == extractor.frame_units(audio)
