"""Audio codecs of the edge transports: PCM16 and float32 bytes, G.711 μ-law (telephony), and a
streaming resampler. numpy only (the stdlib's audioop is deprecated and gone in Python 3.13)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

FloatArray = npt.NDArray[np.float32]
_MULAW_BIAS = 0x84
_MULAW_CLIP14 = 8159


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


def _mulaw_table() -> npt.NDArray[np.int16]:
    """All 256 μ-law codes decoded to 16-bit PCM (ITU-T G.711)."""
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = ((mantissa << 3) + _MULAW_BIAS) << exponent
    return np.where(codes & 0x80, _MULAW_BIAS - magnitude, magnitude - _MULAW_BIAS).astype(np.int16)


_MULAW_DECODE = _mulaw_table()


def mulaw_to_float(data: bytes) -> FloatArray:
    return (_MULAW_DECODE[np.frombuffer(data, dtype=np.uint8)].astype(np.float32) / 32768.0).astype(np.float32)


def float_to_mulaw(audio: FloatArray) -> bytes:
    """G.711 μ-law, bit-exact with the classic reference (Sun g711.c, as audioop had it)."""
    value = (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int32) >> 2  # 14-bit, arithmetic shift
    mask = np.where(value < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(value), _MULAW_CLIP14) + (_MULAW_BIAS >> 2)
    # The segment is the position of the highest set bit above bit 5; past segment 7 it saturates.
    segment = np.maximum(np.floor(np.log2(magnitude)).astype(np.int32) - 5, 0)
    code = np.where(segment > 7, 0x7F, (np.minimum(segment, 7) << 4) | ((magnitude >> (segment + 1)) & 0x0F))
    return ((code ^ mask) & 0xFF).astype(np.uint8).tobytes()


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
