"""Training subcommands of `echox` (registered through the `echox.commands` entry point)."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    from training.evaluate import register_cli as register_eval
    from training.speak import register_cli as register_speak
    from training.stages.synth import register_cli as register_data
    from training.stages.units import register_cli as register_units

    for add in (register_data, register_units, register_speak, register_eval):
        add(sub)
    p = sub.add_parser("train", help="run a training recipe (all or some of its stages)")
    p.add_argument("--recipe", default="tiny", help="recipe name or YAML path (default: tiny)")
    p.add_argument("--stages", help="comma-separated stages (default: the recipe's)")
    p.add_argument("--out", required=True, help="run folder; an existing one resumes")
    p.epilog = "Several GPUs: torchrun --nproc_per_node N -m echox train --recipe 3b --out runs/3b"
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from echox.errors import EchoXError
    from services.common.settings import get_settings
    from training.distributed import shutdown
    from training.recipe import RecipeError, load_recipe
    from training.runner import RichReporter, run_recipe
    from training.stage import SilentReporter

    try:
        recipe = load_recipe(args.recipe, get_settings().data_root)
    except RecipeError as exc:
        raise EchoXError(str(exc)) from None
    stages = args.stages.split(",") if args.stages else None
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone shows progress
    try:
        with RichReporter() if main else contextlib.nullcontext(SilentReporter()) as reporter:
            results = run_recipe(recipe, Path(args.out), stages, reporter)
    finally:
        shutdown()
    if main:
        for stage, result in results.items():
            print(f"{stage:<14} {result.get('wall_seconds', 0):>8.1f} s")
    return 0
