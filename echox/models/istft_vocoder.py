"""Unit vocoder whose network runs at the unit rate (50 Hz), for models we train on CPU.

Deduplicated units → embeddings → predicted durations → frame-rate embeddings → ConvNeXt blocks
at 50 Hz → a head, then signal processing without weights turns the head's frames into 16 kHz
audio. Only that last step works at the sample rate, so the vocoder trains in minutes on two
CPU cores where a HiFi-GAN generator (convolutions at every upsampled rate) needs hours. Heads:

- "harmonic" (default): F0 and a spectral envelope per frame; the voiced part is a bank of
  harmonics of F0 whose phases are the running integral of F0 and whose amplitudes are the
  envelope sampled at k·F0; the unvoiced part is noise shaped by a second envelope (inverse
  STFT with random phases). Phases are coherent by construction, which a frame-rate network
  cannot learn quickly at a 20 ms hop. F0 is learned against a pitch track (`f0_loss`); in
  training the harmonics follow the true F0 (teacher forcing), at inference the predicted one.
- "spectrum" (Vocos style): log-magnitude and phase per STFT bin, inverse STFT.

The public surface matches `UnitVocoder` (forward, synthesize, predict_durations,
duration_loss, log_durations), with the same duration predictor. Frame t is centred on the
middle of samples [t·hop, (t+1)·hop), like the unit features: T frames give T·hop samples.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from echox.audio import SAMPLE_RATE
from echox.config import ConfigBase
from echox.errors import ConfigError
from echox.models.unit_durations import DurationPredictor, DurationUnitVocoder

ARCHITECTURE = "istft"
HEADS = ("harmonic", "spectrum")
_MAX_LOG_MAGNITUDE = 5.0  # exp(5) ≈ 148: a cap keeps an untrained head from overflowing
_SYNTHESIS_SEED = 0  # synthesize() draws its noise from a fixed seed: same units, same audio


@dataclasses.dataclass(frozen=True)
class IstftVocoderConfig(ConfigBase):
    """Sizes of the frame-rate unit vocoder (the defaults are the tiny recipe's, which train to
    intelligible speech in minutes on two CPU cores); `architecture` tells a loader which vocoder
    a part holds."""

    num_units: int = 128
    unit_embed_dim: int = 128
    hidden_dim: int = 256
    intermediate_dim: int = 768
    num_layers: int = 6
    kernel_size: int = 7
    head: str = "harmonic"
    n_fft: int = 640  # the inverse STFT of the noise (harmonic head) or of everything (spectrum head)
    hop_length: int = 320
    subframes: int = 1  # synthesis frames per unit frame (2: envelopes at 100 Hz, sharper onsets)
    num_harmonics: int = 64
    envelope_bins: int = 128  # harmonic envelope, linear in frequency from 0 to Nyquist
    noise_bins: int = 64  # noise envelope, the same way
    f0_center_hz: float = 200.0  # the F0 an untrained head starts from
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
        if self.head not in HEADS:
            fail(f"head must be one of {HEADS}, got {self.head!r}")
        sizes = (self.num_units, self.unit_embed_dim, self.hidden_dim, self.intermediate_dim, self.num_layers)
        if min(sizes) < 1 or min(self.num_harmonics, self.envelope_bins - 1, self.noise_bins - 1) < 1:
            fail("sizes must be >= 1, envelope_bins and noise_bins >= 2")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            fail("kernel_size must be odd so 'same' padding keeps the length")
        if self.subframes < 1 or self.hop_length % self.subframes:
            fail("subframes must be >= 1 and divide hop_length")
        if not 0 < self.synthesis_hop <= self.n_fft or (self.n_fft - self.synthesis_hop) % 2:
            fail("need 0 < hop_length / subframes <= n_fft with an even difference (frames centred on their hop)")
        if self.dur_hidden_dim < 1 or self.dur_kernel_size < 1 or self.dur_kernel_size % 2 == 0:
            fail("dur_hidden_dim must be >= 1 and dur_kernel_size odd")
        if not 0.0 <= self.dur_dropout < 1.0:
            fail("dur_dropout must be in [0, 1)")
        if self.sample_rate < 1 or not 0 < self.f0_center_hz < self.sample_rate / 2:
            fail("sample_rate must be positive and f0_center_hz below Nyquist")

    @property
    def synthesis_hop(self) -> int:
        """Samples per synthesis frame (hop_length / subframes)."""
        return self.hop_length // self.subframes

    @property
    def head_outputs(self) -> int:
        """Outputs per synthesis frame."""
        if self.head == "spectrum":
            return self.n_fft + 2  # log-magnitude and phase per bin
        return 1 + self.envelope_bins + self.noise_bins  # log F0, harmonic and noise envelopes


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


def _to_samples(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """Linear interpolation [B, C, T] → [B, C, T·hop]; frame t lands on the middle of hop t."""
    return F.interpolate(frames, scale_factor=hop, mode="linear", align_corners=False)


def _sample_envelope(log_env: torch.Tensor, freqs: torch.Tensor, nyquist: float) -> torch.Tensor:
    """A log-envelope [B, T, E] on a linear grid 0…Nyquist, read at `freqs` [B, T, K] (Hz)."""
    bins = log_env.shape[-1] - 1
    position = (freqs / nyquist * bins).clamp(0, bins - 1e-4)
    low = position.floor().long()
    weight = position - low
    return log_env.gather(-1, low) * (1 - weight) + log_env.gather(-1, low + 1) * weight


def _sum_harmonics(amplitude: torch.Tensor, cycles: torch.Tensor, hop: int) -> torch.Tensor:
    """Σ_k a_k(n) · sin(2π k · cycles(n)) for amplitudes [B, T, K] per frame, read at each sample
    as `_to_samples` interpolates them, and phases in cycles [B, T·hop] → [B, T·hop].

    Between two frame centres the amplitude is a fixed blend of two frames, so each stretch of
    `hop` samples is two small matrix products with the sines instead of a [B, K, T·hop] amplitude
    tensor and its product (a tiny-recipe batch on two cores: 60 ms forward instead of 106)."""
    batch, frames, harmonics = amplitude.shape
    lead = (hop + 1) // 2  # stretch j covers the samples between frame centres j-1 and j (edges held)
    padded = torch.cat([amplitude[:, :1], amplitude, amplitude[:, -1:]], dim=1)  # [B, T+2, K]
    with torch.no_grad():
        order = torch.arange(1, harmonics + 1, device=cycles.device, dtype=cycles.dtype)
        stretched = F.pad(cycles, (lead, hop - lead))  # the padding's samples are cut off below
        angle = (2 * math.pi) * stretched.reshape(batch, frames + 1, hop, 1) * order
        sines = torch.sin(angle).reshape(batch * (frames + 1), hop, harmonics)
        weight = (torch.arange(hop, device=cycles.device, dtype=cycles.dtype) + hop / 2 - lead + 0.5) / hop
    left = torch.bmm(sines, padded[:, :-1].reshape(-1, harmonics, 1)).reshape(batch, frames + 1, hop)
    right = torch.bmm(sines, padded[:, 1:].reshape(-1, harmonics, 1)).reshape(batch, frames + 1, hop)
    mixed = left * (1 - weight) + right * weight
    return mixed.reshape(batch, (frames + 1) * hop)[:, lead : lead + frames * hop]


class IstftVocoder(DurationUnitVocoder):
    """Units → ConvNeXt at 50 Hz → harmonic-plus-noise (or spectrum) head → 16 kHz waveform,
    plus a duration predictor."""

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
        self.head = nn.Linear(c.hidden_dim, c.head_outputs * c.subframes)
        if c.head == "harmonic":
            with torch.no_grad():  # start quiet (amplitudes about 0.01) at the centre F0
                self.head.bias.fill_(-4.6)
                self.head.bias[:: c.head_outputs] = 0.0
        self.istft = InverseStft(c.n_fft, c.synthesis_hop)

    def encode(self, units: torch.Tensor) -> torch.Tensor:
        """Frame-rate units [B, T] → head outputs per synthesis frame [B, T · subframes, head_outputs]."""
        x = self.norm_pre(self.conv_pre(self.unit_embed(units).transpose(1, 2)).transpose(1, 2))
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(self.norm_post(x))
        return out.reshape(out.shape[0], -1, self.config.head_outputs)

    def _synthesis_rate(self, per_unit_frame: torch.Tensor) -> torch.Tensor:
        """[B, T] at the unit rate → [B, T · subframes] (linear, centres kept)."""
        if self.config.subframes == 1:
            return per_unit_frame
        up = F.interpolate(per_unit_frame.unsqueeze(1), scale_factor=self.config.subframes, mode="linear")
        return up[:, 0]

    def log_f0(self, frames: torch.Tensor) -> torch.Tensor:
        """Predicted log F0 (Hz) per frame [B, T] from `encode`'s output (harmonic head)."""
        return frames[..., 0] + math.log(self.config.f0_center_hz)

    def spectrum(self, frames: torch.Tensor) -> torch.Tensor:
        """Complex spectra [B, n_fft//2+1, T] from `encode`'s output (spectrum head)."""
        log_mag, phase = frames.transpose(1, 2).chunk(2, dim=1)
        return torch.polar(torch.exp(log_mag.clamp(max=_MAX_LOG_MAGNITUDE)), phase)

    def decode(
        self, frames: torch.Tensor, log_f0: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Head outputs → waveform [B, T·hop]. `log_f0` [B, T] overrides the predicted F0 (teacher
        forcing); `generator` draws the noise and the starting phase."""
        if self.config.head == "spectrum":
            return self.istft(self.spectrum(frames)).clamp(-1.0, 1.0)
        c = self.config
        f0 = torch.exp(self.log_f0(frames) if log_f0 is None else self._synthesis_rate(log_f0)).detach()
        harmonic_env, noise_env = frames[..., 1:].split([c.envelope_bins, c.noise_bins], dim=-1)
        voiced = self._harmonics(harmonic_env, f0, generator)
        noise = self._noise(noise_env, generator)
        return (voiced + noise).clamp(-1.0, 1.0)

    def _harmonics(self, log_env: torch.Tensor, f0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        c, nyquist = self.config, self.config.sample_rate / 2
        order = torch.arange(1, c.num_harmonics + 1, device=f0.device, dtype=f0.dtype)
        freqs = f0.unsqueeze(-1) * order  # [B, T, K]
        amplitude = torch.exp(_sample_envelope(log_env, freqs, nyquist).clamp(max=_MAX_LOG_MAGNITUDE))
        amplitude = amplitude * (freqs < nyquist)  # no aliasing: drop harmonics above Nyquist
        with torch.no_grad():
            # The phase is the running integral of F0; summed in float64 and wrapped to one cycle,
            # so float32 keeps k · phase exact enough for every harmonic.
            f0_samples = _to_samples(f0.unsqueeze(1).double(), c.synthesis_hop)[:, 0]
            start = torch.rand(f0.shape[0], 1, generator=generator, dtype=torch.float64).to(f0.device)
            cycles = torch.remainder(torch.cumsum(f0_samples / c.sample_rate, dim=1) + start, 1.0).to(f0.dtype)
        return _sum_harmonics(amplitude, cycles, c.synthesis_hop)

    def _noise(self, log_env: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        bins = self.config.n_fft // 2 + 1
        magnitude = torch.exp(log_env.clamp(max=_MAX_LOG_MAGNITUDE))  # [B, T, E]
        magnitude = F.interpolate(magnitude, size=bins, mode="linear", align_corners=True).transpose(1, 2)
        phase = torch.rand(magnitude.shape, generator=generator).to(magnitude.device) * (2 * math.pi)
        return self.istft(torch.polar(magnitude, phase))

    def forward(self, units: torch.Tensor, log_f0: torch.Tensor | None = None) -> torch.Tensor:
        """Units already expanded to frame rate, LongTensor [B, T] → waveform [B, T · hop]."""
        return self.decode(self.encode(units), log_f0)

    def f0_loss(self, frames: torch.Tensor, target_log_f0: torch.Tensor) -> torch.Tensor:
        """L1 between predicted log F0 and the target [B, T] at the unit rate (0 for the spectrum head)."""
        if self.config.head == "spectrum":
            return frames.new_zeros(())
        return F.l1_loss(self.log_f0(frames), self._synthesis_rate(target_log_f0))

    def envelope_loss(
        self, frames: torch.Tensor, audio: torch.Tensor, log_f0: torch.Tensor, voiced: torch.Tensor
    ) -> torch.Tensor:
        """Harmonic head: L1 between the log-envelope at each harmonic k·F0 and the log-amplitude
        of the target's harmonic there (its STFT peak over half the window's sum), on voiced
        frames. A direct target for the envelope, so it fits fast; the waveform losses refine it.
        `audio` [B, T·hop], `log_f0` and bool `voiced` [B, T] at the unit rate."""
        c = self.config
        if c.head != "harmonic":
            return frames.new_zeros(())
        hop, nyquist = c.synthesis_hop, c.sample_rate / 2
        side = (c.n_fft - hop) // 2
        window = self.istft.window
        spec = torch.stft(F.pad(audio, (side, side)), c.n_fft, hop, c.n_fft, window, center=False, return_complex=True)
        magnitude = spec.abs()[..., : frames.shape[1]].transpose(1, 2)  # [B, T·S, bins]
        order = torch.arange(1, c.num_harmonics + 1, device=audio.device, dtype=audio.dtype)
        freqs = torch.exp(self._synthesis_rate(log_f0)).unsqueeze(-1) * order  # [B, T·S, K]
        peak = _sample_envelope(magnitude.clamp(min=1e-5).log(), freqs, nyquist)
        target = peak - math.log(float(window.sum()) / 2)
        predicted = _sample_envelope(frames[..., 1 : 1 + c.envelope_bins], freqs, nyquist)
        voiced_frames = self._synthesis_rate(voiced.to(audio.dtype)) > 0.5
        mask = (freqs < nyquist) & voiced_frames.unsqueeze(-1)
        return ((predicted - target).abs() * mask).sum() / mask.sum().clamp(min=1)

    def waveform(self, units: torch.Tensor) -> torch.Tensor:
        """Frame-rate units [B, T] → waveform; the noise comes from a fixed seed, so the same
        units always give the same audio."""
        generator = torch.Generator().manual_seed(_SYNTHESIS_SEED)
        return self.decode(self.encode(units), generator=generator)

    def remove_weight_norm(self) -> None:
        """No weight norm here; kept so callers can treat every unit vocoder alike."""
