"""The paper-scale recipes (training/recipes/3b.yaml and 8b.yaml) at a reduced size, through
torchrun with the recipe's own distributed settings (DDP, bf16) and stage settings (LoRA in
stage I, the LLM left as stage I made it in stage III, no time caps): the 3b architecture (Llama-3
attention and RoPE, the medium T2C, a Whisper-large-v3-shaped encoder) made small and trained a
few steps per stage. On the CPU in CI; with `pytest -m gpu` on every GPU of the machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from echox.checkpoint import EchoX, load_part_weights, read_part_config
from echox.models.llm import LLMConfig, build_llm
from tests.unit.test_echo_stage import SMOKE as ECHO_SMOKE
from tests.unit.test_echo_stage import make_echo_run
from tests.unit.test_s2t_stage import SMOKE as S2T_SMOKE
from tests.unit.test_s2t_stage import module_moved
from training.recipe import RECIPES_DIR
from training.stage import DONE_FILE

TORCHRUN = Path(sys.executable).with_name("torchrun")
DATA = Path(__file__).resolve().parents[2] / "data" / "spoken_qa"
STAGES = ("lm", "t2c", "asr", "s2t", "echo", "model")
SMALL: dict[str, dict[str, Any]] = {  # what makes the recipe small; everything else is the recipe's
    "lm": {"steps": 3, "batch_size": 4, "time_limit_s": 0, "warmup": 1, "checkpoint_every": 3,
           "llm_overrides": {"hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "num_heads": 4,
                             "num_kv_heads": 2}},
    "t2c": {"steps": 3, "batch_tokens": 512, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 3,
            "questions": False, "word_repeats": 0},
    "asr": {"steps": 3, "batch_size": 4, "warmup": 1, "limit_clips": 6, "dev_clips": 2, "eval_batch_size": 2,
            "threads": 1, "encoder_overrides": {"d_model": 64, "num_layers": 2, "num_heads": 2, "ffn_dim": 128}},
    "s2t": {**S2T_SMOKE, "lora_rank": 4, "lora_alpha": 8, "augmented_per_text": 1, "encode_batch": 4,
            "threads": 1},
    "echo": {**ECHO_SMOKE, "threads": 1},
}


def small_recipe(name: str, data_root: Path, device: str) -> Path:
    recipe = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    settings = {}
    for stage in STAGES:
        base = {k: v for k, v in (recipe["settings"].get(stage) or {}).items() if k != "import"}
        settings[stage] = {**base, **SMALL.get(stage, {})}
    recipe.update(name=f"{name}-small", facts="facts", settings=settings, seed=3)
    recipe["distributed"] = {**recipe["distributed"], "device": device}
    path = data_root / f"{name}-small.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_small(tmp_path: Path, name: str, device: str, processes: int) -> Path:
    run = tmp_path / "run"
    make_echo_run(run, tmp_path / "facts")  # spoken questions, answers' units, a unit language, a vocoder
    for stage in ("lm", "t2c", "s2t"):  # trained again here, at the recipe's architecture
        shutil.rmtree(run / stage)
    for file in ("templates.json", "voices.json"):  # the lm stage reads the whole fact base
        shutil.copy(DATA / file, tmp_path / "facts" / file)
    recipe = small_recipe(name, tmp_path, device)
    env = {**os.environ, "ECHOX_DATA_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes), "-m", "echox", "train",
               "--recipe", str(recipe), "--out", str(run), "--stages", ",".join(STAGES)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return run


def check_run(run: Path, preset: str, device: str, processes: int) -> None:
    records = {stage: json.loads((run / stage / DONE_FILE).read_text()) for stage in STAGES}
    for stage in ("s2t", "echo"):
        assert records[stage]["processes"] == processes and records[stage]["device"] == device
    model = EchoX.from_pretrained(run / "model")
    config = model.model.config
    reference = {"3b": 3072, "8b": 4096}[preset]
    assert config.llm.num_kv_heads == 2 and config.llm.extra["rope_parameters"]["rope_type"] == "llama3"
    assert config.echo_decoder.hidden_size == 768 and config.echo_decoder.text_dim == 128 != reference
    assert config.encoder.num_mel_bins == 128 and config.encoder.d_model == 64
    # Stage I trained LoRA adapters and merged them: projections moved, norms did not (beyond
    # the bf16 rounding of frozen weights).
    lm = read_part_config(run / "lm", "llm", LLMConfig)
    assert lm.hidden_size == 128
    s2t, echo = EchoX.from_pretrained(run / "s2t" / "model"), EchoX.from_pretrained(run / "echo" / "model")
    start = _lm_weights(run)
    moved = {n for n, p in s2t.model.llm.named_parameters() if not torch.equal(p, bf16(start[n]))}
    assert moved and all("proj" in n for n in moved), sorted(moved)
    # Stage III (train_llm: false) left the LLM as stage I made it; its echo decoder learned.
    for (name, before), after in zip(s2t.model.llm.state_dict().items(), echo.model.llm.state_dict().values(),
                                     strict=True):
        assert torch.equal(before, after), name
    assert module_moved(s2t, echo, "echo_decoder")


def bf16(weights: torch.Tensor) -> torch.Tensor:
    """`weights` as bf16 training keeps frozen weights (the recipes' precision), back in float32."""
    return weights.detach().to(torch.bfloat16).float()


def _lm_weights(run: Path) -> dict[str, torch.Tensor]:
    """The lm stage's LLM, before stage I."""
    llm = build_llm(read_part_config(run / "lm", "llm", LLMConfig))
    load_part_weights(run / "lm", "llm", llm)
    return dict(llm.named_parameters())


@pytest.mark.parametrize("preset", ["3b"])
def test_the_large_recipe_trains_at_a_reduced_size_on_the_cpu(tmp_path: Path, preset: str) -> None:
    run = train_small(tmp_path, preset, "cpu", processes=2)
    check_run(run, preset, "cpu", processes=2)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["3b", "8b"])
def test_the_large_recipe_trains_at_a_reduced_size_on_the_gpus(tmp_path: Path, preset: str) -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU; this machine has none (CI runs -m 'not gpu')")
    processes = torch.cuda.device_count()
    run = train_small(tmp_path, preset, "cuda", processes)
    check_run(run, preset, "cuda", processes)
