"""Stage I (s2t): the loss pieces, the layout against inference, a smoke run, resume and cancel."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echox.checkpoint import EchoX
from echox.errors import ConfigError
from echox.streaming.stages import AnswerEnd, HiddenSegment, SpeechLLMStage
from tests.unit.test_listen_data import make_spoken_run, questions, tone
from tests.unit.test_speak import make_parts
from training.assemble import assemble_parts
from training.listen_data import Rendition, SpokenExample, collate, encode_audios
from training.stage import DONE_FILE, StageCancelled, StageContext, run_stage
from training.stages import s2t
from training.text_data import IGNORE_INDEX

SMOKE: dict[str, Any] = {
    "steps": 4, "batch_size": 4, "warmup": 1, "clean_per_text": 1, "augmented_per_text": 1, "dev_clips": 1,
    "monitor_clips": 2, "eval_every": 2, "checkpoint_every": 4, "log_every": 1,
}


def example_of(echox: EchoX, audio: np.ndarray, answer_ids: list[int], key: str = "clip") -> SpokenExample:
    """A spoken turn whose answer is the given token ids (then the end marker)."""
    tokenizer = echox.tokenizer
    prompt = tokenizer.prompt_ids()
    ids = [*prompt, *answer_ids, tokenizer.eos_id]
    labels = [IGNORE_INDEX] * len(prompt) + [*answer_ids, tokenizer.eos_id]
    states = encode_audios(echox.model, [audio])[0]
    return SpokenExample(key, "fact", states, tuple(tokenizer.encode("hi")), tuple(ids), tuple(labels))


def module_moved(start: EchoX, trained: EchoX, name: str) -> bool:
    """Whether any weight of the model's module `name` differs between the two models."""
    pairs = zip(getattr(start.model, name).parameters(), getattr(trained.model, name).parameters(), strict=True)
    return any(not torch.equal(a, b) for a, b in pairs)


def test_training_forward_is_the_inference_computation(micro_echox: EchoX) -> None:
    """Teacher-forced on the greedy answer, training reproduces inference's tokens and the hidden
    states that predicted them: same splice, same prompt, same decoder and head."""
    audio = tone(1.1, 330.0, 0.3)
    stage = SpeechLLMStage(micro_echox)
    outputs = list(stage.run(audio))
    answer = next(o for o in outputs if isinstance(o, AnswerEnd))
    hidden = torch.cat([o.hidden for o in outputs if isinstance(o, HiddenSegment)])
    assert len(answer.token_ids) >= 2
    micro_echox.model.eval()
    example = example_of(micro_echox, audio, list(answer.token_ids))
    forward = s2t.forward_spoken(micro_echox.model, collate([example]), micro_echox.tokenizer.audio_patch_id)
    scored = (forward.labels[0] != IGNORE_INDEX).nonzero().flatten()
    predicting = scored - 1  # position t predicts the label at t + 1
    tokens = forward.logits[0, predicting].argmax(-1).tolist()
    assert tokens[: len(answer.token_ids)] == list(answer.token_ids)
    torch.testing.assert_close(
        forward.hidden[0, predicting[: len(answer.token_ids)]], hidden, rtol=1e-4, atol=1e-4
    )


def test_padding_does_not_change_an_utterance(micro_echox: EchoX) -> None:
    micro_echox.model.eval()
    short = example_of(micro_echox, tone(0.6, 300.0, 0.3), [70, 71], "a")
    long = example_of(micro_echox, tone(1.8, 500.0, 0.2), [72, 73, 74, 75, 76, 77], "b")
    patch = micro_echox.tokenizer.audio_patch_id
    with torch.no_grad():
        alone = s2t.forward_spoken(micro_echox.model, collate([short]), patch)
        both = s2t.forward_spoken(micro_echox.model, collate([short, long]), patch)
    n = alone.logits.shape[1]
    assert both.logits.shape[1] > n
    torch.testing.assert_close(both.logits[0, :n], alone.logits[0], rtol=1e-4, atol=1e-4)
    assert (both.labels[0, n:] == IGNORE_INDEX).all() and (both.attention_mask[0, n:] == 0).all()


def test_splice_labels_widen_the_audio_patch(micro_echox: EchoX) -> None:
    ids = torch.tensor([1, 5, 9, 6, 7, 40, 41, 2])
    labels = torch.tensor([IGNORE_INDEX] * 5 + [40, 41, 2])
    spliced = s2t.splice_labels(ids, labels, patch_id=9, lengths=[3])
    assert spliced.tolist() == [IGNORE_INDEX] * 7 + [40, 41, 2]
    embeds = micro_echox.model.splice(ids, 9, [torch.zeros(3, 32)])
    assert len(embeds) == len(spliced)


def test_answer_ce_counts_only_labelled_next_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 11, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3, 4, 2]])
    forward = s2t.SpokenForward(torch.zeros(1, 6, 4), logits, labels, torch.ones(1, 6), torch.tensor(0.0), [1])
    loss, _ = s2t.answer_ce(forward)
    torch.testing.assert_close(loss, F.cross_entropy(logits[0, 2:5], torch.tensor([3, 4, 2])))
    loss.backward()  # type: ignore[no-untyped-call]
    assert logits.grad is not None
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[0, 5].abs().sum() == 0


def test_ctc_blank_is_the_given_id() -> None:
    """Frames spelling 1 _ 2 _ 2 with blank 7: nearly free with blank 7, costly with blank 0."""
    frames = torch.full((5, 10), -20.0)
    for t, token in enumerate([1, 7, 2, 7, 2]):
        frames[t, token] = 20.0
    transcript = [torch.tensor([1, 2, 2])]
    assert float(s2t.ctc_loss([frames], transcript, blank_id=7)) < 1e-3
    assert float(s2t.ctc_loss([frames], transcript, blank_id=0)) > 10.0


def test_settings_reject_unknown_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        s2t.S2TSettings.from_mapping({"stepz": 3})
    with pytest.raises(ConfigError, match="augment"):
        s2t.S2TSettings.from_mapping({"augment": {"noise": 1}})
    with pytest.raises(ConfigError, match="at least 1"):
        s2t.S2TSettings.from_mapping({"clean_per_text": 0, "augmented_per_text": 0})


# --- the stage ------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    make_parts(tmp_path / "run")
    make_spoken_run(tmp_path / "run", tmp_path / "facts")
    return tmp_path / "run"


class Recorder:
    """A reporter that remembers what it was told and can cancel after some training steps."""

    def __init__(self, cancel: threading.Event | None = None, cancel_after: int = 0) -> None:
        self.cancel, self.left = cancel, cancel_after
        self.advances: list[tuple[int, dict[str, float]]] = []

    def start(self, stage: str, total: int, unit: str = "steps") -> None:
        pass

    def advance(self, steps: int = 1, **metrics: float) -> None:
        self.advances.append((steps, metrics))
        if self.cancel is not None and "loss" in metrics:
            self.left -= steps
            if self.left <= 0:
                self.cancel.set()

    def log(self, message: str) -> None:
        pass


def context(run: Path, settings: dict[str, Any], reporter: Recorder | None = None) -> StageContext:
    ctx = StageContext(run_dir=run, stage="s2t", settings=settings, facts=run.parent / "facts", seed=3)
    ctx.reporter = reporter or Recorder()
    return ctx


def test_smoke_run_trains_the_listening_modules_and_writes_a_model(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blanks: list[int] = []
    real_ctc = s2t.ctc_loss

    def spy(logits: Any, transcripts: Any, blank_id: int) -> torch.Tensor:
        blanks.append(blank_id)
        return real_ctc(logits, transcripts, blank_id)

    monkeypatch.setattr(s2t, "ctc_loss", spy)
    result = run_stage(s2t.run, context(run_dir, SMOKE))
    assert (run_dir / "s2t" / DONE_FILE).is_file()
    assert result["steps_done"] == 4 and result["speech_encoder"] == "random"
    assert result["train_renditions"] == 3 * 2 and 0.0 <= result["s2t_accuracy"] <= 1.0
    trained, start = EchoX.from_pretrained(run_dir / "s2t" / "model"), assemble_parts(run_dir, seed=3)
    assert set(blanks) == {start.tokenizer.audio_patch_id}
    for name in ("speech_adapter", "lookback", "llm"):
        assert module_moved(start, trained, name), f"{name} did not change"
    for name in ("speech_encoder", "echo_decoder", "vocoder", "aligner"):
        for (n, p), q in zip(getattr(trained.model, name).state_dict().items(),
                             getattr(start.model, name).state_dict().values(), strict=True):
            assert torch.equal(p, q), f"{name}.{n} changed"
    metrics = json.loads((run_dir / "s2t" / "metrics.json").read_text())
    assert {"loss", "answer_ce", "ctc", "dev_ce"} <= set(metrics["curves"])
    assert metrics["evaluation"]["clips"] == 1
    assert (run_dir / "s2t" / "loss.png").is_file()


def test_token_table_stays_frozen_and_lora_merges_into_a_plain_llm(run_dir: Path) -> None:
    settings = {**SMOKE, "lora_rank": 4, "lora_alpha": 8}
    run_stage(s2t.run, context(run_dir, settings))
    trained, start = EchoX.from_pretrained(run_dir / "s2t" / "model"), assemble_parts(run_dir, seed=3)
    # The folder holds a plain LLM (no peft keys) whose projections moved and whose table did not.
    assert torch.equal(trained.model.input_table(), start.model.input_table())
    before = dict(start.model.llm.named_parameters())
    moved = {n for n, p in trained.model.llm.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("proj" in n for n in moved), sorted(moved)
    assert not any("norm" in n for n in moved)  # LoRA touches the target projections only


def test_cancel_then_resume_continues_from_the_checkpoint(run_dir: Path) -> None:
    cancel = threading.Event()
    settings = {**SMOKE, "checkpoint_every": 2}
    ctx = context(run_dir, settings, Recorder(cancel, cancel_after=2))
    ctx.cancel = cancel
    reporter = ctx.reporter
    assert isinstance(reporter, Recorder)
    reporter.cancel = cancel
    with pytest.raises(StageCancelled):
        run_stage(s2t.run, ctx)
    assert not (run_dir / "s2t" / DONE_FILE).exists()
    assert json.loads((run_dir / "s2t" / "checkpoint" / "state.json").read_text())["step"] == 2
    again = Recorder()
    result = run_stage(s2t.run, context(run_dir, settings, again))
    assert result["steps_done"] == 4
    assert sum(steps for steps, metrics in again.advances if "loss" in metrics) == 2  # two steps left
    assert (2, {}) in again.advances  # the progress display catches up to the checkpoint


def test_time_limit_stops_training_early(run_dir: Path) -> None:
    result = run_stage(s2t.run, context(run_dir, {**SMOKE, "max_minutes": 1e-6}))
    assert result["steps_done"] == 1 and result["stopped_by_time"]


def test_history_share_puts_another_facts_turn_first(run_dir: Path) -> None:
    clips = questions((run_dir, run_dir.parent / "facts"))
    plan = [Rendition(clip) for clip in clips]
    assert s2t.with_histories(plan, clips, share=0.0, seed=1) == {}
    histories = s2t.with_histories(plan, clips, share=1.0, seed=1)
    assert len(histories) > len(plan) // 2
    for rendition in plan:
        for turn in histories.get(rendition.key, ()):
            assert turn.user != rendition.question.text
            assert turn.assistant in {q.answer for q in clips} - {rendition.question.answer}
