"""Builds an EchoX model folder (`RUN/model/`) from the parts the training stages wrote.

    RUN/lm/             tokenizer.json, llm.safetensors + llm.json
    RUN/t2c/            echo_decoder.safetensors + echo_decoder.json
    RUN/unit_language/  unit_language.json
    RUN/vocoder/        vocoder.safetensors + vocoder.json

The speech encoder, adapter, CTC head, LookBack and denoising adapter keep their random init
until the listening stages train them; the config is the preset with the learned sizes.
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
from echox.models.vocoders import AnyVocoderConfig
from echox.tokenizer import ChatFormat, TextTokenizer
from echox.units.codec import UnitLanguageCodec
from training.stage import DONE_FILE
from training.stages.vocoder import load_vocoder

PART_STAGES = ("lm", "t2c", "unit_language", "vocoder")


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


def assemble_model(run_dir: Path, out: Path | None = None, seed: int = 0) -> Path:
    """Writes the EchoX folder (default `RUN/model/`) and returns its path."""
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
    torch.manual_seed(seed)  # the not-yet-trained modules get a reproducible init
    model = EchoXModel(config)
    load_part_weights(lm, "llm", model.llm)
    load_part_weights(t2c, "echo_decoder", model.echo_decoder)
    load_part_weights(vocoder, "vocoder", model.vocoder)
    return EchoX(model.eval(), tokenizer, codec).save_pretrained(out or run_dir / "model")
