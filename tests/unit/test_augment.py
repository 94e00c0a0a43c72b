"""training.augment: noise at a given SNR, speed, gain, determinism, peak limit, settings."""

from __future__ import annotations

import numpy as np
import pytest

from echox.audio import SAMPLE_RATE
from echox.errors import ConfigError
from training.augment import PEAK_LIMIT, AugmentSettings, add_noise, augment, change_speed


def tone(seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)  # speech-like loudness changes
    return (amplitude * envelope * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 25.0])
def test_add_noise_hits_the_snr(snr_db: float) -> None:
    clean = tone()
    noisy = add_noise(clean, snr_db, np.random.default_rng(3))
    noise = noisy - clean
    measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
    assert abs(measured - snr_db) < 0.5
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape


def test_add_noise_leaves_silence_alone() -> None:
    silent = np.zeros(1600, dtype=np.float32)
    assert np.array_equal(add_noise(silent, 10.0, np.random.default_rng(0)), silent)


def test_speed_changes_length() -> None:
    clean = tone(1.0)
    assert abs(change_speed(clean, 1.25).size - SAMPLE_RATE / 1.25) <= 2
    assert abs(change_speed(clean, 0.8).size - SAMPLE_RATE / 0.8) <= 2
    settings = AugmentSettings(speed_prob=1.0, speed=(1.1, 1.1), noise_prob=0.0, gain_db=(0.0, 0.0))
    assert abs(augment(clean, np.random.default_rng(0), settings).size - SAMPLE_RATE / 1.1) <= 2


def test_augment_is_deterministic_for_a_generator_state() -> None:
    clean, settings = tone(), AugmentSettings(noise_prob=1.0, speed_prob=1.0)
    first = augment(clean, np.random.default_rng(7), settings)
    again = augment(clean, np.random.default_rng(7), settings)
    other = augment(clean, np.random.default_rng(8), settings)
    assert np.array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_augment_without_changes_is_identity() -> None:
    clean = tone()
    settings = AugmentSettings(noise_prob=0.0, speed_prob=0.0, gain_db=(0.0, 0.0))
    assert np.array_equal(augment(clean, np.random.default_rng(0), settings), clean)


def test_gain_applies_the_drawn_level() -> None:
    clean = tone(amplitude=0.1)
    settings = AugmentSettings(noise_prob=0.0, speed_prob=0.0, gain_db=(-6.0, -6.0))
    quieter = augment(clean, np.random.default_rng(0), settings)
    assert np.allclose(quieter, clean * 10 ** (-6 / 20), atol=1e-6)


def test_loud_clips_are_scaled_not_clipped_and_finite() -> None:
    loud = tone(amplitude=0.9)
    settings = AugmentSettings(noise_prob=1.0, snr_db=(0.0, 0.0), gain_db=(12.0, 12.0), speed_prob=1.0)
    for seed in range(5):
        out = augment(loud, np.random.default_rng(seed), settings)
        assert np.all(np.isfinite(out))
        assert np.max(np.abs(out)) <= PEAK_LIMIT + 1e-6
        assert np.max(np.abs(out)) > 0.9  # scaled to the limit, not squashed


def test_settings_from_mapping() -> None:
    settings = AugmentSettings.from_mapping({"snr_db": [5, 20], "noise_prob": 0.3})
    assert settings.snr_db == (5.0, 20.0) and settings.noise_prob == 0.3
    with pytest.raises(ConfigError, match="unknown"):
        AugmentSettings.from_mapping({"reverb": 0.2})
    with pytest.raises(ConfigError):
        AugmentSettings.from_mapping({"noise_prob": 1.5})
    with pytest.raises(ConfigError):
        AugmentSettings.from_mapping({"speed": [1.1, 0.9]})
