"""Training-time audio augmentation (16 kHz float32 mono): gain, speed, silence around the
speech, telephone band (8 kHz G.711 μ-law and back) and additive noise.

Every draw comes from the caller's `np.random.Generator`, so a given generator state always yields
the same augmented clip. Speed changes tempo and pitch together (plain resampling), as a faster or
slower speaker with a slightly different voice would. Silence and the phone band are there because
callers' audio has both: a model that only ever heard clips starting on the first word drops it
after a pause, and one that never heard 8 kHz μ-law mishears phone calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.fft
import soxr

from echox.audio import SAMPLE_RATE, float_to_mulaw, mulaw_to_float
from echox.errors import ConfigError
from training.stage import settings_kwargs

FloatArray = npt.NDArray[np.float32]
PEAK_LIMIT = 0.99  # augmented clips are scaled down (not clipped) to stay below this peak
_SILENCE_POWER = 1e-10  # below this mean power a clip counts as silent: no noise to scale against


RANGES = ("snr_db", "gain_db", "speed", "silence_seconds")  # the (low, high) settings


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """Probabilities and ranges of the augmentations (a recipe's `augment` mapping)."""

    noise_prob: float = 0.5
    snr_db: tuple[float, float] = (10.0, 30.0)
    gain_db: tuple[float, float] = (-6.0, 6.0)  # drawn for every clip; (0, 0) turns gain off
    speed_prob: float = 0.5
    speed: tuple[float, float] = (0.9, 1.1)  # > 1 is faster (shorter)
    silence_prob: float = 0.3
    silence_seconds: tuple[float, float] = (0.0, 0.5)  # drawn separately before and after the speech
    phone_prob: float = 0.15  # 8 kHz G.711 μ-law round trip (a phone call's audio)

    def __post_init__(self) -> None:
        for name in ("noise_prob", "speed_prob", "silence_prob", "phone_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment: {name} must lie in [0, 1], got {value}")
        for name in RANGES:
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"augment: {name} range {low, high} is reversed")
        if self.speed[0] <= 0.0:
            raise ConfigError(f"augment: speed factors must be positive, got {self.speed}")
        if self.silence_seconds[0] < 0.0:
            raise ConfigError(f"augment: silence_seconds must not be negative, got {self.silence_seconds}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> AugmentSettings:
        kwargs = settings_kwargs(cls, values, "augment")
        for name in RANGES:
            if name in kwargs:
                low, high = kwargs[name]
                kwargs[name] = (float(low), float(high))
        return cls(**kwargs)


def _pink_noise(length: int, rng: np.random.Generator) -> FloatArray:
    """Noise with a 1/f power spectrum (white noise shaped in the frequency domain), made at the
    next length the FFT is fast at and cut: a clip length with a large prime factor made the
    FFTs ten times dearer (10 ms instead of 1 for a 3 s clip)."""
    size = int(scipy.fft.next_fast_len(max(1, length), real=True))
    spectrum = np.fft.rfft(rng.standard_normal(size))
    frequencies = np.arange(spectrum.size, dtype=np.float64)
    frequencies[0] = 1.0  # keep DC finite; it is removed below anyway
    noise = np.fft.irfft(spectrum / np.sqrt(frequencies), n=size)[:length]
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


def phone_band(audio: FloatArray) -> FloatArray:
    """`audio` as a phone call carries it: down to 8 kHz, G.711 μ-law and back up to 16 kHz."""
    narrow = np.asarray(soxr.resample(np.asarray(audio, dtype=np.float32), SAMPLE_RATE, 8000), dtype=np.float32)
    decoded = mulaw_to_float(float_to_mulaw(narrow))
    wide = np.asarray(soxr.resample(decoded, 8000, SAMPLE_RATE), dtype=np.float32)
    return wide[: len(audio)] if len(wide) >= len(audio) else np.pad(wide, (0, len(audio) - len(wide)))


def pad_silence(audio: FloatArray, before_s: float, after_s: float) -> FloatArray:
    before, after = round(before_s * SAMPLE_RATE), round(after_s * SAMPLE_RATE)
    return np.pad(np.asarray(audio, dtype=np.float32), (before, after))


def limit_peak(audio: FloatArray) -> FloatArray:
    """Scales the clip down when its peak exceeds PEAK_LIMIT (no hard clipping)."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak <= PEAK_LIMIT:
        return audio
    return (audio * (PEAK_LIMIT / peak)).astype(np.float32)


def augment(audio: FloatArray, rng: np.random.Generator, settings: AugmentSettings) -> FloatArray:
    """One random augmentation of `audio`: gain, then speed (with speed_prob), silence around it
    (silence_prob), the phone band (phone_prob), then noise (noise_prob), peak-limited. The draws
    are made in a fixed order, so the result depends only on the generator's state."""
    gain = 10.0 ** (float(rng.uniform(*settings.gain_db)) / 20.0)
    use_speed = bool(rng.random() < settings.speed_prob)
    factor = float(rng.uniform(*settings.speed))
    use_noise = bool(rng.random() < settings.noise_prob)
    snr = float(rng.uniform(*settings.snr_db))
    use_silence = bool(rng.random() < settings.silence_prob)
    before_s, after_s = (float(rng.uniform(*settings.silence_seconds)) for _ in range(2))
    use_phone = bool(rng.random() < settings.phone_prob)
    out = np.asarray(audio, dtype=np.float32) * np.float32(gain)
    if use_speed:
        out = change_speed(out, factor)
    if use_silence:
        out = pad_silence(out, before_s, after_s)
    if use_phone:
        out = phone_band(out)
    if use_noise:
        out = add_noise(out, snr, rng)
    return limit_peak(out)
