"""The serving commands as a user runs them: `echox serve` (embedded, and distributed with Triton
and worker processes), `echox call` against it, `echox triton start`, and a clean stop on
Ctrl-C that leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from echox.audio import write_wav
from echox.espeak import speak
from services.common.processes import free_port

pytestmark = pytest.mark.e2e
ECHOX = [sys.executable, "-m", "echox.cli.main"]


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("q") / "question.wav"
    write_wav(path, speak("What is the capital of France?", voice="en-us+m5"))
    return path


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([*ECHOX, *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)


def _wait_for(log: Path, text: str, process: subprocess.Popen[bytes], timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"{text!r} not seen within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def _interrupt(process: subprocess.Popen[bytes], log: Path) -> None:
    """Ctrl-C: exit 0 and no child process left."""
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"did not stop on Ctrl-C:\n{log.read_text()[-3000:]}")
    assert code == 0, log.read_text()[-3000:]
    _gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"left running: {[p.pid for p in alive]}"


def _call(question: Path, port: int, out: Path, session: str = "") -> dict[str, object]:
    args = [*ECHOX, "call", str(question), "--url", f"grpc://127.0.0.1:{port}", "--out", str(out), "--json"]
    if session:
        args += ["--session", session]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    log = tmp_path / "serve.log"
    process = _start(["serve", "--embedded", "--grpc-port", str(port), "--http-port", "0"], log)
    _wait_for(log, "Converse on grpc://", process)
    yield port
    _interrupt(process, log)


def test_call_against_the_embedded_server_continues_a_conversation(embedded: int, question_wav: Path,
                                                                   tmp_path: Path) -> None:
    first = _call(question_wav, embedded, tmp_path / "a1.wav")
    assert set(first) >= {"session_id", "transcript", "text", "segments", "first_segment_tokens", "timings_ms",
                          "audio_seconds"}
    assert "paris" in str(first["text"]).lower()
    assert (tmp_path / "a1.wav").stat().st_size > 1000
    second = _call(question_wav, embedded, tmp_path / "a2.wav", session=str(first["session_id"]))
    assert second["session_id"] == first["session_id"]


def test_call_with_an_unknown_session_fails_clearly(embedded: int, question_wav: Path, tmp_path: Path) -> None:
    done = subprocess.run([*ECHOX, "call", str(question_wav), "--url", f"grpc://127.0.0.1:{embedded}",
                           "--out", str(tmp_path / "x.wav"), "--session", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown session" in done.stderr


def test_distributed_serve_with_triton_and_workers(question_wav: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    env = {"ECHOX_BUS_PREFIX": f"echox-e2e-{uuid.uuid4().hex[:8]}:"}
    http_port = free_port()
    process = _start(["serve", "--grpc-port", str(port), "--http-port", str(http_port), "--api-key", "admin-e2e",
                      "--log-dir", str(tmp_path / "logs")], log, env)
    try:
        _wait_for(log, "Converse on grpc://", process)
        result = _call(question_wav, port, tmp_path / "a.wav")
        assert "paris" in str(result["text"]).lower()
        base = f"http://127.0.0.1:{http_port}"
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        assert urllib.request.urlopen(f"{base}/", timeout=5).status == 200  # the page
        keyed = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": "Bearer admin-e2e"})
        assert urllib.request.urlopen(keyed, timeout=10).status == 200  # the API, with --api-key
    finally:
        _interrupt(process, log)


def test_triton_start_serves_until_interrupted(tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    port = free_port()
    log = tmp_path / "triton.log"
    process = _start(["triton", "start", "--grpc-port", str(port)], log)
    try:
        _wait_for(log, f"127.0.0.1:{port}", process)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready()
        assert all(client.is_model_ready(name) for name in ("speech_llm", "unit_generator", "vocoder"))
    finally:
        _interrupt(process, log)
