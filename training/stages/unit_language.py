"""Stage `unit_language`: a BPE vocabulary over the deduplicated units of the agent's answers.

Learned on the train answers of `RUN/units/units.jsonl` (`UnitLanguageCodec.train`); the figure
that matters is the compression ratio on the held-out dev answers (deduplicated units per
unit-language token): the paper reports close to 2x at k = 1000. A larger vocabulary gives fewer
tokens per answer, but the echo decoder must then learn more classes from the same data.

Output (`RUN/unit_language/`): `unit_language.json` (UnitLanguageCodec.save) and metrics.json;
the compression ratios are the stage's summary.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from echox.errors import EchoXError
from echox.units.codec import UnitLanguageCodec
from training.jsonl import read_jsonl
from training.stage import MetricsLog, StageContext, settings_kwargs
from training.stages.units import UNITS_MANIFEST

CODEC_FILE = "unit_language.json"


@dataclasses.dataclass(frozen=True)
class UnitLanguageSettings:
    """`settings.unit_language` of a recipe."""

    vocab_size: int = 512

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> UnitLanguageSettings:
        kwargs = settings_kwargs(cls, values, "unit_language")
        return cls(**kwargs)


def train_unit_language(
    rows: Sequence[Mapping[str, Any]], num_units: int, vocab_size: int
) -> tuple[UnitLanguageCodec, dict[str, Any]]:
    """Learns the codec on the train rows of a units.jsonl; measures compression on both splits."""
    if vocab_size < num_units:
        raise EchoXError(f"unit_language: vocab_size {vocab_size} is smaller than the {num_units} units")
    train = [list(r["units"]) for r in rows if r["split"] == "train"]
    dev = [list(r["units"]) for r in rows if r["split"] == "dev"]
    if not train:
        raise EchoXError("unit_language: the units have no train answers")
    codec = UnitLanguageCodec.train(train, num_units, vocab_size)
    dev_units = sum(len(seq) for seq in dev)
    dev_tokens = sum(len(codec.encode(seq)) for seq in dev)
    figures = {
        "num_units": num_units,
        "vocab_size": codec.vocab_size,
        "train_compression": round(codec.compression_ratio(train), 4),
        "dev_compression": round(dev_units / dev_tokens, 4) if dev_tokens else None,
        "dev_answers": len(dev),
        "dev_units": dev_units,
        "dev_tokens": dev_tokens,
    }
    return codec, figures


def compression_summary(figures: Mapping[str, Any]) -> str:
    """One line on the held-out compression of `train_unit_language`'s figures (none without dev answers)."""
    if figures["dev_compression"] is None:
        train = figures["train_compression"]
        return f"no held-out (dev) answers, so no held-out compression ratio (train answers: {train:.3f})"
    return f"compression on held-out (dev) answers: {figures['dev_compression']:.3f} units per token"


def run(ctx: StageContext) -> dict[str, Any]:
    """The `unit_language` stage; settings: see UnitLanguageSettings."""
    settings = UnitLanguageSettings.from_mapping(ctx.settings)
    units_dir = ctx.input("units")
    num_units = int(json.loads((units_dir / "units.json").read_text())["num_units"])
    rows = read_jsonl(units_dir / UNITS_MANIFEST, "run the units stage first")
    ctx.reporter.start(ctx.stage, total=1, unit="codec")
    ctx.check_cancelled()
    codec, figures = train_unit_language(rows, num_units, settings.vocab_size)
    codec.save(ctx.out / CODEC_FILE)
    ctx.reporter.advance(1)
    ctx.reporter.log(f"unit_language: {compression_summary(figures)}")
    metrics = MetricsLog(ctx.out)
    metrics.set(**figures)
    metrics.save()
    return figures
