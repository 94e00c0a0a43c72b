"""`echox eval`: how well a model speaks, judged by an ASR the project did not train.

The speaking half (stage II and the vocoder) is measured on the recorded agent answers of a
training run's corpus (`RUN/synth/answers.jsonl`, one split) and their units (`RUN/units/`):
the share of answers whose key words the judge (Whisper tiny.en, `training.judge`) hears in

- `original`: the espeak-ng recording itself (the ceiling the other shares are compared with),
- `resynth`: the model's vocoder speaking the answer's own deduplicated units, durations
  predicted by its duration predictor (what the product path does),
- `resynth_true_durations`: the same with the recorded durations (the vocoder alone),
- `speak`: `echox speak` of the answer text (echo decoder → units → vocoder),

and each share's ratio to `original`. The judge is evaluation only, never in the product path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from echox.errors import EchoXError

if TYPE_CHECKING:  # the model stack loads only when a command runs
    from echox.checkpoint import EchoX
    from training.judge import Judge

SPEAKING_VERSIONS = ("original", "resynth", "resynth_true_durations", "speak")


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


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise EchoXError(f"eval: {path} is missing (run the synth and units stages first)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_answers(run_dir: Path, split: str, facts: Mapping[str, Mapping[str, Any]]) -> list[EvalAnswer]:
    """The `split` answers of a run, joined with their units (ids must match)."""
    units = {row["id"]: row for row in _jsonl(run_dir / "units" / "units.jsonl")}
    answers = []
    for row in _jsonl(run_dir / "synth" / "answers.jsonl"):
        if row["split"] != split:
            continue
        if row["id"] not in units:
            raise EchoXError(f"eval: answer {row['id']} has no units in {run_dir / 'units'}")
        unit_row = units[row["id"]]
        answers.append(
            EvalAnswer(
                id=row["id"],
                fact_id=row["fact_id"],
                text=row["text"],
                keys=tuple(facts[row["fact_id"]]["key"]),
                recording=run_dir / "synth" / row["path"],
                units=tuple(unit_row["units"]),
                durations=tuple(unit_row["durations"]),
            )
        )
    if not answers:
        raise EchoXError(f"eval: no {split!r} answers in {run_dir / 'synth'}")
    return answers


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
    judge: Judge,
    on_each: Callable[[], None] = lambda: None,
    samples_dir: Path | None = None,
) -> dict[str, Any]:
    """Shares heard per version, their ratios to the original, and what the judge heard on misses."""
    from echox.audio import write_wav
    from training.judge import has_key_words

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
    return {"answers": len(answers), "shares": shares, "vs_original": ratios, "misses": misses}


def register_cli(sub: Any) -> None:
    p = sub.add_parser("eval", help="judge how well a model speaks a run's held-out answers")
    p.add_argument("--model", help="model folder (default: the embedded default model)")
    p.add_argument("--run", required=True, help="training run folder whose synth/ and units/ hold the answers")
    p.add_argument("--split", default="dev", choices=("dev", "train"))
    p.add_argument("--limit", type=int, help="judge only the first N answers")
    p.add_argument("--samples", help="write every rendering the judge heard into this folder")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the judge")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from echox.checkpoint import EchoX
    from echox.paths import resolve_model_dir
    from training.judge import Judge, load_facts
    from training.recipe import load_recipe
    from training.runner import RichReporter

    run_dir = Path(args.run)
    facts_dir = _facts_dir(run_dir, load_recipe)
    answers = load_answers(run_dir, args.split, load_facts(facts_dir))[: args.limit]
    echox = EchoX.from_pretrained(resolve_model_dir(args.model))
    judge = Judge(cpu_threads=args.threads)
    with RichReporter() as reporter:
        reporter.start("eval speaking", total=len(answers), unit="answers")
        samples = Path(args.samples) if args.samples else None
        report = speaking_report(echox, answers, judge, lambda: reporter.advance(1), samples)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{len(answers)} {args.split} answers; the judge hears the key words in")
    for name in SPEAKING_VERSIONS:
        share, ratio = report["shares"][name], report["vs_original"][name]
        print(f"  {name:<24} {share:6.3f}   {ratio:6.3f} x original")
    return 0


def _facts_dir(run_dir: Path, load_recipe: Callable[..., Any]) -> Path:
    """The fact base the run was trained on (named in its recipe.json, or by its recipe)."""
    from services.common.settings import get_settings

    recipe_file = run_dir / "recipe.json"
    if not recipe_file.is_file():
        raise EchoXError(f"eval: {run_dir} is not a training run (no recipe.json)")
    written = json.loads(recipe_file.read_text())
    if "facts" in written:
        return Path(written["facts"])
    return Path(load_recipe(written["recipe"], get_settings().data_root).facts)
