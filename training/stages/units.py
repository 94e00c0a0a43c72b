"""Stage `units`: speech units of the agent's answers (features → k-means ids at 50 Hz).

Features of every agent answer (`RUN/synth/answers.jsonl`) are computed: log-mel frames by
default, MFCC frames with `features: {kind: mfcc}` (`training.features.Mfcc`), or with
`features: {kind: encoder, encoder_layers: N}` the states of the `asr` stage's
trained speech encoder after N layers (the recipe then runs `asr` before `units`). The train split fits
the global normalisation and a k-means (k = `num_units`, deterministic for the seed); every
answer, train and dev, is then turned into units, deduplicated, with the run lengths kept for
the vocoder.

Output (`RUN/units/`): `units.json` (feature config, k, figures) + `kmeans.safetensors`
(centroids and normalisation, read by `training.features.UnitExtractor.load`; for encoder
features also the encoder, `speech_encoder.{safetensors,json}`), and `units.jsonl`
with one line per answer: {"id", "fact_id", "split", "units" (deduplicated), "durations"}.

CLI: `echox units extract` applies a trained k-means to a manifest's audio, and
`echox units train-language` learns a unit language from a units.jsonl (see `register_cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from echox.audio import read_wav
from echox.convert.files import listing
from echox.errors import EchoXError
from echox.models.speech_encoder import SpeechEncoder
from echox.units.codec import dedup
from training.features import (
    FeatureConfig,
    UnitExtractor,
    build_features,
    feature_stats,
    fit_kmeans,
    load_speech_encoder,
)
from training.jsonl import read_jsonl, write_jsonl
from training.stage import StageContext, settings_kwargs
from training.stages.synth import ANSWERS_MANIFEST

UNITS_MANIFEST = "units.jsonl"


@dataclasses.dataclass(frozen=True)
class UnitsSettings:
    """`settings.units` of a recipe."""

    num_units: int = 128
    max_iter: int = 100  # Lloyd iterations of the k-means
    features: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # FeatureConfig overrides

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> UnitsSettings:
        kwargs = settings_kwargs(cls, values, "units")
        settings = cls(**kwargs)
        if settings.num_units < 2 or settings.max_iter < 1:
            raise EchoXError("units: num_units must be >= 2 and max_iter >= 1")
        return settings

    def feature_config(self) -> FeatureConfig:
        return FeatureConfig.from_dict({**FeatureConfig().to_dict(), **dict(self.features)})


def units_row(row: Mapping[str, Any], frame_units: Sequence[int]) -> dict[str, Any]:
    """One units.jsonl line (the contract): deduplicated units and their durations."""
    units, durations = dedup(frame_units)
    return {"id": row["id"], "fact_id": row["fact_id"], "split": row["split"], "units": units, "durations": durations}


def answers_with_units(synth_dir: Path, units_dir: Path, stage: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(synth's answers.jsonl row, units.jsonl row) for every answer, in answers.jsonl order.
    Both must name the same answers: one the other lacks means one of the two stages is stale."""
    answers = read_jsonl(synth_dir / ANSWERS_MANIFEST, "run the synth stage first")
    units = {row["id"]: row for row in read_jsonl(units_dir / UNITS_MANIFEST, "run the units stage first")}
    answer_ids = {row["id"] for row in answers}
    if missing := sorted(answer_ids - units.keys()):
        raise EchoXError(f"{stage}: units.jsonl has no units for the answers {listing(missing)}; "
                         "rerun the units stage after synth")
    if unknown := sorted(units.keys() - answer_ids):
        raise EchoXError(f"{stage}: units.jsonl names answers that synth's answers.jsonl lacks: "
                         f"{listing(unknown)}; rerun the units stage after synth")
    return [(row, units[row["id"]]) for row in answers]


def fit_extractor(
    features: Sequence[torch.Tensor],
    config: FeatureConfig,
    num_units: int,
    seed: int,
    max_iter: int = 100,
    encoder: SpeechEncoder | None = None,
) -> UnitExtractor:
    """Global normalisation + k-means over the stacked frames of `features` (train answers)."""
    frames = torch.cat([f for f in features if f.shape[0]])
    mean, std = feature_stats(frames)
    centroids = fit_kmeans((frames - mean) / std, num_units, seed, max_iter)
    return UnitExtractor(config, mean, std, centroids, encoder)


def extract_rows(
    extractor: UnitExtractor,
    rows: Sequence[Mapping[str, Any]],
    folder: Path,
    on_each: Callable[[], None] = lambda: None,
) -> list[dict[str, Any]]:
    """units.jsonl lines for manifest rows (audio paths relative to `folder`)."""
    out = []
    for row in rows:
        on_each()
        out.append(units_row(row, extractor.frame_units(read_wav(folder / row["path"]))))
    return out


def unit_figures(rows: Sequence[Mapping[str, Any]], num_units: int) -> dict[str, Any]:
    """Summary figures: answers, frames, mean run length, how many of the k units occur."""
    frames = sum(sum(r["durations"]) for r in rows)
    dedup_units = sum(len(r["units"]) for r in rows)
    used = len({u for r in rows for u in r["units"]})
    return {
        "answers": len(rows),
        "dev_answers": sum(r["split"] == "dev" for r in rows),
        "frames": frames,
        "mean_duration": round(frames / max(1, dedup_units), 3),
        "units_used": used,
        "num_units": num_units,
    }


def run(ctx: StageContext) -> dict[str, Any]:
    """The `units` stage; settings: see UnitsSettings."""
    settings = UnitsSettings.from_mapping(ctx.settings)
    config = settings.feature_config()
    synth = ctx.input("synth")
    answers = read_jsonl(synth / ANSWERS_MANIFEST, "run the synth stage first")
    train = [row for row in answers if row["split"] == "train"]
    if not train:
        raise EchoXError("units: synth's answers.jsonl has no train answers")
    encoder = load_speech_encoder(ctx.input("asr")) if config.kind == "encoder" else None
    ctx.reporter.start(ctx.stage, total=len(train) + len(answers), unit="answers")
    features = build_features(config, encoder)
    train_features = []
    for row in train:
        ctx.check_cancelled()
        train_features.append(features(read_wav(synth / row["path"])))
        ctx.reporter.advance(1)
    ctx.reporter.log(f"units: k-means with k={settings.num_units} over {sum(len(f) for f in train_features)} frames")
    extractor = fit_extractor(train_features, config, settings.num_units, ctx.seed, settings.max_iter, encoder)

    def each() -> None:
        ctx.check_cancelled()
        ctx.reporter.advance(1)

    rows = extract_rows(extractor, answers, synth, each)
    figures = unit_figures(rows, settings.num_units)
    write_jsonl(ctx.out / UNITS_MANIFEST, rows)
    extractor.save(ctx.out, extra={"figures": figures})
    return figures


# --- CLI ---------------------------------------------------------------------------------


def register_cli(sub: Any) -> None:
    """Adds `echox units extract` and `echox units train-language`."""
    units = sub.add_parser("units", help="speech units and the unit language")
    units_sub = units.add_subparsers(dest="units_command", metavar="UNITS_COMMAND", required=True)
    p = units_sub.add_parser("extract", help="apply a trained k-means to a manifest's audio (→ units.jsonl lines)")
    p.add_argument(
        "--corpus", required=True, type=Path,
        help="a synth folder (its answers.jsonl is read) or a manifest .jsonl (paths relative to it)",
    )
    p.add_argument("--model", required=True, type=Path, help="a units folder (units.json + kmeans.safetensors)")
    p.add_argument("--out", required=True, type=Path, help="where to write the units .jsonl")
    p.set_defaults(handler=run_extract_cli)
    q = units_sub.add_parser("train-language", help="learn a unit language (BPE over deduplicated units)")
    q.add_argument("--units", required=True, type=Path, help="a units.jsonl (train rows learn, dev rows measure)")
    q.add_argument("--vocab", required=True, type=int, help="unit-language vocabulary size (>= the unit count)")
    q.add_argument("--out", required=True, type=Path, help="folder for unit_language.json")
    q.add_argument("--num-units", type=int, default=None, help="unit count k (default: units.json beside --units)")
    q.set_defaults(handler=run_train_language_cli)


def run_extract_cli(args: argparse.Namespace) -> int:
    manifest = args.corpus if args.corpus.is_file() else args.corpus / ANSWERS_MANIFEST
    extractor = UnitExtractor.load(args.model)
    rows = extract_rows(extractor, read_jsonl(manifest), manifest.parent)
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} lines to {args.out} (k={extractor.num_units})")
    return 0


def run_train_language_cli(args: argparse.Namespace) -> int:
    from training.stages.unit_language import compression_summary, train_unit_language

    rows = read_jsonl(args.units)
    num_units = args.num_units
    if num_units is None:
        config_path = args.units.parent / "units.json"
        if not config_path.is_file():
            raise EchoXError(f"no units.json beside {args.units}: pass --num-units")
        num_units = int(json.loads(config_path.read_text())["num_units"])
    codec, figures = train_unit_language(rows, num_units, args.vocab)
    args.out.mkdir(parents=True, exist_ok=True)
    codec.save(args.out / "unit_language.json")
    print(json.dumps(figures, indent=2))
    print(compression_summary(figures))
    return 0
