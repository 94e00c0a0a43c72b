"""Training stages as Celery tasks in a real prefork worker against the real Redis."""

from __future__ import annotations

import time
from pathlib import Path

from celery.result import AsyncResult

from training.celery_app import submit_job
from training.stage import DONE_FILE


def _recipe(tmp_path: Path, limit: int, renditions: int) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: celery-test\nfacts: spoken_qa\nstages: [synth]\n"
        f"settings:\n  synth: {{limit: {limit}, renditions: {renditions}, workers: 2, time_limit_s: 300}}\n"
    )
    return str(path)


def _wait(result: AsyncResult, states: set[str], timeout_s: float) -> list[dict[str, object]]:
    """Polls task state until one of `states`; returns the PROGRESS payloads seen. State and
    payload are read in one backend call, so they always belong together."""
    progress = []
    deadline = time.monotonic() + timeout_s
    while True:
        meta = result.backend.get_task_meta(result.id)
        if meta["status"] in states:
            return progress
        if meta["status"] == "PROGRESS" and isinstance(meta["result"], dict):
            progress.append(dict(meta["result"]))
        assert time.monotonic() < deadline, f"task stuck in {meta['status']}"
        time.sleep(0.05)


def test_a_stage_runs_in_a_worker_and_reports_progress(worker_queue: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = submit_job(_recipe(tmp_path, limit=3, renditions=1), str(run_dir), ["synth"], queue=worker_queue)
    progress = _wait(result, {"SUCCESS", "FAILURE"}, timeout_s=240)
    assert result.state == "SUCCESS", result.traceback
    summary = result.get(timeout=5)
    assert summary["stage"] == "synth" and summary["wall_seconds"] > 0
    assert (run_dir / "synth" / DONE_FILE).is_file()
    assert (run_dir / "synth" / "answers.jsonl").read_text().count("\n") >= 3
    assert progress and {"stage", "done", "total", "unit"} <= set(progress[-1])
    assert progress[-1]["stage"] == "synth"


def test_a_job_is_cancelled(worker_queue: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = submit_job(_recipe(tmp_path, limit=200, renditions=4), str(run_dir), ["synth"], queue=worker_queue)
    _wait(result, {"PROGRESS", "SUCCESS", "FAILURE"}, timeout_s=120)
    result.revoke(terminate=True, signal="SIGTERM")
    _wait(result, {"REVOKED", "SUCCESS", "FAILURE"}, timeout_s=60)
    assert result.state == "REVOKED"
    assert not (run_dir / "synth" / DONE_FILE).exists()
