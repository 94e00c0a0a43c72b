"""Publishing a model through the API into the repository of a real Triton server, which loads
the new version and answers with it (the vocoder only, to keep the server quick to start)."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from echox.paths import DEFAULT_MODEL_DIR
from services.api import create_app
from services.common.settings import Settings
from services.common.triton_server import INSTALL_HINT, MODEL_REPOSITORY, TritonServer, triton_home

ADMIN = "admin-key-of-the-publish-test-0123456789"


def _status(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, data=body, timeout=30) as reply:
            return int(reply.status), bytes(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_published_version_is_loaded_and_served_by_triton(tmp_path: Path) -> None:
    if not (triton_home() / "bin" / "tritonserver").is_file():
        pytest.fail(f"no tritonserver: {INSTALL_HINT}")
    repository = tmp_path / "repository"
    for stage in ("speech_llm", "unit_generator", "vocoder"):
        (repository / stage / "1").mkdir(parents=True)
        shutil.copy2(MODEL_REPOSITORY / stage / "config.pbtxt", repository / stage / "config.pbtxt")
        shutil.copy2(MODEL_REPOSITORY / stage / "1" / "model.py", repository / stage / "1" / "model.py")
    server = TritonServer(DEFAULT_MODEL_DIR, models=["vocoder"], model_repository=repository,
                          log_path=tmp_path / "triton.log", start_timeout_s=120)
    with server:
        settings = Settings(bus_url="memory://", api_key=ADMIN, token_secret="publish-test",
                            runs_root=tmp_path / "runs", triton_model_repository=repository,
                            triton_http_url=server.http_url)
        with TestClient(create_app(settings)) as client:
            reply = client.post("/v1/models/publish", json={"model": "default"},
                                headers={"Authorization": f"Bearer {ADMIN}"})
        assert reply.status_code == 201, f"{reply.text}\n(see {server.log_path})"
        assert reply.json()["version"] == 2
        assert reply.json()["triton"] == {"speech_llm": "not served by this Triton",
                                          "unit_generator": "not served by this Triton", "vocoder": "loaded"}
        assert _status(f"{server.http_url}/v2/models/vocoder/versions/2/ready")[0] == 200
        assert _status(f"{server.http_url}/v2/models/vocoder/versions/1/ready")[0] != 200  # latest only
        request = {"inputs": [{"name": "UNITS", "shape": [1, 6], "datatype": "INT64", "data": [1, 2, 3, 3, 4, 5]}]}
        code, body = _status(f"{server.http_url}/v2/models/vocoder/versions/2/infer", json.dumps(request).encode())
        assert code == 200, body
        pcm = json.loads(body)["outputs"][0]
        assert pcm["name"] == "PCM" and pcm["shape"][-1] > 0
