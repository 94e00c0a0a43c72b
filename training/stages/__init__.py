"""The training stages, in the order a recipe runs them. Each module has `run(ctx) -> dict`."""

from __future__ import annotations

import importlib

from training.stage import StageFn

STAGE_ORDER: tuple[str, ...] = ("synth", "lm", "units", "unit_language", "t2c", "vocoder", "model")


def stage_fn(name: str) -> StageFn:
    if name not in STAGE_ORDER:
        raise KeyError(f"unknown stage {name!r}")
    module = importlib.import_module(f"training.stages.{name}")
    fn: StageFn = module.run
    return fn
