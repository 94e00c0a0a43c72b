"""Unit vocoder (method spec module 10): a unit HiFi-GAN with a duration predictor.

Deduplicated speech units (cluster ids) → embeddings → predicted durations → frame-rate
embeddings → HiFi-GAN generator → 16 kHz waveform. The layout follows fairseq's CodeHiFiGAN
(`CodeGenerator` over `hifigan.Generator`, `VariancePredictor` as duration predictor) so the
released `g_00500000` generator converts by renaming a handful of keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from echox.audio import SAMPLE_RATE
from echox.config import ConfigBase
from echox.errors import ConfigError, ModelLoadError
from echox.models.unit_durations import DurationPredictor, DurationUnitVocoder

LRELU_SLOPE = 0.1  # HiFi-GAN's slope inside the generator
_POST_LRELU_SLOPE = 0.01  # fairseq applies torch's default slope before conv_post
_INIT_STD = 0.01  # HiFi-GAN's init for the upsamplers, resblocks and conv_post


@dataclasses.dataclass(frozen=True)
class VocoderConfig(ConfigBase):
    """Sizes of the unit HiFi-GAN; `hop_length` samples are produced per unit frame."""

    num_units: int = 100
    unit_embed_dim: int = 64
    upsample_rates: tuple[int, ...] = (5, 4, 4, 4)
    upsample_kernel_sizes: tuple[int, ...] = (11, 8, 8, 8)
    upsample_initial_channel: int = 128
    resblock_kernel_sizes: tuple[int, ...] = (3, 7)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    dur_hidden_dim: int = 64
    dur_kernel_size: int = 3
    dur_dropout: float = 0.5
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        def fail(reason: str) -> None:
            raise ConfigError(f"vocoder: {reason}")

        if self.num_units < 1 or self.unit_embed_dim < 1:
            fail("num_units and unit_embed_dim must be >= 1")
        if not self.upsample_rates or len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            fail("upsample_rates and upsample_kernel_sizes must be non-empty and of equal length")
        for rate, kernel in zip(self.upsample_rates, self.upsample_kernel_sizes, strict=True):
            # padding (k - u) / 2 makes each upsampler emit exactly u samples per input step.
            if rate < 1 or kernel < rate or (kernel - rate) % 2:
                fail(f"upsample kernel {kernel} must be >= rate {rate} with an even difference")
        if self.upsample_initial_channel >> len(self.upsample_rates) < 1:
            fail("upsample_initial_channel is too small to halve once per upsampler")
        if not self.resblock_kernel_sizes or len(self.resblock_kernel_sizes) != len(
            self.resblock_dilation_sizes
        ):
            fail("resblock_kernel_sizes and resblock_dilation_sizes must be non-empty, equal length")
        if any(k < 1 or k % 2 == 0 for k in self.resblock_kernel_sizes):
            fail("resblock kernel sizes must be odd so 'same' padding keeps the length")
        if any(not dil or min(dil) < 1 for dil in self.resblock_dilation_sizes):
            fail("each resblock needs at least one dilation, all >= 1")
        if self.dur_hidden_dim < 1 or self.dur_kernel_size < 1 or self.dur_kernel_size % 2 == 0:
            fail("dur_hidden_dim must be >= 1 and dur_kernel_size odd")
        if not 0.0 <= self.dur_dropout < 1.0:
            fail("dur_dropout must be in [0, 1)")
        if self.sample_rate < 1:
            fail("sample_rate must be positive")

    @property
    def hop_length(self) -> int:
        """Waveform samples per unit frame (320 at 16 kHz = 50 Hz units)."""
        return math.prod(self.upsample_rates)

    @classmethod
    def tiny(cls) -> Self:
        """Small enough to run far faster than real time on one CPU core and to train on two."""
        return cls()

    @classmethod
    def official(cls) -> Self:
        """fairseq's released 16 kHz CodeHiFiGAN unit vocoder (HuBERT k-means 1000)."""
        return cls(
            num_units=1000,
            unit_embed_dim=128,
            upsample_rates=(5, 4, 4, 2, 2),
            upsample_kernel_sizes=(11, 8, 8, 4, 4),
            upsample_initial_channel=512,
            resblock_kernel_sizes=(3, 7, 11),
            resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
            dur_hidden_dim=128,
            dur_kernel_size=3,
            dur_dropout=0.5,
            sample_rate=16_000,
        )

    @classmethod
    def from_fairseq_json(cls, cfg: dict[str, Any]) -> Self:
        """Reads a fairseq `vocoder_config.json`; training-only keys are ignored."""
        for feature in ("multispkr", "embedder_params", "f0", "multistyle"):
            if cfg.get(feature):
                raise ConfigError(f"vocoder: fairseq option {feature!r} (extra conditioning) is unsupported")
        try:
            embed_dim = int(cfg["embedding_dim"])
            dur = cfg.get("dur_predictor_params")
            if not dur:
                raise ConfigError("vocoder: the fairseq config has no dur_predictor_params")
            # Without extra conditioning the generator input is the unit embedding itself.
            in_dim = int(cfg.get("model_in_dim", 80))
            if in_dim != embed_dim or int(dur["encoder_embed_dim"]) != embed_dim:
                raise ConfigError(
                    f"vocoder: model_in_dim {in_dim} and dur encoder_embed_dim "
                    f"{dur['encoder_embed_dim']} must equal embedding_dim {embed_dim}"
                )
            return cls(
                num_units=int(cfg["num_embeddings"]),
                unit_embed_dim=embed_dim,
                upsample_rates=tuple(int(v) for v in cfg["upsample_rates"]),
                upsample_kernel_sizes=tuple(int(v) for v in cfg["upsample_kernel_sizes"]),
                upsample_initial_channel=int(cfg["upsample_initial_channel"]),
                resblock_kernel_sizes=tuple(int(v) for v in cfg["resblock_kernel_sizes"]),
                resblock_dilation_sizes=tuple(
                    tuple(int(d) for d in dil) for dil in cfg["resblock_dilation_sizes"]
                ),
                dur_hidden_dim=int(dur["var_pred_hidden_dim"]),
                dur_kernel_size=int(dur["var_pred_kernel_size"]),
                dur_dropout=float(dur["var_pred_dropout"]),
                sample_rate=int(cfg.get("sampling_rate", SAMPLE_RATE)),
            )
        except KeyError as exc:
            raise ConfigError(f"vocoder: the fairseq config lacks the key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"vocoder: malformed fairseq config ({exc})") from None


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _normal_init(conv: nn.Module) -> nn.Module:
    # Initialise before weight norm so g and v start from the HiFi-GAN init (fairseq sets the
    # weight after wrapping, which its old weight_norm hook silently overwrites).
    if isinstance(conv, nn.Conv1d | nn.ConvTranspose1d):
        nn.init.normal_(conv.weight, 0.0, _INIT_STD)
    return conv


def _remove_weight_norm(module: nn.Module) -> None:
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


class VocoderResBlock(nn.Module):
    """HiFi-GAN multi-receptive-field block (ResBlock1): dilated conv, then plain conv, residual."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(
                _normal_init(
                    nn.Conv1d(
                        channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d)
                    )
                )
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(
                _normal_init(nn.Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size)))
            )
            for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            xt = c1(F.leaky_relu(x, LRELU_SLOPE))
            xt = c2(F.leaky_relu(xt, LRELU_SLOPE))
            x = xt + x
        return x

    def remove_weight_norm(self) -> None:
        for conv in (*self.convs1, *self.convs2):
            _remove_weight_norm(conv)


class UnitVocoder(DurationUnitVocoder):
    """Unit HiFi-GAN (fairseq CodeHiFiGAN layout) with a duration predictor, 16 kHz output.

    Submodule names mirror fairseq (`dur_predictor`, `conv_pre`, `ups`, `resblocks`,
    `conv_post`); only the unit table is renamed (`dict` → `unit_embed`).
    """

    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.unit_embed = nn.Embedding(c.num_units, c.unit_embed_dim)
        self.dur_predictor = DurationPredictor(
            c.unit_embed_dim, c.dur_hidden_dim, c.dur_kernel_size, c.dur_dropout
        )
        ch = c.upsample_initial_channel
        self.conv_pre = weight_norm(nn.Conv1d(c.unit_embed_dim, ch, 7, padding=3))
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for rate, kernel in zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True):
            up = nn.ConvTranspose1d(ch, ch // 2, kernel, rate, padding=(kernel - rate) // 2)
            self.ups.append(weight_norm(_normal_init(up)))
            ch //= 2
            for k, dil in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes, strict=True):
                self.resblocks.append(VocoderResBlock(ch, k, dil))
        self.conv_post = weight_norm(_normal_init(nn.Conv1d(ch, 1, 7, padding=3)))

    def generate(self, features: torch.Tensor) -> torch.Tensor:
        """Frame-rate features [B, C, T] → waveform [B, T * hop] in [-1, 1]."""
        num_kernels = len(self.config.resblock_kernel_sizes)
        x: torch.Tensor = self.conv_pre(features)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * num_kernels : (i + 1) * num_kernels]
            # Mean over the multi-receptive-field blocks (summed in order, as fairseq does).
            total: torch.Tensor = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / num_kernels
        x = self.conv_post(F.leaky_relu(x, _POST_LRELU_SLOPE))
        return torch.tanh(x).squeeze(1)

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        """Units already expanded to frame rate, LongTensor [B, T] → waveform [B, T * hop]."""
        return self.generate(self.unit_embed(units).transpose(1, 2))

    def waveform(self, units: torch.Tensor) -> torch.Tensor:
        return self(units)

    def remove_weight_norm(self) -> None:
        """Folds weight norm into plain weights for inference; load checkpoints before this."""
        for conv in (self.conv_pre, *self.ups, self.conv_post):
            _remove_weight_norm(conv)
        for block in self.resblocks:
            if isinstance(block, VocoderResBlock):
                block.remove_weight_norm()


_FAIRSEQ_RENAMES = {"dict.weight": "unit_embed.weight"}
_WN_SUFFIXES = {
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
}


def _fairseq_to_ours(key: str) -> str:
    if key in _FAIRSEQ_RENAMES:
        return _FAIRSEQ_RENAMES[key]
    for old, new in _WN_SUFFIXES.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def load_fairseq_state_dict(state: dict[str, torch.Tensor], config: VocoderConfig) -> dict[str, torch.Tensor]:
    """Converts a fairseq CodeHiFiGAN generator state dict (`g_00500000["generator"]`) to ours.

    Old-style weight norm (`weight_g`/`weight_v`) maps to parametrization `original0`/`original1`;
    a plain `weight` (generator saved after removing weight norm) is split into g = ||w||, v = w.
    Raises ModelLoadError naming every fairseq key not consumed, every key of ours not
    produced, and every shape mismatch.
    """
    with torch.device("meta"):
        expected = {k: v.shape for k, v in UnitVocoder(config).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, tensor in state.items():
        ours = _fairseq_to_ours(key)
        if ours in expected:
            out[ours] = tensor
            continue
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        g_key = f"{base}.parametrizations.weight.original0"
        if base is not None and g_key in expected:
            dims = tuple(range(1, tensor.ndim))  # weight norm over dim 0, as fairseq's
            out[g_key] = torch.linalg.vector_norm(tensor, dim=dims, keepdim=True)
            out[f"{base}.parametrizations.weight.original1"] = tensor
            continue
        unused.append(key)
    missing = sorted(set(expected) - set(out))
    bad_shapes = sorted(
        f"{k}: {tuple(v.shape)} != {tuple(expected[k])}" for k, v in out.items() if v.shape != expected[k]
    )
    if unused or missing or bad_shapes:
        parts = []
        if unused:
            parts.append(f"unused fairseq keys {sorted(unused)}")
        if missing:
            parts.append(f"missing keys {missing}")
        if bad_shapes:
            parts.append(f"shape mismatches {bad_shapes}")
        raise ModelLoadError("fairseq vocoder checkpoint does not match the config: " + "; ".join(parts))
    return out
