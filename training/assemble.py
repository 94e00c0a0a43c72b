"""Builds an EchoX model folder (`RUN/model/`) from the parts the training stages wrote.

    RUN/lm/             tokenizer.json, llm.safetensors + llm.json
    RUN/t2c/            echo_decoder.safetensors + echo_decoder.json
    RUN/unit_language/  unit_language.json
    RUN/vocoder/        vocoder.safetensors + vocoder.json
    RUN/asr/            speech_encoder.safetensors + speech_encoder.json (optional)

The adapter, CTC head, LookBack and denoising adapter (and the speech encoder without `asr`)
keep their random init; the listening stages (s2t, echo) start from this model and write their
own whole model folders. The config is the run's preset (`tiny` unless told) with the parts' own
configs, the adapter sized between them, and the prompt format the `lm` stage saved.
"""

from __future__ import annotations

from pathlib import Path

import torch

from echox.checkpoint import EchoX, load_part_weights, read_part_config
from echox.errors import ConfigError, ModelLoadError
from echox.models.echo_decoder import EchoDecoderConfig
from echox.models.echox import EchoXConfig, EchoXModel
from echox.models.llm import LLMConfig
from echox.models.presets import get_preset
from echox.models.speech_adapter import SpeechAdapterConfig
from echox.models.speech_encoder import SpeechEncoderConfig
from echox.models.vocoders import AnyVocoderConfig
from echox.tokenizer import ChatFormat
from echox.units.codec import UnitLanguageCodec
from training.stage import DONE_FILE
from training.stages.lm import load_lm_tokenizer
from training.stages.vocoder import load_vocoder

PART_STAGES = ("lm", "t2c", "unit_language", "vocoder")
ENCODER_STAGE, ENCODER_PART = "asr", "speech_encoder"  # RUN/asr/speech_encoder.{safetensors,json}


def _finished(run_dir: Path, stage: str) -> Path:
    folder = run_dir / stage
    if not (folder / DONE_FILE).is_file():
        raise ModelLoadError(f"cannot assemble a model: stage {stage!r} has not finished in {run_dir}")
    return folder


def fitted_adapter(adapter: SpeechAdapterConfig, llm: LLMConfig, encoder_dim: int) -> SpeechAdapterConfig:
    """The preset's adapter between the parts: its head counts were chosen for the preset's LLM
    width, so an LLM of another width brings its own head count."""
    if adapter.hidden_size != llm.hidden_size:
        adapter = adapter.replace(hidden_size=llm.hidden_size, num_heads=llm.num_heads, lookback_heads=llm.num_heads)
    return adapter.replace(encoder_dim=encoder_dim)


def assembled_config(
    preset: str,
    llm: LLMConfig,
    echo_decoder: EchoDecoderConfig,
    vocoder: AnyVocoderConfig,
    encoder: SpeechEncoderConfig | None,
    chat: ChatFormat,
) -> EchoXConfig:
    """The preset with the parts' own configs (the weights fit those); without `asr` the
    preset's speech encoder."""
    base = get_preset(preset)
    encoder = encoder or base.encoder
    try:
        adapter = fitted_adapter(base.adapter, llm, encoder.d_model)
        return base.replace(
            llm=llm, echo_decoder=echo_decoder, vocoder=vocoder, encoder=encoder, adapter=adapter, chat=chat
        )
    except ConfigError as exc:
        raise ModelLoadError(f"the parts do not fit the {preset} preset: {exc}") from None


def assemble_parts(run_dir: Path, seed: int = 0, *, preset: str = "tiny") -> EchoX:
    """An EchoX built from the finished part stages of a run (in memory, eval mode). The speech
    encoder comes from the `asr` stage when it has finished, else it keeps its random init."""
    run_dir = Path(run_dir)
    lm, t2c, unit_language, vocoder = (_finished(run_dir, stage) for stage in PART_STAGES)
    tokenizer = load_lm_tokenizer(lm)
    codec = UnitLanguageCodec.load(unit_language / "unit_language.json")
    asr = run_dir / ENCODER_STAGE
    has_encoder = (asr / DONE_FILE).is_file()
    config = assembled_config(
        preset,
        read_part_config(lm, "llm", LLMConfig),
        read_part_config(t2c, "echo_decoder", EchoDecoderConfig),
        load_vocoder(vocoder).config,
        read_part_config(asr, ENCODER_PART, SpeechEncoderConfig) if has_encoder else None,
        tokenizer.chat,
    )
    torch.manual_seed(seed)  # the not-yet-trained modules get a reproducible init
    model = EchoXModel(config)
    load_part_weights(lm, "llm", model.llm)
    load_part_weights(t2c, "echo_decoder", model.echo_decoder)
    load_part_weights(vocoder, "vocoder", model.vocoder)
    if has_encoder:
        load_part_weights(asr, ENCODER_PART, model.speech_encoder)
    return EchoX(model.eval(), tokenizer, codec)


def assemble_model(run_dir: Path, out: Path | None = None, seed: int = 0, *, preset: str = "tiny") -> Path:
    """Writes the EchoX folder of `assemble_parts` (default `RUN/model/`) and returns its path."""
    return assemble_parts(run_dir, seed, preset=preset).save_pretrained(out or Path(run_dir) / "model")
