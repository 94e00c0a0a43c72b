"""Builds an EchoX model folder (`RUN/model/`) from the parts the training stages wrote.

    RUN/lm/             tokenizer.json, llm.safetensors + llm.json
    RUN/t2c/            echo_decoder.safetensors + echo_decoder.json
    RUN/unit_language/  unit_language.json
    RUN/vocoder/        vocoder.safetensors + vocoder.json
    RUN/asr/            speech_encoder.safetensors + speech_encoder.json (optional)

The adapter, CTC head, LookBack and denoising adapter (and the speech encoder without `asr`)
keep their random init; the listening stages (s2t, echo) start from this model and write their
own whole model folders. The config is the tiny preset with the learned sizes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from echox.checkpoint import EchoX, load_part_weights, read_part_config
from echox.errors import ConfigError, ModelLoadError
from echox.models.echo_decoder import EchoDecoderConfig
from echox.models.echox import EchoXConfig, EchoXModel
from echox.models.llm import LLMConfig
from echox.models.presets import preset_tiny
from echox.models.speech_encoder import SpeechEncoderConfig
from echox.models.vocoders import AnyVocoderConfig
from echox.tokenizer import ChatFormat, TextTokenizer
from echox.units.codec import UnitLanguageCodec
from training.stage import DONE_FILE
from training.stages.vocoder import load_vocoder

PART_STAGES = ("lm", "t2c", "unit_language", "vocoder")
ENCODER_STAGE, ENCODER_PART = "asr", "speech_encoder"  # RUN/asr/speech_encoder.{safetensors,json}


def _finished(run_dir: Path, stage: str) -> Path:
    folder = run_dir / stage
    if not (folder / DONE_FILE).is_file():
        raise ModelLoadError(f"cannot assemble a model: stage {stage!r} has not finished in {run_dir}")
    return folder


def assembled_config(
    llm: LLMConfig, echo_decoder: EchoDecoderConfig, vocoder: AnyVocoderConfig, codec: UnitLanguageCodec
) -> EchoXConfig:
    """The tiny preset at the learned sizes, with the parts' own configs (the weights fit those)."""
    base = preset_tiny(vocab_size=llm.vocab_size, unit_vocab_size=codec.vocab_size, num_units=codec.num_units)
    try:
        return base.replace(llm=llm, echo_decoder=echo_decoder, vocoder=vocoder)
    except ConfigError as exc:
        raise ModelLoadError(f"the parts do not fit the tiny preset: {exc}") from None


def assemble_parts(run_dir: Path, seed: int = 0) -> EchoX:
    """An EchoX built from the finished part stages of a run (in memory, eval mode). The speech
    encoder comes from the `asr` stage when it has finished, else it keeps its random init."""
    run_dir = Path(run_dir)
    lm, t2c, unit_language, vocoder = (_finished(run_dir, stage) for stage in PART_STAGES)
    chat = ChatFormat()
    tokenizer = TextTokenizer.load(lm / "tokenizer.json", chat)
    codec = UnitLanguageCodec.load(unit_language / "unit_language.json")
    config = assembled_config(
        read_part_config(lm, "llm", LLMConfig),
        read_part_config(t2c, "echo_decoder", EchoDecoderConfig),
        load_vocoder(vocoder).config,
        codec,
    ).replace(chat=chat)
    asr = run_dir / ENCODER_STAGE
    if (asr / DONE_FILE).is_file():
        encoder = read_part_config(asr, ENCODER_PART, SpeechEncoderConfig)
        adapter = config.adapter.replace(encoder_dim=encoder.d_model)
        try:
            config = config.replace(encoder=encoder, adapter=adapter)
        except ConfigError as exc:
            raise ModelLoadError(f"the speech encoder does not fit the tiny preset: {exc}") from None
    torch.manual_seed(seed)  # the not-yet-trained modules get a reproducible init
    model = EchoXModel(config)
    load_part_weights(lm, "llm", model.llm)
    load_part_weights(t2c, "echo_decoder", model.echo_decoder)
    load_part_weights(vocoder, "vocoder", model.vocoder)
    if (asr / DONE_FILE).is_file():
        load_part_weights(asr, ENCODER_PART, model.speech_encoder)
    return EchoX(model.eval(), tokenizer, codec)


def assemble_model(run_dir: Path, out: Path | None = None, seed: int = 0) -> Path:
    """Writes the EchoX folder of `assemble_parts` (default `RUN/model/`) and returns its path."""
    return assemble_parts(run_dir, seed).save_pretrained(out or Path(run_dir) / "model")
