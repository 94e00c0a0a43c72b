"""Reading foreign checkpoint folders: JSON configs and safetensors weights (single files or
HF shards), with a ModelLoadError that names the file for anything unreadable."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from echox.errors import ModelLoadError

Tensors = dict[str, torch.Tensor]
MAX_LISTED = 12  # names shown in an error before "... (N in all)"


def safetensors_files(folder: Path, what: str) -> tuple[Path, ...]:
    """The weight files of a HF folder: the index's shards, model.safetensors, or model-*-of-*."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no weight_map")
        files = tuple(folder / name for name in sorted(set(weight_map.values())))
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index} lists shards that are missing: {absent}")
        return files
    if (folder / "model.safetensors").is_file():
        return (folder / "model.safetensors",)
    shards = tuple(sorted(folder.glob("model-*-of-*.safetensors")))
    if not shards:
        raise ModelLoadError(f"no {what} weights in {folder}: expected model.safetensors or shards")
    return shards


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def load_safetensors(files: Sequence[Path]) -> Tensors:
    """Every tensor of the files, in their stored dtype; a key in two files is an error."""
    tensors: Tensors = {}
    for path in files:
        try:
            part = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read weights {path}: {exc}") from None
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise ModelLoadError(f"{path.name} repeats keys of another shard: {listing(twice)}")
        tensors.update(part)
    return tensors


def listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > MAX_LISTED else ''}]"
