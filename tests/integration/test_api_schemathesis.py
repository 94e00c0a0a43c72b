"""Schemathesis against the control plane's own OpenAPI description, on its distributed
configuration: keys, limits, sessions and job records in the real Redis (a prefix of this run's
own), jobs sent through the real Celery client to a queue of this run's own (no worker takes
them), models published into a temporary Triton repository. No request may get a server error,
and every answer must match the description (status codes, content types, bodies)."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.python import asgi

from services.api import create_app
from services.common.settings import REPO_ROOT, Settings, get_settings

ADMIN = "admin-key-of-the-schemathesis-run-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
RUN = uuid.uuid4().hex[:8]
PREFIX = f"echox-test-fuzz-{RUN}:"
QUEUE = f"echox-test-fuzz-{RUN}"
STAGES = ("speech_llm", "unit_generator", "vocoder")


ROOT = Path(tempfile.gettempdir()) / f"echox-test-fuzz-{RUN}"  # made and removed by _own_state
# Built at import: schemathesis' fixture-based loader does not run under pytest 9, so the schema
# (and the app behind it) must exist when the module is collected. Nothing connects yet.
APP = create_app(Settings(
    redis_url=get_settings().redis_url, bus_url=get_settings().redis_url, bus_prefix=PREFIX, api_key=ADMIN,
    token_secret="fuzz", data_root=ROOT / "data", runs_root=ROOT / "runs", triton_model_repository=ROOT / "repo",
    celery_queue=QUEUE, rate_limit_per_minute=1_000_000, livekit_api_secret="fuzz-livekit-secret-of-32-bytes-or-more",
))
# A schema cannot say which recipes exist or where a recipe file lies: schema-valid bodies may
# rightly get 400 (no such recipe, a path outside the data root) besides the defaults.
CONFIG = schemathesis.Config.from_dict({"checks": {"positive_data_acceptance": {
    "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "429"]}}})
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=CONFIG)


@pytest.fixture(scope="module", autouse=True)
def _own_state(redis_url: str) -> Iterator[None]:
    """This run's data root and Triton repository; afterwards, only this run's Redis keys go."""
    shutil.copytree(REPO_ROOT / "data" / "spoken_qa", ROOT / "data" / "spoken_qa")
    shipped = REPO_ROOT / "deploy" / "triton" / "model_repository"
    for stage in STAGES:
        (ROOT / "repo" / stage / "1").mkdir(parents=True)
        shutil.copy2(shipped / stage / "config.pbtxt", ROOT / "repo" / stage / "config.pbtxt")
    try:
        yield
    finally:
        _delete_keys(redis_url)
        shutil.rmtree(ROOT, ignore_errors=True)


def _delete_keys(redis_url: str) -> None:
    """Only this run's: its prefix, its queue, and the results of the tasks it queued."""
    client = redis_lib.Redis.from_url(redis_url)
    task_ids = [task for key in client.scan_iter(match=f"{PREFIX}api:job:*")
                for task in json.loads(client.get(key) or "{}").get("task_ids", [])]
    keys = [*client.scan_iter(match=f"{PREFIX}*"), QUEUE, f"_kombu.binding.{QUEUE}",
            *(f"celery-task-meta-{task}" for task in task_ids)]
    client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def client() -> Iterator[asgi.ASGIClient]:
    """One client for the whole run: the app's Redis clients live on one event loop."""
    with asgi.get_client(APP) as session:
        yield session


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_matches_its_description(case: schemathesis.Case, client: asgi.ASGIClient) -> None:
    case.call_and_validate(session=client, headers=HEADERS)
