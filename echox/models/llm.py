"""The LLM: any HF causal LM built from a config (Llama by default)."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from echox.config import ConfigBase
from echox.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LLMConfig(ConfigBase):
    """The fields every decoder-only HF LM shares; `extra` passes anything else through."""

    model_type: str = "llama"
    vocab_size: int = 128256
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_layers: int = 28
    num_heads: int = 24
    num_kv_heads: int = 8
    head_dim: int | None = None
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError("llm: hidden_size must be divisible by num_heads (or set head_dim)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("llm: num_heads must be divisible by num_kv_heads")

    def to_hf(self) -> Any:
        kwargs: dict[str, Any] = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        }
        if self.head_dim is not None:
            kwargs["head_dim"] = self.head_dim
        kwargs.update(self.extra)
        try:
            return AutoConfig.for_model(self.model_type, **kwargs)
        except ValueError as exc:
            raise ConfigError(f"llm: {exc}") from None


def build_llm(config: LLMConfig) -> PreTrainedModel:
    """A randomly initialised causal LM (weights come from a checkpoint or training)."""
    model = AutoModelForCausalLM.from_config(config.to_hf())
    return model  # type: ignore[no-any-return]
