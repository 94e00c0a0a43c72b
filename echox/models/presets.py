"""Model presets: `tiny` (trains and runs in real time on CPU) and the paper's `3b` and `8b`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from echox.errors import ConfigError
from echox.models.echo_decoder import EchoDecoderConfig
from echox.models.echox import EchoXConfig
from echox.models.istft_vocoder import IstftVocoderConfig
from echox.models.llm import LLMConfig
from echox.models.speech_adapter import SpeechAdapterConfig
from echox.models.speech_encoder import SpeechEncoderConfig
from echox.models.vocoder import VocoderConfig
from echox.streaming.segmenter import SegmenterConfig

WHISPER_LARGE_V3 = SpeechEncoderConfig(
    d_model=1280, num_layers=32, num_heads=20, ffn_dim=5120, num_mel_bins=128, max_source_positions=1500
)
LLAMA3_VOCAB = 128256


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    }


def _medium_t2c(llm: LLMConfig, unit_vocab_size: int) -> EchoDecoderConfig:
    """The released 'medium' echo decoder: 8 layers × 768, 12 heads (used by EchoX-8B)."""
    return EchoDecoderConfig(
        text_vocab_size=llm.vocab_size,
        text_dim=llm.hidden_size,
        unit_vocab_size=unit_vocab_size,
        hidden_size=768,
        num_layers=8,
        num_heads=12,
        num_kv_heads=12,
        intermediate_size=2048,
        max_position_embeddings=2048,
        aligner_intermediate_size=llm.intermediate_size,
    )


def _paper(llm: LLMConfig, unit_vocab_size: int = 10000) -> EchoXConfig:
    adapter = SpeechAdapterConfig(
        encoder_dim=WHISPER_LARGE_V3.d_model,
        hidden_size=llm.hidden_size,
        num_heads=llm.num_heads,
        lookback_heads=llm.num_heads,
    )
    return EchoXConfig(
        encoder=WHISPER_LARGE_V3,
        adapter=adapter,
        llm=llm,
        echo_decoder=_medium_t2c(llm, unit_vocab_size),
        vocoder=VocoderConfig.official(),
        segmenter=SegmenterConfig(),
        max_answer_tokens=1024,
    )


def preset_3b() -> EchoXConfig:
    """Whisper-large-v3 + Llama-3.2-3B (3.21 B) + the medium T2C + the 16 kHz unit HiFi-GAN."""
    llm = LLMConfig(
        vocab_size=LLAMA3_VOCAB, hidden_size=3072, intermediate_size=8192, num_layers=28,
        num_heads=24, num_kv_heads=8, tie_word_embeddings=True, extra=_llama3_rope(32.0),
    )
    return _paper(llm)


def preset_8b() -> EchoXConfig:
    """Whisper-large-v3 + Llama-3.1-8B (8.03 B) + the medium T2C + the 16 kHz unit HiFi-GAN."""
    llm = LLMConfig(
        vocab_size=LLAMA3_VOCAB, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, tie_word_embeddings=False, extra=_llama3_rope(8.0),
    )
    return _paper(llm)


def preset_tiny(vocab_size: int = 2048, unit_vocab_size: int = 512, num_units: int = 128) -> EchoXConfig:
    """A few million parameters: trains on two CPU cores and answers in real time on one."""
    encoder = SpeechEncoderConfig(
        d_model=128, num_layers=4, num_heads=4, ffn_dim=512, num_mel_bins=80, max_source_positions=500
    )
    llm = LLMConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
        num_kv_heads=2, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True,
    )
    adapter = SpeechAdapterConfig(
        encoder_dim=encoder.d_model, hidden_size=llm.hidden_size, num_heads=4, lookback_heads=4
    )
    echo = EchoDecoderConfig(
        text_vocab_size=vocab_size, text_dim=llm.hidden_size, unit_vocab_size=unit_vocab_size,
        hidden_size=256, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=704,
        max_position_embeddings=1024, aligner_intermediate_size=704,
    )
    return EchoXConfig(
        encoder=encoder,
        adapter=adapter,
        llm=llm,
        echo_decoder=echo,
        vocoder=IstftVocoderConfig(num_units=num_units),
        segmenter=SegmenterConfig(lag=3, max_len=32, min_len=8, threshold=0.1),
        max_answer_tokens=128,
    )


PRESETS: dict[str, Callable[[], EchoXConfig]] = {"tiny": preset_tiny, "3b": preset_3b, "8b": preset_8b}


def get_preset(name: str) -> EchoXConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
