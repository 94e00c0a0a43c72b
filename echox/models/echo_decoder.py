"""Echo decoder (T2C): LLM-space embeddings → unit-language tokens; and the denoising adapter.

The decoder's token table is [LLM input embeddings (frozen) ; unit-language rows (trained)], so
ids 0..V_text-1 are text and V_text..V_text+V_unit-1 are unit-language tokens. An input adapter
maps every H-wide embedding to the decoder width; the head predicts over text+unit ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from echox.config import ConfigBase
from echox.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class EchoDecoderConfig(ConfigBase):
    """Sizes of the released code: small 4×512, default 6×512, medium 8×768, large 2×H."""

    text_vocab_size: int = 128256
    text_dim: int = 3072
    unit_vocab_size: int = 8192
    hidden_size: int = 768
    num_layers: int = 8
    num_heads: int = 12
    num_kv_heads: int = 12
    intermediate_size: int = 2048
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # A full transformers `rope_parameters` dict (e.g. llama3 scaling); overrides rope_theta.
    rope_parameters: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    aligner_intermediate_size: int = 8192
    aligner_dropout: float = 0.1
    # Upper bound on unit-language tokens per input embedding when generating.
    max_units_per_input: float = 8.0
    min_units: int = 16
    # Training-time dropout on the decoder's inputs and attention weights (none at inference):
    # a small T2C learns its few hundred answers by heart without it.
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError("echo decoder: inconsistent head counts")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"echo decoder: dropout must be in [0, 1), got {self.dropout}")
        if self.unit_vocab_size < 1:
            raise ConfigError("echo decoder: unit_vocab_size must be positive")

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.unit_vocab_size

    def to_hf(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=1,  # inputs arrive as embeddings; the decoder's own table is removed
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            attention_dropout=self.dropout,
            rope_parameters=self.rope_parameters or {"rope_type": "default", "rope_theta": self.rope_theta},
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        )


class DenoisingAdapter(nn.Module):
    """MLP H → intermediate → H (ReLU, dropout) that maps LLM hidden states to text-embedding space."""

    def __init__(self, config: EchoDecoderConfig) -> None:
        super().__init__()
        h, inner = config.text_dim, config.aligner_intermediate_size
        self.net = nn.Sequential(
            nn.Linear(h, inner), nn.ReLU(), nn.Dropout(config.aligner_dropout), nn.Linear(inner, h)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)  # type: ignore[no-any-return]


class EchoDecoder(nn.Module):
    """A small Llama over [text-or-hidden embeddings ; unit-language tokens]."""

    def __init__(self, config: EchoDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.unit_embed = nn.Embedding(config.unit_vocab_size, config.text_dim)
        self.adapter = nn.Linear(config.text_dim, config.hidden_size, bias=True)
        self.input_dropout = nn.Dropout(config.dropout)
        self.decoder = LlamaModel(config.to_hf())
        self.decoder.embed_tokens = None  # type: ignore[assignment]
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, token_ids: torch.Tensor, text_table: torch.Tensor) -> torch.Tensor:
        """Embeds mixed ids in the H-wide space: text rows from the frozen LLM table, units trained."""
        v_text = self.config.text_vocab_size
        is_unit = token_ids >= v_text
        text_part = nn.functional.embedding(token_ids.clamp(max=v_text - 1), text_table.detach())
        unit_part = self.unit_embed((token_ids - v_text).clamp(min=0))
        return torch.where(is_unit.unsqueeze(-1), unit_part, text_part)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: object | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object | None]:
        """H-wide embeddings [B, L, text_dim] → logits over text+unit ids [B, L, V_text+V_unit]."""
        out = self.decoder(
            inputs_embeds=self.input_dropout(self.adapter(inputs_embeds)),
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
        )
        return self.lm_head(out.last_hidden_state), out.cache

    def unit_limit(self, prefix_len: int) -> int:
        """The most unit-language tokens generated after a prefix of `prefix_len` embeddings."""
        limit = max(self.config.min_units, int(self.config.max_units_per_input * prefix_len))
        return min(limit, self.config.max_position_embeddings - prefix_len)

    def allowed_ids(self, stop_id: int | torch.Tensor, device: torch.device) -> torch.Tensor:
        """0 on the unit ids and the stop id (or ids), -inf elsewhere: added to the logits, it
        keeps the output decodable."""
        allowed = torch.full((self.config.vocab_size,), float("-inf"), device=device)
        allowed[self.config.text_vocab_size :] = 0.0
        allowed[stop_id] = 0.0
        return allowed

    @torch.inference_mode()
    def generate_units(
        self, prefix_embeds: torch.Tensor, text_table: torch.Tensor, stop_id: int
    ) -> list[int]:
        """Greedy unit-language tokens (0-based) after `prefix_embeds` [L, text_dim], until `stop_id`.

        Only unit ids and the stop id can be chosen, so the output is always decodable.
        """
        v_text = self.config.text_vocab_size
        allowed = self.allowed_ids(stop_id, prefix_embeds.device)
        logits, cache = self(prefix_embeds.unsqueeze(0), use_cache=True)
        units: list[int] = []
        for _ in range(self.unit_limit(prefix_embeds.shape[0])):
            next_id = int((logits[0, -1].float() + allowed).argmax())
            if next_id == stop_id:
                break
            units.append(next_id - v_text)
            step = self.embed(torch.tensor([[next_id]], device=prefix_embeds.device), text_table)
            logits, cache = self(step, cache=cache, use_cache=True)
        return units
