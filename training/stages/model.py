"""Stage `model`: the run's final EchoX model folder (`RUN/model/`).

The newest whole model a listening stage wrote (`RUN/echo/model`, else `RUN/s2t/model`), or, in
a run without them, the trained parts assembled (see `training.assemble`). This is the folder
`echox speak`, `echox respond`, `echox eval` and the demo load. Setting `weights_dtype`
(`float16`, `bfloat16` or `float32`, the default) is the type its weights are stored in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from echox.checkpoint import EchoX
from echox.errors import ConfigError
from training.assemble import assemble_parts
from training.stage import StageContext, is_done

MODEL_STAGES = ("echo", "s2t")  # stages that write a whole model to RUN/<stage>/model, newest first
MODEL_DIR = "model"
WEIGHT_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run(ctx: StageContext) -> dict[str, Any]:
    """The `model` stage; its one setting is `weights_dtype`."""
    unknown = sorted(set(ctx.settings) - {"weights_dtype"})
    dtype_name = str(ctx.settings.get("weights_dtype", "float32"))
    if unknown or dtype_name not in WEIGHT_DTYPES:
        known = ", ".join(WEIGHT_DTYPES)
        raise ConfigError(f"settings.model: only weights_dtype ({known}) is known; got {ctx.settings}")
    ctx.reporter.start(ctx.stage, total=1, unit="model")
    source = next((stage for stage in MODEL_STAGES if is_done(ctx.run_dir, stage)), None)
    # Loaded (or assembled) and written once, in the storage type asked for.
    if source:
        echox = EchoX.from_pretrained(ctx.run_dir / source / MODEL_DIR)
    else:
        echox = assemble_parts(ctx.run_dir, ctx.seed, preset=ctx.preset)
    folder = echox.save_pretrained(ctx.out, weights_dtype=WEIGHT_DTYPES[dtype_name])
    ctx.reporter.advance(1)
    return {
        "from": source or "parts", "folder": str(folder), "weights_dtype": dtype_name, "megabytes": _megabytes(folder)
    }


def _megabytes(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20, 2)
