"""What every training stage shares: its folder, resume, metrics, loss curves and progress.

A run folder holds one sub-folder per stage. A stage writes its outputs there, a metrics JSON
(`metrics.json`), loss curves (`loss.png`) and, when finished, a `DONE` marker with its wall
time: a restarted run skips finished stages and resumes an unfinished one from its last
checkpoint. The same stage runs from the CLI (a rich progress display) and as a Celery task
(progress through task state): only the Reporter differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from echox.errors import ConfigError

if TYPE_CHECKING:  # torch loads when a stage trains, not when the CLI starts
    import torch

    from training.distributed import Parallel

DONE_FILE = "DONE"
METRICS_FILE = "metrics.json"
LOSS_PLOT = "loss.png"


def settings_kwargs(cls: type, values: Mapping[str, Any], label: str) -> dict[str, Any]:
    """`values` as keyword arguments of the settings dataclass `cls`; a key that names none of
    its fields is a ConfigError listing the known ones (`label` says whose settings they are)."""
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{label}: unknown keys {unknown}; known: {sorted(names)}")
    return dict(values)


class Reporter(Protocol):
    """Where progress goes: a terminal display, a Celery task state, or nowhere."""

    def start(self, stage: str, total: int, unit: str = "steps") -> None: ...
    def advance(self, steps: int = 1, **metrics: float) -> None: ...
    def log(self, message: str) -> None: ...


class SilentReporter:
    def start(self, stage: str, total: int, unit: str = "steps") -> None:
        pass

    def advance(self, steps: int = 1, **metrics: float) -> None:
        pass

    def log(self, message: str) -> None:
        pass


class StageCancelled(Exception):
    """Raised inside a stage when its job was cancelled; the last checkpoint stays usable."""


def _one_process() -> Parallel:
    from training.distributed import SINGLE  # imports torch: only once a stage runs

    return SINGLE


@dataclasses.dataclass
class StageContext:
    """Everything a stage needs: where to read and write, its settings, and how to report."""

    run_dir: Path
    stage: str
    settings: Mapping[str, Any]
    facts: Path | None = None  # the SpokenQA fact base folder (facts.jsonl, templates.json, voices.json)
    preset: str = "tiny"
    reporter: Reporter = dataclasses.field(default_factory=SilentReporter)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    seed: int = 0
    parallel: Parallel = dataclasses.field(default_factory=_one_process)  # torchrun's ranks

    @property
    def out(self) -> Path:
        path = self.run_dir / self.stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def input(self, stage: str) -> Path:
        """The folder of an earlier stage, which must have finished."""
        path = self.run_dir / stage
        if not (path / DONE_FILE).is_file():
            raise FileNotFoundError(f"stage {self.stage!r} needs stage {stage!r}, unfinished in {self.run_dir}")
        return path

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise StageCancelled(f"stage {self.stage} was cancelled")

    def setting(self, name: str, default: Any = None) -> Any:
        return self.settings.get(name, default)


StageFn = Callable[[StageContext], Mapping[str, Any]]


def schedule_progress(step: int, steps: int, elapsed_s: float, max_minutes: float) -> float:
    """How far a training loop is through its schedule: the larger of steps done / `steps` and
    training time / `max_minutes` (0: no time cap). A time-capped run on a slow or busy machine
    so ends with its learning rate fully decayed instead of being cut off near the peak."""
    by_time = elapsed_s / (60.0 * max_minutes) if max_minutes > 0 else 0.0
    return max(step / max(1, steps), by_time)


def warmup_cosine(step: int, warmup_steps: int, progress: float, min_ratio: float) -> float:
    """The learning rate's factor of its peak: linear warmup over `warmup_steps`, then a cosine
    from 1 down to `min_ratio` as `progress` (schedule_progress) goes from 0 to 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float | None = None, *, factor: float = 1.0) -> None:
    """Sets every parameter group's rate to `lr`, or with `lr` None to `factor` times the group's
    own `peak_lr` (optimizers whose groups learn at different rates keep it in each group)."""
    for group in optimizer.param_groups:
        group["lr"] = lr if lr is not None else group["peak_lr"] * factor


def optimizer_step(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters: Iterable[torch.Tensor], grad_clip: float
) -> None:
    """One update: fresh gradients of `loss`, their total norm clipped to `grad_clip`, one step."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()


AVERAGE_FILE = "average.safetensors"  # beside a checkpoint's model.safetensors


class WeightAverage:
    """An exponential moving average of a model's floating-point weights and buffers, the
    averaged copy a trained generator is usually served with. Its decay warms up as
    (1 + n) / (10 + n) over the first updates, so early weights do not linger."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"weight average: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.reset(model)

    def reset(self, model: torch.nn.Module) -> None:
        """Starts the average afresh from `model`'s weights."""
        self.updates = 0
        self.shadow = {
            name: value.detach().clone() for name, value in model.state_dict().items() if value.is_floating_point()
        }

    def update(self, model: torch.nn.Module) -> None:
        import torch

        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for name, value in model.state_dict().items():
                if name in self.shadow:
                    self.shadow[name].lerp_(value.detach(), 1.0 - decay)
        self.updates += 1

    def copy_to(self, model: torch.nn.Module) -> None:
        """Puts the averaged weights into `model` (its integer buffers stay)."""
        model.load_state_dict(self.shadow, strict=False)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        meta = {"updates": str(self.updates), "decay": str(self.decay)}
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.shadow.items()}
        save_file(tensors, str(folder / "average.tmp.safetensors"), metadata=meta)
        (folder / "average.tmp.safetensors").replace(folder / AVERAGE_FILE)

    def load(self, folder: Path) -> bool:
        """Resumes from `folder`'s average if it holds one; False (and no change) if not."""
        from safetensors import safe_open

        path = folder / AVERAGE_FILE
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as stored:
            missing = set(self.shadow) - set(stored.keys())
            if missing:
                raise ConfigError(f"{path}: no average for {sorted(missing)[:3]}")
            self.shadow = {name: stored.get_tensor(name).to(value.device) for name, value in self.shadow.items()}
            self.updates = int((stored.metadata() or {}).get("updates", 0))
        return True


def is_done(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / DONE_FILE).is_file()


def run_stage(fn: StageFn, ctx: StageContext) -> dict[str, Any]:
    """Runs one stage unless it already finished; records its wall time and result. Under
    torchrun a data-parallel stage runs on every rank, any other on rank 0 alone while the rest
    wait; rank 0 writes the record."""
    from training.distributed import main_first
    from training.stages import DATA_PARALLEL

    done = ctx.out / DONE_FILE
    if done.is_file():
        return dict(json.loads(done.read_text()))
    if ctx.parallel.active and ctx.stage not in DATA_PARALLEL:
        with main_first(ctx.parallel) as main:
            if main:
                _timed(fn, ctx, done)
        if not done.is_file():
            raise RuntimeError(f"stage {ctx.stage!r} failed on rank 0 (its log says why)")
        return dict(json.loads(done.read_text()))
    result = _timed(fn, ctx, done)
    ctx.parallel.barrier()  # the other ranks read rank 0's record of a finished stage
    return result


def _timed(fn: StageFn, ctx: StageContext, done: Path) -> dict[str, Any]:
    import torch

    torch.manual_seed(ctx.seed)
    threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        result = dict(fn(ctx))
    finally:  # a stage's `threads` setting must not leak into the stages after it
        torch.set_num_threads(threads)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    if ctx.parallel.is_main:
        done.write_text(json.dumps(result, indent=2) + "\n")
    return result


class MetricsLog:
    """Loss (and other) curves of a stage: appended as training goes, written as JSON and PNG."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / METRICS_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.curves: dict[str, list[list[float]]] = self.data.setdefault("curves", {})

    def add(self, step: int, **values: float) -> None:
        for name, value in values.items():
            self.curves.setdefault(name, []).append([step, float(value)])

    def set(self, **values: Any) -> None:
        self.data.update(values)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        if self.curves:
            plot_curves(self.curves, self.folder / LOSS_PLOT, title=self.folder.name)


def plot_curves(curves: Mapping[str, list[list[float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=name)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


RNG_KEY = "torch_rng_state"  # beside the optimizer tensors, whose keys are "<param id>.<name>"


def save_training_state(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, extra: Mapping[str, Any] = {},
    average: WeightAverage | None = None,
) -> None:
    """Weights (safetensors) + optimizer tensors and torch's CPU random state (safetensors) +
    JSON, written atomically enough for resume: the JSON names the step and is written last.
    The random state makes a resumed run draw the dropout masks an unbroken one would. With
    `average`, its weights are saved too."""
    import torch
    from safetensors.torch import save_file, save_model

    folder.mkdir(parents=True, exist_ok=True)
    if average is not None:
        average.save(folder)
    save_model(model, str(folder / "model.tmp.safetensors"))  # tied weights are stored once
    opt_state = optimizer.state_dict()
    tensors, layout = _flatten_optimizer(opt_state)
    save_file({**tensors, RNG_KEY: torch.get_rng_state()}, str(folder / "optimizer.tmp.safetensors"))
    (folder / "model.tmp.safetensors").replace(folder / "model.safetensors")
    (folder / "optimizer.tmp.safetensors").replace(folder / "optimizer.safetensors")
    meta = {"step": step, "optimizer": layout, "extra": dict(extra)}
    (folder / "state.json").write_text(json.dumps(meta) + "\n")


def load_training_state(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, average: WeightAverage | None = None
) -> tuple[int, dict[str, Any]]:
    """Restores a checkpoint written by save_training_state; returns (step, extra) or (0, {}).
    An `average` is restored too; a checkpoint written without one starts it from the weights
    restored."""
    meta_path = folder / "state.json"
    if not meta_path.is_file():
        return 0, {}
    import torch
    from safetensors.torch import load_file, load_model

    meta = json.loads(meta_path.read_text())
    load_model(model, str(folder / "model.safetensors"))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    rng_state = tensors.pop(RNG_KEY, None)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if rng_state is not None:  # checkpoints written before the random state was kept lack it
        torch.set_rng_state(rng_state)
    if average is not None and not average.load(folder):
        average.reset(model)
    return int(meta["step"]), dict(meta.get("extra", {}))


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in layout["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": layout["param_groups"]}
