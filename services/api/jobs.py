"""/v1/jobs: training jobs through Celery (admin only): submit, progress, cancel, artifacts.

A job runs some stages of a recipe into `runs_root/<run>`. A recipe is a name from
training/recipes or a YAML file under the data root (ECHOX_DATA_ROOT); any other path is refused
(400), as is data the recipe names outside the data root. A run folder that an unfinished job
still writes is refused too (409); a finished one may be submitted again, which resumes it (the
stages that finished are skipped).

Progress is per stage, read from the Celery task states (PROGRESS carries done/total/unit and
the latest metrics); the job's state follows from its stages.
"""

from __future__ import annotations

import math
import mimetypes
import re
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from services.api.auth import KeyRecord, require_admin
from services.api.deps import AUTH_ERRORS, ApiState, State, errors
from services.api.job_store import JobRecord
from training.stage import DONE_FILE, LOSS_PLOT, METRICS_FILE
from training.stages import STAGE_ORDER

RUN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
JOB_ID = PathParam(pattern=r"^[0-9a-f]{32}$", description="The id POST /v1/jobs returned")
StageName = Literal[STAGE_ORDER]  # type: ignore[valid-type]  # the stages training.stages knows
StageState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")
_CELERY_STATES: dict[str, StageState] = {
    "PENDING": "queued", "RECEIVED": "queued", "STARTED": "running", "PROGRESS": "running", "RETRY": "running",
    "SUCCESS": "succeeded", "FAILURE": "failed", "REJECTED": "failed", "IGNORED": "failed", "REVOKED": "cancelled",
}  # fmt: skip
MODEL_DIR = "model"  # the `model` stage's folder: the run's model

router = APIRouter(prefix="/v1/jobs", tags=["training jobs"], dependencies=[Depends(require_admin)],
                   responses=errors(*AUTH_ERRORS, 503))


class JobRequest(BaseModel):
    recipe: str = Field(min_length=1, max_length=1024, examples=["tiny"],
                        description="A recipe name (training/recipes) or a YAML path under the data root")
    stages: list[StageName] | None = Field(default=None, min_length=1, max_length=len(STAGE_ORDER),
                                           json_schema_extra={"uniqueItems": True},
                                           description="The stages to run, in order (default: the recipe's)")
    run: str | None = Field(default=None, pattern=RUN_PATTERN,
                            description="The run folder's name under runs_root (default: recipe-time-random)")


class StageProgress(BaseModel):
    stage: str
    state: StageState
    done: int | None = None
    total: int | None = None
    unit: str | None = None
    fraction: float | None = Field(default=None, description="done / total, 1.0 once the stage succeeded")
    metrics: dict[str, float | None] = Field(default_factory=dict, description="The latest training metrics")
    message: str | None = None
    result: dict[str, Any] | None = Field(default=None, description="The stage's summary, once it succeeded")
    error: str | None = None


class JobStatus(BaseModel):
    id: str
    recipe: str
    run: str
    run_dir: str
    state: JobState
    stages: list[StageProgress]
    created_at: float
    cancelled_at: float | None = None
    submitted_by: str


class Artifact(BaseModel):
    path: str = Field(description="Relative to the run folder; GET …/artifacts/{path} returns the file")
    stage: str
    bytes: int


class Artifacts(BaseModel):
    job_id: str
    run_dir: str
    files: list[Artifact]


def _finite(value: Any) -> Any:
    """JSON without NaN or infinities (a diverged loss), which strict JSON cannot carry."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def stage_progress(stage: str, celery_state: str, payload: Any, cancelled: bool) -> StageProgress:
    state = _CELERY_STATES.get(celery_state, "queued")
    if cancelled and state == "queued":
        state = "cancelled"  # a later stage of a cancelled chain is never sent
    progress = StageProgress(stage=stage, state=state)
    if celery_state == "PROGRESS" and isinstance(payload, dict):
        done, total = payload.get("done"), payload.get("total")
        progress.done = int(done) if isinstance(done, int | float) else None
        progress.total = int(total) if isinstance(total, int | float) else None
        if progress.done is not None and progress.total:
            progress.fraction = min(1.0, progress.done / progress.total)
        progress.unit = str(payload.get("unit") or "") or None
        progress.metrics = _finite(payload.get("metrics") or {})
        progress.message = str(payload.get("message") or "") or None
    elif state == "succeeded":
        progress.fraction = 1.0
        progress.result = _finite(payload) if isinstance(payload, dict) else None
    elif state == "failed":
        progress.error = f"{type(payload).__name__}: {payload}" if isinstance(payload, BaseException) else str(payload)
    elif state == "cancelled":
        progress.error = "cancelled"
    return progress


def job_state(stages: list[StageProgress], cancel_asked: bool) -> JobState:
    states = [s.state for s in stages]
    if "failed" in states:
        return "failed"
    if all(s == "succeeded" for s in states):
        return "succeeded"
    if cancel_asked or "cancelled" in states:
        return "cancelling" if "running" in states else "cancelled"
    return "running" if any(s in ("running", "succeeded") for s in states) else "queued"


async def job_status(state: ApiState, record: JobRecord) -> JobStatus:
    """The job's status from its Celery tasks; the first terminal one is kept in the record."""
    if record.final is not None:
        return JobStatus.model_validate(record.final)
    found = await run_in_threadpool(lambda: [state.runner.task_state(task_id) for task_id in record.task_ids])
    cancel_asked = record.cancelled_at is not None
    stages = [stage_progress(stage, celery_state, payload, cancel_asked)
              for stage, (celery_state, payload) in zip(record.stages, found, strict=True)]
    status = JobStatus(id=record.id, recipe=record.recipe, run=record.run, run_dir=record.run_dir,
                       state=job_state(stages, cancel_asked), stages=stages, created_at=record.created_at,
                       cancelled_at=record.cancelled_at, submitted_by=record.submitted_by)
    if status.state in TERMINAL:
        record.final = status.model_dump(mode="json")
        await state.jobs.put(record)
    return status


def resolve_recipe(state: ApiState, recipe: str) -> Any:
    """The loaded recipe; 400 for a path outside the data root and recipes folder, or a bad recipe."""
    from training.recipe import RECIPES_DIR, RecipeError, load_recipe, resolve_recipe_path

    data_root = state.settings.data_root
    try:
        candidate = resolve_recipe_path(recipe)
        path = (candidate if candidate.is_absolute() else data_root / candidate).resolve()
    except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
        raise HTTPException(400, f"unusable recipe path: {exc}") from None
    if not any(path.is_relative_to(root.resolve()) for root in (data_root, RECIPES_DIR)):
        raise HTTPException(400, "the recipe path lies outside the data root and the recipes folder")
    try:
        return load_recipe(str(path), data_root)
    except RecipeError as exc:
        raise HTTPException(400, str(exc)) from None
    except (OSError, ValueError) as exc:
        raise HTTPException(400, f"cannot read the recipe: {type(exc).__name__}: {exc}") from None


def choose_stages(requested: list[str] | None, recipe_stages: tuple[str, ...]) -> list[str]:
    stages = list(requested) if requested else list(recipe_stages)
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise HTTPException(400, f"unknown stages {unknown} (known: {', '.join(STAGE_ORDER)})")
    if len(set(stages)) != len(stages):
        raise HTTPException(400, "a stage is named twice")
    if not stages:
        raise HTTPException(400, "the recipe names no stages and none were given")
    return stages


async def _check_run_free(state: ApiState, run: str) -> None:
    owner = await state.jobs.run_owner(run)
    previous = await state.jobs.get(owner) if owner else None
    if previous is not None and (await job_status(state, previous)).state not in TERMINAL:
        raise HTTPException(409, f"job {previous.id} is still writing run {run!r}")


@router.post("", status_code=202, response_model=JobStatus, responses=errors(400, 409, 413),
             summary="Submit a training job: stages of a recipe, run by Celery workers")
async def submit(state: State, body: JobRequest, key: Annotated[KeyRecord, Depends(require_admin)]) -> JobStatus:
    recipe = resolve_recipe(state, body.recipe)
    stages = choose_stages(body.stages, recipe.stages)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", recipe.name).strip("-.")[:32] or "run"
    run = body.run or f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    await _check_run_free(state, run)
    run_dir = state.settings.runs_root.resolve() / run
    task_ids = await run_in_threadpool(state.runner.submit, str(recipe.source.resolve()), str(run_dir), stages)
    record = JobRecord(id=uuid.uuid4().hex, recipe=body.recipe, recipe_path=str(recipe.source), run=run,
                       run_dir=str(run_dir), stages=stages, task_ids=task_ids, created_at=time.time(),
                       submitted_by=key.id)
    await state.jobs.put(record)
    await state.jobs.set_run_owner(run, record.id)
    return await job_status(state, record)


@router.get("", response_model=list[JobStatus], summary="The newest jobs, newest first")
async def list_jobs(state: State, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> list[JobStatus]:
    return [await job_status(state, record) for record in await state.jobs.list(limit)]


async def _record(state: ApiState, job_id: str) -> JobRecord:
    record = await state.jobs.get(job_id)
    if record is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return record


@router.get("/{job_id}", response_model=JobStatus, responses=errors(404), summary="A job's state and progress")
async def get_job(state: State, job_id: Annotated[str, JOB_ID]) -> JobStatus:
    return await job_status(state, await _record(state, job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobStatus, responses=errors(404, 409),
             summary="Cancel a job: its running stage is terminated, the rest never run")
async def cancel(state: State, job_id: Annotated[str, JOB_ID]) -> JobStatus:
    record = await _record(state, job_id)
    status = await job_status(state, record)
    if status.state in ("succeeded", "failed"):
        raise HTTPException(409, f"job {job_id} already {status.state}")
    if status.state != "cancelled":
        await run_in_threadpool(state.runner.cancel, record.task_ids)
        record.cancelled_at = record.cancelled_at or time.time()
        await state.jobs.put(record)
    return await job_status(state, record)


def list_artifacts(run_dir: Path) -> list[Artifact]:
    """Each stage's metrics, loss curves and summary (DONE), and every file of the model folder."""
    if not run_dir.is_dir():
        return []
    found: list[Artifact] = []
    for stage_dir in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        files = (sorted(f for f in stage_dir.rglob("*") if f.is_file() and not f.is_symlink())
                 if stage_dir.name == MODEL_DIR else
                 [f for f in (stage_dir / n for n in (METRICS_FILE, LOSS_PLOT, DONE_FILE)) if f.is_file()])
        found += [Artifact(path=f.relative_to(run_dir).as_posix(), stage=stage_dir.name, bytes=f.stat().st_size)
                  for f in files]
    return found


@router.get("/{job_id}/artifacts", response_model=Artifacts, responses=errors(404),
            summary="What a job's run folder holds so far: metrics, loss curves, the model folder")
async def artifacts(state: State, job_id: Annotated[str, JOB_ID]) -> Artifacts:
    record = await _record(state, job_id)
    files = await run_in_threadpool(list_artifacts, Path(record.run_dir))
    return Artifacts(job_id=job_id, run_dir=record.run_dir, files=files)


@router.get("/{job_id}/artifacts/{path:path}", response_class=FileResponse, responses={
    **errors(404), 200: {"content": {"application/octet-stream": {}}, "description": "The file"}},
    summary="One artifact file (only those the listing names)")
async def artifact_file(state: State, job_id: Annotated[str, JOB_ID], path: str) -> FileResponse:
    record = await _record(state, job_id)
    listed = {a.path for a in await run_in_threadpool(list_artifacts, Path(record.run_dir))}
    if path not in listed:  # never a path the caller builds: only what the listing names
        raise HTTPException(404, f"no artifact {path!r} in job {job_id}")
    media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return FileResponse(Path(record.run_dir) / path, media_type=media_type)
