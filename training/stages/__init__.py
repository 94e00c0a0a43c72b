"""The training stages, in the order a recipe runs them. Each module has `run(ctx) -> dict`."""

from __future__ import annotations

import importlib

from training.stage import StageFn

STAGE_ORDER: tuple[str, ...] = (
    "synth", "lm", "units", "unit_language", "t2c", "vocoder", "asr", "s2t", "echo", "echo_gold", "model"
)
# Stages that train data-parallel under torchrun (training.distributed); the rest run on rank 0.
DATA_PARALLEL = frozenset({"s2t", "echo", "echo_gold"})
# Stages that run another stage's module under their own name (and folder) with other settings.
MODULE_OF = {"echo_gold": "echo"}


def stage_fn(name: str) -> StageFn:
    if name not in STAGE_ORDER:
        raise KeyError(f"unknown stage {name!r}")
    module = importlib.import_module(f"training.stages.{MODULE_OF.get(name, name)}")
    fn: StageFn = module.run
    return fn
