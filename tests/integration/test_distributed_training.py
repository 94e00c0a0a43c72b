"""Data-parallel training (training.distributed) for real: `torchrun` starts two CPU processes
(gloo) that train the listening stages of a micro run with DDP and bf16 autocast, as the 3b and
8b recipes do on GPUs with NCCL. The stages refuse to finish when the processes end with
different weights, so a batch split or a gradient sync that goes wrong fails this test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from echox.checkpoint import EchoX
from echox.errors import ConfigError
from tests.unit.test_echo_stage import SMOKE as ECHO_SMOKE
from tests.unit.test_echo_stage import make_echo_run
from tests.unit.test_s2t_stage import SMOKE as S2T_SMOKE
from tests.unit.test_s2t_stage import module_moved
from training.assemble import assemble_parts
from training.distributed import DistributedSettings, Parallel
from training.recipe import load_recipe
from training.stage import DONE_FILE

TORCHRUN = Path(sys.executable).with_name("torchrun")


def write_recipe(path: Path, precision: str) -> Path:
    recipe = {
        "name": "ddp-smoke", "preset": "tiny", "seed": 3, "facts": "facts", "stages": ["s2t", "echo"],
        "distributed": {"strategy": "ddp", "precision": precision, "device": "cpu"},
        "settings": {"s2t": {**S2T_SMOKE, "steps": 6}, "echo": {**ECHO_SMOKE, "batch_size": 4}},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_two_processes_train_s2t_and_echo_in_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_echo_run(run, tmp_path / "facts")
    shutil.rmtree(run / "s2t")  # trained here, by both processes
    recipe = write_recipe(tmp_path / "ddp.yaml", "bf16")
    env = {**os.environ, "ECHOX_DATA_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "echox", "train",
               "--recipe", str(recipe), "--out", str(run)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    s2t, echo = (json.loads((run / stage / DONE_FILE).read_text()) for stage in ("s2t", "echo"))
    assert s2t["processes"] == 2 and s2t["steps_done"] == 6
    assert echo["processes"] == 2 and echo["steps"] == ECHO_SMOKE["steps"]
    assert set(json.loads((run / "report.json").read_text())) == {"s2t", "echo"}
    assert done.stdout.count("s2t ") == 1  # rank 0 alone prints the summary
    start, trained = assemble_parts(run, seed=3), EchoX.from_pretrained(run / "s2t" / "model")
    assert module_moved(start, trained, "speech_adapter")
    assert EchoX.from_pretrained(run / "echo" / "model").model.echo_decoder is not None
    step = json.loads((run / "s2t" / "checkpoint" / "state.json").read_text())["step"]
    assert step == 6  # one checkpoint, written by rank 0


def _drift(rank: int, port: int, results: dict[int, bool]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    parallel = Parallel(rank=rank, world_size=2)
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    same = parallel.replicas_agree(layer)
    with torch.no_grad():
        layer.weight[0, 0] += 1e-6 * rank  # one replica drifts a little
    results[rank] = same and not parallel.replicas_agree(layer)
    dist.destroy_process_group()


def test_replica_check_sees_a_drifted_process() -> None:
    from services.common.processes import free_port

    results = mp.Manager().dict()
    mp.spawn(_drift, args=(free_port(), results), nprocs=2, join=True)
    assert dict(results) == {0: True, 1: True}


def test_settings_and_recipe_block(tmp_path: Path) -> None:
    assert DistributedSettings.from_mapping({"precision": "bf16"}).precision == "bf16"
    for bad in ({"strategy": "zero3"}, {"precision": "fp8"}, {"device": "tpu"}, {"nodes": 2}):
        with pytest.raises(ConfigError):
            DistributedSettings.from_mapping(bad)
    (tmp_path / "facts").mkdir()
    recipe = load_recipe(str(write_recipe(tmp_path / "r.yaml", "fp32")), tmp_path)
    assert recipe.distributed == {"strategy": "ddp", "precision": "fp32", "device": "cpu"}
    assert Parallel(rank=1, world_size=3).shard(list(range(7))) == [1, 4]
