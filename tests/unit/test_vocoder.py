"""Unit vocoder: lengths, duration prediction, input checks and fairseq checkpoint conversion."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from echox.errors import ConfigError, ModelLoadError
from echox.models.istft_vocoder import IstftVocoder, IstftVocoderConfig
from echox.models.vocoder import (
    UnitVocoder,
    VocoderConfig,
    load_fairseq_state_dict,
)

# Hop 4, two resblocks with different dilation counts: exercises every shape rule in milliseconds.
MICRO = VocoderConfig(
    num_units=20,
    unit_embed_dim=8,
    upsample_rates=(2, 2),
    upsample_kernel_sizes=(4, 4),
    upsample_initial_channel=16,
    resblock_kernel_sizes=(3, 5),
    resblock_dilation_sizes=((1, 2), (1, 3, 5)),
    dur_hidden_dim=8,
    dur_kernel_size=3,
    dur_dropout=0.5,
)


# The tiny recipe's architecture, as small: the checks and durations are shared with UnitVocoder.
MICRO_ISTFT = IstftVocoderConfig(
    num_units=20, unit_embed_dim=8, hidden_dim=16, intermediate_dim=32, num_layers=1, num_harmonics=4,
    envelope_bins=8, noise_bins=8, dur_hidden_dim=8,
)


def _model(config: VocoderConfig = MICRO, seed: int = 0) -> UnitVocoder:
    torch.manual_seed(seed)
    return UnitVocoder(config).eval()


def _fixed_durations(model: UnitVocoder, frames: int) -> None:
    """Makes the predictor output log(1 + frames) everywhere, so predictions are exact."""
    with torch.no_grad():
        model.dur_predictor.proj.weight.zero_()
        model.dur_predictor.proj.bias.fill_(math.log(1 + frames))


# ---------------------------------------------------------------- fairseq-layout reference


def _wn(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Old-style weight norm pair (g over dim 0, v) for a conv weight of `shape`."""
    g = torch.rand((shape[0], *([1] * (len(shape) - 1))), generator=gen) + 0.5
    return g, torch.randn(shape, generator=gen)


def fairseq_state_dict(cfg: VocoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors named and shaped as fairseq's CodeGenerator state dict, with weight_g/weight_v."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, shape: tuple[int, ...], bias: int) -> None:
        sd[f"{name}.weight_g"], sd[f"{name}.weight_v"] = _wn(shape, gen)
        sd[f"{name}.bias"] = 0.1 * torch.randn(bias, generator=gen)

    e, h, k = cfg.unit_embed_dim, cfg.dur_hidden_dim, cfg.dur_kernel_size
    sd["dict.weight"] = torch.randn(cfg.num_units, e, generator=gen)
    for i, (cin, ln) in enumerate(((e, "ln1"), (h, "ln2")), start=1):
        sd[f"dur_predictor.conv{i}.0.weight"] = 0.3 * torch.randn(h, cin, k, generator=gen)
        sd[f"dur_predictor.conv{i}.0.bias"] = 0.1 * torch.randn(h, generator=gen)
        sd[f"dur_predictor.{ln}.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
        sd[f"dur_predictor.{ln}.bias"] = 0.1 * torch.randn(h, generator=gen)
    sd["dur_predictor.proj.weight"] = 0.3 * torch.randn(1, h, generator=gen)
    sd["dur_predictor.proj.bias"] = torch.tensor([1.0])
    ch = cfg.upsample_initial_channel
    conv("conv_pre", (ch, e, 7), ch)
    block = 0
    for i, kernel in enumerate(cfg.upsample_kernel_sizes):
        conv(f"ups.{i}", (ch, ch // 2, kernel), ch // 2)  # ConvTranspose1d: [in, out, k]
        ch //= 2
        for rk, dil in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True):
            for m in range(len(dil)):
                conv(f"resblocks.{block}.convs1.{m}", (ch, ch, rk), ch)
                conv(f"resblocks.{block}.convs2.{m}", (ch, ch, rk), ch)
            block += 1
    conv("conv_post", (1, ch, 7), 1)
    return sd


def _w(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    g, v = sd[f"{name}.weight_g"], sd[f"{name}.weight_v"]
    return g * v / v.flatten(1).norm(dim=1).view(-1, *([1] * (v.ndim - 1)))


def reference_generator(sd: dict[str, torch.Tensor], cfg: VocoderConfig, x: torch.Tensor) -> torch.Tensor:
    """HiFi-GAN written with functional ops straight from fairseq-named tensors, [B, C, T] → [B, S]."""
    x = F.conv1d(x, _w(sd, "conv_pre"), sd["conv_pre.bias"], padding=3)
    nk, block = len(cfg.resblock_kernel_sizes), 0
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
        x = F.leaky_relu(x, 0.1)
        x = F.conv_transpose1d(x, _w(sd, f"ups.{i}"), sd[f"ups.{i}.bias"], stride=u, padding=(k - u) // 2)
        outs = []
        for rk, dil in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True):
            y = x
            for m, d in enumerate(dil):
                n1, n2 = f"resblocks.{block}.convs1.{m}", f"resblocks.{block}.convs2.{m}"
                t = F.conv1d(
                    F.leaky_relu(y, 0.1), _w(sd, n1), sd[f"{n1}.bias"], padding=d * (rk - 1) // 2, dilation=d
                )
                y = y + F.conv1d(F.leaky_relu(t, 0.1), _w(sd, n2), sd[f"{n2}.bias"], padding=(rk - 1) // 2)
            outs.append(y)
            block += 1
        x = sum(outs[1:], outs[0]) / nk
    x = F.conv1d(F.leaky_relu(x, 0.01), _w(sd, "conv_post"), sd["conv_post.bias"], padding=3)
    return torch.tanh(x).squeeze(1)


def reference_log_durations(sd: dict[str, torch.Tensor], units: torch.Tensor) -> torch.Tensor:
    x = F.embedding(units, sd["dict.weight"])
    for i, ln in ((1, "ln1"), (2, "ln2")):
        w = sd[f"dur_predictor.conv{i}.0.weight"]
        x = F.relu(F.conv1d(x.transpose(1, 2), w, sd[f"dur_predictor.conv{i}.0.bias"], padding=1))
        x = F.layer_norm(
            x.transpose(1, 2), (w.shape[0],), sd[f"dur_predictor.{ln}.weight"], sd[f"dur_predictor.{ln}.bias"]
        )
    return F.linear(x, sd["dur_predictor.proj.weight"], sd["dur_predictor.proj.bias"]).squeeze(-1)


# ---------------------------------------------------------------- config


@pytest.mark.unit
def test_presets_hop_and_dict_round_trip() -> None:
    for cfg in (VocoderConfig.tiny(), VocoderConfig.official(), MICRO):
        assert VocoderConfig.from_dict(cfg.to_dict()) == cfg
    assert VocoderConfig.tiny().hop_length == 320
    assert VocoderConfig.official().hop_length == 320
    assert MICRO.hop_length == 4


@pytest.mark.unit
@pytest.mark.parametrize(
    "changes",
    [
        {"upsample_kernel_sizes": (4,)},  # length differs from the rates
        {"upsample_kernel_sizes": (5, 4)},  # odd kernel - rate: output would be one sample long
        {"upsample_initial_channel": 3},  # 3 // 2 // 2 == 0 channels after the second upsampler
        {"resblock_kernel_sizes": (3, 4)},  # even kernel breaks 'same' padding
        {"resblock_dilation_sizes": ((1, 2),)},
        {"resblock_dilation_sizes": ((1, 2), ())},
        {"dur_kernel_size": 2},
        {"dur_dropout": 1.0},
        {"num_units": 0},
    ],
)
def test_config_rejects_inconsistent_sizes(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        MICRO.replace(**changes)


def _official_json() -> dict[str, Any]:
    return {
        "resblock": "1",
        "learning_rate": 0.0002,
        "upsample_rates": [5, 4, 4, 2, 2],
        "upsample_kernel_sizes": [11, 8, 8, 4, 4],
        "upsample_initial_channel": 512,
        "resblock_kernel_sizes": [3, 7, 11],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "num_embeddings": 1000,
        "embedding_dim": 128,
        "model_in_dim": 128,
        "code_hop_size": 320,
        "f0": False,
        "dur_predictor_params": {
            "encoder_embed_dim": 128,
            "var_pred_hidden_dim": 128,
            "var_pred_kernel_size": 3,
            "var_pred_dropout": 0.5,
        },
        "sampling_rate": 16000,
    }


@pytest.mark.unit
def test_from_fairseq_json_matches_official() -> None:
    assert VocoderConfig.from_fairseq_json(_official_json()) == VocoderConfig.official()


@pytest.mark.unit
@pytest.mark.parametrize(
    "edit",
    [
        {"multispkr": True},
        {"f0": True},
        {"model_in_dim": 80},
        {"dur_predictor_params": None},
        {"num_embeddings": None},
    ],
)
def test_from_fairseq_json_rejects_unsupported(edit: dict[str, Any]) -> None:
    cfg = _official_json()
    for key, value in edit.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    with pytest.raises(ConfigError):
        VocoderConfig.from_fairseq_json(cfg)


@pytest.mark.unit
def test_official_parameter_count() -> None:
    with torch.device("meta"):
        model = UnitVocoder(VocoderConfig.official())
    total = sum(p.numel() for p in model.parameters())
    # 13.26 M generator (HiFi-GAN V1 sizes, 5 upsamplers) + 128 k unit table + 0.1 M predictor.
    assert 13.0e6 < total < 14.0e6, total


# ---------------------------------------------------------------- lengths and durations


@pytest.mark.unit
def test_forward_length_is_frames_times_hop() -> None:
    model = _model()
    units = torch.randint(0, MICRO.num_units, (2, 7))
    assert model(units).shape == (2, 7 * MICRO.hop_length)


@pytest.mark.unit
@pytest.mark.parametrize("config", [MICRO, VocoderConfig.tiny()], ids=["micro", "tiny"])
def test_synthesize_length_is_sum_of_durations_times_hop(config: VocoderConfig) -> None:
    model = _model(config)
    units = torch.tensor([3, 1, 4, 1, 5])
    durations = torch.tensor([2, 1, 3, 1, 4])
    audio = model.synthesize(units, durations)
    assert audio.dtype == torch.float32 and audio.ndim == 1
    assert audio.numel() == int(durations.sum()) * config.hop_length
    assert float(audio.abs().max()) <= 1.0


@pytest.mark.unit
def test_synthesize_uses_predicted_durations() -> None:
    model = _model()
    _fixed_durations(model, 3)
    audio = model.synthesize([1, 2, 3, 4])
    assert audio.numel() == 4 * 3 * MICRO.hop_length


@pytest.mark.unit
def test_predicted_durations_are_at_least_one() -> None:
    model = _model()
    units = torch.randint(0, MICRO.num_units, (3, 11))
    durations = model.predict_durations(units)
    assert durations.dtype == torch.long and durations.shape == units.shape
    assert bool((durations >= 1).all())
    with torch.no_grad():  # exp(very negative) - 1 rounds to -1: clamped to one frame
        model.dur_predictor.proj.bias.fill_(-20.0)
    assert bool((model.predict_durations(units) == 1).all())


@pytest.mark.unit
@pytest.mark.parametrize("kernel", [3, 5])  # 5: the tiny recipe's (the padding reaches two units in)
def test_padded_batch_predicts_like_single_sequences(kernel: int) -> None:
    model = _model(dataclasses.replace(MICRO, dur_kernel_size=kernel))
    a, b = torch.tensor([1, 5, 9, 2, 7]), torch.tensor([4, 4, 8])
    batch = torch.zeros(2, 5, dtype=torch.long)
    batch[0], batch[1, :3] = a, b
    out = model.predict_durations(batch, lengths=torch.tensor([5, 3]))
    assert torch.equal(out[0], model.predict_durations(a.unsqueeze(0))[0])
    assert torch.equal(out[1, :3], model.predict_durations(b.unsqueeze(0))[0])
    assert torch.equal(out[1, 3:], torch.zeros(2, dtype=torch.long))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    log_b = model.log_durations(b.unsqueeze(0))[0]
    assert torch.allclose(model.log_durations(batch, mask)[1, :3], log_b, atol=1e-6)


@pytest.mark.unit
def test_duration_loss_ignores_padding_and_trains_predictor() -> None:
    model = _model()
    a, b = torch.tensor([1, 5, 9, 2, 7]), torch.tensor([4, 6, 8])
    da, db = torch.tensor([2, 1, 4, 1, 3]), torch.tensor([5, 1, 2])
    units = torch.stack([a, F.pad(b, (0, 2))])
    targets = torch.stack([da, F.pad(db, (0, 2))])
    loss = model.duration_loss(units, targets)
    errors = [
        (model.log_durations(u.unsqueeze(0))[0] - torch.log1p(d.float())) ** 2 for u, d in ((a, da), (b, db))
    ]
    assert torch.allclose(loss, torch.cat(errors).mean())
    loss.backward()
    assert model.dur_predictor.proj.weight.grad is not None
    assert model.conv_pre.parametrizations.weight.original1.grad is None
    with pytest.raises(ValueError, match="padding"):
        model.duration_loss(units, torch.zeros_like(targets))


# ---------------------------------------------------------------- input checks


@pytest.mark.unit
@pytest.mark.parametrize(
    ("units", "durations", "match"),
    [
        ([], None, "empty"),
        (torch.tensor([], dtype=torch.long), None, "empty"),
        ([1, 20], None, r"\[0, 20\)"),
        ([-1, 2], None, r"\[0, 20\)"),
        ([[1, 2]], None, "1-D"),
        (torch.tensor([1.0, 2.0]), None, "integers"),
        ([1, 2], torch.tensor([1, 2, 3]), "shape"),
        ([1, 2], torch.tensor([1, 0]), ">= 1"),
        ([1, 2], torch.tensor([1.0, 2.0]), ">= 1"),
    ],
)
@pytest.mark.parametrize("architecture", ["hifigan", "istft"])
def test_synthesize_rejects_bad_input(units: Any, durations: Any, match: str, architecture: str) -> None:
    with pytest.raises(ValueError, match=match):
        _either(architecture).synthesize(units, durations)


def _either(architecture: str) -> UnitVocoder | IstftVocoder:
    torch.manual_seed(0)
    return _model() if architecture == "hifigan" else IstftVocoder(MICRO_ISTFT).eval()


@pytest.mark.unit
@pytest.mark.parametrize("architecture", ["hifigan", "istft"])
def test_synthesize_is_deterministic_and_restores_training_mode(architecture: str) -> None:
    model = _either(architecture).train()
    units = [1, 2, 3, 2, 7]
    first = model.synthesize(units)  # dropout is off despite train mode; istft noise has a fixed seed
    assert torch.equal(first, model.synthesize(units))
    assert model.training
    durations = torch.tensor([1, 2, 1, 3, 1])
    hop = model.config.hop_length
    assert model.synthesize(units, durations).shape == (int(durations.sum()) * hop,)


@pytest.mark.unit
def test_manual_seed_makes_models_identical() -> None:
    units = torch.randint(0, MICRO.num_units, (1, 9), generator=torch.Generator().manual_seed(1))
    a, b, c = _model(seed=7), _model(seed=7), _model(seed=8)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert torch.equal(a(units), b(units))
    assert not torch.equal(a(units), c(units))


@pytest.mark.unit
def test_remove_weight_norm_keeps_the_output() -> None:
    model = _model()
    units = torch.randint(0, MICRO.num_units, (1, 9))
    before = model(units)
    model.remove_weight_norm()
    assert not any("parametrizations" in key for key in model.state_dict())
    assert torch.allclose(model(units), before, atol=1e-6)


# ---------------------------------------------------------------- fairseq conversion


@pytest.mark.unit
def test_fairseq_conversion_round_trip() -> None:
    fairseq = fairseq_state_dict(MICRO)
    converted = load_fairseq_state_dict(fairseq, MICRO)
    model = UnitVocoder(MICRO).eval()
    model.load_state_dict(converted, strict=True)
    # Every fairseq tensor lands in exactly one of our keys, unchanged.
    assert len(converted) == len(fairseq)
    ours = {id(t) for t in converted.values()}
    assert all(id(t) in ours for t in fairseq.values())
    assert converted["unit_embed.weight"] is fairseq["dict.weight"]
    assert converted["ups.1.parametrizations.weight.original0"] is fairseq["ups.1.weight_g"]
    assert (
        converted["resblocks.3.convs2.2.parametrizations.weight.original1"]
        is (fairseq["resblocks.3.convs2.2.weight_v"])
    )

    # conv_pre equals F.conv1d with weight g * v / ||v|| (norm over all dims but 0).
    x = torch.randn(2, MICRO.unit_embed_dim, 6)
    g, v = fairseq["conv_pre.weight_g"], fairseq["conv_pre.weight_v"]
    weight = g * v / v.norm(dim=(1, 2), keepdim=True)
    expected = F.conv1d(x, weight, fairseq["conv_pre.bias"], padding=3)
    assert torch.allclose(model.conv_pre(x), expected, atol=1e-5)


@pytest.mark.unit
def test_fairseq_weights_compute_the_reference_network() -> None:
    fairseq = fairseq_state_dict(MICRO, seed=3)
    model = UnitVocoder(MICRO).eval()
    model.load_state_dict(load_fairseq_state_dict(fairseq, MICRO), strict=True)
    units = torch.randint(0, MICRO.num_units, (2, 10))
    features = F.embedding(units, fairseq["dict.weight"]).transpose(1, 2)
    assert torch.allclose(model(units), reference_generator(fairseq, MICRO, features), atol=1e-5)
    assert torch.allclose(model.log_durations(units), reference_log_durations(fairseq, units), atol=1e-5)
    # A generator saved after removing weight norm (plain `weight`) converts to the same network.
    plain = {k: v for k, v in fairseq.items() if not k.endswith(("weight_g", "weight_v"))}
    for key in fairseq:
        if key.endswith(".weight_g"):
            plain[key[: -len("_g")]] = _w(fairseq, key[: -len(".weight_g")])
    model.load_state_dict(load_fairseq_state_dict(plain, MICRO), strict=True)
    assert torch.allclose(model(units), reference_generator(fairseq, MICRO, features), atol=1e-5)


@pytest.mark.unit
def test_fairseq_conversion_names_every_problem() -> None:
    fairseq = fairseq_state_dict(MICRO)
    fairseq["spkr.weight"] = torch.zeros(200, MICRO.unit_embed_dim)
    del fairseq["conv_post.bias"]
    fairseq["ups.0.weight_v"] = fairseq["ups.0.weight_v"][:, :, :3]
    with pytest.raises(ModelLoadError) as info:
        load_fairseq_state_dict(fairseq, MICRO)
    message = str(info.value)
    assert "spkr.weight" in message and "conv_post.bias" in message and "ups.0" in message
    with pytest.raises(ModelLoadError, match="missing"):
        load_fairseq_state_dict(fairseq_state_dict(MICRO), VocoderConfig.tiny())
