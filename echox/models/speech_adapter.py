"""Speech adapter, CTC head and shrink, and LookBack attention (method spec modules 2-5)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from echox.config import ConfigBase
from echox.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SpeechAdapterConfig(ConfigBase):
    """Maps encoder states (d_enc, 50 Hz) to LLM-width states (hidden, 25 Hz)."""

    encoder_dim: int = 1280
    hidden_size: int = 3072
    num_heads: int = 24
    stack: int = 2
    ff_mult: int = 2
    dropout: float = 0.1
    lookback_heads: int = 24
    # Released code: LookBack attends over the kept frames only. False attends over all frames.
    lookback_mask_dropped: bool = True
    # Released code quirk: the adapter layer is built with batch_first=False, so it mixes
    # across audios rather than across time. Reproduced only for the official weights.
    official_batch_first_quirk: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.hidden_size % self.lookback_heads:
            raise ConfigError("speech adapter: hidden_size must be divisible by the head counts")
        if self.stack < 1:
            raise ConfigError("speech adapter: stack must be >= 1")


class SpeechAdapter(nn.Module):
    """Stack `stack` frames → Linear → one Transformer encoder layer → LayerNorm."""

    def __init__(self, config: SpeechAdapterConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.projector = nn.Linear(config.stack * config.encoder_dim, h)
        self.layer = nn.TransformerEncoderLayer(
            d_model=h,
            nhead=config.num_heads,
            dim_feedforward=config.ff_mult * h,
            dropout=config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.norm = nn.LayerNorm(h)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """[B, T, d_enc] → [B, T // stack, hidden]; a trailing odd frame is dropped."""
        b, t, d = states.shape
        t_out = t // self.config.stack
        stacked = states[:, : t_out * self.config.stack].reshape(b, t_out, self.config.stack * d)
        x = self.projector(stacked)
        if self.config.official_batch_first_quirk:
            x = self.layer(x.transpose(0, 1)).transpose(0, 1)
        else:
            x = self.layer(x)
        return self.norm(x)


def ctc_shrink_mask(ctc_logits: torch.Tensor) -> torch.Tensor:
    """Keep frame t iff argmax_t != argmax_{t-1}; frame 0 is always kept. [B, T, V] → bool [B, T]."""
    best = ctc_logits.argmax(dim=-1)
    keep = torch.ones_like(best, dtype=torch.bool)
    keep[:, 1:] = best[:, 1:] != best[:, :-1]
    return keep


def ctc_greedy_ids(ctc_logits: torch.Tensor, blank_id: int) -> list[int]:
    """Greedy CTC decoding of one utterance [T, V]: collapse repeats, drop blanks."""
    best = ctc_logits.argmax(dim=-1).tolist()
    out: list[int] = []
    previous = None
    for token in best:
        if token != previous and token != blank_id:
            out.append(int(token))
        previous = token
    return out


class LookBack(nn.Module):
    """Kept frames attend back to the adapter states; residual + LayerNorm."""

    def __init__(self, config: SpeechAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.attn = nn.MultiheadAttention(
            config.hidden_size, config.lookback_heads, dropout=config.dropout, batch_first=True
        )
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, states: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
        """states [B, T, H], keep bool [B, T] → one [n_kept_b, H] tensor per item."""
        out = []
        for item_states, item_keep in zip(states, keep, strict=True):
            query = item_states[item_keep].unsqueeze(0)
            memory = item_states.unsqueeze(0)
            ignore = (~item_keep).unsqueeze(0) if self.config.lookback_mask_dropped else None
            attended, _ = self.attn(query, memory, memory, key_padding_mask=ignore, need_weights=False)
            out.append(self.norm(attended + query).squeeze(0))
        return out
