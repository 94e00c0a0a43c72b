"""Tiny EchoX models for unit tests: a few hundred thousand parameters, built in milliseconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from echox.checkpoint import EchoX
from echox.models.echo_decoder import EchoDecoderConfig
from echox.models.echox import EchoXConfig
from echox.models.llm import LLMConfig
from echox.models.speech_adapter import SpeechAdapterConfig
from echox.models.speech_encoder import SpeechEncoderConfig
from echox.models.vocoder import VocoderConfig
from echox.streaming.segmenter import SegmenterConfig


def micro_config(vocab_size: int = 300, max_answer_tokens: int = 24) -> EchoXConfig:
    """Hidden 32, 1-2 layers everywhere: the 'tester' config of every module."""
    encoder = SpeechEncoderConfig(
        d_model=32, num_layers=1, num_heads=2, ffn_dim=64, num_mel_bins=80, max_source_positions=250
    )
    llm = LLMConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=512, rope_theta=10000.0,
    )
    return EchoXConfig(
        encoder=encoder,
        adapter=SpeechAdapterConfig(encoder_dim=32, hidden_size=32, num_heads=2, lookback_heads=2),
        llm=llm,
        echo_decoder=EchoDecoderConfig(
            text_vocab_size=vocab_size, text_dim=32, unit_vocab_size=16, hidden_size=32, num_layers=1,
            num_heads=2, num_kv_heads=2, intermediate_size=64, max_position_embeddings=256,
            aligner_intermediate_size=64, max_units_per_input=3.0, min_units=4,
        ),
        vocoder=VocoderConfig(
            num_units=16, unit_embed_dim=16, upsample_rates=(5, 4, 4, 4), upsample_kernel_sizes=(11, 8, 8, 8),
            upsample_initial_channel=32, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),),
            dur_hidden_dim=16,
        ),
        segmenter=SegmenterConfig(lag=2, max_len=6, min_len=2, threshold=0.1),
        max_answer_tokens=max_answer_tokens,
    )


@pytest.fixture(scope="session")
def micro_echox() -> EchoX:
    return EchoX.random_init(micro_config(), seed=0)


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory: pytest.TempPathFactory, micro_echox: EchoX) -> Path:
    return micro_echox.save_pretrained(tmp_path_factory.mktemp("micro") / "model")


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)
