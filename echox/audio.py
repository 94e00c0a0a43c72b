"""Audio in and out: read, validate, mix down, resample to the model rate, write 16-bit WAV."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from echox.errors import AudioInputError

SAMPLE_RATE = 16_000

FloatArray = npt.NDArray[np.float32]
_MULAW_BIAS = 0x84
_MULAW_CLIP14 = 8159


def prepare_audio(
    samples: npt.ArrayLike, sample_rate: int, max_seconds: float | None = None
) -> FloatArray:
    """Returns mono float32 audio at 16 kHz, or raises AudioInputError with a clear reason.

    Accepts (n,), (n, channels) or (channels, n) with few channels; integer PCM is scaled.
    """
    audio = np.asarray(samples)
    if audio.size == 0:
        raise AudioInputError("the audio is empty")
    if sample_rate <= 0:
        raise AudioInputError(f"invalid sample rate {sample_rate}")
    if np.issubdtype(audio.dtype, np.integer):
        audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max)
    audio = audio.astype(np.float32, copy=False)
    if audio.ndim == 2:
        # Channels are the short axis: (n, c) from soundfile, (c, n) from some callers.
        channel_axis = 1 if audio.shape[1] <= audio.shape[0] else 0
        audio = audio.mean(axis=channel_axis)
    elif audio.ndim != 1:
        raise AudioInputError(f"expected mono or multi-channel audio, got shape {audio.shape}")
    if not np.all(np.isfinite(audio)):
        raise AudioInputError("the audio contains NaN or infinite samples")
    if sample_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE).astype(np.float32)
    if audio.size == 0:
        raise AudioInputError("the audio is empty after resampling")
    seconds = audio.size / SAMPLE_RATE
    if max_seconds is not None and seconds > max_seconds:
        raise AudioInputError(
            f"the audio is {seconds:.1f} s long; this model's window is {max_seconds:.1f} s"
        )
    return audio


def read_wav(path: str | Path, max_seconds: float | None = None) -> FloatArray:
    """Reads an audio file into mono float32 at 16 kHz."""
    path = Path(path)
    if not path.is_file():
        raise AudioInputError(f"no audio file at {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise AudioInputError(f"cannot read {path}: {exc}") from None
    return prepare_audio(data, int(rate), max_seconds=max_seconds)


def decode_wav_bytes(payload: bytes, max_seconds: float | None = None) -> FloatArray:
    """Decodes an in-memory audio file (WAV, FLAC, OGG) into mono float32 at 16 kHz."""
    try:
        data, rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=False)
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise AudioInputError(f"cannot decode audio: {exc}") from None
    return prepare_audio(data, int(rate), max_seconds=max_seconds)


def to_pcm16(audio: FloatArray) -> npt.NDArray[np.int16]:
    """Float audio in [-1, 1] to 16-bit PCM (clipped)."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


def write_wav(path: str | Path, audio: FloatArray, sample_rate: int = SAMPLE_RATE) -> None:
    """Writes mono 16-bit PCM WAV."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), to_pcm16(audio), sample_rate, subtype="PCM_16")


# G.711 μ-law (telephony): numpy only, as the stdlib's audioop is gone in Python 3.13.
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
