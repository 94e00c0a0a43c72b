"""Audio codecs of the edge transports: PCM16 and float32 bytes, G.711 μ-law (telephony, from the
core library, where training's phone-band augmentation uses it too), and a streaming resampler."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

from echox.audio import float_to_mulaw, mulaw_to_float

FloatArray = npt.NDArray[np.float32]
__all__ = ["AudioFormatError", "StreamResampler", "f32_to_float", "float_to_mulaw", "float_to_pcm16", "mulaw_to_float",
           "pcm16_to_float", "resample"]


class AudioFormatError(ValueError):
    """Bytes that are not audio of the declared format."""


def pcm16_to_float(data: bytes) -> FloatArray:
    if len(data) % 2:
        raise AudioFormatError(f"PCM16 audio must be a whole number of 2-byte samples, got {len(data)} bytes")
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)


def f32_to_float(data: bytes) -> FloatArray:
    if len(data) % 4:
        raise AudioFormatError(f"float32 audio must be a whole number of 4-byte samples, got {len(data)} bytes")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def float_to_pcm16(audio: FloatArray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def resample(audio: FloatArray, from_rate: int, to_rate: int) -> FloatArray:
    """One whole clip (an answer segment) from one rate to another."""
    if from_rate == to_rate or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    out: FloatArray = np.asarray(soxr.resample(audio, from_rate, to_rate), dtype=np.float32)
    return out


class StreamResampler:
    """Resamples a stream chunk by chunk without clicks at the chunk borders."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._stream = None if from_rate == to_rate else soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32")

    def __call__(self, audio: FloatArray, last: bool = False) -> FloatArray:
        if self._stream is None:
            return audio.astype(np.float32, copy=False)
        out: FloatArray = np.asarray(self._stream.resample_chunk(audio.astype(np.float32, copy=False), last=last),
                                     dtype=np.float32)
        return out
