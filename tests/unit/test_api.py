"""The control plane on in-memory stores: keys and scopes, rate and size limits, sessions and
their tokens, training jobs on a stand-in runner (the real Celery one is an integration test),
artifacts, models and publishing into a temporary Triton repository."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi.testclient import TestClient
from livekit import api as livekit_api

from echox.paths import DEFAULT_MODEL_DIR
from echox.tokenizer import Turn
from services.api import create_app, publish
from services.api.job_store import CeleryRunner
from services.api.limits import MemoryRateLimiter
from services.common.bus.base import BusError
from services.common.settings import REPO_ROOT, Settings
from services.common.state import MemorySessionStore
from services.common.tokens import verify_session_token

ADMIN = "admin-key-for-the-unit-tests-0123456789"
SHIPPED_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"


class FakeRunner:
    """Stands in for Celery: hands out task ids, answers the states a test sets."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, str, list[str]]] = []
        self.states: dict[str, tuple[str, Any]] = {}
        self.cancelled: list[list[str]] = []
        self.handed_out: list[list[str]] = []  # the task ids of every job, in order
        self.reads = 0

    def submit(self, recipe_path: str, run_dir: str, stages: list[str]) -> list[str]:
        self.submitted.append((recipe_path, run_dir, stages))
        self.handed_out.append([uuid.uuid4().hex for _ in stages])
        return self.handed_out[-1]

    def task_state(self, task_id: str) -> tuple[str, Any]:
        self.reads += 1
        return self.states.get(task_id, ("PENDING", None))

    def cancel(self, task_ids: list[str]) -> None:
        self.cancelled.append(list(task_ids))

    def close(self) -> None:
        pass


def triton_repository(folder: Path) -> Path:
    """A Triton repository like the shipped one: each stage's config.pbtxt and version 1."""
    for stage in publish.STAGES:
        (folder / stage / "1").mkdir(parents=True)
        shutil.copy2(SHIPPED_REPOSITORY / stage / "config.pbtxt", folder / stage / "config.pbtxt")
        shutil.copy2(SHIPPED_REPOSITORY / stage / "1" / "model.py", folder / stage / "1" / "model.py")
    return folder


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    data = tmp_path / "data"
    shutil.copytree(REPO_ROOT / "data" / "spoken_qa", data / "spoken_qa")
    return Settings(bus_url="memory://", api_key=ADMIN, token_secret="unit-secret", data_root=data,
                    runs_root=tmp_path / "runs", triton_model_repository=triton_repository(tmp_path / "repo"),
                    livekit_api_key="lk-key", livekit_api_secret="lk-secret-long-enough-for-hs256-0123456789",
                    session_token_ttl_s=120.0, max_request_bytes=4096, rate_limit_per_minute=1000)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def store() -> MemorySessionStore:
    return MemorySessionStore()


@pytest.fixture
def client(settings: Settings, runner: FakeRunner, store: MemorySessionStore) -> Iterator[TestClient]:
    with TestClient(create_app(settings, sessions=store, runner=runner)) as test_client:
        yield test_client


def auth(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_key(client: TestClient, scope: str) -> str:
    reply = client.post("/v1/keys", json={"name": f"a {scope} key", "scope": scope}, headers=auth())
    assert reply.status_code == 201, reply.text
    return str(reply.json()["key"])


def every_protected_route(client: TestClient) -> list[tuple[str, str]]:
    """(method, concrete path) of every operation in the OpenAPI that is not health or readiness."""
    found = []
    for template, operations in client.get("/openapi.json").json()["paths"].items():
        if template in ("/healthz", "/readyz"):
            continue
        path = re.sub(r"\{[^}]+\}", "0123456789abcdef0123456789abcdef", template)
        found += [(method.upper(), path) for method in operations]
    return found


# --- keys, scopes, limits -------------------------------------------------------------------


def test_every_route_but_health_needs_a_key(client: TestClient) -> None:
    routes = every_protected_route(client)
    assert len(routes) >= 14
    for method, path in routes:
        reply = client.request(method, path, json={})
        assert reply.status_code == 401, (method, path, reply.text)
        assert reply.headers["www-authenticate"] == "Bearer"
        assert client.request(method, path, json={}, headers=auth("echox_not-a-key")).status_code == 401
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "checks": {"sessions": "ok"}}
    assert client.get("/openapi.json").status_code == 200


def test_a_client_key_opens_sessions_only(client: TestClient) -> None:
    key = make_key(client, "client")
    for method, path in every_protected_route(client):
        if path.startswith("/v1/sessions"):
            continue
        reply = client.request(method, path, json={}, headers=auth(key))
        assert reply.status_code == 403, (method, path, reply.text)
    assert client.post("/v1/sessions", headers=auth(key)).status_code == 201
    assert client.post("/v1/sessions", headers={"X-API-Key": key}).status_code == 201


def test_key_lifecycle(client: TestClient) -> None:
    created = client.post("/v1/keys", json={"name": "ops", "scope": "admin"}, headers=auth()).json()
    secret = created["key"]
    assert secret.startswith("echox_") and len(secret) > 40 and created["hint"] == secret[:10]
    listed = client.get("/v1/keys", headers=auth(secret)).json()
    assert {k["id"] for k in listed} == {"configured", created["id"]}
    assert all("key" not in k for k in listed) and secret not in json.dumps(listed)
    assert client.delete(f"/v1/keys/{created['id']}", headers=auth()).status_code == 204
    assert client.get("/v1/keys", headers=auth(secret)).status_code == 401
    assert client.delete(f"/v1/keys/{created['id']}", headers=auth()).status_code == 404
    assert client.delete("/v1/keys/configured", headers=auth()).status_code == 409
    assert client.post("/v1/keys", json={"name": "x", "scope": "root"}, headers=auth()).status_code == 422


def test_rate_limit_per_key(settings: Settings, runner: FakeRunner) -> None:
    settings.rate_limit_per_minute = 3
    with TestClient(create_app(settings, runner=runner)) as client:
        other = make_key(client, "client")  # the admin key's first request
        # 8 more overrun 3 a minute even if the minute turns meanwhile.
        replies = [client.get("/v1/keys", headers=auth()) for _ in range(8)]
        limited = next(reply for reply in replies if reply.status_code != 200)
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
        assert client.post("/v1/sessions", headers=auth(other)).status_code == 201  # its own budget


async def test_the_rate_limit_window_turns() -> None:
    now = [120.0]
    limiter = MemoryRateLimiter(per_minute=2, clock=lambda: now[0])
    assert [await limiter.hit("k") for _ in range(3)] == [(True, 60), (True, 60), (False, 60)]
    assert await limiter.hit("other") == (True, 60)
    now[0] = 179.5
    assert await limiter.hit("k") == (False, 1)
    now[0] = 180.0
    assert await limiter.hit("k") == (True, 60)


def test_a_wrong_method_names_every_allowed_one(client: TestClient) -> None:
    reply = client.put("/v1/keys", headers=auth())
    assert reply.status_code == 405 and reply.headers["allow"] == "GET, POST"


def test_oversize_bodies_get_413(client: TestClient) -> None:
    big = {"name": "x" * 5000, "scope": "client"}
    assert client.post("/v1/keys", json=big, headers=auth()).status_code == 413
    assert client.post("/v1/keys", json=big).status_code == 413  # refused before anything reads it

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts as the body arrives
        yield b'{"name": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    reply = client.post("/v1/keys", content=chunks(), headers={**auth(), "Content-Type": "application/json"})
    assert reply.status_code == 413


# --- sessions -------------------------------------------------------------------------------


def test_a_session_gets_room_scoped_tokens(client: TestClient, settings: Settings) -> None:
    reply = client.post("/v1/sessions", json={"identity": "alice", "name": "Alice"}, headers=auth())
    assert reply.status_code == 201, reply.text
    made = reply.json()
    session_id = made["session_id"]
    assert made["room"] == session_id and made["livekit_url"] == settings.livekit_url
    claims = livekit_api.TokenVerifier("lk-key", settings.livekit_api_secret).verify(made["livekit_token"])
    assert claims.identity == "alice" and claims.name == "Alice"
    assert claims.video.room == session_id and claims.video.room_join
    assert not (claims.video.room_create or claims.video.room_admin or claims.video.room_list)
    raw = jwt.decode(made["livekit_token"], options={"verify_signature": False})
    assert raw["exp"] - raw["nbf"] == 120
    with pytest.raises(jwt.InvalidTokenError):
        livekit_api.TokenVerifier("lk-key", "another-secret-long-enough-0123456789").verify(made["livekit_token"])
    assert verify_session_token("unit-secret", made["token"]) == session_id
    assert made["websocket_url"] == f"ws://testserver/ws?token={made['token']}"


def test_the_websocket_address_follows_the_public_url(settings: Settings, runner: FakeRunner) -> None:
    settings.public_url = "https://voice.example.com/"
    with TestClient(create_app(settings, runner=runner)) as client:
        made = client.post("/v1/sessions", headers=auth()).json()
    assert made["websocket_url"].startswith("wss://voice.example.com/ws?token=")
    assert made["identity"] == f"caller-{made['session_id']}"


async def test_transcript_and_end(client: TestClient, store: MemorySessionStore) -> None:
    session_id = client.post("/v1/sessions", headers=auth()).json()["session_id"]
    await store.append(session_id, Turn("what is the capital of france", "paris"))
    transcript = client.get(f"/v1/sessions/{session_id}/transcript", headers=auth()).json()
    assert transcript == {"session_id": session_id,
                          "turns": [{"user": "what is the capital of france", "assistant": "paris"}]}
    assert client.delete(f"/v1/sessions/{session_id}", headers=auth()).status_code == 204
    assert client.get(f"/v1/sessions/{session_id}/transcript", headers=auth()).status_code == 404
    assert client.delete(f"/v1/sessions/{session_id}", headers=auth()).status_code == 404
    assert client.get("/v1/sessions/bad%20id/transcript", headers=auth()).status_code == 422


def test_a_down_state_store_is_503_not_500(settings: Settings, runner: FakeRunner) -> None:
    class DownStore(MemorySessionStore):
        async def create(self, session_id: str | None = None) -> str:
            raise BusError("redis SET session on redis://x failed: ConnectionError")

    with TestClient(create_app(settings, sessions=DownStore(), runner=runner)) as client:
        reply = client.post("/v1/sessions", headers=auth())
    assert reply.status_code == 503 and "unavailable" in reply.json()["detail"]


# --- training jobs --------------------------------------------------------------------------


def submit(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/jobs", json=body, headers=auth())


def test_recipe_paths_outside_the_data_root_are_refused(client: TestClient, settings: Settings,
                                                        tmp_path: Path, runner: FakeRunner) -> None:
    outside = tmp_path / "outside.yaml"
    outside.write_text("name: x\nstages: [lm]\n")
    (settings.data_root / "link.yaml").symlink_to(outside)
    (settings.data_root / "escape.yaml").write_text("name: x\nfacts: ../../etc\nstages: [lm]\n")
    for recipe in (str(outside), "../outside.yaml", "link.yaml", "/etc/passwd.yaml", "../../../etc/x",
                   "escape.yaml", "no-such-recipe", "bad\x00name.yaml"):
        reply = submit(client, recipe=recipe)
        assert reply.status_code == 400, (recipe, reply.text)
    assert runner.submitted == []
    assert submit(client, recipe="tiny", stages=["nope"]).status_code == 422
    assert submit(client, recipe="tiny", stages=["lm", "lm"]).status_code == 400
    assert submit(client, recipe="tiny", run="../escape").status_code == 422


def test_a_job_reports_progress_per_stage(client: TestClient, settings: Settings, runner: FakeRunner) -> None:
    (settings.data_root / "mine.yaml").write_text("name: mine\nfacts: spoken_qa\nstages: [lm, units]\n")
    reply = submit(client, recipe="mine.yaml")
    assert reply.status_code == 202, reply.text
    job = reply.json()
    assert job["state"] == "queued" and [s["stage"] for s in job["stages"]] == ["lm", "units"]
    assert re.fullmatch(r"mine-\d{8}-\d{6}-[0-9a-f]{6}", job["run"])
    recipe_path, run_dir, stages = runner.submitted[0]
    assert recipe_path == str((settings.data_root / "mine.yaml").resolve()) and stages == ["lm", "units"]
    assert run_dir == str(settings.runs_root.resolve() / job["run"])
    first, second = runner.handed_out[-1]
    runner.states[first] = ("PROGRESS", {"stage": "lm", "done": 5, "total": 20, "unit": "steps",
                                         "metrics": {"loss": 2.5, "lr": float("nan")}, "message": ""})
    running = client.get(f"/v1/jobs/{job['id']}", headers=auth()).json()
    assert running["state"] == "running"
    assert running["stages"][0] | {"result": None} == {
        "stage": "lm", "state": "running", "done": 5, "total": 20, "unit": "steps", "fraction": 0.25,
        "metrics": {"loss": 2.5, "lr": None}, "message": None, "result": None, "error": None}
    assert running["stages"][1]["state"] == "queued"
    runner.states[first] = ("SUCCESS", {"stage": "lm", "steps_done": 20})
    runner.states[second] = ("SUCCESS", {"stage": "units"})
    done = client.get(f"/v1/jobs/{job['id']}", headers=auth()).json()
    assert done["state"] == "succeeded" and done["stages"][0]["result"] == {"stage": "lm", "steps_done": 20}
    reads = runner.reads
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth()).json() == done
    assert runner.reads == reads  # a final status is kept: Celery forgets task states after a day
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth()).status_code == 409
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth()).json()] == [job["id"]]


def test_a_failed_stage_fails_the_job(client: TestClient, runner: FakeRunner) -> None:
    job = submit(client, recipe="tiny", stages=["lm", "units"]).json()
    first, _ = runner.handed_out[-1]
    runner.states[first] = ("FAILURE", ValueError("loss is NaN"))
    failed = client.get(f"/v1/jobs/{job['id']}", headers=auth()).json()
    assert failed["state"] == "failed" and failed["stages"][0]["error"] == "ValueError: loss is NaN"


def test_cancel_and_the_run_folder_guard(client: TestClient, runner: FakeRunner) -> None:
    job = submit(client, recipe="tiny", stages=["lm", "units"], run="r1").json()
    first, second = runner.handed_out[-1]
    runner.states[first] = ("PROGRESS", {"done": 1, "total": 9})
    assert submit(client, recipe="tiny", stages=["lm"], run="r1").status_code == 409  # still writing r1
    cancelling = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth())
    assert cancelling.status_code == 202 and cancelling.json()["state"] == "cancelling"
    assert runner.cancelled == [[first, second]]
    runner.states[first] = ("REVOKED", None)
    cancelled = client.get(f"/v1/jobs/{job['id']}", headers=auth()).json()
    assert cancelled["state"] == "cancelled" and [s["state"] for s in cancelled["stages"]] == ["cancelled"] * 2
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth()).json()["state"] == "cancelled"
    assert submit(client, recipe="tiny", stages=["lm"], run="r1").status_code == 202  # resumes r1
    assert client.get(f"/v1/jobs/{'0' * 32}", headers=auth()).status_code == 404


def test_artifacts_list_and_serve_only_what_they_name(client: TestClient, settings: Settings) -> None:
    job = submit(client, recipe="tiny", stages=["lm"], run="r2").json()
    run = settings.runs_root / "r2"
    (run / "lm" / "checkpoint").mkdir(parents=True)
    (run / "lm" / "metrics.json").write_text('{"curves": {}}')
    (run / "lm" / "loss.png").write_bytes(b"\x89PNG")
    (run / "lm" / "checkpoint" / "model.safetensors").write_bytes(b"w")
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    listed = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth()).json()
    assert [(f["path"], f["stage"]) for f in listed["files"]] == [
        ("lm/metrics.json", "lm"), ("lm/loss.png", "lm"), ("model/config.json", "model")]
    got = client.get(f"/v1/jobs/{job['id']}/artifacts/lm/metrics.json", headers=auth())
    assert got.status_code == 200 and got.json() == {"curves": {}}
    for hidden in ("lm/checkpoint/model.safetensors", "../r2/lm/loss.png", "..%2F..%2Fetc%2Fpasswd"):
        assert client.get(f"/v1/jobs/{job['id']}/artifacts/{hidden}", headers=auth()).status_code == 404


def test_a_cancel_escalates_to_sigkill(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM first; SIGKILL later for a stage that swallowed it (now, if the app shuts down)."""
    sent: list[tuple[list[str], str]] = []
    quick, slow = CeleryRunner(kill_after_s=0.05), CeleryRunner(kill_after_s=3600)
    for runner in (quick, slow):
        monkeypatch.setattr(runner, "_revoke", lambda ids, signal: sent.append((ids, signal)))
    quick.cancel(["a"])
    deadline = time.monotonic() + 30
    while len(sent) < 2:
        assert time.monotonic() < deadline, sent
        time.sleep(0.01)
    assert sent == [(["a"], "SIGTERM"), (["a"], "SIGKILL")]
    slow.cancel(["b"])
    slow.close()
    assert sent[2:] == [(["b"], "SIGTERM"), (["b"], "SIGKILL")]


def test_a_down_broker_is_503(settings: Settings) -> None:
    from services.api.job_store import JobBackendError

    class DownRunner(FakeRunner):
        def submit(self, recipe_path: str, run_dir: str, stages: list[str]) -> list[str]:
            raise JobBackendError("the Celery broker is unavailable: OperationalError")

    with TestClient(create_app(settings, runner=DownRunner())) as client:
        assert submit(client, recipe="tiny").status_code == 503


# --- models, publishing, metrics ------------------------------------------------------------


def finished_run_model(settings: Settings, run: str) -> Path:
    model = settings.runs_root / run / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    (model / "DONE").write_text("{}")
    return model


def test_models_list_and_publish(client: TestClient, settings: Settings) -> None:
    finished_run_model(settings, "r3")
    (settings.runs_root / "unfinished" / "model").mkdir(parents=True)  # no DONE: not registered
    listed = client.get("/v1/models", headers=auth()).json()
    assert [(m["id"], m["source"], m["published_versions"]) for m in listed] == [
        ("default", "default", []), ("run:r3", "run", [])]
    reply = client.post("/v1/models/publish", json={"model": "run:r3"}, headers=auth())
    assert reply.status_code == 201, reply.text
    assert reply.json()["version"] == 2 and set(reply.json()["triton"].values()) == {"no Triton configured"}
    repo = settings.triton_model_repository
    for stage in publish.STAGES:
        version = repo / stage / "2"
        assert (version / "echox" / "model.safetensors").stat().st_size > 1000
        assert not (version / "echox" / "DONE").exists()
        assert (version / "adapter.py").read_bytes() == (SHIPPED_REPOSITORY / stage / "1" / "model.py").read_bytes()
        assert json.loads((version / "published.json").read_text())["model"] == "run:r3"
    assert [p.name for p in (repo / "vocoder").iterdir() if p.name.startswith(".")] == []
    assert client.post("/v1/models/publish", json={"model": "default"}, headers=auth()).json()["version"] == 3
    versions = {m["id"]: m["published_versions"] for m in client.get("/v1/models", headers=auth()).json()}
    assert versions == {"default": [3], "run:r3": [2]}
    assert client.post("/v1/models/publish", json={"model": "run:nope"}, headers=auth()).status_code == 404
    shutil.rmtree(repo / "unit_generator")
    assert client.post("/v1/models/publish", json={"model": "default"}, headers=auth()).status_code == 400


def test_a_published_version_serves_its_own_checkpoint(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The generated model.py pins ./echox even when config.pbtxt names another folder."""
    entry = publish.find_model(settings.runs_root, None, "default")
    assert entry is not None
    _, written = publish.write_version(entry, settings.triton_model_repository, SHIPPED_REPOSITORY)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    monkeypatch.setenv("ECHOX_MODEL_DIR", "/no/such/model")
    vocoder = next(path for path in written if path.parent.name == "vocoder")
    spec = importlib.util.spec_from_file_location("published_vocoder", vocoder / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = {"parameters": {"model_dir": {"string_value": "/elsewhere"}, "torch_threads": {"string_value": "1"}}}
    model.initialize({"model_config": json.dumps(config)})
    shipped = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["model"]
    assert model.num_units == shipped["vocoder"]["num_units"]


async def test_publish_loads_the_stages_triton_serves_and_rolls_back_a_failure(settings: Settings) -> None:
    asked: list[str] = []
    failing = {"vocoder"}

    def triton(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path == "/v2/repository/index":
            return httpx.Response(200, json=[{"name": "vocoder", "version": "1", "state": "READY"},
                                             {"name": "unit_generator", "version": "1", "state": "READY"}])
        name = request.url.path.split("/")[-2]
        if name in failing:
            return httpx.Response(400, json={"error": "failed to load 'vocoder' version 2: boom"})
        return httpx.Response(200)

    entry = publish.find_model(settings.runs_root, None, "default")
    assert entry is not None
    repo = settings.triton_model_repository
    async with httpx.AsyncClient(base_url="http://triton", transport=httpx.MockTransport(triton)) as client:
        with pytest.raises(publish.TritonLoadError, match="boom"):
            await publish.publish(entry, repo, SHIPPED_REPOSITORY, client)
        assert all(not (repo / stage / "2").exists() for stage in publish.STAGES)
        # After the failure, the stage already switched (unit_generator) was loaded back to version 1.
        assert asked[:3] == ["/v2/repository/index", "/v2/repository/models/unit_generator/load",
                             "/v2/repository/models/vocoder/load"]
        assert asked[3:5] == ["/v2/repository/index", "/v2/repository/models/unit_generator/load"]
        failing.clear()
        version, outcome = await publish.publish(entry, repo, SHIPPED_REPOSITORY, client)
    assert version == 2
    assert outcome == {"speech_llm": "not served by this Triton", "unit_generator": "loaded", "vocoder": "loaded"}


def test_metrics_need_an_admin_key_unless_public(client: TestClient, settings: Settings, runner: FakeRunner) -> None:
    client.get("/healthz")
    assert client.get("/metrics").status_code == 401
    text = client.get("/metrics", headers=auth()).text
    assert 'echox_api_requests_total{method="GET",route="/healthz",status="200"}' in text
    settings.api_metrics_public = True
    with TestClient(create_app(settings, runner=runner)) as public:
        assert public.get("/metrics").status_code == 200
