"""Registered checkpoints, and publishing one into the Triton model repository.

Registered: the default model (ECHOX_MODEL_DIR, else the embedded one), id `default`, and the
model folder of every finished run, `runs_root/<run>/model`, id `run:<run>`.

Publishing makes one new version number N (one more than any stage has) and writes, for every
stage model of the repository, a self-contained `<repository>/<stage>/<N>/`:
    model.py        pins the checkpoint below, whatever config.pbtxt or ECHOX_MODEL_DIR say
    adapter.py      the stage adapter this release ships (deploy/triton/.../<stage>/1/model.py)
    echox/          a copy of the checkpoint folder
    published.json  what was published, from where, when
Each version is assembled in a hidden folder beside it and renamed into place, so a server that
polls the repository never sees half of one (Triton skips folders whose name is not a number).
With a Triton HTTP address, every stage model that server has READY is then loaded again, which
brings up version N (the default version policy serves the latest); if one fails to load, the new
versions are removed and the stages already switched are loaded back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

STAGES = ("speech_llm", "unit_generator", "vocoder")
CHECKPOINT_DIR = "echox"
ADAPTER_FILE = "adapter.py"
RECORD_FILE = "published.json"
LOCK_FILE = ".echox-publish.lock"  # a file, not a folder: Triton only takes folders for models
DEFAULT_ID = "default"
RUN_PREFIX = "run:"

_MODEL_PY = '''"""Triton model `{stage}`, version {version}: EchoX model {model_id!r}, published {when}.

Serves the checkpoint in ./{checkpoint} through the stage adapter in ./{adapter} (the model.py this
release ships), whatever the model_dir parameter of config.pbtxt or the server's ECHOX_MODEL_DIR say:
this version is self-contained.
"""

import importlib.util
import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("echox_{stage}_v{version}_adapter", _HERE / "{adapter}")
_adapter = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_adapter)


class TritonPythonModel(_adapter.TritonPythonModel):
    def initialize(self, args):
        config = json.loads(args["model_config"])
        config.setdefault("parameters", {{}})["model_dir"] = {{"string_value": str(_HERE / "{checkpoint}")}}
        super().initialize({{**args, "model_config": json.dumps(config)}})
'''


class PublishError(Exception):
    """The repository or the checkpoint cannot take a new version (a 400 or 409 of the API)."""


class TritonLoadError(Exception):
    """Triton refused to load the new version (the API's 502); nothing of it is left behind."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    id: str
    source: str  # "default" or "run"
    folder: Path
    created_at: float
    bytes: int


def _entry(model_id: str, source: str, folder: Path) -> ModelEntry | None:
    """A registered checkpoint, if `folder` holds an EchoX model (read without loading it)."""
    config = folder / "config.json"
    try:
        meta = json.loads(config.read_text())
        files = [f for f in folder.iterdir() if f.is_file()]
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != "echox":
        return None
    return ModelEntry(model_id, source, folder, config.stat().st_mtime, sum(f.stat().st_size for f in files))


def registered_models(runs_root: Path, model_dir: Path | None) -> list[ModelEntry]:
    from echox.paths import default_model_dir

    found: list[ModelEntry] = []
    default = model_dir or default_model_dir()
    if default is not None and (entry := _entry(DEFAULT_ID, "default", default)):
        found.append(entry)
    if runs_root.is_dir():
        for run in sorted(runs_root.iterdir()):
            model = run / "model"
            if (model / "DONE").is_file() and (entry := _entry(RUN_PREFIX + run.name, "run", model)):
                found.append(entry)
    return found


def find_model(runs_root: Path, model_dir: Path | None, model_id: str) -> ModelEntry | None:
    return next((m for m in registered_models(runs_root, model_dir) if m.id == model_id), None)


def _versions(stage_dir: Path) -> list[int]:
    return [int(p.name) for p in stage_dir.iterdir() if p.is_dir() and p.name.isdigit()] if stage_dir.is_dir() else []


def published_versions(repository: Path, model_id: str) -> list[int]:
    """The versions of the repository that hold `model_id` (read from the vocoder's records)."""
    found = []
    for version in sorted(_versions(repository / STAGES[-1])):
        record = repository / STAGES[-1] / str(version) / RECORD_FILE
        with contextlib.suppress(OSError, ValueError):
            if json.loads(record.read_text()).get("model") == model_id:
                found.append(version)
    return found


@contextlib.contextmanager
def _repository_lock(repository: Path) -> Iterator[None]:
    """One publisher at a time per repository (also across API replicas sharing its volume)."""
    with (repository / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_version(model: ModelEntry, stage_dir: Path, adapter: Path, version: int) -> Path:
    staging = stage_dir / f".publish-{uuid.uuid4().hex}"
    try:
        staging.mkdir()
        shutil.copytree(model.folder, staging / CHECKPOINT_DIR, ignore=shutil.ignore_patterns("DONE", "__pycache__"))
        shutil.copy2(adapter, staging / ADAPTER_FILE)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        (staging / "model.py").write_text(_MODEL_PY.format(
            stage=stage_dir.name, version=version, model_id=model.id, when=when, checkpoint=CHECKPOINT_DIR,
            adapter=ADAPTER_FILE))
        record = {"model": model.id, "source": str(model.folder), "version": version, "published_at": time.time()}
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        final = stage_dir / str(version)
        staging.rename(final)  # atomic: the version appears whole or not at all
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_version(model: ModelEntry, repository: Path, adapters: Path) -> tuple[int, list[Path]]:
    """Writes the next version of every stage; (its number, the folders written)."""
    for stage in STAGES:
        if not (repository / stage / "config.pbtxt").is_file():
            raise PublishError(f"the model repository {repository} has no stage model {stage!r}")
        if not (adapters / stage / "1" / "model.py").is_file():
            raise PublishError(f"no stage adapter {adapters / stage / '1' / 'model.py'}")
    written: list[Path] = []
    with _repository_lock(repository):
        version = 1 + max((v for stage in STAGES for v in _versions(repository / stage)), default=0)
        try:
            for stage in STAGES:
                written.append(_write_version(model, repository / stage, adapters / stage / "1" / "model.py", version))
        except OSError as exc:
            remove_versions(written)
            raise PublishError(f"cannot write version {version}: {exc}") from exc
    return version, written


def remove_versions(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


async def _triton_call(client: httpx.AsyncClient, path: str) -> Any:
    reply = await client.post(path, json={})
    if reply.status_code != 200:
        try:
            reason = reply.json().get("error", reply.text)
        except ValueError:
            reason = reply.text
        raise TritonLoadError(f"Triton {path}: HTTP {reply.status_code}: {reason}")
    return reply.json() if reply.content else None


async def load_in_triton(client: httpx.AsyncClient, stages: tuple[str, ...] = STAGES) -> dict[str, str]:
    """Loads again every stage model the server has READY; {stage: "loaded" or why not}.
    On a failure, the stages already loaded are loaded back (call after removing the version)."""
    index = await _triton_call(client, "/v2/repository/index")
    ready = {m.get("name") for m in index or [] if isinstance(m, dict) and m.get("state") == "READY"}
    outcome: dict[str, str] = {}
    for stage in stages:
        if stage not in ready:
            outcome[stage] = "not served by this Triton"
            continue
        await _triton_call(client, f"/v2/repository/models/{stage}/load")
        outcome[stage] = "loaded"
    return outcome


async def publish(model: ModelEntry, repository: Path, adapters: Path, triton: httpx.AsyncClient | None
                  ) -> tuple[int, dict[str, str]]:
    """Publishes `model` as a new version: (version, per-stage Triton outcome)."""
    import anyio

    version, written = await anyio.to_thread.run_sync(write_version, model, repository, adapters)
    if triton is None:
        return version, {stage: "no Triton configured" for stage in STAGES}
    try:
        return version, await load_in_triton(triton)
    except (TritonLoadError, httpx.HTTPError) as exc:
        await anyio.to_thread.run_sync(remove_versions, written)
        with contextlib.suppress(TritonLoadError, httpx.HTTPError):
            await load_in_triton(triton)  # back to the newest version that is left
        raise TritonLoadError(f"version {version} of {model.id} was not loaded, and is removed: {exc}") from exc
