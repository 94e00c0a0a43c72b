"""Runs the real Triton Inference Server (the binary scripts/install-triton.sh puts under
VENV/triton) on the EchoX model repository, bound to 127.0.0.1.

What a launch needs on these machines (see /work/shared/spec/environment.md, Triton):
- LD_LIBRARY_PATH starting with this interpreter's LIBDIR, or the Python-backend stub loads
  the system libpython against the venv's standard library;
- the venv's bin first on PATH, so the stub's embedded Python finds the venv (and echox);
- a --backend-directory holding libtriton_python.so, triton_python_backend_utils.py and the
  stub for this Python version, copied out of the wheel;
- a per-server shared-memory prefix, so servers on one machine do not share regions.

The model folder reaches the models as the server's ECHOX_MODEL_DIR environment variable (each
model's config.pbtxt may override it with its `model_dir` parameter).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from echox.checkpoint import read_config
from echox.errors import EchoXError, ModelLoadError
from services.common.processes import free_port, stop_process
from services.common.settings import REPO_ROOT

MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
MODELS = ("speech_llm", "unit_generator", "vocoder")
INSTALL_HINT = "run `bash scripts/install-triton.sh` (it puts tritonserver under .venv/triton)"


class TritonServerError(EchoXError):
    """Triton is not installed, did not start, or a model did not load."""


def triton_home(prefix: str | Path | None = None) -> Path:
    """Where install-triton.sh put the server: PREFIX/triton/pytriton/tritonserver."""
    return Path(prefix or sys.prefix) / "triton" / "pytriton" / "tritonserver"


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a server log, without the option and model tables Triton prints."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    kept = [line for line in text.splitlines() if line.strip() and not line.startswith(("|", "+"))]
    return "\n".join(kept[-lines:])


def load_errors(path: Path) -> list[str]:
    """Why models failed to load, one line per model (model.py's exception, without its traceback)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    found = re.findall(r"failed to load '([^']+)' version \d+: (.*?)(?:\\n|\"$)", text, flags=re.MULTILINE)
    return list(dict.fromkeys(f"{name}: {reason}" for name, reason in found))


class TritonServer:
    """One tritonserver process serving `models` of the EchoX repository.

    >>> with TritonServer(model_dir="echox/assets/echox-tiny") as server:
    ...     client = TritonSpeechLLM(server.grpc_url)
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        models: Sequence[str] = MODELS,
        model_repository: str | Path = MODEL_REPOSITORY,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        log_path: str | Path | None = None,
        start_timeout_s: float = 180.0,
        stop_timeout_s: float = 15.0,
        home: str | Path | None = None,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.models = tuple(models)
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self._log_arg = Path(log_path).resolve() if log_path else None
        self.log_path: Path | None = None  # where this run's server log is, once started
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.home = Path(home) if home else triton_home()
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None

    @property
    def grpc_url(self) -> str:
        """host:port, as tritonclient.grpc wants it."""
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics']}/metrics"

    def _check(self) -> None:
        binary = self.home / "bin" / "tritonserver"
        if not os.access(binary, os.X_OK):
            raise TritonServerError(f"no tritonserver at {binary}: {INSTALL_HINT}")
        try:
            read_config(self.model_dir)
        except ModelLoadError as exc:
            raise TritonServerError(f"cannot serve the model folder {self.model_dir}: {exc}") from None
        for name in self.models:
            if not (self.model_repository / name / "config.pbtxt").is_file():
                raise TritonServerError(f"no model {name!r} in the Triton repository {self.model_repository}")

    def _backend_directory(self, workdir: Path) -> Path:
        """backends/python with the library, the utils and the stub of this Python (gotcha 2)."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        python = workdir / "backends" / "python"
        python.mkdir(parents=True)
        sources = [
            self.home / "backends" / "python" / "libtriton_python.so",
            self.home / "backends" / "python" / "triton_python_backend_utils.py",
            self.home / "python_backend_stubs" / version / "triton_python_backend_stub",
        ]
        for source in sources:
            if not source.is_file():
                raise TritonServerError(f"{source} is missing: {INSTALL_HINT}")
            shutil.copy2(source, python / source.name)
        return python.parent

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        # Gotcha 1: the stub must load this interpreter's libpython, not the system's. The
        # wheel's own libraries follow: the copied stub lost the RPATH that pointed at them.
        wheel_libs = str(self.home.parent.parent / "nvidia_pytriton.libs")
        paths = (libdir, wheel_libs, env.get("LD_LIBRARY_PATH", ""))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
        # Gotcha 2: the stub's Python finds its packages through the first python3 on PATH.
        env["PATH"] = os.pathsep.join((str(Path(sys.prefix) / "bin"), env.get("PATH", "")))
        env["ECHOX_MODEL_DIR"] = str(self.model_dir)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.pop("PYTHONHOME", None)
        return env

    def command(self, backend_directory: Path, log_file: Path) -> list[str]:
        ports = {name: str(port) for name, port in self.ports.items()}
        cmd = [
            str(self.home / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory}",
            f"--backend-config=python,shm-region-prefix-name=echox-{os.getpid()}-{ports['grpc']}-",
            "--model-control-mode=explicit",
            *[f"--load-model={name}" for name in self.models],
            f"--grpc-address={self.host}", f"--grpc-port={ports['grpc']}",
            f"--http-address={self.host}", f"--http-port={ports['http']}",
            f"--metrics-address={self.host}", f"--metrics-port={ports['metrics']}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout_s) - 2)}",
            f"--log-file={log_file}",
        ]
        return cmd

    def start(self) -> TritonServer:
        """Starts the server and returns once it and every model are READY."""
        if self.process is not None:
            raise TritonServerError("this TritonServer is already started")
        self._check()
        for name, port in self.ports.items():
            self.ports[name] = port or free_port(self.host)
        self._workdir = Path(tempfile.mkdtemp(prefix="echox-triton-"))
        log_file = self._log_arg or self._workdir / "tritonserver.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("")  # a fresh log per start: the error tail is about this run
        self.log_path = log_file
        command = self.command(self._backend_directory(self._workdir), log_file)
        with open(log_file, "ab") as out:
            # Its own session: Ctrl-C in a terminal reaches us, and we stop the server in order.
            self.process = subprocess.Popen(command, env=self._environment(), stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        pending = ["server", *self.models]
        while pending:
            if self.process.poll() is not None:
                raise self._failure(f"tritonserver exited with status {self.process.returncode} while starting")
            if time.monotonic() > deadline:
                raise self._failure(
                    f"Triton was not ready within {self.start_timeout_s:.0f} s (waiting for {', '.join(pending)})"
                )
            path = "/v2/health/ready" if pending[0] == "server" else f"/v2/models/{pending[0]}/ready"
            if self._get(path) is not None:
                pending.pop(0)
                continue
            failed = self._failed_models()
            if failed:
                raise self._failure(f"Triton could not load {failed}")
            time.sleep(0.25)

    def _get(self, path: str, body: bytes | None = None) -> bytes | None:
        """The body of a 200 answer from the HTTP endpoint, else None."""
        try:
            with urllib.request.urlopen(self.http_url + path, data=body, timeout=2) as response:
                return bytes(response.read()) if int(response.status) == 200 else None
        except (urllib.error.URLError, OSError):
            return None

    def _failed_models(self) -> str:
        """Models the server gave up on (a stub that cannot start, model.py raising), with reasons."""
        raw = self._get("/v2/repository/index", body=b"{}")
        try:
            index = json.loads(raw) if raw else []
        except ValueError:
            return ""
        failed = [f"{m.get('name')}: {m.get('reason') or 'unavailable'}" for m in index
                  if m.get("name") in self.models and m.get("state") == "UNAVAILABLE"]
        return "; ".join(failed)

    def _failure(self, message: str) -> TritonServerError:
        assert self.log_path is not None
        reasons = "".join(f"\n  {line}" for line in load_errors(self.log_path))
        return TritonServerError(
            f"{message}{reasons}\nthe end of the server log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (Triton finishes in-flight requests), then SIGKILL after stop_timeout_s."""
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, self.stop_timeout_s)
        if self._workdir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._workdir)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
