"""Stage `model`: the trained parts assembled into one EchoX model folder (`RUN/model/`).

What `echox speak`, `echox respond`, `echox eval` and the demo load. Parts not yet trained by
the recipe's stages keep a reproducible random init (see `training.assemble`).
"""

from __future__ import annotations

from typing import Any

from training.assemble import assemble_model
from training.stage import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    """The `model` stage (no settings)."""
    ctx.reporter.start(ctx.stage, total=1, unit="model")
    folder = assemble_model(ctx.run_dir, ctx.out, seed=ctx.seed)
    ctx.reporter.advance(1)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {"folder": str(folder), "megabytes": round(size / 2**20, 2)}
