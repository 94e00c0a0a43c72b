from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from echox.audio import SAMPLE_RATE, prepare_audio, read_wav, write_wav
from echox.errors import AudioInputError


def test_resamples_and_mixes_down() -> None:
    stereo = np.random.default_rng(0).uniform(-0.5, 0.5, (44_100, 2)).astype(np.float32)
    out = prepare_audio(stereo, 44_100)
    assert out.ndim == 1 and out.dtype == np.float32
    assert abs(len(out) - SAMPLE_RATE) <= 2


def test_channels_first_is_mixed_down_too() -> None:
    audio = np.stack([np.ones(1000), -np.ones(1000)]).astype(np.float32)
    assert np.allclose(prepare_audio(audio, SAMPLE_RATE), 0.0)


def test_int16_is_scaled() -> None:
    pcm = np.full(100, 16384, dtype=np.int16)
    assert np.allclose(prepare_audio(pcm, SAMPLE_RATE), 0.5, atol=1e-3)


@pytest.mark.parametrize(
    ("samples", "rate", "max_seconds", "reason"),
    [
        (np.zeros(0, np.float32), 16_000, None, "empty"),
        (np.array([0.0, np.nan], np.float32), 16_000, None, "NaN"),
        (np.array([0.0, np.inf], np.float32), 16_000, None, "NaN or infinite"),
        (np.zeros(16_000 * 3, np.float32), 16_000, 2.0, "window"),
        (np.zeros(100, np.float32), 0, None, "sample rate"),
        (np.zeros((2, 2, 2), np.float32), 16_000, None, "shape"),
    ],
    ids=["empty", "nan", "inf", "too-long", "bad-rate", "3d"],
)
def test_bad_audio_has_a_clear_reason(samples: np.ndarray, rate: int, max_seconds: float | None, reason: str) -> None:
    with pytest.raises(AudioInputError, match=reason):
        prepare_audio(samples, rate, max_seconds=max_seconds)


def test_wav_round_trip(tmp_path: Path) -> None:
    audio = (0.5 * np.sin(np.linspace(0, 100, 8000))).astype(np.float32)
    write_wav(tmp_path / "a.wav", audio)
    info = sf.info(str(tmp_path / "a.wav"))
    assert info.samplerate == SAMPLE_RATE and info.subtype == "PCM_16"
    assert np.allclose(read_wav(tmp_path / "a.wav"), audio, atol=1e-4)


def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav")
    with pytest.raises(AudioInputError, match="cannot read"):
        read_wav(bad)
    with pytest.raises(AudioInputError, match="no audio file"):
        read_wav(tmp_path / "missing.wav")
