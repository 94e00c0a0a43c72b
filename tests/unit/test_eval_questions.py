"""`echox eval` of the whole model: the questions it synthesizes, the metric arithmetic, the report,
and the command end to end on a random-init model with a stand-in judge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import training.judge
from echox.audio import FloatArray
from echox.cli.main import main
from echox.units.codec import UnitLanguageCodec
from tests.unit.test_evaluate import make_corpus
from training.eval_questions import (
    EvalQuestion,
    TurnResult,
    Verdict,
    conditions,
    eval_questions,
    evaluate_questions,
    mean,
    percentiles,
    question_audio,
    questions_report,
    ratio,
    share,
)
from training.evaluate import format_report
from training.stages.synth import FactBase, load_fact_base

REPO = Path(__file__).resolve().parents[2]
VOICES = {
    "train": ["en-us+m1"],
    "dev": ["en-us+m5", "en+f5"],
    "agent": {"voice": "en-us+f2", "rate_wpm": 150, "pitch": 50},
    "rate_wpm": [130, 190],
    "pitch": [35, 65],
}
FACTS = [
    {"id": "f1", "category": "capital", "slots": {"country": "France"}, "answer": "It is Paris.", "key": ["Paris"]},
    {"id": "f2", "category": "legs", "slots": {"animal": "spider"}, "answer": "Eight legs.", "key": ["eight"]},
]
TEMPLATES = {"capital": ["What is the capital of {country}?"], "legs": ["How many legs does a {animal} have?"]}


def write_fact_base(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    (folder / "templates.json").write_text(json.dumps(TEMPLATES))
    (folder / "voices.json").write_text(json.dumps(VOICES))
    return folder


class WordJudge:
    """Stands in for Whisper: always 'hears' the same words, and counts what it was given."""

    def __init__(self, words: str = "it is paris", cpu_threads: int = 1) -> None:
        self.words = words
        self.clips: list[int] = []

    def transcribe(self, audio_16k: FloatArray) -> str:
        self.clips.append(audio_16k.size)
        return self.words


def turn(text: str, first_cut: int | None = 3, first_audio: float | None = 100.0, samples: int = 16_000) -> TurnResult:
    return TurnResult(
        transcript="what is the capital of france",
        text=text,
        speech=np.zeros(samples, dtype=np.float32),
        first_segment_tokens=first_cut,
        first_text_ms=10.0,
        first_audio_ms=first_audio,
        total_ms=500.0,
        units=((1, 2, 3, 1, 2, 3),),
    )


def test_one_dev_question_per_fact_deterministic_and_covering_the_categories() -> None:
    base = load_fact_base(REPO / "data" / "spoken_qa")
    questions = eval_questions(base, "dev", seed=1234, limit=12)
    assert questions == eval_questions(base, "dev", seed=1234, limit=12)
    assert len({q.fact_id for q in questions}) == 12
    categories = {f["id"]: f["category"] for f in base.facts}
    assert len({categories[q.fact_id] for q in questions}) == min(12, len(set(categories.values())))
    assert {q.voice for q in questions} <= set(base.voices["dev"])
    low, high = base.voices["rate_wpm"]
    assert all(low <= q.rate <= high for q in questions)
    # The clean questions are the synth stage's rendition r0 of the same seed.
    assert all(q.id.startswith(f"q-{q.fact_id}-t") and q.id.endswith("-r0") for q in questions)
    assert len(eval_questions(base, "dev", seed=1234, limit=None)) == len(base.facts)
    assert {q.voice for q in eval_questions(base, "train", 1234, 12)} <= set(base.voices["train"])


def test_conditions_cover_noise_the_extreme_rates_the_phone_band_and_a_pause() -> None:
    found = {c.name: c for c in conditions(VOICES)}
    assert list(found) == ["clean", "noise", "rate_min", "rate_max", "phone", "pause"]
    assert found["noise"].snr_db == 20.0 and found["noise"].rate_wpm is None
    assert (found["rate_min"].rate_wpm, found["rate_max"].rate_wpm) == (130, 190)
    assert found["phone"].phone and not found["clean"].phone and found["pause"].pause_s == 0.5


def test_phone_and_pause_conditions_change_the_audio_as_named() -> None:
    question = eval_questions(FactBase(FACTS, TEMPLATES, VOICES), "dev", seed=7, limit=1)[0]
    clean, phone, pause = (question_audio(question, found, seed=7) for found in
                           (c for c in conditions(VOICES) if c.name in ("clean", "phone", "pause")))
    assert pause.size == clean.size + 8000 and not pause[:8000].any()
    np.testing.assert_array_equal(pause[8000:], clean)
    assert phone.size == clean.size
    band = np.abs(np.fft.rfft(phone))[int(phone.size * 4200 / 16000):]  # above 4.2 kHz: nothing carried
    assert band.max() < 0.01 * np.abs(np.fft.rfft(clean)).max()


def test_question_audio_is_deterministic_with_noise_at_20_db() -> None:
    base = FactBase(FACTS, TEMPLATES, VOICES)
    question = eval_questions(base, "dev", seed=7, limit=1)[0]
    clean, noise, fast = (question_audio(question, c, seed=7) for c in (conditions(VOICES)[i] for i in (0, 1, 3)))
    np.testing.assert_array_equal(noise, question_audio(question, conditions(VOICES)[1], seed=7))
    snr = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean((noise - clean).astype(np.float64) ** 2))
    assert abs(snr - 20.0) < 0.01
    if question.rate < 190:
        assert fast.size < clean.size  # faster speech is shorter


def test_metric_arithmetic() -> None:
    assert percentiles(range(101)) == {"p50": 50.0, "p95": 95.0}
    assert percentiles([50, 10, 40, 20, 30]) == {"p50": 30.0, "p95": 48.0}  # linear: 40 + 0.8 * 10
    assert percentiles([None, 40.0, None, 20.0]) == {"p50": 30.0, "p95": 39.0}
    assert percentiles([None]) == {"p50": None, "p95": None}
    assert share([True, False, True, True]) == 0.75 and share([]) == 0.0
    assert ratio(0.6, 0.8) == pytest.approx(0.75) and ratio(0.5, 0.0) is None
    assert mean([2, None, 4]) == 3.0 and mean([None]) is None


def test_questions_report_reads_s2s_against_the_reference() -> None:
    questions = [EvalQuestion(f"q{i}", f"f{i}", "q?", "a.", ("paris",), "en+f5", 150, 50) for i in range(4)]
    condition_list = conditions(VOICES)[:2]
    verdicts = [
        Verdict(questions[0], "clean", turn("paris", first_cut=2), "paris", s2t=True, s2s=True),
        Verdict(questions[1], "clean", turn("paris", first_cut=4, first_audio=300.0), "rome", s2t=True, s2s=False),
        Verdict(questions[2], "clean", turn("paris", first_cut=None, first_audio=None, samples=0), "", True, False),
        Verdict(questions[3], "clean", turn("rome", first_cut=6, first_audio=200.0), "paris", s2t=False, s2s=True),
        Verdict(questions[0], "noise", turn("rome"), "rome", s2t=False, s2s=False),
    ]
    codec = UnitLanguageCodec.train([[1, 2, 3] * 4], num_units=8, vocab_size=10)
    report = questions_report(verdicts, [True, True, False, False], condition_list, codec)
    clean = report["accuracy"]["clean"]
    assert (clean["s2t"], clean["s2s"], clean["turns"]) == (0.75, 0.5, 4)
    assert report["reference"] == 0.5 and clean["s2s_vs_reference"] == 1.0
    assert report["accuracy"]["noise"] == {
        "label": "noise 20 dB SNR",
        "s2t": 0.0,
        "s2s": 0.0,
        "s2s_vs_reference": 0.0,
        "turns": 1,
    }
    streaming = report["streaming"]
    assert streaming["first_segment_tokens_mean"] == 4.0 and streaming["no_audio"] == 1
    assert streaming["first_audio_ms"] == {"p50": 200.0, "p95": 290.0}
    assert streaming["real_time_factor"] == pytest.approx(4 * 0.5 / 3.0)  # 4 turns of 0.5 s, 3 s of speech
    assert streaming["compression_generated"] == codec.compression_ratio([(1, 2, 3, 1, 2, 3)] * 4) > 1.0
    assert [(m["id"], m["condition"]) for m in report["misses"]] == [
        ("q1", "clean"),
        ("q2", "clean"),
        ("q3", "clean"),
        ("q0", "noise"),
    ]


def test_evaluate_questions_judges_references_and_every_condition() -> None:
    base = FactBase(FACTS, TEMPLATES, VOICES)
    questions = eval_questions(base, "dev", seed=3, limit=2)
    heard: list[int] = []

    def paris_turns(audio: FloatArray) -> TurnResult:
        heard.append(audio.size)
        return turn("The capital is Paris.")

    judge, ticks = WordJudge("paris"), []
    report = evaluate_questions(
        paris_turns, judge, questions, VOICES, UnitLanguageCodec.identity(8), 3, lambda: ticks.append(1)
    )
    assert len(heard) == 2 * 6 and len(judge.clips) == 2 + 2 * 6 and len(ticks) == 2 + 2 * 6  # 6 conditions
    assert report["reference"] == 0.5  # f1's key is heard, f2's "eight" is not
    for figures in report["accuracy"].values():
        assert (figures["s2t"], figures["s2s"], figures["s2s_vs_reference"]) == (0.5, 0.5, 1.0)
    assert report["streaming"]["compression_generated"] == 1.0  # the identity codec


def test_eval_command_end_to_end_on_a_random_init_model(
    micro_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    make_corpus(run)
    (run / "recipe.json").write_text(json.dumps({"recipe": "x", "facts": str(write_fact_base(tmp_path / "facts"))}))
    judges: list[WordJudge] = []

    def new_judge(cpu_threads: int) -> WordJudge:
        judges.append(WordJudge(cpu_threads=cpu_threads))
        return judges[-1]

    monkeypatch.setattr(training.judge, "Judge", new_judge)
    argv = ["eval", "--model", str(micro_model_dir), "--run", str(run), "--limit", "2", "--threads", "1", "--json"]
    assert main([*argv, "--samples", str(tmp_path / "samples")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["questions"] == 2 and report["split"] == "dev" and report["reference"] == 0.5
    assert {name: figures["turns"] for name, figures in report["accuracy"].items()} == dict.fromkeys(
        ("clean", "noise", "rate_min", "rate_max", "phone", "pause"), 2
    )
    assert report["accuracy"]["clean"]["s2s"] == 0.5  # the stand-in hears "paris" in every answer
    assert report["streaming"]["compression_held_out"] == 1.0  # the random model's identity codec
    assert report["speaking"]["answers"] == 2 and report["speaking"]["shares"]["original"] == 0.5
    assert len(judges[0].clips) == 2 + 2 * 6 + 2 * 4  # references, turns, speaking half
    assert len(list((tmp_path / "samples").glob("*.clean.wav"))) == 2
    table = format_report(report)
    assert main([*argv, "--limit", "0"]) == 2 and "--limit must be at least 1" in capsys.readouterr().err
    assert "2 dev-voice questions" in table and "noise 20 dB SNR" in table and "rate 190 wpm" in table
    assert "the judge on espeak-ng reference answers (agent voice): 0.500" in table
    assert "speaking half, 2 recorded dev answers" in table and "held-out answers" in table
    assert ("first clean misses" in table) == any(m["condition"] == "clean" for m in report["misses"])


def test_speaking_only_eval_judges_a_run_assembled_from_its_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.unit.test_speak import make_parts

    run = tmp_path / "run"
    make_parts(run)  # lm, t2c, unit_language and vocoder, no listening stages and no model folder
    make_corpus(run)
    facts = str(write_fact_base(tmp_path / "facts"))
    (run / "recipe.json").write_text(json.dumps({"recipe": "x", "preset": "tiny", "facts": facts}))
    judges: list[WordJudge] = []

    def new_judge(cpu_threads: int) -> WordJudge:
        judges.append(WordJudge(cpu_threads=cpu_threads))
        return judges[-1]

    monkeypatch.setattr(training.judge, "Judge", new_judge)
    assert main(["eval", "--speaking-only", "--run", str(run), "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "accuracy" not in report and report["model"] == f"{run} (its parts)"
    assert report["speaking"]["answers"] == 2 and report["speaking"]["shares"]["original"] == 0.5
    assert len(judges[0].clips) == 2 * 4  # the four renderings of each dev answer, no questions
    table = format_report(report)
    assert "speaking half, 2 recorded dev answers" in table and "unit compression" in table
    assert main(["eval", "--speaking-only"]) == 2 and "give --run RUN" in capsys.readouterr().err
