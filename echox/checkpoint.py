"""The model folder: one format for every model size.

    DIR/config.json          format version + the EchoX config (all sizes, chat format, switches)
    DIR/model.safetensors    every weight (tied weights stored once)
    DIR/tokenizer.json       the text tokenizer (HF tokenizers)
    DIR/unit_language.json   the unit-language codec
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from echox import __version__
from echox.config import ConfigBase
from echox.errors import ConfigError, EchoXError, ModelLoadError
from echox.models.echox import EchoXConfig, EchoXModel
from echox.tokenizer import TextTokenizer, byte_level_tokenizer
from echox.units.codec import UnitLanguageCodec

FORMAT_NAME = "echox"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
UNIT_LANGUAGE_FILE = "unit_language.json"


class EchoX:
    """A complete model: the network, its tokenizer and its unit-language codec."""

    def __init__(self, model: EchoXModel, tokenizer: TextTokenizer, codec: UnitLanguageCodec) -> None:
        config = model.config
        if tokenizer.vocab_size > config.llm.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens; the LLM only {config.llm.vocab_size}"
            )
        if codec.vocab_size != config.echo_decoder.unit_vocab_size:
            raise ConfigError(
                f"the unit language has {codec.vocab_size} tokens; "
                f"the echo decoder {config.echo_decoder.unit_vocab_size}"
            )
        if codec.num_units != config.vocoder.num_units:
            raise ConfigError(
                f"the unit language covers {codec.num_units} units; the vocoder {config.vocoder.num_units}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec

    @property
    def config(self) -> EchoXConfig:
        return self.model.config

    @classmethod
    def random_init(
        cls, config: EchoXConfig, tokenizer: TextTokenizer | None = None, seed: int = 0
    ) -> EchoX:
        """Random weights, the byte-level tokenizer and an identity unit language (no merges)."""
        tokenizer = tokenizer or byte_level_tokenizer(config.chat)
        codec = UnitLanguageCodec.identity(config.vocoder.num_units)
        config = config.replace(echo_decoder=config.echo_decoder.replace(unit_vocab_size=codec.vocab_size))
        torch.manual_seed(seed)
        model = EchoXModel(config).eval()
        return cls(model, tokenizer, codec)

    def save_pretrained(self, path: str | Path, weights_dtype: torch.dtype | None = None) -> Path:
        """Writes the model folder. `weights_dtype` (e.g. torch.float16) stores the floating-point
        weights in that type, halving the folder; loading casts them back to the model's own."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "echox_version": __version__,
            "model": self.config.to_dict(),
        }
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        model = self.model if weights_dtype is None else _with_weights_in(self.model, weights_dtype)
        save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        self.tokenizer.save(folder / TOKENIZER_FILE)
        self.codec.save(folder / UNIT_LANGUAGE_FILE)
        return folder

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> EchoX:
        folder = Path(path)
        config = read_config(folder)
        for name in (WEIGHTS_FILE, TOKENIZER_FILE, UNIT_LANGUAGE_FILE):
            if not (folder / name).is_file():
                raise ModelLoadError(f"{folder} is not a complete model folder: {name} is missing")
        tokenizer = TextTokenizer.load(folder / TOKENIZER_FILE, config.chat)
        codec = UnitLanguageCodec.load(folder / UNIT_LANGUAGE_FILE)
        model = EchoXModel(config)
        try:
            missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"cannot read weights in {folder / WEIGHTS_FILE}: {_first_line(exc)}") from None
        if missing or unexpected:
            raise ModelLoadError(
                f"weights in {folder} do not match the config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        try:
            return cls(model.to(device).eval(), tokenizer, codec)
        except ConfigError as exc:
            raise ModelLoadError(f"{folder}: {exc}") from None


def _with_weights_in(model: EchoXModel, dtype: torch.dtype) -> EchoXModel:
    """A copy whose floating-point parameters are `dtype`; buffers (mel filters, windows) keep
    full precision, and tied parameters stay one tensor (save_model stores them once)."""
    copied = copy.deepcopy(model)
    for parameter in copied.parameters():  # each shared parameter once
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
    return copied


def read_config(folder: Path) -> EchoXConfig:
    """Reads and validates config.json, with a clear error for every way it can be wrong."""
    if not folder.is_dir():
        raise ModelLoadError(f"no model folder at {folder}")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} is not a model folder: {CONFIG_FILE} is missing")
    try:
        meta: Any = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{config_path} is not an EchoX model config")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise ModelLoadError(f"{config_path} has no format_version")
    if version > FORMAT_VERSION:
        raise ModelLoadError(
            f"{folder} was written by a newer EchoX (model format {version}; this version reads up to "
            f"{FORMAT_VERSION}, echox {__version__}): upgrade echox"
        )
    model = meta.get("model")
    if not isinstance(model, dict):
        raise ModelLoadError(f"{config_path} has no model section")
    try:
        return EchoXConfig.from_dict(model)
    except EchoXError as exc:
        raise ModelLoadError(f"{config_path}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


C = TypeVar("C", bound=ConfigBase)


def save_part(folder: str | Path, name: str, module: torch.nn.Module, config: ConfigBase) -> Path:
    """One module of a model (what a training stage produces): NAME.safetensors + NAME.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_NAME + "-part", "format_version": FORMAT_VERSION, "config": config.to_dict()}
    (folder / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_model(module, str(folder / f"{name}.safetensors"))
    return folder / f"{name}.safetensors"


def read_part_config(folder: str | Path, name: str, config_type: type[C]) -> C:
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise ModelLoadError(f"no {name} in {folder}: {path.name} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelLoadError(f"{path} is not a part file this echox can read")
    try:
        return config_type.from_dict(meta["config"])
    except (EchoXError, KeyError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def load_part_weights(folder: str | Path, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Loads NAME.safetensors into `module` (strict)."""
    path = Path(folder) / f"{name}.safetensors"
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except (SafetensorError, RuntimeError, OSError, FileNotFoundError) as exc:
        raise ModelLoadError(f"cannot read {path}: {_first_line(exc)}") from None
    if missing or unexpected:
        raise ModelLoadError(f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return module
