"""`echox eval`: how well a model answers and speaks, judged by an ASR the project did not train.

The whole model is measured on spoken questions it synthesizes itself (training/eval_questions.py:
S2T and S2S accuracy, clean, in noise, at the extreme speaking rates, over the phone band and
after a pause, against the judge's share on reference answers; streaming figures). With `--run`,
the speaking half (stage II and the vocoder) is also measured on the recorded agent answers of a
training run's corpus (`RUN/synth/answers.jsonl`, one split) and their units (`RUN/units/`): the
share of answers whose key words the judge (Whisper tiny.en, `training.judge`) hears in

- `original`: the espeak-ng recording itself (the ceiling the other shares are compared with),
- `resynth`: the model's vocoder speaking the answer's own deduplicated units, durations
  predicted by its duration predictor (what the product path does),
- `resynth_true_durations`: the same with the recorded durations (the vocoder alone),
- `speak`: `echox speak` of the answer text (echo decoder → units → vocoder),

and each share's ratio to `original`. 49 answers make one answer 0.02, too coarse to compare two
T2Cs, so `speak` is also judged on the answers with their key words swapped for other facts'
("The capital of Italy is Cairo.", `--speak-swaps` per answer, never a text the T2C trained on):
about 100 more held-out texts, reported beside the answers' share and pooled with it. The judge is
evaluation only, never in the product path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from echox.errors import EchoXError
from training.jsonl import read_jsonl

if TYPE_CHECKING:  # the model stack loads only when a command runs
    from echox.checkpoint import EchoX

SPEAKING_VERSIONS = ("original", "resynth", "resynth_true_durations", "speak")
DEFAULT_QUESTIONS = 45  # one per fact, 5 per category: about 3 minutes on two idle CPU cores
MISSES_SHOWN = 3  # in the table; --json lists them all


class Listener(Protocol):
    """What the evaluation needs of the judge (training.judge.Judge, or a stand-in in tests)."""

    def transcribe(self, audio_16k: npt.NDArray[np.float32]) -> str: ...


@dataclasses.dataclass(frozen=True)
class EvalAnswer:
    """One recorded agent answer with its key words and units."""

    id: str
    fact_id: str
    text: str
    keys: tuple[str, ...]
    recording: Path
    units: tuple[int, ...]  # deduplicated
    durations: tuple[int, ...]


def load_answers(run_dir: Path, split: str, facts: Mapping[str, Mapping[str, Any]]) -> list[EvalAnswer]:
    """The `split` answers of a run, with their units."""
    from training.stages.units import answers_with_units

    answers = [
        EvalAnswer(
            id=row["id"],
            fact_id=row["fact_id"],
            text=row["text"],
            keys=tuple(facts[row["fact_id"]]["key"]),
            recording=run_dir / "synth" / row["path"],
            units=tuple(unit_row["units"]),
            durations=tuple(unit_row["durations"]),
        )
        for row, unit_row in answers_with_units(run_dir / "synth", run_dir / "units", "eval")
        if row["split"] == split
    ]
    if not answers:
        raise EchoXError(
            f"eval: no {split!r} answers in {run_dir / 'synth'}: the run holds no answer out (synth's "
            "answer_dev_share 0); judge the speaking half on a run that does"
        )
    return answers


@dataclasses.dataclass(frozen=True)
class SwappedText:
    """A held-out answer with its key words swapped for another fact's: a text for `speak` only."""

    text: str
    keys: tuple[str, ...]  # the other fact's, which the judge must hear
    answer_id: str  # the answer it was made from


def swapped_texts(
    run_dir: Path, answers: Sequence[EvalAnswer], facts: Sequence[Mapping[str, Any]], per_answer: int, seed: int
) -> list[SwappedText]:
    """Each answer with its key words swapped for those of up to `per_answer` other facts of its
    category, never a text the run's T2C trained on (its rendered pieces, the train answers), and
    only where the swap put the other fact's key words in. Deterministic for a seed."""
    from training.judge import has_key_words
    from training.stages.synth import ANSWERS_MANIFEST
    from training.stages.t2c import PIECES_FILE, swap_words

    trained = {row["text"] for row in read_jsonl(run_dir / "synth" / ANSWERS_MANIFEST) if row["split"] == "train"}
    trained |= {row["text"] for row in read_jsonl(run_dir / "t2c" / PIECES_FILE, missing_ok=True)}
    by_id = {fact["id"]: fact for fact in facts}
    by_category: dict[str, list[Mapping[str, Any]]] = {}
    for fact in facts:
        by_category.setdefault(fact["category"], []).append(fact)
    rng, out = random.Random(seed), list[SwappedText]()
    for answer in answers:
        category = by_id[answer.fact_id]["category"]
        others = [f for f in by_category[category] if f["id"] != answer.fact_id]
        for other in rng.sample(others, min(per_answer, len(others))):
            text = swap_words(answer.text, answer.keys, other["key"])
            if text != answer.text and text not in trained and has_key_words(text, other["key"]):
                out.append(SwappedText(text, tuple(other["key"]), answer.id))
    return out


def speaking_versions(echox: EchoX, answer: EvalAnswer) -> dict[str, npt.NDArray[np.float32]]:
    """The four renderings of one answer that the judge listens to (16 kHz float32)."""
    import torch

    from echox.audio import read_wav
    from training.speak import speak_text

    vocoder = echox.model.vocoder
    units = torch.tensor(answer.units)

    def as_array(audio: torch.Tensor) -> npt.NDArray[np.float32]:
        return audio.float().cpu().numpy().astype(np.float32)

    return {
        "original": read_wav(answer.recording),
        "resynth": as_array(vocoder.synthesize(units)),
        "resynth_true_durations": as_array(vocoder.synthesize(units, torch.tensor(answer.durations))),
        "speak": speak_text(echox, answer.text),
    }


def speaking_report(
    echox: EchoX,
    answers: Sequence[EvalAnswer],
    judge: Listener,
    on_each: Callable[[], None] = lambda: None,
    samples_dir: Path | None = None,
    swapped: Sequence[SwappedText] = (),
) -> dict[str, Any]:
    """Shares heard per version, their ratios to the original, and what the judge heard on misses;
    with `swapped`, `speak` of those texts too, alone and pooled with the answers'."""
    from echox.audio import write_wav
    from training.judge import has_key_words
    from training.speak import speak_text

    heard = dict.fromkeys(SPEAKING_VERSIONS, 0)
    misses: dict[str, list[dict[str, str]]] = {name: [] for name in SPEAKING_VERSIONS}
    for answer in answers:
        for name, audio in speaking_versions(echox, answer).items():
            transcript = judge.transcribe(audio)
            if has_key_words(transcript, answer.keys):
                heard[name] += 1
            else:
                misses[name].append({"id": answer.id, "text": answer.text, "heard": transcript})
            if samples_dir is not None and name != "original":
                write_wav(samples_dir / f"{answer.id}.{name}.wav", audio)
        on_each()
    shares = {name: heard[name] / len(answers) for name in SPEAKING_VERSIONS}
    ratios = {name: shares[name] / shares["original"] if shares["original"] else 0.0 for name in SPEAKING_VERSIONS}
    report: dict[str, Any] = {"answers": len(answers), "shares": shares, "vs_original": ratios, "misses": misses}
    if swapped:
        swapped_misses = []
        for item in swapped:
            transcript = judge.transcribe(speak_text(echox, item.text))
            if not has_key_words(transcript, item.keys):
                swapped_misses.append({"id": item.answer_id, "text": item.text, "heard": transcript})
            on_each()
        swapped_heard = len(swapped) - len(swapped_misses)
        report["swapped"] = {
            "texts": len(swapped),
            "speak": swapped_heard / len(swapped),
            "speak_pooled": (heard["speak"] + swapped_heard) / (len(answers) + len(swapped)),
            "misses": swapped_misses,
        }
    return report


def register_cli(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a model on spoken questions: S2T, S2S, streaming figures, robustness")
    p.add_argument("--model", help="model folder (default: the embedded default model)")
    p.add_argument("--split", default="dev", choices=("dev", "train"), help="voices of the questions (default: dev)")
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_QUESTIONS,
        help=f"questions, one per fact (default: {DEFAULT_QUESTIONS}); the speaking half judges every run answer",
    )
    p.add_argument("--seed", type=int, default=1234, help="seed of the question draws and the noise (default: 1234)")
    p.add_argument("--facts", help="fact base folder (default: the run's with --run, else the tiny recipe's)")
    p.add_argument("--run", help="training run folder: also judge the speaking half on its held-out answers")
    p.add_argument(
        "--speaking-only",
        action="store_true",
        help="judge only the speaking half on --run's held-out answers (no questions); without --model the "
        "run's finished parts (lm, t2c, unit_language, vocoder) are assembled",
    )
    p.add_argument(
        "--speak-swaps",
        type=int,
        default=3,
        help="with --run: also judge `speak` of each answer with its key words swapped for up to N other "
        "facts' (default: 3; 0: none)",
    )
    p.add_argument("--samples", help="write every spoken answer the judge heard into this folder")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the model and of the judge (default: 2)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from training.eval_questions import PipelineTurns, conditions, eval_questions, evaluate_questions
    from training.judge import Judge
    from training.runner import RichReporter
    from training.stages.synth import load_fact_base

    if args.limit < 1:
        raise EchoXError(f"eval: --limit must be at least 1, got {args.limit}")
    if args.speak_swaps < 0:
        raise EchoXError(f"eval: --speak-swaps must be 0 or more, got {args.speak_swaps}")
    run_dir = Path(args.run) if args.run else None
    if args.speaking_only and run_dir is None:
        raise EchoXError("eval: --speaking-only judges a training run's held-out answers; give --run RUN")
    torch.set_num_threads(args.threads)
    base = load_fact_base(_facts_dir(run_dir, args.facts))
    questions = [] if args.speaking_only else eval_questions(base, args.split, args.seed, args.limit)
    answers = load_answers(run_dir, args.split, {f["id"]: f for f in base.facts}) if run_dir else []
    swapped = swapped_texts(run_dir, answers, base.facts, args.speak_swaps, args.seed) if run_dir else []
    echox, model_name = _load_model(args.model, run_dir if args.speaking_only else None)
    judge = Judge(cpu_threads=args.threads)
    samples = Path(args.samples) if args.samples else None
    if samples is not None:
        samples.mkdir(parents=True, exist_ok=True)
    total = len(questions) * (len(conditions(base.voices)) + 1) + len(answers) + len(swapped)
    started = time.perf_counter()
    with RichReporter() as reporter:
        reporter.start("eval", total=total, unit="turns")
        tick = lambda: reporter.advance(1)  # noqa: E731 - one callback for every kind of work
        report: dict[str, Any] = {"streaming": {}}
        if questions:
            turns = PipelineTurns(echox)
            report = evaluate_questions(turns, judge, questions, base.voices, echox.codec, args.seed, tick, samples)
        if run_dir is not None:
            report["speaking"] = speaking_report(echox, answers, judge, tick, samples, swapped)  # the whole split
            report["streaming"]["compression_held_out"] = echox.codec.compression_ratio(a.units for a in answers)
    report.update(model=model_name, split=args.split, seed=args.seed, run=str(run_dir) if run_dir else None)
    report["seconds"] = round(time.perf_counter() - started, 1)  # judging included, loading not
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _load_model(model: str | None, parts_of: Path | None) -> tuple[EchoX, str]:
    """The model to evaluate and its name: the `model` folder (default: the embedded default),
    or, with `parts_of` and no `model`, that run's finished parts assembled in memory."""
    from echox.checkpoint import EchoX
    from echox.paths import resolve_model_dir
    from training.assemble import assemble_parts

    if parts_of is not None and model is None:
        return assemble_parts(parts_of, preset=_run_recipe(parts_of).get("preset", "tiny")), f"{parts_of} (its parts)"
    model_dir = resolve_model_dir(model)
    return EchoX.from_pretrained(model_dir), str(model_dir)


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a readable table (the speaking half alone with --speaking-only)."""
    header = f"model {report['model']}, {report['seconds']:.0f} s"
    lines = _questions_table(report) if "accuracy" in report else [header]
    if "speaking" in report:
        speaking = report["speaking"]
        lines.append(f"speaking half, {speaking['answers']} recorded {report['split']} answers of {report['run']}:")
        for name in SPEAKING_VERSIONS:
            lines.append(
                f"  {name:<24} {speaking['shares'][name]:6.3f}   {speaking['vs_original'][name]:6.3f} x original"
            )
        if "swapped" in speaking:
            swaps = speaking["swapped"]
            lines.append(
                f"  {'speak, key words swapped':<24} {swaps['speak']:6.3f}   ({swaps['texts']} more held-out texts; "
                f"with the answers {swaps['speak_pooled']:.3f})"
            )
        if "accuracy" not in report:
            lines.append(f"  unit compression: {report['streaming']['compression_held_out']:.3f} units per token")
    clean_misses = [m for m in report.get("misses", []) if m["condition"] == "clean"][:MISSES_SHOWN]
    if clean_misses:
        lines.append("first clean misses (all in --json): question | heard | answer | the judge heard")
        lines += [f"  {m['question']} | {m['heard']!r} | {m['text']!r} | {m['judge_heard']!r}" for m in clean_misses]
    return "\n".join(lines)


def _questions_table(report: Mapping[str, Any]) -> list[str]:
    lines = [
        f"{report['questions']} {report['split']}-voice questions (one per fact, seed {report['seed']}), "
        f"model {report['model']}, {report['seconds']:.0f} s",
        f"  {'condition':<20} {'S2T':>6} {'S2S':>6} {'S2S/ref':>8}",
    ]
    for figures in report["accuracy"].values():
        versus = _figure(figures["s2s_vs_reference"], "{:8.3f}")
        lines.append(f"  {figures['label']:<20} {figures['s2t']:6.3f} {figures['s2s']:6.3f} {versus:>8}")
    streaming = report["streaming"]
    return [
        *lines,
        f"  the judge on espeak-ng reference answers (agent voice): {report['reference']:.3f}",
        f"  tokens before the first segment cut: {_figure(streaming['first_segment_tokens_mean'], '{:.1f}')} (mean)",
        f"  time to first text:  p50 {_ms(streaming['first_text_ms']['p50'])}, "
        f"p95 {_ms(streaming['first_text_ms']['p95'])}",
        f"  time to first audio: p50 {_ms(streaming['first_audio_ms']['p50'])}, "
        f"p95 {_ms(streaming['first_audio_ms']['p95'])} ({streaming['no_audio']} turns without audio)",
        f"  real-time factor: {_figure(streaming['real_time_factor'], '{:.3f}')} (compute / speech seconds)",
        f"  unit compression: {_figure(streaming['compression_generated'], '{:.3f}')} units per token (generated)"
        + (
            f", {streaming['compression_held_out']:.3f} (the run's held-out answers)"
            if "compression_held_out" in streaming
            else ""
        ),
    ]


def _figure(value: float | None, spec: str) -> str:
    return "n/a" if value is None else spec.format(value)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _facts_dir(run_dir: Path | None, facts: str | None) -> Path:
    """The fact base: --facts, else the one the run was trained on, else the tiny recipe's."""
    from services.common.settings import get_settings
    from training.recipe import load_recipe

    if facts:
        return Path(facts)
    if run_dir is None:
        return Path(load_recipe("tiny", get_settings().data_root).facts)
    written = _run_recipe(run_dir)
    if "facts" in written:
        return Path(written["facts"])
    return Path(load_recipe(written["recipe"], get_settings().data_root).facts)


def _run_recipe(run_dir: Path) -> dict[str, Any]:
    """What the runner wrote of the recipe into the run (`RUN/recipe.json`)."""
    recipe_file = run_dir / "recipe.json"
    if not recipe_file.is_file():
        raise EchoXError(f"eval: {run_dir} is not a training run (no recipe.json)")
    return dict(json.loads(recipe_file.read_text()))
