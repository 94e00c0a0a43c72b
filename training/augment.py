"""Training-time audio augmentation (16 kHz float32 mono): gain, speed, additive noise.

Every draw comes from the caller's `np.random.Generator`, so a given generator state always yields
the same augmented clip. Speed changes tempo and pitch together (plain resampling), as a faster or
slower speaker with a slightly different voice would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr

from echox.audio import SAMPLE_RATE
from echox.errors import ConfigError
from training.stage import settings_kwargs

FloatArray = npt.NDArray[np.float32]
PEAK_LIMIT = 0.99  # augmented clips are scaled down (not clipped) to stay below this peak
_SILENCE_POWER = 1e-10  # below this mean power a clip counts as silent: no noise to scale against


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """Probabilities and ranges of the augmentations (a recipe's `augment` mapping)."""

    noise_prob: float = 0.5
    snr_db: tuple[float, float] = (10.0, 30.0)
    gain_db: tuple[float, float] = (-6.0, 6.0)  # drawn for every clip; (0, 0) turns gain off
    speed_prob: float = 0.5
    speed: tuple[float, float] = (0.9, 1.1)  # > 1 is faster (shorter)

    def __post_init__(self) -> None:
        for name in ("noise_prob", "speed_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment: {name} must lie in [0, 1], got {value}")
        for name in ("snr_db", "gain_db", "speed"):
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"augment: {name} range {low, high} is reversed")
        if self.speed[0] <= 0.0:
            raise ConfigError(f"augment: speed factors must be positive, got {self.speed}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> AugmentSettings:
        kwargs = settings_kwargs(cls, values, "augment")
        for name in ("snr_db", "gain_db", "speed"):
            if name in kwargs:
                low, high = kwargs[name]
                kwargs[name] = (float(low), float(high))
        return cls(**kwargs)


def _pink_noise(length: int, rng: np.random.Generator) -> FloatArray:
    """Noise with a 1/f power spectrum (white noise shaped in the frequency domain)."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    frequencies = np.arange(spectrum.size, dtype=np.float64)
    frequencies[0] = 1.0  # keep DC finite; it is removed below anyway
    noise = np.fft.irfft(spectrum / np.sqrt(frequencies), n=length)
    return (noise - noise.mean()).astype(np.float32)


def add_noise(audio: FloatArray, snr_db: float, rng: np.random.Generator) -> FloatArray:
    """`audio` plus noise at exactly `snr_db` below the clip's mean power (a random white/pink
    blend). A silent clip comes back unchanged: there is no signal power to set the level."""
    signal = np.asarray(audio, dtype=np.float32)
    signal_power = float(np.mean(np.square(signal, dtype=np.float64))) if signal.size else 0.0
    if signal_power < _SILENCE_POWER:
        return signal.copy()
    pink_share = float(rng.uniform(0.0, 1.0))
    white = rng.standard_normal(signal.size).astype(np.float32)
    noise = pink_share * _pink_noise(signal.size, rng) + (1.0 - pink_share) * white
    noise_power = float(np.mean(np.square(noise, dtype=np.float64)))
    scale = np.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (signal + scale * noise).astype(np.float32)


def change_speed(audio: FloatArray, factor: float) -> FloatArray:
    """Plays `audio` `factor` times as fast (length / factor) by resampling."""
    if factor == 1.0:
        return np.asarray(audio, dtype=np.float32).copy()
    resampled = soxr.resample(np.asarray(audio, dtype=np.float32), SAMPLE_RATE * factor, SAMPLE_RATE)
    return np.asarray(resampled, dtype=np.float32)


def limit_peak(audio: FloatArray) -> FloatArray:
    """Scales the clip down when its peak exceeds PEAK_LIMIT (no hard clipping)."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak <= PEAK_LIMIT:
        return audio
    return (audio * (PEAK_LIMIT / peak)).astype(np.float32)


def augment(audio: FloatArray, rng: np.random.Generator, settings: AugmentSettings) -> FloatArray:
    """One random augmentation of `audio`: gain, then speed (with speed_prob), then noise (with
    noise_prob), peak-limited. The draws are made in a fixed order, so the result depends only on
    the generator's state."""
    gain = 10.0 ** (float(rng.uniform(*settings.gain_db)) / 20.0)
    use_speed = bool(rng.random() < settings.speed_prob)
    factor = float(rng.uniform(*settings.speed))
    use_noise = bool(rng.random() < settings.noise_prob)
    snr = float(rng.uniform(*settings.snr_db))
    out = np.asarray(audio, dtype=np.float32) * np.float32(gain)
    if use_speed:
        out = change_speed(out, factor)
    if use_noise:
        out = add_noise(out, snr, rng)
    return limit_peak(out)
