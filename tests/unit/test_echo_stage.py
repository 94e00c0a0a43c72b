"""Stage III (echo, echo_gold): targets, the hidden-state pairing, the losses, smoke runs, resume."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from echox.checkpoint import EchoX
from echox.errors import ConfigError
from echox.streaming.stages import AnswerEnd, HiddenSegment, SpeechLLMStage, UnitStage
from echox.tokenizer import byte_level_tokenizer
from echox.units.codec import UnitLanguageCodec
from tests.unit.test_listen_data import FACTS, make_spoken_run, tone
from tests.unit.test_s2t_stage import Recorder, example_of, module_moved
from tests.unit.test_speak import NUM_UNITS, make_parts
from training import speak
from training.assemble import assemble_parts
from training.augment import AugmentSettings
from training.echo_targets import (
    EchoTargetCache,
    FrozenT2C,
    SegmentTarget,
    decode_answers,
    gold_targets,
    predicting_states,
    sentence_spans,
)
from training.jsonl import read_jsonl, write_jsonl
from training.listen_data import Rendition, encode_renditions
from training.stage import DONE_FILE, StageCancelled, StageContext, run_stage
from training.stages import echo
from training.stages.synth import ANSWERS_MANIFEST
from training.stages.t2c import load_text_side, split_sentences
from training.text_data import load_facts

DEV_FACT = "capital-1"  # its recorded answer is held out: the dev questions ask about it
SMOKE: dict[str, Any] = {
    "steps": 4, "batch_size": 2, "warmup": 1, "dev_clips": 2, "eval_every": 2, "checkpoint_every": 2,
    "log_every": 1, "max_decode_tokens": 6, "samples": 0,
}


# --- targets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["Bees make honey. They fly!  Do they sting?", "Pi is 3.14 exactly. Yes.", "One sentence.", "No end", "Hi. "],
)
def test_sentence_spans_cut_where_split_sentences_cuts(text: str) -> None:
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode(text)
    spans = sentence_spans(tokenizer, ids)
    assert [tokenizer.decode(ids[s:e]).strip() for s, e in spans] == split_sentences(text)
    assert spans[0][0] == 0 and spans[-1][1] == len(ids)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("parts")
    make_parts(run)
    return run


def frozen_t2c(run: Path, echox: EchoX) -> FrozenT2C:
    tokenizer, model = echox.tokenizer, echox.model
    table = load_text_side(run / "lm", tokenizer.chat).table
    return FrozenT2C.load(run / "t2c", table, tokenizer, model.t2c_prefix_ids(tokenizer.bos_id),
                          model.t2c_suffix_ids(tokenizer.eos_id))


def test_frozen_t2c_speaks_a_segment_as_echox_speak_does(parts: Path) -> None:
    echox = assemble_parts(parts)
    t2c = frozen_t2c(parts, echox)
    for text in ("The capital of France is Paris.", "They fly!"):
        assert echox.codec.decode(t2c.unit_tokens(text)) == speak.segment_units(echox, text)
    assert not any(p.requires_grad for p in t2c.decoder.parameters())


def test_batched_t2c_speaks_each_text_as_alone(parts: Path) -> None:
    echox = assemble_parts(parts)
    t2c = frozen_t2c(parts, echox)
    texts = ["Hi.", "The capital of France is Paris.", "Snow is white!"]
    assert t2c.unit_tokens_batch(texts) == [t2c.unit_tokens(text) for text in texts]
    cache = EchoTargetCache(t2c)
    cache.prefetch(["Bees make honey. They fly!", "Hi."])
    assert cache.spoken == {t: t2c.unit_tokens(t) for t in ("Bees make honey.", "They fly!", "Hi.")}
    assert cache.generated == 3


class CountingT2C(FrozenT2C):
    """A T2C stand-in whose 'units' spell the text's length; counts what it is asked to speak."""

    def __init__(self) -> None:
        self.tokenizer = byte_level_tokenizer()
        self.asked: list[str] = []

    def unit_tokens(self, text: str) -> tuple[int, ...]:
        self.asked.append(text)
        return (len(text) % 7, 1)


def test_echo_targets_are_reused_while_the_answer_is_unchanged(tmp_path: Path) -> None:
    t2c = CountingT2C()
    cache = EchoTargetCache(t2c)
    answer = t2c.tokenizer.encode("Bees make honey. They fly!")
    first = cache.targets("q1", answer)
    assert [(t.start, t.end) for t in first] == sentence_spans(t2c.tokenizer, answer)
    assert t2c.asked == ["Bees make honey.", "They fly!"]
    assert cache.targets("q1", answer) is first  # unchanged answer: nothing regenerated
    cache.targets("q2", answer)  # another example, same sentences: spoken once only
    changed = t2c.tokenizer.encode("Bees make honey. They sting!")
    assert cache.targets("q1", changed)[0].unit_tokens == first[0].unit_tokens
    assert t2c.asked == ["Bees make honey.", "They fly!", "They sting!"]
    assert cache.figures() == {"targets_generated": 3, "targets_reused": 1, "targets_refreshed": 3}
    cache.save(tmp_path / "spoken.jsonl")
    restored = EchoTargetCache(CountingT2C(), EchoTargetCache.read(tmp_path / "spoken.jsonl"))
    assert restored.targets("q1", changed) == cache.targets("q1", changed)
    assert restored.generated == 0


def test_gold_targets_are_per_sentence_only_when_every_sentence_was_rendered() -> None:
    tokenizer = byte_level_tokenizer()
    codec = UnitLanguageCodec.identity(NUM_UNITS)
    ids = tokenizer.encode("Bees make honey. They fly!")
    whole = [1, 2, 3, 4, 5]
    pieces = {"Bees make honey.": [1, 2], "They fly!": [4, 5]}
    spans = sentence_spans(tokenizer, ids)
    assert gold_targets(tokenizer, codec, ids, whole, pieces) == [
        SegmentTarget(*spans[0], (1, 2)), SegmentTarget(*spans[1], (4, 5))
    ]
    assert gold_targets(tokenizer, codec, ids, whole, {"They fly!": [4, 5]}) == [
        SegmentTarget(0, len(ids), tuple(whole))
    ]


def test_denoise_weight_caps_the_denoising_term() -> None:
    ce = torch.tensor(2.0, requires_grad=True)
    denoise = torch.tensor(4.0, requires_grad=True)
    weight = echo.denoise_weight(ce, denoise, 0.2)
    assert float(weight) == pytest.approx(0.1) and not weight.requires_grad  # 0.2 · 2 / 4
    assert float(weight * denoise.detach()) == pytest.approx(0.2 * 2.0)  # the term is ratio × CE at most
    assert float(echo.denoise_weight(ce, torch.tensor(0.1), 0.2)) == 1.0  # min(1, 4)


# --- pairing and layout against inference --------------------------------------------------


def test_each_token_is_paired_with_the_hidden_state_that_predicted_it(micro_echox: EchoX) -> None:
    """The decoded answers and the hidden states training pairs with them are the tokens and the
    hidden states inference produces (batched decoding with left padding included)."""
    micro_echox.model.eval()
    audios = [tone(1.1, 330.0, 0.3), tone(0.6, 520.0, 0.2)]
    stage = SpeechLLMStage(micro_echox)
    examples = [example_of(micro_echox, audio, [70], f"c{i}") for i, audio in enumerate(audios)]
    tokenizer = micro_echox.tokenizer
    layout = echo.Layout(tokenizer.audio_patch_id, tokenizer.eos_id, [tokenizer.bos_id], [tokenizer.eos_id])
    decoded = decode_answers(micro_echox.model, examples, layout.patch_id, layout.eos_id, 24)
    with torch.no_grad():
        passes = echo.run_passes(micro_echox.model, examples, decoded, layout)
    for row, audio in enumerate(audios):
        outputs = list(stage.run(audio))
        answer = next(o for o in outputs if isinstance(o, AnswerEnd))
        assert decoded[row] == list(answer.token_ids) and len(decoded[row]) >= 2
        forward, at = passes.forwards[row]
        assert forward is not passes.gold  # the decoded answer is not the gold one: a second pass
        for segment in (o for o in outputs if isinstance(o, HiddenSegment)):
            states = predicting_states(forward, at, segment.start, segment.start + len(segment.token_ids))
            torch.testing.assert_close(states, segment.hidden, rtol=1e-4, atol=1e-4)


def test_echo_loss_lays_out_a_segment_as_the_unit_stage(micro_echox: EchoX) -> None:
    """Teacher-forced on what `UnitStage.generate` speaks for some hidden states, the echo loss
    predicts every one of those unit tokens: the same prefix, aligner, separator and shift."""
    model, tokenizer = micro_echox.model, micro_echox.tokenizer
    model.eval()
    torch.manual_seed(1)
    hidden = torch.randn(5, model.config.llm.hidden_size)
    spoken = UnitStage(micro_echox).generate(HiddenSegment(0, 0, (70, 71, 72, 73, 74), "x", hidden))
    assert len(spoken.unit_tokens) >= 2
    segment = echo.EchoSegment(hidden, (70, 71, 72, 73, 74), spoken.unit_tokens)
    with torch.no_grad():
        result = echo.echo_loss(model, [segment], [tokenizer.bos_id], [tokenizer.eos_id], tokenizer.eos_id)
    assert result.count == len(spoken.unit_tokens) + 1  # each unit, then the stop
    assert result.correct >= len(spoken.unit_tokens)  # the stop may be cut by the length limit instead


def test_settings_reject_unknown_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        echo.EchoSettings.from_mapping({"stepz": 3})
    with pytest.raises(ConfigError, match="targets"):
        echo.EchoSettings.from_mapping({"targets": "silver"})
    with pytest.raises(ConfigError, match="augment"):
        echo.EchoSettings.from_mapping({"augment": {"noise": 1}})


# --- the stage -----------------------------------------------------------------------------


def make_echo_run(run: Path, facts_dir: Path) -> None:
    """Parts, spoken questions, the recorded answers (one fact's held out) and their units, and
    an s2t model (the assembled parts)."""
    make_parts(run)
    make_spoken_run(run, facts_dir)
    answers, units = [], []
    for i, fact in enumerate(FACTS):
        split = "dev" if fact["id"] == DEV_FACT else "train"
        answers.append({"id": f"a-{fact['id']}", "fact_id": fact["id"], "split": split, "voice": "f2", "rate": 150,
                        "pitch": 50, "text": fact["answer"], "path": "x.wav", "seconds": 1.0})
        units.append({"id": f"a-{fact['id']}", "fact_id": fact["id"], "split": split,
                      "units": [(3 * i + k) % NUM_UNITS for k in range(12)], "durations": [2] * 12})
    (run / "synth" / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    (run / "units").mkdir()
    (run / "units" / "units.jsonl").write_text("".join(json.dumps(u) + "\n" for u in units))
    (run / "units" / DONE_FILE).write_text("{}\n")
    assemble_parts(run, seed=3).save_pretrained(run / "s2t" / "model")
    (run / "s2t" / DONE_FILE).write_text("{}\n")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    make_echo_run(tmp_path / "run", tmp_path / "facts")
    return tmp_path / "run"


def context(run: Path, stage: str, settings: dict[str, Any], reporter: Recorder | None = None) -> StageContext:
    return StageContext(run_dir=run, stage=stage, settings=settings, facts=run.parent / "facts", seed=3,
                        reporter=reporter or Recorder())


@pytest.mark.parametrize(("stage", "targets"), [("echo", "echo"), ("echo_gold", "gold")])
def test_smoke_run_trains_the_speaking_side_and_writes_a_model(run_dir: Path, stage: str, targets: str) -> None:
    settings = {**SMOKE, "targets": targets, "samples": 1 if targets == "gold" else 0}
    result = run_stage(echo.run, context(run_dir, stage, settings))
    out = run_dir / stage
    assert (out / DONE_FILE).is_file() and result["steps"] == 4 and result["targets"] == targets
    assert result["train_questions"] == 2 and result["dev_questions"] == 2
    trained, start = EchoX.from_pretrained(out / "model"), EchoX.from_pretrained(run_dir / "s2t" / "model")
    for name, should_change in (("echo_decoder", True), ("aligner", True), ("llm", True),
                                ("speech_encoder", False), ("vocoder", False)):
        assert module_moved(start, trained, name) == should_change, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"loss", "ce_units", "unit_accuracy", "denoise", "denoise_weight", "ce_answer", "ctc",
            "dev_echo_ce", "dev_gold_unit_accuracy", "dev_s2t_accuracy"} <= set(metrics["curves"])
    assert all(0.0 < w <= 1.0 for _, w in metrics["curves"]["denoise_weight"])
    assert (out / "loss.png").is_file()
    if targets == "echo":
        assert result["targets_generated"] >= 1 and result["targets_reused"] >= 1  # both examples, every step
        assert (out / echo.TARGETS_FILE).read_text().strip()
    else:
        assert result["targets_refreshed"] == 0  # gold training never asks the T2C (dev figures aside)
        index = json.loads((out / "samples" / "index.json").read_text())
        assert len(index) == 1 and (out / "samples" / f"{index[0]['id']}.wav").is_file()


def test_a_frozen_decoder_stays_as_stage_two_left_it_while_the_aligner_learns(run_dir: Path) -> None:
    run_stage(echo.run, context(run_dir, "echo", {**SMOKE, "train_decoder": False, "samples": 0}))
    trained, start = EchoX.from_pretrained(run_dir / "echo" / "model"), EchoX.from_pretrained(run_dir / "s2t" / "model")
    for name, should_change in (("echo_decoder", False), ("aligner", True)):
        assert module_moved(start, trained, name) == should_change, name


@pytest.mark.parametrize("which", ["train", "all"])
def test_facts_all_also_trains_on_the_questions_whose_recorded_answer_is_held_out(run_dir: Path, which: str) -> None:
    ctx = context(run_dir, "echo", SMOKE)
    facts = {fact.id: fact for fact in load_facts(ctx.facts)}
    train, dev = echo.renditions(ctx, facts, echo.EchoSettings.from_mapping({**SMOKE, "facts": which}))
    trained_facts = {r.question.fact_id for r in train}
    assert (DEV_FACT in trained_facts) == (which == "all") and len(trained_facts) >= 2
    assert dev and {r.question.fact_id for r in dev} == {DEV_FACT}  # dev: held-out answers, dev voices, either way
    assert all(r.question.voice not in {d.question.voice for d in dev} for r in train)


def test_a_run_that_holds_no_answer_out_monitors_on_dev_voice_questions_about_any_fact(run_dir: Path) -> None:
    manifest = run_dir / "synth" / ANSWERS_MANIFEST
    rows = [{**row, "split": "train"} for row in read_jsonl(manifest)]  # as synth writes at answer_dev_share 0
    write_jsonl(manifest, rows)
    settings = {**SMOKE, "dev_clips": 50}
    ctx = context(run_dir, "echo", settings)
    facts = {fact.id: fact for fact in load_facts(ctx.facts)}
    train, dev = echo.renditions(ctx, facts, echo.EchoSettings.from_mapping(settings))
    assert DEV_FACT in {r.question.fact_id for r in train}
    assert len({r.question.fact_id for r in dev}) >= 2
    assert all(r.question.voice not in {d.question.voice for d in dev} for r in train)


@pytest.mark.parametrize("same_encoder", [True, False])
def test_the_s2t_stage_cached_states_are_reused_when_its_encoder_is_this_one(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, same_encoder: bool
) -> None:
    ctx = context(run_dir, "echo", SMOKE)
    settings = echo.EchoSettings.from_mapping(SMOKE)
    facts = {fact.id: fact for fact in load_facts(ctx.facts)}
    plan, dev_plan = echo.renditions(ctx, facts, settings)
    echox = EchoX.from_pretrained(run_dir / "s2t" / "model")
    written = encode_renditions(echox.model, plan, AugmentSettings(), 3, run_dir / "s2t" / "encoded")
    if not same_encoder:
        torch.nn.init.normal_(echox.model.speech_encoder.whisper.conv1.weight)
    encoded: list[str] = []
    real = echo.encode_shared

    def spy(parallel: Any, model: Any, wanted: list[Rendition], *args: Any) -> dict[str, torch.Tensor]:
        encoded.extend(r.key for r in wanted)
        return real(parallel, model, wanted, *args)

    monkeypatch.setattr(echo, "encode_shared", spy)
    train, dev = echo.spoken_examples(ctx, settings, echox, plan, dev_plan)
    assert [e.key for e in train] == [r.key for r in plan] and len(dev) == len(dev_plan)
    if same_encoder:
        assert encoded == [r.key for r in dev_plan]  # only what s2t did not encode
        assert all(torch.equal(e.states, written[e.key]) for e in train)
    else:
        assert encoded == [r.key for r in [*plan, *dev_plan]]  # a stale cache is never read


def test_cancel_then_resume_continues_from_the_checkpoint(run_dir: Path) -> None:
    cancel = threading.Event()
    reporter = Recorder(cancel, cancel_after=2)
    ctx = context(run_dir, "echo", SMOKE, reporter)
    ctx.cancel = cancel
    with pytest.raises(StageCancelled):
        run_stage(echo.run, ctx)
    assert not (run_dir / "echo" / DONE_FILE).exists()
    assert json.loads((run_dir / "echo" / "checkpoint" / "state.json").read_text())["step"] == 2
    again = Recorder()
    result = run_stage(echo.run, context(run_dir, "echo", SMOKE, again))
    assert result["steps"] == 4
    assert sum(steps for steps, metrics in again.advances if "loss" in metrics) == 2


def test_time_limit_stops_training_early(run_dir: Path) -> None:
    result = run_stage(echo.run, context(run_dir, "echo", {**SMOKE, "max_minutes": 1e-6}))
    assert result["steps"] == 1 and result["stopped_by_time"]
