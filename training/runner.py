"""Runs a recipe's stages in order with one progress display; resumes where it stopped."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from training.distributed import SINGLE, DistributedSettings, Parallel, from_environment
from training.recipe import Recipe
from training.stage import Reporter, SilentReporter, StageContext, run_stage
from training.stages import stage_fn


class RichReporter:
    """One progress bar per stage, with the latest metrics beside it."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description:<14}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
        )
        self._task: Any = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, stage: str, total: int, unit: str = "steps") -> None:
        self._task = self.progress.add_task(stage, total=total, unit=unit, metrics="")

    def advance(self, steps: int = 1, **metrics: float) -> None:
        self.progress.update(self._task, advance=steps)
        if metrics:
            self.progress.update(self._task, metrics=" ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def log(self, message: str) -> None:
        self.progress.console.print(message)


def recipe_parallel(recipe: Recipe) -> Parallel:
    """One process, unless the recipe asks for `distributed` settings or torchrun started us."""
    if recipe.distributed is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return SINGLE
    return from_environment(DistributedSettings.from_mapping(recipe.distributed or {}))


def run_recipe(
    recipe: Recipe,
    out: Path,
    stages: Sequence[str] | None = None,
    reporter: Reporter | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, dict[str, Any]]:
    """Runs `stages` (default: the recipe's) into `out`; finished stages are skipped. Under
    torchrun every rank calls this; rank 0 alone reports and writes the run's records."""
    parallel = recipe_parallel(recipe)
    out.mkdir(parents=True, exist_ok=True)
    if parallel.is_main:
        written = {"recipe": str(recipe.source), "name": recipe.name, "preset": recipe.preset}
        written["facts"] = str(recipe.facts)
        (out / "recipe.json").write_text(json.dumps(written, indent=2))
    results: dict[str, dict[str, Any]] = {}
    for stage in stages or recipe.stages:
        ctx = StageContext(
            run_dir=out,
            stage=stage,
            settings=recipe.stage_settings(stage),
            facts=recipe.facts,
            preset=recipe.preset,
            seed=recipe.seed,
            cancel=cancel or threading.Event(),
            parallel=parallel,
        )
        if reporter is not None:
            ctx.reporter = reporter if parallel.is_main else SilentReporter()
        results[stage] = run_stage(stage_fn(stage), ctx)
    if not parallel.is_main:
        return results
    report = out / "report.json"  # earlier invocations' stages stay in the report
    merged = json.loads(report.read_text()) if report.is_file() else {}
    report.write_text(json.dumps({**merged, **results}, indent=2) + "\n")
    return results
