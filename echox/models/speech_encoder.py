"""Speech encoder: Whisper log-mel features and a frozen HF Whisper encoder (50 Hz states)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from echox.audio import SAMPLE_RATE, FloatArray
from echox.config import ConfigBase
from echox.errors import ConfigError

HOP_LENGTH = 160  # 10 ms mel frames; the encoder's stride-2 conv gives 50 Hz states
SAMPLES_PER_STATE = 2 * HOP_LENGTH


@dataclasses.dataclass(frozen=True)
class SpeechEncoderConfig(ConfigBase):
    """A Whisper encoder. `max_source_positions` sets the window: positions / 50 seconds."""

    d_model: int = 1280
    num_layers: int = 32
    num_heads: int = 20
    ffn_dim: int = 5120
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    # Keep only the states that cover real audio; the released model keeps the whole window.
    trim_to_audio: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ConfigError("speech encoder: d_model must be divisible by num_heads")
        if self.max_source_positions < 1:
            raise ConfigError("speech encoder: max_source_positions must be positive")

    @property
    def window_seconds(self) -> float:
        return self.max_source_positions * SAMPLES_PER_STATE / SAMPLE_RATE

    def to_hf(self) -> WhisperConfig:
        return WhisperConfig(
            d_model=self.d_model,
            encoder_layers=self.num_layers,
            encoder_attention_heads=self.num_heads,
            encoder_ffn_dim=self.ffn_dim,
            num_mel_bins=self.num_mel_bins,
            max_source_positions=self.max_source_positions,
            decoder_layers=1,
            decoder_attention_heads=self.num_heads,
            decoder_ffn_dim=self.ffn_dim,
            vocab_size=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )


class SpeechEncoder(nn.Module):
    """16 kHz audio → log-mel (Whisper's recipe) → frozen Whisper encoder states at 50 Hz."""

    def __init__(self, config: SpeechEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.whisper = WhisperEncoder(config.to_hf())
        self.whisper.requires_grad_(False)
        window = config.max_source_positions * SAMPLES_PER_STATE
        self.features = WhisperFeatureExtractor(
            feature_size=config.num_mel_bins,
            sampling_rate=SAMPLE_RATE,
            hop_length=HOP_LENGTH,
            chunk_length=max(1, round(window / SAMPLE_RATE)),
            n_fft=400,
        )
        self.features.n_samples = window
        self.features.nb_max_frames = window // HOP_LENGTH

    def log_mel(self, audio: FloatArray) -> torch.Tensor:
        """Returns [1, num_mel_bins, 2 * max_source_positions] padded log-mel features."""
        feats = self.features(
            np.asarray(audio, dtype=np.float32), sampling_rate=SAMPLE_RATE, return_tensors="pt"
        )
        return feats.input_features.to(self.whisper.conv1.weight.dtype)

    def num_states(self, num_samples: int) -> int:
        """How many encoder states cover `num_samples` of real audio (rounded up, even)."""
        if not self.config.trim_to_audio:
            return self.config.max_source_positions
        states = -(-num_samples // SAMPLES_PER_STATE)
        states += states % 2  # the adapter stacks pairs of frames
        return min(states, self.config.max_source_positions)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """[B, mels, frames] → [B, max_source_positions, d_model]."""
        return self.whisper(input_features).last_hidden_state
