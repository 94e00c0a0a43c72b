"""Speech-unit features and the unit extractor (features → k-means cluster ids at 50 Hz).

Units are k-means cluster ids of log-mel frames. One feature frame is one vocoder hop (320
samples at 16 kHz), and frame t is centred on the middle of samples [t·hop, (t+1)·hop): the
vocoder turns unit t back into exactly those samples, so units and audio line up with no offset.
An utterance of N samples gives N // hop frames (a trailing partial hop is dropped).

Normalisation is GLOBAL (per mel bin, mean and std over the training frames, stored with the
centroids): the agent speaks in one voice at one level, so absolute loudness is information
(silence, stops and vowels stay apart), whereas per-utterance normalisation would shift every
frame of a short answer by that answer's own mix of sounds and smear the clusters.

`FeatureConfig.kind` names the feature: "log_mel"; "mfcc", the log-mel frames' first cepstral
coefficients with deltas (HuBERT's first-iteration units), which keep the spectral envelope and
drop the pitch that log-mel's low bins resolve (measured: one text said at two pitches keeps 0.89
of its MFCC units against 0.59 of its log-mel ones, k = 128); or "encoder", the states after
`encoder_layers` layers of the run's own trained speech encoder (the `asr` stage's, 50 Hz, one
state per hop; the paper's HuBERT units are such a layer). Encoder units are meant to keep what
the ASR learned to tell apart (the sounds) and drop what it did not (pitch, level); from the tiny
recipe's 4-layer encoder they came out worse than log-mel for T2C and vocoder alike (README), so
log-mel is the default. The encoder's weights are saved with the k-means, so a units folder
alone extracts units; the k-means, the dedup and the vocoder do not care which kind.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import load_file, save_file

from echox.audio import SAMPLE_RATE
from echox.checkpoint import load_part_weights, read_part_config, save_part
from echox.config import ConfigBase
from echox.errors import ConfigError, ModelLoadError
from echox.models.speech_encoder import SAMPLES_PER_STATE, SpeechEncoder, SpeechEncoderConfig
from echox.units.codec import dedup

UNITS_CONFIG_FILE = "units.json"
KMEANS_FILE = "kmeans.safetensors"
FEATURE_KINDS = ("log_mel", "mfcc", "encoder")
ENCODER_PART = "speech_encoder"  # the units folder's copy of the asr stage's encoder


@dataclasses.dataclass(frozen=True)
class FeatureConfig(ConfigBase):
    """Log-mel frames at `sample_rate / hop_length` Hz (50 Hz by default: one vocoder hop)."""

    kind: str = "log_mel"
    sample_rate: int = 16_000
    hop_length: int = 320
    win_length: int = 640
    n_fft: int = 1024
    num_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8_000.0
    log_floor: float = 1e-5  # log(max(mel, floor)): silence becomes one flat value, not -inf
    encoder_layers: int = 0  # kind "encoder": layers run before the states are read (0 = all + final norm)
    num_cepstra: int = 13  # kind "mfcc": cepstral coefficients kept (c0, the level, included)
    delta_order: int = 2  # kind "mfcc": 1 adds deltas, 2 deltas and delta-deltas (HuBERT's 39 dims)

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ConfigError(f"features: kind must be one of {FEATURE_KINDS}, got {self.kind!r}")
        if not 0 < self.hop_length <= self.win_length <= self.n_fft:
            raise ConfigError("features: need 0 < hop_length <= win_length <= n_fft")
        if (self.n_fft - self.hop_length) % 2:
            raise ConfigError("features: n_fft - hop_length must be even (frames centred on their hop)")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ConfigError("features: need 0 <= f_min < f_max <= sample_rate / 2")
        if self.num_mels < 1 or self.log_floor <= 0:
            raise ConfigError("features: num_mels must be >= 1 and log_floor > 0")
        if self.encoder_layers < 0:
            raise ConfigError("features: encoder_layers must be >= 0 (0 = every layer)")
        cepstra_fit = 1 <= self.num_cepstra <= self.num_mels or self.kind != "mfcc"
        if not cepstra_fit or not 0 <= self.delta_order <= 2:
            raise ConfigError("features: need 1 <= num_cepstra <= num_mels and delta_order 0, 1 or 2")
        if self.kind == "encoder" and (self.sample_rate, self.hop_length) != (SAMPLE_RATE, SAMPLES_PER_STATE):
            raise ConfigError(f"features: encoder states come at {SAMPLE_RATE // SAMPLES_PER_STATE} Hz from "
                              f"{SAMPLE_RATE} Hz audio; sample_rate must be {SAMPLE_RATE} and "
                              f"hop_length must be {SAMPLES_PER_STATE}")

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length


def _hz_to_mel(hz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(config: FeatureConfig) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, [num_mels, n_fft // 2 + 1], each of unit peak."""
    bins = np.linspace(0.0, config.sample_rate / 2, config.n_fft // 2 + 1)
    edges_mel = np.linspace(
        _hz_to_mel(np.array(config.f_min)), _hz_to_mel(np.array(config.f_max)), config.num_mels + 2
    )
    edges = _mel_to_hz(edges_mel)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - low) / np.maximum(centre - low, 1e-9)
    falling = (high - bins[None, :]) / np.maximum(high - centre, 1e-9)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None)).float()


class LogMel:
    """Audio (16 kHz float) → log-mel frames [T, num_mels], T = samples // hop."""

    def __init__(self, config: FeatureConfig) -> None:
        self.config = config
        self.window = torch.hann_window(config.win_length)
        self.filters = mel_filterbank(config)

    def __call__(self, audio: npt.NDArray[np.float32] | torch.Tensor) -> torch.Tensor:
        c = self.config
        wav = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not torch.is_tensor(audio) else audio)
        wav = wav.float().reshape(-1)
        frames = wav.numel() // c.hop_length
        if frames == 0:
            return torch.zeros(0, c.num_mels)
        # Pad so that frame t of a non-centred STFT covers hop t in its middle.
        side = (c.n_fft - c.hop_length) // 2
        wav = wav[: frames * c.hop_length]
        padded = torch.nn.functional.pad(wav, (side, side))
        spec = torch.stft(
            padded, c.n_fft, c.hop_length, c.win_length, self.window, center=False, return_complex=True
        )
        power = spec.abs().pow(2)[:, :frames]  # [bins, T]
        mel = self.filters @ power
        return torch.log(torch.clamp(mel, min=c.log_floor)).T.contiguous()


def dct_matrix(size: int, keep: int) -> torch.Tensor:
    """The orthonormal DCT-II's first `keep` rows, [keep, size]."""
    n = torch.arange(size, dtype=torch.float64)
    k = torch.arange(keep, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi / size * (n + 0.5) * k) * math.sqrt(2.0 / size)
    basis[0] /= math.sqrt(2.0)
    return basis.float()


def deltas(frames: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Regression deltas over ±`width` frames of [T, dim] (edges repeated), as HTK computes them."""
    padded = torch.cat([frames[:1].expand(width, -1), frames, frames[-1:].expand(width, -1)])
    total = frames.shape[0]
    slopes = torch.zeros_like(frames)
    for n in range(1, width + 1):
        slopes += n * (padded[width + n : width + n + total] - padded[width - n : width - n + total])
    return slopes / (2 * sum(n * n for n in range(1, width + 1)))


class Mfcc:
    """Audio → MFCC frames [T, num_cepstra · (1 + delta_order)]: the log-mel frames' DCT, cut to
    the first coefficients, with deltas. Cutting the cepstrum keeps the spectral envelope (the
    sound) and drops the harmonics' fine structure (the pitch), which log-mel frames from a 40 ms
    window resolve below about 1.5 kHz; HuBERT's first units are k-means over such frames."""

    def __init__(self, config: FeatureConfig) -> None:
        self.config = config
        self.log_mel = LogMel(config)
        self.dct = dct_matrix(config.num_mels, config.num_cepstra)

    def __call__(self, audio: npt.NDArray[np.float32] | torch.Tensor) -> torch.Tensor:
        cepstra = self.log_mel(audio) @ self.dct.T
        if cepstra.shape[0] == 0:
            return torch.zeros(0, self.config.num_cepstra * (1 + self.config.delta_order))
        stack = [cepstra]
        for _ in range(self.config.delta_order):
            stack.append(deltas(stack[-1]))
        return torch.cat(stack, dim=1)


class EncoderStates:
    """Audio (16 kHz float) → the speech encoder's states after `encoder_layers` layers, [T, d_model],
    T = samples // hop, state t read for hop t. Audio longer than the encoder's window is read in
    windows one after another."""

    MARGIN_STATES = 25  # padding after the audio in a cropped window, as the asr stage trains it

    def __init__(self, config: FeatureConfig, encoder: SpeechEncoder) -> None:
        depth = len(encoder.whisper.layers)
        if config.encoder_layers > depth:
            raise ConfigError(f"features: encoder_layers {config.encoder_layers} > the encoder's {depth} layers")
        self.config = config
        self.encoder = encoder.eval()

    @torch.no_grad()
    def __call__(self, audio: npt.NDArray[np.float32] | torch.Tensor) -> torch.Tensor:
        from training.stages.asr import encode_window, window_log_mel

        wav = np.asarray(audio, dtype=np.float32).reshape(-1)
        hop, frames = self.config.hop_length, wav.size // self.config.hop_length
        # Whisper's state t is centred on sample hop·t, hop t's middle half a hop later: read the
        # audio from half a hop on and state t lands on hop t.
        wav = wav[hop // 2 : frames * hop]
        limit = self.encoder.config.max_source_positions
        step = limit - self.MARGIN_STATES - 1
        pieces = [torch.zeros(0, self.encoder.config.d_model)]
        for start in range(0, frames, step):
            piece = wav[start * hop : (start + step) * hop]
            window = min(limit, self.encoder.num_states(piece.size) + self.MARGIN_STATES)
            features = window_log_mel(self.encoder, [piece], window)
            states = encode_window(self.encoder.whisper, features, self.config.encoder_layers)
            pieces.append(states[0, : min(step, frames - start)].float())
        return torch.cat(pieces)


def load_speech_encoder(folder: Path) -> SpeechEncoder:
    """The SpeechEncoder part saved in `folder` (an asr stage's output, or a units folder)."""
    encoder = SpeechEncoder(read_part_config(folder, ENCODER_PART, SpeechEncoderConfig))
    load_part_weights(folder, ENCODER_PART, encoder)
    return encoder.eval()


def build_features(
    config: FeatureConfig, encoder: SpeechEncoder | None = None
) -> LogMel | Mfcc | EncoderStates:
    """The feature function named by `config.kind`; kind "encoder" reads `encoder`'s states."""
    if config.kind == "log_mel":
        return LogMel(config)
    if config.kind == "mfcc":
        return Mfcc(config)
    if config.kind == "encoder":
        if encoder is None:
            raise ConfigError("features: kind 'encoder' needs the trained speech encoder (the asr stage)")
        return EncoderStates(config, encoder)
    raise ConfigError(f"features: unknown kind {config.kind!r}")


class UnitExtractor:
    """Features → global normalisation → nearest k-means centroid: one unit id per 50 Hz frame."""

    def __init__(
        self,
        config: FeatureConfig,
        mean: torch.Tensor,
        std: torch.Tensor,
        centroids: torch.Tensor,
        encoder: SpeechEncoder | None = None,
    ) -> None:
        if centroids.ndim != 2 or centroids.shape[1] != mean.numel() or mean.shape != std.shape:
            raise ValueError("UnitExtractor: centroids [k, dim], mean [dim] and std [dim] must agree")
        self.config = config
        self.encoder = encoder if config.kind == "encoder" else None
        self.features = build_features(config, encoder)
        self.mean = mean.float()
        self.std = std.float()
        self.centroids = centroids.float()

    @property
    def num_units(self) -> int:
        return int(self.centroids.shape[0])

    def normalized_features(self, audio: npt.NDArray[np.float32] | torch.Tensor) -> torch.Tensor:
        return (self.features(audio) - self.mean) / self.std

    def assign(self, normalized: torch.Tensor) -> torch.Tensor:
        """Nearest centroid (squared Euclidean) of each normalised frame [T, dim] → LongTensor [T]."""
        if normalized.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long)
        distances = (
            normalized.pow(2).sum(1, keepdim=True)
            - 2 * normalized @ self.centroids.T
            + self.centroids.pow(2).sum(1)[None, :]
        )
        return distances.argmin(dim=1)

    def frame_units(self, audio: npt.NDArray[np.float32] | torch.Tensor) -> list[int]:
        """One unit per frame (not deduplicated)."""
        return [int(u) for u in self.assign(self.normalized_features(audio))]

    def dedup_units(self, audio: npt.NDArray[np.float32] | torch.Tensor) -> list[int]:
        """Deduplicated units (what the unit language and the vocoder's input are made of)."""
        return dedup(self.frame_units(audio))[0]

    def quantized_features(self, units: Sequence[int]) -> torch.Tensor:
        """Frame units → the centroids in feature space (un-normalised), [T, dim]."""
        return self.centroids[torch.as_tensor(list(units), dtype=torch.long)] * self.std + self.mean

    def save(self, folder: Path, extra: dict[str, Any] | None = None) -> None:
        """`units.json` (feature config, k, extra figures) + `kmeans.safetensors` (centroids, stats),
        and for kind "encoder" the encoder as `speech_encoder.{safetensors,json}`."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.encoder is not None:
            save_part(folder, ENCODER_PART, self.encoder, self.encoder.config)
        tensors = {"centroids": self.centroids, "mean": self.mean, "std": self.std}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / KMEANS_FILE))
        payload = {"features": self.config.to_dict(), "num_units": self.num_units, **(extra or {})}
        (folder / UNITS_CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> UnitExtractor:
        folder = Path(folder)
        config_path, weights_path = folder / UNITS_CONFIG_FILE, folder / KMEANS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise ModelLoadError(f"no unit model in {folder} (needs {UNITS_CONFIG_FILE} and {KMEANS_FILE})")
        try:
            payload = json.loads(config_path.read_text())
            config = FeatureConfig.from_dict(payload["features"])
            tensors = load_file(str(weights_path))
            encoder = load_speech_encoder(folder) if config.kind == "encoder" else None
            extractor = cls(config, tensors["mean"], tensors["std"], tensors["centroids"], encoder)
        except (KeyError, ValueError, ConfigError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{folder}: unreadable unit model ({exc})") from None
        if extractor.num_units != payload.get("num_units"):
            raise ModelLoadError(
                f"{folder}: units.json says {payload.get('num_units')} units, centroids hold {extractor.num_units}"
            )
        return extractor


def feature_stats(frames: torch.Tensor, min_std: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of stacked frames [N, dim] (std floored: a constant bin stays finite)."""
    mean = frames.mean(0)
    std = frames.std(0, unbiased=False).clamp(min=min_std)
    return mean, std


def fit_kmeans(normalized: torch.Tensor, num_units: int, seed: int, max_iter: int = 100) -> torch.Tensor:
    """k-means (scikit-learn, k-means++ init, one run) on normalised frames → centroids [k, dim].

    Deterministic for a seed: a fixed init and Lloyd iterations over the same frames.
    """
    from sklearn.cluster import KMeans

    if normalized.shape[0] < num_units:
        raise ValueError(f"k-means: {normalized.shape[0]} frames cannot make {num_units} clusters")
    data = normalized.double().numpy()
    model = KMeans(n_clusters=num_units, n_init=1, max_iter=max_iter, random_state=seed, algorithm="lloyd")
    model.fit(data)
    return torch.from_numpy(model.cluster_centers_).float()


def hop_seconds(config: FeatureConfig) -> float:
    return config.hop_length / config.sample_rate


def frames_for(samples: int, config: FeatureConfig) -> int:
    """How many frames (= units) an utterance of `samples` samples gives."""
    return math.floor(samples / config.hop_length)


@dataclasses.dataclass(frozen=True)
class PitchConfig(ConfigBase):
    """YIN pitch tracking at the unit frame rate (the vocoder's F0 targets)."""

    sample_rate: int = 16_000
    hop_length: int = 320
    window: int = 1024  # analysis span: the lag range plus the integration window
    f0_min: float = 60.0
    f0_max: float = 500.0
    threshold: float = 0.15  # YIN aperiodicity below which a frame counts as voiced
    min_rms: float = 1e-3  # quieter frames are unvoiced whatever their periodicity


def _yin_lag(cmnd: npt.NDArray[np.float64], lag_min: int, threshold: float) -> tuple[float, float]:
    """First dip of the cumulative-mean-normalised difference below `threshold` (else the global
    minimum), refined by a parabola: (lag in samples, aperiodicity)."""
    below = np.nonzero(cmnd[lag_min:] < threshold)[0]
    if below.size:
        lag = lag_min + int(below[0])
        while lag + 1 < cmnd.size and cmnd[lag + 1] < cmnd[lag]:
            lag += 1
    else:
        lag = lag_min + int(np.argmin(cmnd[lag_min:]))
    if 0 < lag < cmnd.size - 1:
        left, mid, right = cmnd[lag - 1], cmnd[lag], cmnd[lag + 1]
        bend = left - 2 * mid + right
        shift = 0.5 * (left - right) / bend if bend > 0 else 0.0
        return lag + float(np.clip(shift, -1, 1)), float(mid)
    return float(lag), float(cmnd[lag])


def pitch_track(audio: npt.NDArray[np.float32], config: PitchConfig = PitchConfig()) -> npt.NDArray[np.float32]:
    """F0 in Hz per unit frame (frame t centred on hop t's middle), 0 where unvoiced."""
    hop, sr = config.hop_length, config.sample_rate
    frames = len(audio) // hop
    lag_max = int(sr / config.f0_min)
    lag_min = max(2, int(sr / config.f0_max))
    span = config.window - lag_max  # integration window of the difference function
    if frames == 0 or span < hop:
        return np.zeros(frames, dtype=np.float32)
    side = config.window // 2
    padded = np.pad(np.asarray(audio, dtype=np.float64), (side, side + config.window))
    f0 = np.zeros(frames, dtype=np.float32)
    for t in range(frames):
        centre = side + t * hop + hop // 2
        x = padded[centre - span // 2 : centre - span // 2 + config.window]
        head = x[:span]
        if np.sqrt(np.mean(head**2)) < config.min_rms:
            continue
        energy = np.concatenate([[0.0], np.cumsum(x**2)])
        lags = np.arange(lag_max + 1)
        shifted = energy[lags + span] - energy[lags]  # energy of x[τ : τ + span]
        corr = np.correlate(x[: span + lag_max], head, mode="valid")[: lag_max + 1]
        diff = np.maximum(shifted[0] + shifted - 2 * corr, 0.0)
        running = np.cumsum(diff[1:]) / np.arange(1, lag_max + 1)
        cmnd = np.ones(lag_max + 1)
        cmnd[1:] = diff[1:] / np.maximum(running, 1e-12)
        lag, aperiodicity = _yin_lag(cmnd, lag_min, config.threshold)
        if aperiodicity < config.threshold:
            f0[t] = sr / lag
    return f0


def continuous_log_f0(f0: npt.NDArray[np.float32], default_hz: float = 200.0) -> npt.NDArray[np.float32]:
    """log F0 with unvoiced frames filled by interpolating their voiced neighbours (a contour the
    vocoder can follow everywhere; voicing itself lives in the harmonic amplitudes)."""
    voiced = np.nonzero(f0 > 0)[0]
    if voiced.size == 0:
        return np.full(f0.shape, np.log(default_hz), dtype=np.float32)
    filled = np.interp(np.arange(f0.size), voiced, np.log(f0[voiced]))
    return filled.astype(np.float32)
