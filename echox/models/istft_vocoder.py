"""Unit vocoder with an inverse-STFT head (Vocos style), for models we train on CPU.

Deduplicated units → embeddings → predicted durations → frame-rate embeddings → ConvNeXt blocks
at the unit rate (50 Hz) → per-frame log-magnitude and phase → inverse STFT → 16 kHz waveform.
All the network runs at the frame rate and only the inverse FFT works at the sample rate, so it
trains in minutes on two CPU cores where a HiFi-GAN generator (convolutions at every upsampled
rate) needs hours. The public surface matches `UnitVocoder` (forward, synthesize,
predict_durations, duration_loss, log_durations), and the duration predictor is the same.

Frame t of the inverse STFT is centred on the middle of samples [t·hop, (t+1)·hop), like the
unit features, so T frames give exactly T·hop samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from echox.audio import SAMPLE_RATE
from echox.config import ConfigBase
from echox.errors import ConfigError
from echox.models.vocoder import DurationPredictor

ARCHITECTURE = "istft"
_MAX_LOG_MAGNITUDE = 5.0  # exp(5) ≈ 148: a cap keeps an untrained head from overflowing the iFFT


@dataclasses.dataclass(frozen=True)
class IstftVocoderConfig(ConfigBase):
    """Sizes of the iSTFT unit vocoder; `architecture` tells a loader which vocoder a part holds."""

    num_units: int = 128
    unit_embed_dim: int = 128
    hidden_dim: int = 256
    intermediate_dim: int = 768
    num_layers: int = 6
    kernel_size: int = 7
    n_fft: int = 1280
    hop_length: int = 320
    dur_hidden_dim: int = 128
    dur_kernel_size: int = 3
    dur_dropout: float = 0.5
    sample_rate: int = SAMPLE_RATE
    architecture: str = ARCHITECTURE

    def __post_init__(self) -> None:
        def fail(reason: str) -> None:
            raise ConfigError(f"istft vocoder: {reason}")

        if self.architecture != ARCHITECTURE:
            fail(f"architecture must be {ARCHITECTURE!r}, got {self.architecture!r}")
        if min(self.num_units, self.unit_embed_dim, self.hidden_dim, self.intermediate_dim, self.num_layers) < 1:
            fail("num_units, unit_embed_dim, hidden_dim, intermediate_dim and num_layers must be >= 1")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            fail("kernel_size must be odd so 'same' padding keeps the length")
        if not 0 < self.hop_length <= self.n_fft or (self.n_fft - self.hop_length) % 2:
            fail("need 0 < hop_length <= n_fft with an even difference (frames centred on their hop)")
        if self.dur_hidden_dim < 1 or self.dur_kernel_size < 1 or self.dur_kernel_size % 2 == 0:
            fail("dur_hidden_dim must be >= 1 and dur_kernel_size odd")
        if not 0.0 <= self.dur_dropout < 1.0:
            fail("dur_dropout must be in [0, 1)")
        if self.sample_rate < 1:
            fail("sample_rate must be positive")

    @classmethod
    def tiny(cls) -> IstftVocoderConfig:
        """Trains to intelligible speech in about ten minutes on two CPU cores."""
        return cls()


class ConvNeXtBlock(nn.Module):
    """Depthwise conv → LayerNorm → pointwise MLP (GELU) → layer scale, residual."""

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] → [B, T, C]."""
        y = self.dwconv(x.transpose(1, 2)).transpose(1, 2)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + self.gamma * y


class InverseStft(nn.Module):
    """Per-frame complex spectra [B, n_fft//2+1, T] → waveform [B, T·hop] by windowed overlap-add."""

    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.window: torch.Tensor
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        frames = spec.shape[-1]
        pieces = torch.fft.irfft(spec, n=self.n_fft, dim=1) * self.window[None, :, None]  # [B, n_fft, T]
        total = (frames - 1) * self.hop_length + self.n_fft
        fold = {"output_size": (1, total), "kernel_size": (1, self.n_fft), "stride": (1, self.hop_length)}
        signal = F.fold(pieces, **fold).reshape(spec.shape[0], total)
        squared = self.window.square()[None, :, None].expand(1, -1, frames)
        envelope = F.fold(squared, **fold).reshape(1, total)
        start = (self.n_fft - self.hop_length) // 2  # frame t is centred on hop t's middle
        end = start + frames * self.hop_length
        return signal[:, start:end] / envelope[:, start:end].clamp(min=1e-8)


class IstftVocoder(nn.Module):
    """Units → ConvNeXt at 50 Hz → magnitude and phase → inverse STFT, plus a duration predictor."""

    def __init__(self, config: IstftVocoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.unit_embed = nn.Embedding(c.num_units, c.unit_embed_dim)
        self.dur_predictor = DurationPredictor(c.unit_embed_dim, c.dur_hidden_dim, c.dur_kernel_size, c.dur_dropout)
        self.conv_pre = nn.Conv1d(c.unit_embed_dim, c.hidden_dim, c.kernel_size, padding=c.kernel_size // 2)
        self.norm_pre = nn.LayerNorm(c.hidden_dim, eps=1e-6)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(c.hidden_dim, c.intermediate_dim, c.kernel_size, 1.0 / c.num_layers)
            for _ in range(c.num_layers)
        )
        self.norm_post = nn.LayerNorm(c.hidden_dim, eps=1e-6)
        self.head = nn.Linear(c.hidden_dim, c.n_fft + 2)  # log-magnitude and phase per bin
        self.istft = InverseStft(c.n_fft, c.hop_length)

    @property
    def device(self) -> torch.device:
        return self.unit_embed.weight.device

    def spectrum(self, units: torch.Tensor) -> torch.Tensor:
        """Frame-rate units [B, T] → complex spectra [B, n_fft//2+1, T]."""
        x = self.conv_pre(self.unit_embed(units).transpose(1, 2)).transpose(1, 2)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        log_mag, phase = self.head(self.norm_post(x)).transpose(1, 2).chunk(2, dim=1)
        magnitude = torch.exp(log_mag.clamp(max=_MAX_LOG_MAGNITUDE))
        return torch.polar(magnitude, phase)

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        """Units already expanded to frame rate, LongTensor [B, T] → waveform [B, T · hop]."""
        return self.istft(self.spectrum(units)).clamp(-1.0, 1.0)

    def log_durations(self, dedup_units: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw duration-predictor output log(1 + d) per deduplicated unit, [B, N]."""
        return self.dur_predictor(self.unit_embed(dedup_units), mask)  # type: ignore[no-any-return]

    def predict_durations(self, dedup_units: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Frames per deduplicated unit [B, N] → LongTensor [B, N], >= 1 (0 at padding)."""
        mask = None
        if lengths is not None:
            positions = torch.arange(dedup_units.shape[1], device=dedup_units.device)
            mask = positions.unsqueeze(0) < lengths.to(dedup_units.device).unsqueeze(1)
        log_dur = self.log_durations(dedup_units, mask)
        durations = torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)
        return durations if mask is None else durations.masked_fill(~mask, 0)

    def duration_loss(self, dedup_units: torch.Tensor, target_durations: torch.Tensor) -> torch.Tensor:
        """MSE between predicted log-durations and log(1 + target); padding = target 0."""
        mask = target_durations > 0
        if not bool(mask.any()):
            raise ValueError("duration_loss: every target duration is padding (0)")
        log_dur = self.log_durations(dedup_units, mask)
        target = torch.log1p(target_durations.to(log_dur.dtype))
        return F.mse_loss(log_dur[mask], target[mask])

    @torch.no_grad()
    def synthesize(
        self, dedup_units: torch.Tensor | Sequence[int], durations: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One utterance of deduplicated units [N] → float32 waveform [samples] on the CPU.

        Uses predicted durations when `durations` is None; runs in eval mode and restores the mode.
        """
        units = self._check_units(dedup_units)
        was_training = self.training
        self.eval()
        try:
            if durations is None:
                frames = self.predict_durations(units.unsqueeze(0))[0]
            else:
                frames = self._check_durations(durations, units.shape[0])
            audio: torch.Tensor = self(torch.repeat_interleave(units, frames).unsqueeze(0))[0]
        finally:
            self.train(was_training)
        return audio.float().cpu().contiguous()

    def remove_weight_norm(self) -> None:
        """No weight norm here; kept so callers can treat every unit vocoder alike."""

    def _check_units(self, dedup_units: torch.Tensor | Sequence[int]) -> torch.Tensor:
        units = torch.as_tensor(dedup_units)
        if units.ndim != 1 or units.numel() == 0:
            shape = tuple(units.shape)
            raise ValueError(f"synthesize: expected a non-empty 1-D sequence of unit ids, got shape {shape}")
        if units.is_floating_point() or units.is_complex() or units.dtype == torch.bool:
            raise ValueError(f"synthesize: unit ids must be integers, got {units.dtype}")
        low, high = int(units.min()), int(units.max())
        if low < 0 or high >= self.config.num_units:
            raise ValueError(f"synthesize: unit ids must be in [0, {self.config.num_units}), got range [{low}, {high}]")
        return units.long().to(self.device)

    def _check_durations(self, durations: torch.Tensor, num_units: int) -> torch.Tensor:
        frames = torch.as_tensor(durations)
        if frames.shape != (num_units,):
            raise ValueError(f"synthesize: durations shape {tuple(frames.shape)} != units shape ({num_units},)")
        if frames.is_floating_point() or int(frames.min()) < 1:
            raise ValueError("synthesize: durations must be integers >= 1")
        return frames.long().to(self.device)
