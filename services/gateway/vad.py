"""Voice activity detection for the call core: one speech probability per 32 ms frame of 16 kHz
audio. `SileroVad` is the product's (the silero-vad wheel's ONNX model, offline, run with
onnxruntime directly: one shared session, the recurrent state per call); `EnergyVad` is a plain
loudness gate for unit tests and for deployments without onnxruntime."""

from __future__ import annotations

import importlib.resources
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from services.gateway.codecs import FloatArray

SAMPLE_RATE = 16_000
FRAME_SAMPLES = 512  # silero's frame at 16 kHz: 32 ms


class VoiceActivity(Protocol):
    """Per call (it keeps state): speech probability of consecutive frames."""

    frame_samples: int

    def probability(self, frame: FloatArray) -> float:
        """P(speech) in [0, 1] for the next `frame_samples` samples of 16 kHz float audio."""
        ...

    def reset(self) -> None:
        ...


VadFactory = Callable[[], VoiceActivity]


class EnergyVad:
    """Loudness gate: -50 dBFS and below is silence (0), -30 dBFS and above speech (1), linear
    in between, so the default threshold 0.5 sits at -40 dBFS."""

    frame_samples = FRAME_SAMPLES

    def __init__(self, floor_db: float = -50.0, ceiling_db: float = -30.0) -> None:
        self.floor_db = floor_db
        self.ceiling_db = ceiling_db

    def probability(self, frame: FloatArray) -> float:
        rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64)))) if frame.size else 0.0
        db = 20.0 * np.log10(max(rms, 1e-9))
        return float(np.clip((db - self.floor_db) / (self.ceiling_db - self.floor_db), 0.0, 1.0))

    def reset(self) -> None:
        pass


class SileroVad:
    """Silero VAD v5+ (ONNX, from the silero-vad wheel). The model is loaded once per process
    and shared; each instance carries one call's recurrent state and 64-sample context."""

    frame_samples = FRAME_SAMPLES
    _CONTEXT = 64
    _session: Any = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.session = self.load()
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    @classmethod
    def load(cls) -> Any:
        with cls._lock:
            if cls._session is None:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                # One thread: a frame takes well under a millisecond, and the model workers need the cores.
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
                path = importlib.resources.files("silero_vad.data").joinpath("silero_vad.onnx")
                cls._session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                                            providers=["CPUExecutionProvider"])
            return cls._session

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, self._CONTEXT), dtype=np.float32)

    def probability(self, frame: FloatArray) -> float:
        if frame.shape != (self.frame_samples,):
            raise ValueError(f"silero wants frames of {self.frame_samples} samples, got {frame.shape}")
        x = np.concatenate([self._context, frame.astype(np.float32, copy=False)[None, :]], axis=1)
        out, self._state = self.session.run(None, {"input": x, "state": self._state, "sr": self._sr})
        self._context = x[:, -self._CONTEXT:]
        return float(out[0][0])


def vad_factory(kind: str = "silero") -> VadFactory:
    """What makes one VAD per call: "silero" (the product) or "energy" (tests)."""
    if kind == "silero":
        SileroVad.load()  # fail at startup, not on the first call
        return SileroVad
    if kind == "energy":
        return EnergyVad
    raise ValueError(f"unknown VAD {kind!r} (silero or energy)")
