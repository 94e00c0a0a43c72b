"""The unit vocoder's training losses: spectral losses, an optional discriminator and an optional
encoder-feature loss (`EncoderFeatureLoss`: the run's own trained speech encoder as the ear).

Spectral losses (`SpectralLoss`, `head_loss`) converge fast on CPU, but L1 on log-magnitudes
pulls each frame towards the average of what its units could mean: smeared formants, an
over-smooth spectrum. A discriminator that sees real and generated spectrograms rewards the
detail the average lacks. `MultiResolutionDiscriminator` is UnivNet's multi-resolution
spectrogram discriminator, made small for two CPU cores: per STFT size a few strided 2-D
convolutions over (frequency, time) of the log-magnitude, each layer's activations kept for
feature matching. Its losses are least squares (LSGAN) with feature matching, as in HiFi-GAN and
Vocos. Only training uses the discriminator; a trained vocoder carries no trace of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from echox.models.istft_vocoder import IstftVocoderConfig
from echox.models.speech_encoder import HOP_LENGTH, SpeechEncoder
from training.features import FeatureConfig, mel_filterbank
from training.stages.asr import layer_states


class SpectralLoss(nn.Module):
    """Multi-resolution STFT loss (spectral convergence + log-magnitude L1) and log-mel L1 (on the
    largest resolution's magnitudes, so the mel costs no extra STFT)."""

    def __init__(self, resolutions: Sequence[int] = (256, 512, 1024), sample_rate: int = 16_000) -> None:
        super().__init__()
        self.resolutions = tuple(sorted(resolutions))
        for n_fft in self.resolutions:
            self.register_buffer(f"window_{n_fft}", torch.hann_window(n_fft), persistent=False)
        largest = self.resolutions[-1]
        mel = FeatureConfig(sample_rate=sample_rate, hop_length=largest // 4, win_length=largest, n_fft=largest)
        self.mel_filters: torch.Tensor
        self.register_buffer("mel_filters", mel_filterbank(mel), persistent=False)

    def _magnitude(self, wav: torch.Tensor, n_fft: int) -> torch.Tensor:
        window: torch.Tensor = getattr(self, f"window_{n_fft}")
        spec = torch.stft(wav, n_fft, n_fft // 4, n_fft, window, return_complex=True)
        return spec.abs().clamp(min=1e-5)

    def forward(self, predicted: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        stft = predicted.new_zeros(())
        pred = true = predicted
        for n_fft in self.resolutions:
            pred = self._magnitude(predicted, n_fft)
            with torch.no_grad():
                true = self._magnitude(target, n_fft)
            convergence = torch.linalg.vector_norm(true - pred) / torch.linalg.vector_norm(true).clamp(min=1e-5)
            stft = stft + convergence + (pred.log() - true.log()).abs().mean()
        pred_mel = (self.mel_filters @ pred.square()).clamp(min=1e-5).log()
        true_mel = (self.mel_filters @ true.square()).clamp(min=1e-5).log()
        mel = (pred_mel - true_mel).abs().mean()
        return {"stft": stft / len(self.resolutions), "mel": mel}


def head_loss(spectrum: torch.Tensor, audio: torch.Tensor, config: IstftVocoderConfig) -> torch.Tensor:
    """L1 between the head's log-magnitudes and the target's, framed as the head frames (frame t
    centred on hop t): a direct, strong signal for the magnitudes while the waveform losses
    teach the phases."""
    n_fft, hop = config.n_fft, config.synthesis_hop
    side = (n_fft - hop) // 2
    window = torch.hann_window(n_fft, device=audio.device)
    padded = F.pad(audio, (side, side))
    target = torch.stft(padded, n_fft, hop, n_fft, window, center=False, return_complex=True)
    frames = spectrum.shape[-1]
    true_log = target[..., :frames].abs().clamp(min=1e-5).log()
    return (spectrum.abs().clamp(min=1e-5).log() - true_log).abs().mean()


# --- the discriminator ---------------------------------------------------------------

_SLOPE = 0.1  # leaky ReLU slope of HiFi-GAN's discriminators


class SpectrogramDiscriminator(nn.Module):
    """One resolution: waveform [B, S] → log-magnitude STFT [B, 1, F, T] → convolutions →
    a map of real/fake scores, plus every layer's activations."""

    def __init__(self, n_fft: int, channels: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.window: torch.Tensor
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        # Stride 2 in frequency and time from the first layer on, 3x3 kernels: a training step with
        # the discriminator on 8 crops costs about 1.4x one without (the tiny recipe on two cores;
        # 5x5 kernels at full resolution cost 5x on one thread). The receptive field is still 47 bins by 47 frames.
        strides = ((2, 2), (2, 2), (2, 2), (1, 1))
        layers, in_channels = [], 1
        for stride in strides:
            layers.append(weight_norm(nn.Conv2d(in_channels, channels, (3, 3), stride, padding=(1, 1))))
            in_channels = channels
        self.layers = nn.ModuleList(layers)
        self.post = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def spectrogram(self, wav: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wav, self.n_fft, self.n_fft // 4, self.n_fft, self.window, return_complex=True)
        return spec.abs().clamp(min=1e-5).log().unsqueeze(1)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.spectrogram(wav)
        features = []
        for layer in self.layers:
            x = F.leaky_relu(layer(x), _SLOPE)
            features.append(x)
        score = self.post(x)
        features.append(score)
        return score, features


class MultiResolutionDiscriminator(nn.Module):
    """One `SpectrogramDiscriminator` per STFT size."""

    def __init__(self, resolutions: Sequence[int] = (256, 512, 1024), channels: int = 16) -> None:
        super().__init__()
        if not resolutions or min(resolutions) < 16 or channels < 1:
            raise ValueError("discriminator: needs resolutions >= 16 samples and channels >= 1")
        self.discriminators = nn.ModuleList(SpectrogramDiscriminator(n, channels) for n in resolutions)

    def forward(self, wav: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [discriminator(wav) for discriminator in self.discriminators]


def discriminator_loss(
    discriminator: MultiResolutionDiscriminator, real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    """LSGAN: real towards 1, generated towards 0 (`fake` is detached here: only D learns)."""
    loss = real.new_zeros(())
    for (real_score, _), (fake_score, _) in zip(discriminator(real), discriminator(fake.detach()), strict=True):
        loss = loss + (1 - real_score).square().mean() + fake_score.square().mean()
    return loss / len(discriminator.discriminators)


def generator_losses(
    discriminator: MultiResolutionDiscriminator, real: torch.Tensor, fake: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The generator's side: LSGAN (generated towards 1) and feature matching (L1 between the
    discriminator's activations on real and generated audio, summed over layers as HiFi-GAN
    does), each averaged over resolutions. Gradients reach the generator only."""
    with torch.no_grad():
        real_outputs = discriminator(real)
    adversarial = fake.new_zeros(())
    matching = fake.new_zeros(())
    for (fake_score, fake_features), (_, real_features) in zip(discriminator(fake), real_outputs, strict=True):
        adversarial = adversarial + (1 - fake_score).square().mean()
        for fake_map, real_map in zip(fake_features, real_features, strict=True):
            matching = matching + (fake_map - real_map).abs().mean()
    count = len(discriminator.discriminators)
    return {"adversarial": adversarial / count, "feature_matching": matching / count}


class Adversary:
    """The discriminator and its optimizer: one discriminator update per generator step, then the
    generator's adversarial terms against the updated discriminator (HiFi-GAN's order)."""

    def __init__(self, resolutions: Sequence[int], channels: int, learning_rate: float) -> None:
        self.discriminator = MultiResolutionDiscriminator(resolutions, channels)
        self.learning_rate = learning_rate
        self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=learning_rate, betas=(0.8, 0.99))

    def update(self, real: torch.Tensor, fake: torch.Tensor, lr_factor: float) -> torch.Tensor:
        """One discriminator step on `real` and (detached) `fake`; returns its loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate * lr_factor
        self.discriminator.requires_grad_(True)
        loss = discriminator_loss(self.discriminator, real, fake)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        return loss.detach()

    def generator_terms(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """`generator_losses` with the discriminator's weights frozen (no gradients wasted on them)."""
        self.discriminator.requires_grad_(False)
        return generator_losses(self.discriminator, real, fake)

    def add_terms(
        self, parts: dict[str, torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
        weights: tuple[float, float], lr_factor: float,
    ) -> None:
        """One discriminator step, then the generator's terms into `parts`, and `parts["loss"]`
        raised by them at `weights` (adversarial, feature matching)."""
        parts["discriminator"] = self.update(real, fake, lr_factor)
        terms = self.generator_terms(real, fake)
        parts.update(terms)
        parts["loss"] = parts["loss"] + weights[0] * terms["adversarial"] + weights[1] * terms["feature_matching"]


# --- the speech encoder's ear ------------------------------------------------------------


def whisper_log_mel(audio: torch.Tensor, mel_filters: torch.Tensor) -> torch.Tensor:
    """`WhisperFeatureExtractor`'s log-mel in torch, so gradients reach the audio: [B, S] →
    [B, mels, S // 160]. Power STFT (400-sample Hann window, hop 160, reflect-padded), Slaney mel
    filters [201, mels], log10, floored 8 below each clip's peak, scaled to about [-1, 1]."""
    n_fft = 400  # SpeechEncoder's feature extractor's
    window = torch.hann_window(n_fft, device=audio.device, dtype=audio.dtype)
    spec = torch.stft(audio, n_fft, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spec[..., :-1].abs().square()
    log_spec = (mel_filters.T @ power).clamp(min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


class EncoderFeatureLoss(nn.Module):
    """L1 between what a trained speech encoder makes of the generated and of the real audio,
    layer by layer, each layer's distance relative to the real states' spread.

    The spectral losses weigh every bin alike; the encoder (the run's `asr` stage, trained to
    tell words apart in many voices) weighs what tells sounds apart, the judge's concern. Its
    weights stay frozen; only the vocoder learns from it."""

    def __init__(self, encoder: SpeechEncoder) -> None:
        super().__init__()
        self.whisper = encoder.whisper.eval().requires_grad_(False)
        self.mel_filters: torch.Tensor
        filters = torch.as_tensor(encoder.features.mel_filters, dtype=torch.float32)
        self.register_buffer("mel_filters", filters, persistent=False)

    def states(self, audio: torch.Tensor) -> list[torch.Tensor]:
        """The states after each encoder layer, [B, S // 320, d] each."""
        return layer_states(self.whisper, whisper_log_mel(audio, self.mel_filters))

    def forward(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real = self.states(target)
        fake = self.states(predicted)
        # Each layer's distance relative to how much its real states vary (positions and biases,
        # shared by both sides, would otherwise dilute it).
        spread = [(r - r.mean(dim=(0, 1))).abs().mean().clamp(min=1e-5) for r in real]
        terms = [(f - r).abs().mean() / s for f, r, s in zip(fake, real, spread, strict=True)]
        return torch.stack(terms).mean()
