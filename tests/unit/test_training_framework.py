"""training/stage.py, recipe.py, runner.py: what every stage relies on."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from echox.errors import ConfigError, EchoXError
from training import recipe as recipe_module
from training.jsonl import read_jsonl, write_jsonl
from training.recipe import RecipeError, load_recipe
from training.stage import (
    DONE_FILE,
    LOSS_PLOT,
    METRICS_FILE,
    MetricsLog,
    StageCancelled,
    StageContext,
    WeightAverage,
    load_training_state,
    optimizer_step,
    run_stage,
    save_training_state,
    set_learning_rate,
)

DATA_ROOT = Path(__file__).resolve().parents[2] / "data"


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(16, 4, generator=gen)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_training_state_round_trip_resumes_exactly(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    _train(model, optimizer, 3)
    save_training_state(tmp_path, model, optimizer, step=3, extra={"best": 0.5})
    other, other_opt = _model_and_optimizer(99)
    step, extra = load_training_state(tmp_path, other, other_opt)
    assert step == 3 and extra == {"best": 0.5}
    _train(model, optimizer, 2)
    _train(other, other_opt, 2)  # same updates only if the optimizer moments were restored
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_weight_average_follows_the_weights_with_a_warming_decay(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    first = {name: value.clone() for name, value in model.state_dict().items()}
    average = WeightAverage(model, decay=0.5)
    _train(model, optimizer, 1)
    average.update(model)  # the first decay is min(0.5, 1 / 10): mostly the new weights
    for name, value in model.state_dict().items():
        assert torch.allclose(average.shadow[name], 0.1 * first[name] + 0.9 * value)
    second = {name: value.clone() for name, value in average.shadow.items()}
    _train(model, optimizer, 1)
    average.update(model)  # then min(0.5, 2 / 11)
    for name, value in model.state_dict().items():
        assert torch.allclose(average.shadow[name], 2 / 11 * second[name] + 9 / 11 * value)
    fresh, _ = _model_and_optimizer(1)
    average.copy_to(fresh)
    assert all(torch.equal(fresh.state_dict()[name], average.shadow[name]) for name in average.shadow)
    average.save(tmp_path)
    resumed = WeightAverage(fresh, decay=0.5)
    assert resumed.load(tmp_path) and resumed.updates == 2
    assert all(torch.equal(resumed.shadow[name], average.shadow[name]) for name in average.shadow)
    assert not WeightAverage(fresh, decay=0.5).load(tmp_path / "none")
    # A checkpoint written without an average: the average starts from the weights it restores.
    save_training_state(tmp_path / "plain", model, optimizer, 2)
    restored, restored_optimizer = _model_and_optimizer(3)
    late = WeightAverage(restored, decay=0.5)
    assert load_training_state(tmp_path / "plain", restored, restored_optimizer, late)[0] == 2
    assert late.updates == 0
    assert all(torch.equal(late.shadow[name], value) for name, value in model.state_dict().items())
    with pytest.raises(ConfigError, match="decay"):
        WeightAverage(fresh, decay=1.0)


def test_no_checkpoint_means_step_zero(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    assert load_training_state(tmp_path, model, optimizer) == (0, {})


def test_finished_stage_is_skipped_and_records_wall_time(tmp_path: Path) -> None:
    calls = []

    def stage(ctx: StageContext) -> dict[str, Any]:
        calls.append(ctx.stage)
        return {"figure": 1.0}

    ctx = StageContext(run_dir=tmp_path, stage="demo", settings={})
    first = run_stage(stage, ctx)
    second = run_stage(stage, ctx)
    assert calls == ["demo"] and first == second and "wall_seconds" in first
    assert json.loads((tmp_path / "demo" / DONE_FILE).read_text())["figure"] == 1.0


def test_a_stage_thread_setting_does_not_leak_into_the_next_stage(tmp_path: Path) -> None:
    # The lm stage trains on one thread; the t2c and vocoder stages after it used to inherit that.
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2

    def stage(ctx: StageContext) -> dict[str, Any]:
        torch.set_num_threads(wanted)
        if ctx.stage == "fails":
            raise ValueError("boom")
        return {}

    try:
        run_stage(stage, StageContext(run_dir=tmp_path, stage="one_thread", settings={}))
        assert torch.get_num_threads() == before
        with pytest.raises(ValueError, match="boom"):
            run_stage(stage, StageContext(run_dir=tmp_path, stage="fails", settings={}))
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_cancelled_stage_is_not_marked_done(tmp_path: Path) -> None:
    def stage(ctx: StageContext) -> dict[str, Any]:
        ctx.check_cancelled()
        return {}

    cancel = threading.Event()
    cancel.set()
    ctx = StageContext(run_dir=tmp_path, stage="demo", settings={}, cancel=cancel)
    with pytest.raises(StageCancelled):
        run_stage(stage, ctx)
    assert not (tmp_path / "demo" / DONE_FILE).exists()


def test_input_requires_a_finished_stage(tmp_path: Path) -> None:
    ctx = StageContext(run_dir=tmp_path, stage="b", settings={})
    with pytest.raises(FileNotFoundError, match="unfinished"):
        ctx.input("a")


def test_metrics_log_writes_json_and_plot_and_appends(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    for step in range(5):
        log.add(step, loss=1.0 / (step + 1))
    log.set(accuracy=0.9)
    log.save()
    again = MetricsLog(tmp_path)
    again.add(5, loss=0.1)
    again.save()
    data = json.loads((tmp_path / METRICS_FILE).read_text())
    assert len(data["curves"]["loss"]) == 6 and data["accuracy"] == 0.9
    assert (tmp_path / LOSS_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_recipe_loads() -> None:
    recipe = load_recipe("tiny", DATA_ROOT)
    assert recipe.stages[:2] == ("synth", "lm") and recipe.facts == (DATA_ROOT / "spoken_qa").resolve()
    every_answer = load_recipe("tiny-all", DATA_ROOT)  # tiny, with no answer held out of the speaking half
    assert every_answer.stages == recipe.stages and every_answer.stage_settings("synth")["answer_dev_share"] == 0
    assert recipe.stage_settings("synth")["answer_dev_share"] > 0


def test_a_recipe_extends_another_and_states_only_its_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = load_recipe("tiny", DATA_ROOT)
    variant = tmp_path / "held.yaml"
    variant.write_text("extends: tiny\nstages: [synth, lm]\nsettings:\n  synth: {answer_dev_share: 0.3}\n"
                       "  extra: {steps: 3}\n")
    recipe = load_recipe(str(variant), DATA_ROOT)
    assert recipe.name == "held" and recipe.stages == ("synth", "lm") and recipe.seed == tiny.seed
    assert recipe.stage_settings("synth") == {**tiny.stage_settings("synth"), "answer_dev_share": 0.3}
    assert recipe.stage_settings("t2c") == tiny.stage_settings("t2c") and recipe.stage_settings("extra") == {"steps": 3}
    refused = ((str(variant), "name a recipe"), ("../tiny", "name a recipe"), ("nowhere", "but no recipe 'nowhere'"))
    for target, reason in refused:
        (tmp_path / "bad.yaml").write_text(f"extends: {target}\n")
        with pytest.raises(RecipeError, match=reason):
            load_recipe(str(tmp_path / "bad.yaml"), DATA_ROOT)
    monkeypatch.setattr(recipe_module, "RECIPES_DIR", tmp_path)
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(RecipeError, match="circle"):
        load_recipe("a", DATA_ROOT)


def test_recipe_data_outside_the_data_root_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nfacts: ../../etc\nstages: [synth]\n")
    with pytest.raises(RecipeError, match="outside the data root"):
        load_recipe(str(bad), DATA_ROOT)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("stages: [nope]\n")
    with pytest.raises(RecipeError, match="unknown stages"):
        load_recipe(str(unknown), DATA_ROOT)
    with pytest.raises(RecipeError, match="no recipe"):
        load_recipe("does-not-exist", DATA_ROOT)


def test_training_state_keeps_tied_weights_tied(tmp_path: Path) -> None:
    """An LM with a tied head (shared storage) must checkpoint and resume."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    save_training_state(tmp_path, model, optimizer, step=1)
    torch.manual_seed(1)
    other_embed, other_head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    other_head.weight = other_embed.weight
    other = torch.nn.ModuleDict({"embed": other_embed, "head": other_head})
    assert load_training_state(tmp_path, other, torch.optim.AdamW(other.parameters()))[0] == 1
    assert torch.equal(other["embed"].weight, embed.weight)
    assert other["head"].weight.data_ptr() == other["embed"].weight.data_ptr()


def test_optimizer_step_clips_the_gradient_norm_before_stepping() -> None:
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    weight.grad = torch.full((3,), 99.0)  # a stale gradient must not add to the new one
    optimizer_step(optimizer, (weight * torch.tensor([300.0, 0.0, 400.0])).sum(), [weight], grad_clip=5.0)
    assert torch.allclose(weight.detach(), torch.tensor([-3.0, 0.0, -4.0]))  # (300, 0, 400) scaled to norm 5


def test_set_learning_rate_sets_one_rate_or_scales_each_groups_peak() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [a], "peak_lr": 2e-3}, {"params": [b], "peak_lr": 3e-4}], lr=1.0)
    set_learning_rate(optimizer, factor=0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1.5e-4]
    set_learning_rate(optimizer, 0.25)
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]


def test_jsonl_round_trip_and_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rows.jsonl"
    rows = [{"id": "a", "text": "Zürich is in Switzerland."}, {"id": "b", "units": [1, 2, 3]}]
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows and not list(path.parent.glob("*.partial"))
    assert "Zürich" in path.read_text(encoding="utf-8")
    path.write_text(path.read_text() + "\n{not json\n")
    with pytest.raises(EchoXError, match=r"rows\.jsonl, line 4: not JSON"):
        read_jsonl(path)
    with pytest.raises(EchoXError, match=r"gone\.jsonl is missing \(run the synth stage first\)"):
        read_jsonl(tmp_path / "gone.jsonl", "run the synth stage first")
    assert read_jsonl(tmp_path / "gone.jsonl", missing_ok=True) == []
