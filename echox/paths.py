"""Where the embedded default model lives."""

from __future__ import annotations

import os
from pathlib import Path

from echox.errors import ModelLoadError

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = PACKAGE_DIR / "assets" / "echox-tiny"


def default_model_dir() -> Path | None:
    """ECHOX_MODEL_DIR if set, else the committed default model, else None."""
    override = os.environ.get("ECHOX_MODEL_DIR")
    if override:
        return Path(override)
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


def resolve_model_dir(model: str | None) -> Path:
    if model:
        return Path(model)
    found = default_model_dir()
    if found is None:
        raise ModelLoadError(
            "no default model is committed yet: pass --model DIR "
            "(make one with `echox model init --preset tiny --out DIR`)"
        )
    return found
