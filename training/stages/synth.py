"""Stage `synth`: the spoken SpokenQA-mini corpus, rendered with espeak-ng at 16 kHz.

Questions: every fact × its category's templates × every train and dev voice × `renditions`
draws of speaking rate and pitch inside the ranges of voices.json. templates.json is not split,
so the split of a question follows its VOICE (train voices → "train", dev voices → "dev").
Answers: every fact's answer in the agent voice at its exact rate and pitch; the answer split is
a fixed ~15 % of the facts per category ("dev"), held out for unit-language compression and
intelligibility — every fact stays known to the model.

Output (`RUN/synth/`): `questions.jsonl`, `answers.jsonl` (one object a line: id, fact_id, split,
voice, rate, pitch, text, path relative to the folder, seconds) and the WAVs under `audio/`.
The same seed gives byte-identical manifests and audio: each file's rate and pitch come from a
generator seeded by (seed, file id), never from the order of work. Files are written atomically,
so a restart keeps everything already rendered; the manifests are written at the end. No
augmentation is baked in: noise, gain and speed are applied at training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf

from echox.audio import SAMPLE_RATE, write_wav
from echox.errors import EchoXError
from echox.espeak import espeak_available, speak
from training.jsonl import read_jsonl

if TYPE_CHECKING:
    from training.stage import Reporter, StageContext

QUESTIONS_MANIFEST = "questions.jsonl"
ANSWERS_MANIFEST = "answers.jsonl"
AUDIO_DIR = "audio"
DEFAULT_RENDITIONS = 2
DEFAULT_ANSWER_DEV_SHARE = 0.15
BATCH_SIZE = 48  # files per pool task: cancellation is checked between batches


@dataclasses.dataclass(frozen=True)
class Rendition:
    """One WAV of the corpus and its manifest line (the field order is the manifest's)."""

    id: str
    fact_id: str
    split: str
    voice: str
    rate: int
    pitch: int
    text: str
    path: str  # relative to the corpus folder

    def manifest_line(self, seconds: float) -> str:
        return json.dumps({**dataclasses.asdict(self), "seconds": seconds}, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class FactBase:
    facts: list[dict[str, Any]]
    templates: dict[str, list[str]]
    voices: dict[str, Any]


def load_fact_base(facts_dir: Path) -> FactBase:
    """Reads facts.jsonl, templates.json and voices.json, with a clear error when one is missing."""
    paths = {name: facts_dir / name for name in ("facts.jsonl", "templates.json", "voices.json")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise EchoXError(f"the fact base is incomplete, missing: {', '.join(missing)}")
    facts = read_jsonl(paths["facts.jsonl"])
    templates = json.loads(paths["templates.json"].read_text())
    voices = json.loads(paths["voices.json"].read_text())
    unknown = sorted({f["category"] for f in facts} - set(templates))
    if unknown:
        raise EchoXError(f"templates.json has no templates for categories {unknown}")
    return FactBase(facts=facts, templates=templates, voices=voices)


def _stable_int(*parts: object) -> int:
    """A process- and platform-independent hash (Python's hash() is salted per process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _slug(voice: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", voice).strip("-")


def limit_facts(facts: Sequence[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` facts taking the categories in turn, so a small run still covers them all."""
    if limit is None or limit >= len(facts):
        return list(facts)
    seen: dict[str, int] = {}
    ranked = []
    for order, fact in enumerate(facts):
        index_in_category = seen.get(fact["category"], 0)
        seen[fact["category"]] = index_in_category + 1
        ranked.append((index_in_category, order, fact))
    ranked.sort(key=lambda item: (item[0], item[1]))
    return [fact for _, _, fact in ranked[: max(limit, 0)]]


def dev_answer_facts(facts: Sequence[dict[str, Any]], share: float = DEFAULT_ANSWER_DEV_SHARE) -> set[str]:
    """A fixed held-out share of each category (at least one fact each), independent of the seed."""
    by_category: dict[str, list[str]] = {}
    for fact in facts:
        by_category.setdefault(fact["category"], []).append(fact["id"])
    chosen: set[str] = set()
    for ids in by_category.values():
        count = max(1, round(share * len(ids))) if share > 0 else 0
        chosen.update(sorted(ids, key=lambda fact_id: _stable_int("answer-dev", fact_id))[:count])
    return chosen


def question_renditions(base: FactBase, facts: Sequence[dict[str, Any]], seed: int, renditions: int) -> list[Rendition]:
    """Every fact × template × voice × rendition, rate and pitch drawn per file from (seed, id)."""
    voice_splits = [(voice, "train") for voice in base.voices["train"]] + [(v, "dev") for v in base.voices["dev"]]
    rate_low, rate_high = (int(x) for x in base.voices["rate_wpm"])
    pitch_low, pitch_high = (int(x) for x in base.voices["pitch"])
    out = []
    for fact in facts:
        for t_index, template in enumerate(base.templates[fact["category"]]):
            text = template.format(**fact["slots"])
            for voice, split in voice_splits:
                for r_index in range(renditions):
                    file_id = f"q-{fact['id']}-t{t_index}-{_slug(voice)}-r{r_index}"
                    rng = np.random.default_rng(_stable_int(seed, file_id))
                    out.append(
                        Rendition(
                            id=file_id,
                            fact_id=fact["id"],
                            split=split,
                            voice=voice,
                            rate=int(rng.integers(rate_low, rate_high + 1)),
                            pitch=int(rng.integers(pitch_low, pitch_high + 1)),
                            text=text,
                            path=f"{AUDIO_DIR}/questions/{_slug(voice)}/{file_id}.wav",
                        )
                    )
    return out


def answer_renditions(base: FactBase, facts: Sequence[dict[str, Any]], dev_share: float) -> list[Rendition]:
    """Every fact's answer in the agent voice, at the agent's exact rate and pitch."""
    agent = base.voices["agent"]
    dev = dev_answer_facts(base.facts, dev_share)
    return [
        Rendition(
            id=f"a-{fact['id']}",
            fact_id=fact["id"],
            split="dev" if fact["id"] in dev else "train",
            voice=str(agent["voice"]),
            rate=int(agent["rate_wpm"]),
            pitch=int(agent["pitch"]),
            text=fact["answer"],
            path=f"{AUDIO_DIR}/answers/a-{fact['id']}.wav",
        )
        for fact in facts
    ]


def existing_seconds(path: Path) -> float | None:
    """The length of a finished corpus file, or None when it is absent or not 16 kHz mono PCM16."""
    if not path.is_file():
        return None
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError):
        return None
    if info.samplerate != SAMPLE_RATE or info.channels != 1 or info.subtype != "PCM_16" or info.frames <= 0:
        return None
    return _seconds(info.frames)


def _seconds(frames: int) -> float:
    return round(frames / SAMPLE_RATE, 4)


def render_batch(jobs: Sequence[tuple[str, str, int, int, str]]) -> list[float]:
    """Renders (text, voice, rate, pitch, absolute path) jobs; returns each file's seconds.

    Writes to a temporary name and renames, so a file that exists is always whole.
    """
    seconds = []
    for text, voice, rate, pitch, path in jobs:
        audio = speak(text, voice=voice, rate_wpm=rate, pitch=pitch)
        final = Path(path)
        partial = final.with_name(final.stem + ".partial.wav")
        write_wav(partial, audio)
        os.replace(partial, final)
        seconds.append(_seconds(int(audio.size)))
    return seconds


def _batches(items: Sequence[Rendition], size: int) -> Iterator[list[Rendition]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _render_missing(
    todo: Sequence[Rendition], out: Path, workers: int, reporter: Reporter, cancel: Callable[[], None]
) -> dict[str, float]:
    """Renders `todo` on `workers` threads; returns seconds per id. `cancel()` raises to stop.

    Threads, not processes: the work is the espeak-ng child processes (which run on all cores),
    the Python side is a small share; and threads also work inside a Celery prefork worker,
    whose daemonic processes may not start a process pool.
    """
    seconds: dict[str, float] = {}

    def job(batch: list[Rendition]) -> list[tuple[str, str, int, int, str]]:
        return [(r.text, r.voice, r.rate, r.pitch, str(out / r.path)) for r in batch]

    def collect(batch: list[Rendition], result: list[float]) -> None:
        seconds.update(zip((r.id for r in batch), result, strict=True))
        reporter.advance(len(batch))

    batches = list(_batches(todo, BATCH_SIZE))
    if workers <= 1:
        for batch in batches:
            cancel()
            collect(batch, render_batch(job(batch)))
        return seconds
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth") as pool:
        pending: dict[Future[list[float]], list[Rendition]] = {}
        queue = iter(batches)
        try:
            while True:
                # Keep a few batches per worker in flight: enough to stay busy, few to cancel.
                for batch in queue:
                    pending[pool.submit(render_batch, job(batch))] = batch
                    if len(pending) >= 3 * workers:
                        break
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    collect(pending.pop(future), future.result())
                cancel()
        finally:
            for future in pending:
                future.cancel()
    return seconds


def _write_manifest(path: Path, rows: Sequence[Rendition], seconds: Mapping[str, float]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(row.manifest_line(seconds[row.id]) + "\n" for row in rows))
    os.replace(partial, path)


def _no_cancel() -> None:
    pass


def synthesize_corpus(
    facts_dir: Path,
    out: Path,
    seed: int,
    renditions: int = DEFAULT_RENDITIONS,
    workers: int | None = None,
    reporter: Reporter | None = None,
    cancel: Callable[[], None] = _no_cancel,
    limit: int | None = None,
    answer_dev_share: float = DEFAULT_ANSWER_DEV_SHARE,
) -> dict[str, Any]:
    """Renders the corpus into `out` (resuming: valid files are kept) and writes both manifests.

    `limit` keeps the first N facts (categories taken in turn); `cancel` is called between
    batches and raises to stop (StageCancelled from a stage context); `workers` defaults to
    the number of cores. Returns the summary figures.
    """
    if not espeak_available():
        raise EchoXError("espeak-ng is not installed (apt-get install espeak-ng)")
    if renditions < 1:
        raise EchoXError(f"renditions must be at least 1, got {renditions}")
    started = time.perf_counter()
    base = load_fact_base(facts_dir)
    facts = limit_facts(base.facts, limit)
    questions = question_renditions(base, facts, seed, renditions)
    answers = answer_renditions(base, facts, answer_dev_share)
    everything = questions + answers
    if reporter is None:
        from training.stage import SilentReporter

        reporter = SilentReporter()
    reporter.start("synth", total=len(everything), unit="files")
    seconds: dict[str, float] = {}
    for row in everything:
        found = existing_seconds(out / row.path)
        if found is not None:
            seconds[row.id] = found
    reporter.advance(len(seconds))
    todo = [row for row in everything if row.id not in seconds]
    for folder in sorted({(out / row.path).parent for row in todo}):
        folder.mkdir(parents=True, exist_ok=True)
    seconds.update(_render_missing(todo, out, workers or os.cpu_count() or 1, reporter, cancel))
    _write_manifest(out / QUESTIONS_MANIFEST, questions, seconds)
    _write_manifest(out / ANSWERS_MANIFEST, answers, seconds)
    summary = _summary(questions, answers, seconds, rendered=len(todo))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    reporter.log(
        f"synth: {summary['files']} files ({summary['rendered']} rendered), "
        f"{summary['audio_hours']:.2f} h of audio in {summary['wall_seconds']:.0f} s"
    )
    return summary


def _summary(
    questions: Sequence[Rendition], answers: Sequence[Rendition], seconds: Mapping[str, float], rendered: int
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind, rows in (("questions", questions), ("answers", answers)):
        for split in ("train", "dev"):
            summary[f"{kind}_{split}"] = sum(1 for row in rows if row.split == split)
    summary["files"] = len(questions) + len(answers)
    summary["rendered"] = rendered
    summary["audio_hours"] = round(sum(seconds.values()) / 3600.0, 3)
    summary["answer_hours"] = round(sum(seconds[row.id] for row in answers) / 3600.0, 3)
    return summary


def run(ctx: StageContext) -> dict[str, Any]:
    """The `synth` stage. Settings: renditions, workers (null: all cores), limit, answer_dev_share."""
    if ctx.facts is None:
        raise EchoXError("the synth stage needs the fact base folder (the recipe's `facts`)")
    limit = ctx.setting("limit")
    workers = ctx.setting("workers")
    return synthesize_corpus(
        facts_dir=ctx.facts,
        out=ctx.out,
        seed=ctx.seed,
        renditions=int(ctx.setting("renditions", DEFAULT_RENDITIONS)),
        workers=int(workers) if workers else None,
        reporter=ctx.reporter,
        cancel=ctx.check_cancelled,
        limit=int(limit) if limit is not None else None,
        answer_dev_share=float(ctx.setting("answer_dev_share", DEFAULT_ANSWER_DEV_SHARE)),
    )


def register_cli(sub: Any) -> None:
    """Adds `echox data synth`."""
    data = sub.add_parser("data", help="build training data")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = data_sub.add_parser("synth", help="render the spoken-QA corpus with espeak-ng (16 kHz WAV + manifests)")
    p.add_argument(
        "--facts", required=True, type=Path, help="fact base folder (facts.jsonl, templates.json, voices.json)"
    )
    p.add_argument("--out", required=True, type=Path, help="corpus folder; an existing one resumes")
    p.add_argument("--seed", type=int, default=1234, help="seed of the rate and pitch draws (default: 1234)")
    p.add_argument(
        "--renditions",
        type=int,
        default=DEFAULT_RENDITIONS,
        help=f"renditions per question and voice (default: {DEFAULT_RENDITIONS})",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--limit", type=int, default=None, help="only the first N facts (categories in turn)")
    p.set_defaults(handler=run_synth_cli)


def run_synth_cli(args: argparse.Namespace) -> int:
    from training.runner import RichReporter

    with RichReporter() as reporter:
        summary = synthesize_corpus(
            facts_dir=args.facts,
            out=args.out,
            seed=args.seed,
            renditions=args.renditions,
            workers=args.workers,
            reporter=reporter,
            limit=args.limit,
        )
    print(json.dumps(summary, indent=2))
    return 0
