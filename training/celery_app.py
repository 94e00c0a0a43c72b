"""Celery: every training stage is a task; a job is a chain of a recipe's stages.

Start a worker with `celery -A training.celery_app worker --pool prefork`. JSON is the only
serializer; tasks are acknowledged late (a worker that dies mid-stage leaves the task queued and
the stage resumes from its last checkpoint); progress goes to the task state as PROGRESS with
{stage, done, total, unit, metrics}. Cancelling a job revokes its tasks with terminate=True,
which the prefork pool honours.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task, chain
from celery.result import AsyncResult
from celery.signals import worker_process_init

from services.common.settings import get_settings
from training.recipe import load_recipe
from training.stage import StageContext, run_stage
from training.stages import stage_fn

settings = get_settings()
app = Celery("echox_training", broker=settings.broker_url, backend=settings.result_url)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_track_started=True,
    result_extended=True,
    broker_connection_retry_on_startup=True,
    task_time_limit=settings.stage_time_limit_s,
)


@worker_process_init.connect  # type: ignore[untyped-decorator]  # celery ships no types
def _allow_stage_subprocesses(**_: Any) -> None:
    """Prefork children are daemonic, and daemonic processes may not start children; stages
    parallelise with process pools (synthesis, feature extraction), so lift that flag here."""
    multiprocessing.current_process().daemon = False


class CeleryReporter:
    """Stage progress as Celery task state, at most a few updates a second."""

    def __init__(self, task: Task, min_interval_s: float = 0.5) -> None:
        self.task = task
        self.min_interval_s = min_interval_s
        self.state: dict[str, Any] = {}
        self._last = 0.0

    def start(self, stage: str, total: int, unit: str = "steps") -> None:
        self.state = {"stage": stage, "done": 0, "total": total, "unit": unit, "metrics": {}, "message": ""}
        self._publish(force=True)

    def advance(self, steps: int = 1, **metrics: float) -> None:
        self.state["done"] = self.state.get("done", 0) + steps
        if metrics:
            self.state["metrics"] = {k: float(v) for k, v in metrics.items()}
        self._publish(force=self.state["done"] >= self.state.get("total", 0))

    def log(self, message: str) -> None:
        self.state["message"] = message
        self._publish(force=True)

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.min_interval_s:
            self._last = now
            self.task.update_state(state="PROGRESS", meta=dict(self.state))


@app.task(bind=True, name="echox.training.run_stage")  # type: ignore[untyped-decorator]
def run_stage_task(self: Task, recipe: str, run_dir: str, stage: str) -> dict[str, Any]:
    """Runs one stage of `recipe` into `run_dir` (skipped if it already finished)."""
    loaded = load_recipe(recipe, settings.data_root)
    ctx = StageContext(
        run_dir=Path(run_dir),
        stage=stage,
        settings=loaded.stage_settings(stage),
        facts=loaded.facts,
        preset=loaded.preset,
        seed=loaded.seed,
        reporter=CeleryReporter(self),
    )
    return {"stage": stage, **run_stage(stage_fn(stage), ctx)}


def submit_job(recipe: str, run_dir: str, stages: list[str], queue: str | None = None) -> AsyncResult:
    """A chain of stage tasks; each stage's time limit comes from its `time_limit_s` setting."""
    loaded = load_recipe(recipe, settings.data_root)
    signatures = []
    for stage in stages:
        limit = loaded.stage_settings(stage).get("time_limit_s", settings.stage_time_limit_s)
        options: dict[str, Any] = {"time_limit": int(limit), "soft_time_limit": max(1, int(limit) - 30)}
        if queue:
            options["queue"] = queue
        signatures.append(run_stage_task.si(recipe, run_dir, stage).set(**options))
    return chain(*signatures).apply_async()
