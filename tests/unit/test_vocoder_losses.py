"""The vocoder's discriminator and its losses: shapes, where gradients go, and that it learns to
tell real speech-like audio from generated noise; the speech-encoder feature loss."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.test_encoder_units import ENCODER, micro_encoder
from training.vocoder_losses import (
    Adversary,
    EncoderFeatureLoss,
    MultiResolutionDiscriminator,
    discriminator_loss,
    generator_losses,
    whisper_log_mel,
)

RESOLUTIONS = (64, 128)


def _tone(batch: int, samples: int) -> torch.Tensor:
    """Harmonic tones at a few pitches: a stand-in for voiced speech."""
    t = torch.arange(samples) / 16_000
    f0 = torch.linspace(110, 220, batch).unsqueeze(1)
    return sum(0.3 / k * torch.sin(2 * math.pi * k * f0 * t) for k in range(1, 6))  # type: ignore[return-value]


def test_each_resolution_scores_a_map_and_keeps_every_layer() -> None:
    discriminator = MultiResolutionDiscriminator(RESOLUTIONS, channels=4)
    outputs = discriminator(torch.randn(3, 4000))
    assert len(outputs) == len(RESOLUTIONS)
    for (score, features), n_fft in zip(outputs, RESOLUTIONS, strict=True):
        assert score.shape[:2] == (3, 1) and score.ndim == 4
        assert len(features) == 5 and features[-1] is score
        frequency_bins, frames = n_fft // 2 + 1, 4000 // (n_fft // 4) + 1
        assert features[0].shape[2:] == ((frequency_bins + 1) // 2, (frames + 1) // 2)  # stride 2 in both


def test_discriminator_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="resolutions"):
        MultiResolutionDiscriminator((), channels=4)
    with pytest.raises(ValueError, match="channels"):
        MultiResolutionDiscriminator((64,), channels=0)


def test_generator_losses_reach_the_generator_only_and_vanish_on_a_perfect_copy() -> None:
    adversary = Adversary(RESOLUTIONS, channels=4, learning_rate=1e-3)
    real = _tone(2, 4000)
    same = adversary.generator_terms(real, real.clone())
    assert float(same["feature_matching"]) == 0.0
    fake = (0.1 * torch.randn(2, 4000)).requires_grad_(True)
    terms = adversary.generator_terms(real, fake)
    (terms["adversarial"] + terms["feature_matching"]).backward()
    assert fake.grad is not None and float(fake.grad.abs().sum()) > 0
    assert all(p.grad is None for p in adversary.discriminator.parameters())


def test_discriminator_update_leaves_the_generated_audio_alone() -> None:
    adversary = Adversary(RESOLUTIONS, channels=4, learning_rate=1e-3)
    fake = (0.1 * torch.randn(2, 4000)).requires_grad_(True)
    adversary.update(_tone(2, 4000), fake, lr_factor=1.0)
    assert fake.grad is None
    assert any(p.grad is not None for p in adversary.discriminator.parameters())


def test_discriminator_learns_to_tell_tones_from_noise() -> None:
    torch.manual_seed(0)
    adversary = Adversary(RESOLUTIONS, channels=4, learning_rate=2e-3)
    real, fake = _tone(4, 4000), 0.1 * torch.randn(4, 4000, generator=torch.Generator().manual_seed(1))
    first = float(discriminator_loss(adversary.discriminator, real, fake).detach())
    for _ in range(40):
        last = float(adversary.update(real, fake, lr_factor=1.0))
    assert last < 0.25 * first
    # The generator's adversarial loss on that noise is now high: the discriminator calls it fake.
    assert float(generator_losses(adversary.discriminator, real, fake)["adversarial"].detach()) > 0.5


def test_add_terms_raises_the_loss_by_the_weighted_terms() -> None:
    torch.manual_seed(0)
    adversary = Adversary(RESOLUTIONS, channels=4, learning_rate=1e-3)
    real, fake = _tone(2, 4000), 0.1 * torch.randn(2, 4000)
    parts = {"loss": torch.tensor(1.0)}
    adversary.add_terms(parts, real, fake, (0.5, 2.0), lr_factor=1.0)
    assert set(parts) == {"loss", "discriminator", "adversarial", "feature_matching"}
    expected = 1.0 + 0.5 * float(parts["adversarial"]) + 2.0 * float(parts["feature_matching"])
    assert float(parts["loss"]) == pytest.approx(expected)
    assert float(parts["adversarial"]) > 0 and float(parts["feature_matching"]) > 0


# --- the speech encoder's ear ------------------------------------------------------------


def test_whisper_log_mel_in_torch_is_the_feature_extractors() -> None:
    encoder = micro_encoder()
    samples = ENCODER.max_source_positions * 320  # the whole window: the extractor pads to it
    audio = _tone(1, samples)[0] + 0.01 * torch.randn(samples, generator=torch.Generator().manual_seed(0))
    expected = encoder.log_mel(audio.numpy())
    filters = torch.as_tensor(encoder.features.mel_filters, dtype=torch.float32)
    assert torch.allclose(whisper_log_mel(audio[None], filters), expected, atol=1e-4)


def test_encoder_feature_loss_is_zero_for_a_copy_and_trains_only_the_audio() -> None:
    encoder = micro_encoder()
    before = {name: p.clone() for name, p in encoder.named_parameters()}
    ear = EncoderFeatureLoss(encoder)
    real = _tone(3, 4800)
    assert float(ear(real.clone(), real)) == pytest.approx(0.0, abs=1e-6)
    noisy = (real + 0.05 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
    louder_noise = real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    loss = ear(noisy, real)
    assert 0 < float(loss.detach()) < float(ear(louder_noise, real))
    loss.backward()  # type: ignore[no-untyped-call]
    assert noisy.grad is not None and noisy.grad.abs().sum() > 0
    assert all(p.grad is None and torch.equal(p, before[name]) for name, p in encoder.named_parameters())
    assert len(ear.states(real)) == 2 and ear.states(real)[0].shape == (3, 4800 // 320, ENCODER.d_model)
