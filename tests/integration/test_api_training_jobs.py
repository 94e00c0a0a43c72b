"""Training jobs through the API, run by a real prefork Celery worker against the real Redis:
a few-step job runs, reports progress and leaves its artifacts; a second job is cancelled while
it trains, and the worker lives on."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis as redis_lib
from fastapi.testclient import TestClient

from services.api import create_app
from services.common.settings import REPO_ROOT, Settings

if TYPE_CHECKING:
    from tests.integration.conftest import CeleryWorker

ADMIN = "admin-key-of-the-api-job-tests-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
# The lm stage on a micro LLM and six facts: seconds of training, with metrics and loss curves.
LM = ("{limit_facts: 6, warmup: 1, batch_size: 8, log_every: 1, threads: 1, max_answer_tokens: 8, "
      "llm_overrides: {hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1}, ")
RECIPES = {
    "quick": LM + "steps: 6, checkpoint_every: 3, time_limit_s: 300}",
    "long": LM + "steps: 1000000, checkpoint_every: 1000, time_limit_s: 600}",  # runs until cancelled
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(REPO_ROOT / "data" / "spoken_qa", root / "spoken_qa")
    (root / "recipes").mkdir()
    for name, lm in RECIPES.items():
        (root / "recipes" / f"{name}.yaml").write_text(
            f"name: api-{name}\npreset: tiny\nseed: 5\nfacts: spoken_qa\nstages: [lm]\nsettings:\n  lm: {lm}\n")
    return root


@pytest.fixture(scope="module")
def worker(celery_workers: Callable[..., CeleryWorker], data_root: Path) -> CeleryWorker:
    return celery_workers(ECHOX_DATA_ROOT=str(data_root))


@pytest.fixture(scope="module")
def api(worker: CeleryWorker, data_root: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[TestClient]:
    prefix = f"echox-test-api-{uuid.uuid4().hex[:8]}:"
    settings = Settings(redis_url=redis_url, bus_url=redis_url, bus_prefix=prefix, api_key=ADMIN,
                        token_secret="jobs-test", data_root=data_root, runs_root=tmp_path_factory.mktemp("runs"),
                        celery_queue=worker.queue, rate_limit_per_minute=100_000, job_kill_after_s=3.0,
                        livekit_api_secret="jobs-test-livekit-secret-0123456789abcdef")
    try:
        with TestClient(create_app(settings)) as client:
            yield client
    finally:
        _delete_keys(redis_url, prefix)


def _delete_keys(redis_url: str, prefix: str) -> None:
    """Only what these tests wrote: the API's keys and the results of their Celery tasks."""
    client = redis_lib.Redis.from_url(redis_url)
    task_ids = [task for key in client.scan_iter(match=f"{prefix}api:job:*")
                for task in json.loads(client.get(key) or "{}").get("task_ids", [])]
    keys = [*client.scan_iter(match=f"{prefix}*"), *(f"celery-task-meta-{task}" for task in task_ids)]
    if keys:
        client.delete(*keys)
    client.close()


def _poll(api: TestClient, job_id: str, until: Callable[[dict[str, Any]], bool], timeout_s: float
          ) -> list[dict[str, Any]]:
    """Reads the job through the API until `until` holds; every status seen, in order."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while True:
        reply = api.get(f"/v1/jobs/{job_id}", headers=HEADERS)
        assert reply.status_code == 200, reply.text
        seen.append(reply.json())
        if until(seen[-1]):
            return seen
        assert time.monotonic() < deadline, f"the job is stuck: {seen[-1]}"
        time.sleep(0.1)


def _submit(api: TestClient, recipe: str, run: str) -> dict[str, Any]:
    reply = api.post("/v1/jobs", json={"recipe": f"recipes/{recipe}.yaml", "run": run}, headers=HEADERS)
    assert reply.status_code == 202, reply.text
    return dict(reply.json())


def test_a_job_runs_reports_progress_and_leaves_artifacts(api: TestClient) -> None:
    job = _submit(api, "quick", "quick")
    seen = _poll(api, job["id"], lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout_s=300)
    final = seen[-1]
    assert final["state"] == "succeeded", final
    stage = final["stages"][0]
    assert stage["stage"] == "lm" and stage["fraction"] == 1.0 and stage["result"]["steps_done"] == 6
    progress = [j["stages"][0] for j in seen if j["stages"][0]["state"] == "running"]
    assert any(p["total"] and p["unit"] for p in progress), "no progress was reported while the stage ran"

    files = {f["path"]: f for f in api.get(f"/v1/jobs/{job['id']}/artifacts", headers=HEADERS).json()["files"]}
    assert {"lm/metrics.json", "lm/loss.png", "lm/DONE"} <= set(files)
    metrics = api.get(f"/v1/jobs/{job['id']}/artifacts/lm/metrics.json", headers=HEADERS).json()
    assert [step for step, _ in metrics["curves"]["loss"]] == [1, 2, 3, 4, 5, 6]
    plot = api.get(f"/v1/jobs/{job['id']}/artifacts/lm/loss.png", headers=HEADERS)
    assert plot.headers["content-type"] == "image/png" and plot.content.startswith(b"\x89PNG")


def test_a_training_job_is_cancelled_and_the_worker_lives_on(api: TestClient, worker: CeleryWorker) -> None:
    job = _submit(api, "long", "long")
    _poll(api, job["id"], lambda j: (j["stages"][0]["done"] or 0) >= 1, timeout_s=300)  # training has begun
    reply = api.post(f"/v1/jobs/{job['id']}/cancel", headers=HEADERS)
    assert reply.status_code == 202 and reply.json()["state"] in ("cancelling", "cancelled"), reply.text
    final = _poll(api, job["id"], lambda j: j["state"] != "cancelling", timeout_s=120)[-1]
    assert final["state"] == "cancelled" and final["stages"][0]["state"] == "cancelled", final
    # Nothing trains on: SIGTERM stops the stage, or SIGKILL does a few seconds later (job_kill_after_s).
    deadline = time.monotonic() + 60
    while worker.busy():
        assert time.monotonic() < deadline, "the cancelled stage is still running in the worker"
        time.sleep(0.5)
    assert not (Path(final["run_dir"]) / "lm" / "DONE").exists()
    assert worker.alive()  # the prefork pool replaced the terminated child; the worker still serves
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=HEADERS).json()["state"] == "cancelled"
