"""Data-parallel training under torchrun: one process per GPU (or per CPU slot), DDP, bf16.

    torchrun --nproc_per_node 8 -m echox train --recipe 3b --out runs/3b

A recipe's `distributed:` mapping sets the strategy and precision; torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK) sets who this process is. Without torchrun everything here is a
no-op and the stages run as one process, as the tiny recipe does on a laptop.

The listening stages (s2t, echo) train data-parallel: each rank takes its share of every global
batch, gradients are averaged by DDP, and the time-capped schedules agree on the slowest rank's
clock so every rank stops on the same step. The other stages run on rank 0 while the rest wait
(they are small or CPU-bound: synthesis, k-means, the unit language). Only rank 0 writes
checkpoints, metrics and models, and only it shows progress.

`precision: bf16` runs the training forward passes under bf16 autocast and stores the frozen
weights (the LLM under LoRA, the speech encoder) in bf16, which halves the memory of an 8B LLM;
trainable weights and the optimizer stay float32. Speech is encoded (log-mel, frozen encoder)
in float32 before that, and the trained model goes back to float32 before it is saved and
evaluated. LoRA itself is the s2t stage's `lora_rank`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from echox.errors import ConfigError

STRATEGIES = ("ddp",)  # LoRA keeps the trained weights small, so replicating the frozen base is enough
PRECISIONS = ("fp32", "bf16")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """A recipe's `distributed:` mapping."""

    strategy: str = "ddp"
    precision: str = "fp32"
    device: str = "auto"  # "auto": the local GPU when there is one, else the CPU; or "cpu" / "cuda"
    timeout_minutes: float = 60.0  # how long ranks wait for rank 0 to finish a rank-0-only stage

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"distributed.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"distributed.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"distributed.device must be auto, cpu or cuda, got {self.device!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DistributedSettings:
        from training.stage import settings_kwargs

        return cls(**settings_kwargs(cls, values, "distributed"))


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Who this process is among the training processes, and how they share work."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    bf16: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of a global batch (every rank gets the same count when it divides)."""
        return list(items[self.rank :: self.world_size])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def agree_max(self, value: float) -> float:
        """The largest `value` over the ranks: a time-capped loop then stops on the same step
        everywhere (one rank stopping early would leave the others waiting in all-reduce)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def replicas_agree(self, module: nn.Module) -> bool:
        """Whether every rank holds the same weights (a bug in sharding or syncing shows up here
        as ranks that drifted apart): compares a fingerprint of the parameters across ranks."""
        if not self.active:
            return True
        with torch.no_grad():
            values = [p.detach().double() for p in module.parameters()]
            fingerprint = sum(float((v * (1.0 + 1e-3 * i)).sum()) for i, v in enumerate(values))
        return self.agree_max(fingerprint) == -self.agree_max(-fingerprint)

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare(self, model: nn.Module, trained: nn.Module) -> None:
        """Before training: only `trained`'s parameters that already require grad keep doing so
        (DDP waits for a gradient of every parameter that requires one); under bf16 every frozen
        weight becomes bf16."""
        learning = {id(p) for p in trained.parameters() if p.requires_grad}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in learning)
            if self.bf16 and id(parameter) not in learning and parameter.is_floating_point():
                parameter.data = parameter.data.to(torch.bfloat16)

    def wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        """`module` under DDP when there are several ranks. Its forward computes the loss; with
        `find_unused`, a step may leave some trained parameters out of it."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused
        )


SINGLE = Parallel()


def from_environment(settings: DistributedSettings | None = None) -> Parallel:
    """The Parallel of this process: torchrun's environment, or one process. Starts the process
    group (NCCL on GPUs, gloo on CPUs) the first time it is asked under torchrun."""
    settings = settings or DistributedSettings()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("distributed.device is cuda, but this machine has no usable GPU")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=settings.timeout_minutes),
        )
    bf16 = settings.precision == "bf16"
    if bf16 and use_cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("distributed.precision is bf16, but this GPU does not support bf16")
    return Parallel(rank=rank, world_size=world_size, device=device, bf16=bf16)


@contextlib.contextmanager
def main_first(parallel: Parallel) -> Iterator[bool]:
    """Rank 0 does the work inside (yields True there); the others wait for it at a barrier."""
    try:
        yield parallel.is_main
    finally:
        parallel.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
