"""EchoX: the speech encoder, adapter, CTC shrink, LookBack and splice around an LLM, plus the
denoising adapter, echo decoder and unit vocoder that turn the LLM's hidden states into speech."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from echox.audio import FloatArray
from echox.config import ConfigBase
from echox.errors import ConfigError
from echox.models.echo_decoder import DenoisingAdapter, EchoDecoder, EchoDecoderConfig
from echox.models.llm import LLMConfig, build_llm
from echox.models.speech_adapter import LookBack, SpeechAdapter, SpeechAdapterConfig, ctc_shrink_mask
from echox.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from echox.models.vocoders import AnyVocoderConfig, build_vocoder
from echox.streaming.segmenter import SegmenterConfig
from echox.tokenizer import ChatFormat

# The released T2C prompt around a segment's hidden states, in Llama-3 ids. Its header carries
# id 12800 where 128000 (<|begin_of_text|>) was likely meant. Reproduced only under official
# compatibility; our own models use [bos] + segment + [eos].
OFFICIAL_T2C_QUIRK_ID = 12800
OFFICIAL_T2C_HEADER = (128006, 128000, 65576, 128007, 128000, 198)
OFFICIAL_T2C_PREFIX = (*OFFICIAL_T2C_HEADER, OFFICIAL_T2C_QUIRK_ID)
OFFICIAL_T2C_SUFFIX = (128009, *OFFICIAL_T2C_HEADER)


@dataclasses.dataclass(frozen=True)
class EchoXConfig(ConfigBase):
    encoder: SpeechEncoderConfig
    adapter: SpeechAdapterConfig
    llm: LLMConfig
    echo_decoder: EchoDecoderConfig
    vocoder: AnyVocoderConfig
    segmenter: SegmenterConfig = dataclasses.field(default_factory=SegmenterConfig)
    chat: ChatFormat = dataclasses.field(default_factory=ChatFormat)
    official_compat: bool = False
    max_answer_tokens: int = 256

    def __post_init__(self) -> None:
        checks = [
            (self.adapter.encoder_dim == self.encoder.d_model, "adapter.encoder_dim != encoder.d_model"),
            (self.adapter.hidden_size == self.llm.hidden_size, "adapter.hidden_size != llm.hidden_size"),
            (self.echo_decoder.text_dim == self.llm.hidden_size, "echo_decoder.text_dim != llm width"),
            (self.echo_decoder.text_vocab_size == self.llm.vocab_size, "echo_decoder text vocab != llm"),
            (self.max_answer_tokens >= 1, "max_answer_tokens must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"inconsistent EchoX config: {message}")


@dataclasses.dataclass
class SpeechEncoding:
    """What the listening side computes for one utterance."""

    adapter_states: torch.Tensor  # [T, H] at 25 Hz
    ctc_logits: torch.Tensor  # [T, V]
    keep: torch.Tensor  # bool [T]
    shrunk: torch.Tensor  # [n_kept, H]: replaces <audio_patch> in the prompt


class EchoXModel(nn.Module):
    def __init__(self, config: EchoXConfig) -> None:
        super().__init__()
        self.config = config
        self.speech_encoder = SpeechEncoder(config.encoder)
        self.speech_adapter = SpeechAdapter(config.adapter)
        self.ctc_head = nn.Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False)
        self.lookback = LookBack(config.adapter)
        self.llm = build_llm(config.llm)
        self.aligner = DenoisingAdapter(config.echo_decoder)
        self.echo_decoder = EchoDecoder(config.echo_decoder)
        self.vocoder = build_vocoder(config.vocoder)

    # --- listening -------------------------------------------------------------------------
    def encode_states(self, input_features: torch.Tensor, num_states: Sequence[int]) -> torch.Tensor:
        """Whisper states trimmed to the longest utterance: [B, mels, frames] → [B, T, d_enc]."""
        return self.speech_encoder(input_features)[:, : max(num_states)]

    def adapt(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states → (adapter states A [B, T', H], CTC logits [B, T', V])."""
        states = self.speech_adapter(encoder_states)
        return states, self.ctc_head(states)

    def shrink(self, states: torch.Tensor, ctc_logits: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CTC shrink + LookBack: returns the keep mask and one [n_kept, H] sequence per item."""
        keep = ctc_shrink_mask(ctc_logits)
        return keep, self.lookback(states, keep)

    @torch.inference_mode()
    def encode_speech(self, audio: FloatArray) -> SpeechEncoding:
        """One 16 kHz utterance → adapter states, CTC logits and the shrunk sequence."""
        features = self.speech_encoder.log_mel(audio).to(self.device)
        num_states = self.speech_encoder.num_states(len(audio))
        encoder_states = self.encode_states(features, [num_states])
        states, logits = self.adapt(encoder_states.to(self.speech_adapter.projector.weight.dtype))
        keep, shrunk = self.shrink(states, logits)
        return SpeechEncoding(states[0], logits[0], keep[0], shrunk[0])

    def splice(self, input_ids: torch.Tensor, audio_patch_id: int, speech: Sequence[torch.Tensor]) -> torch.Tensor:
        """Prompt ids [L] → embeddings [L', H] with the k-th <audio_patch> replaced by speech[k]."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        positions = (input_ids == audio_patch_id).nonzero().flatten().tolist()
        if len(positions) != len(speech):
            raise ValueError(f"{len(positions)} <audio_patch> tokens for {len(speech)} audios")
        pieces, cursor = [], 0
        for position, sequence in zip(positions, speech, strict=True):
            pieces += [embeds[cursor:position], sequence.to(embeds.dtype)]
            cursor = position + 1
        pieces.append(embeds[cursor:])
        return torch.cat(pieces, dim=0)

    def input_table(self) -> torch.Tensor:
        """The LLM's input embedding table [V, H] (also the echo decoder's frozen text rows)."""
        weight = self.llm.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)
        return weight

    # --- speaking --------------------------------------------------------------------------
    def t2c_prefix_ids(self, bos_id: int) -> list[int]:
        """The T2C prompt before a segment's embeddings."""
        return list(OFFICIAL_T2C_PREFIX) if self.config.official_compat else [bos_id]

    def t2c_suffix_ids(self, eos_id: int) -> list[int]:
        """The T2C prompt after a segment's embeddings; unit tokens follow it."""
        return list(OFFICIAL_T2C_SUFFIX) if self.config.official_compat else [eos_id]

    @property
    def device(self) -> torch.device:
        return self.ctc_head.weight.device

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per top-level module (a tied LM head is counted once, in the LLM)."""
        counts = {name: sum(p.numel() for p in module.parameters()) for name, module in self.named_children()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

