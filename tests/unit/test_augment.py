"""training.augment: noise at a given SNR, speed, gain, silence, phone band, determinism, peak
limit, settings."""

from __future__ import annotations

import numpy as np
import pytest

from echox.audio import SAMPLE_RATE
from echox.errors import ConfigError
from training.augment import PEAK_LIMIT, AugmentSettings, add_noise, augment, change_speed, phone_band

QUIET = {"silence_prob": 0.0, "phone_prob": 0.0}  # only the augmentation a test is about


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
    settings = AugmentSettings(speed_prob=1.0, speed=(1.1, 1.1), noise_prob=0.0, gain_db=(0.0, 0.0), **QUIET)
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
    settings = AugmentSettings(noise_prob=0.0, speed_prob=0.0, gain_db=(0.0, 0.0), **QUIET)
    assert np.array_equal(augment(clean, np.random.default_rng(0), settings), clean)


def test_gain_applies_the_drawn_level() -> None:
    clean = tone(amplitude=0.1)
    settings = AugmentSettings(noise_prob=0.0, speed_prob=0.0, gain_db=(-6.0, -6.0), **QUIET)
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


def test_silence_goes_before_and_after_the_speech() -> None:
    clean = tone(0.5)
    settings = AugmentSettings(
        noise_prob=0.0, speed_prob=0.0, gain_db=(0.0, 0.0), phone_prob=0.0, silence_prob=1.0,
        silence_seconds=(0.25, 0.25),
    )
    out = augment(clean, np.random.default_rng(0), settings)
    pad = SAMPLE_RATE // 4
    assert out.size == clean.size + 2 * pad
    assert not out[:pad].any() and not out[-pad:].any()
    assert np.array_equal(out[pad:-pad], clean)


def test_phone_band_removes_what_8khz_cannot_carry() -> None:
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    low, high = 0.2 * np.sin(2 * np.pi * 440.0 * t), 0.2 * np.sin(2 * np.pi * 6000.0 * t)
    out = phone_band((low + high).astype(np.float32))
    spectrum = np.abs(np.fft.rfft(out))  # 1 Hz bins over one second
    assert out.size == SAMPLE_RATE and out.dtype == np.float32
    assert spectrum[6000] < 0.01 * spectrum[440]  # above 4 kHz: gone
    assert abs(spectrum[440] / np.abs(np.fft.rfft(low))[440] - 1.0) < 0.1  # the voice band stays
    settings = AugmentSettings(noise_prob=0.0, speed_prob=0.0, gain_db=(0.0, 0.0), silence_prob=0.0, phone_prob=1.0)
    assert np.array_equal(augment(low.astype(np.float32), np.random.default_rng(0), settings),
                          phone_band(low.astype(np.float32)))


def test_settings_from_mapping() -> None:
    settings = AugmentSettings.from_mapping({"snr_db": [5, 20], "noise_prob": 0.3})
    assert settings.snr_db == (5.0, 20.0) and settings.noise_prob == 0.3
    with pytest.raises(ConfigError, match="unknown"):
        AugmentSettings.from_mapping({"reverb": 0.2})
    with pytest.raises(ConfigError):
        AugmentSettings.from_mapping({"noise_prob": 1.5})
    with pytest.raises(ConfigError):
        AugmentSettings.from_mapping({"speed": [1.1, 0.9]})
    with pytest.raises(ConfigError):
        AugmentSettings.from_mapping({"silence_seconds": [-0.1, 0.2]})
    with pytest.raises(ConfigError):
        AugmentSettings.from_mapping({"phone_prob": -0.1})


@pytest.mark.parametrize("length", [48_000, 48_123, 1])  # 48,123 = 3 · 16,041: made at a faster FFT length
def test_pink_noise_has_the_length_asked_and_a_one_over_f_spectrum(length: int) -> None:
    from training.augment import _pink_noise

    noise = _pink_noise(length, np.random.default_rng(5))
    assert noise.shape == (length,) and noise.dtype == np.float32 and abs(float(noise.mean())) < 1e-6
    if length < SAMPLE_RATE:
        return
    power = np.abs(np.fft.rfft(noise.astype(np.float64))) ** 2
    hz = np.fft.rfftfreq(length, 1 / SAMPLE_RATE)
    low, high = power[(hz >= 100) & (hz < 200)].mean(), power[(hz >= 1000) & (hz < 2000)].mean()
    assert 5.0 < low / high < 20.0  # ten times the frequency, a tenth of the power
