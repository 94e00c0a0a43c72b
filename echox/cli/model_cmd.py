"""`echox model init|info|import-official`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from echox.errors import EchoXError


def register(sub: Any) -> None:
    model = sub.add_parser("model", help="create, inspect and import model folders")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    init = model_sub.add_parser("init", help="write a randomly initialised model folder")
    init.add_argument("--preset", default="tiny", help="model size: tiny, 3b or 8b (default: tiny)")
    init.add_argument("--out", required=True, help="folder to write")
    init.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    init.set_defaults(handler=run_init)

    info = model_sub.add_parser("info", help="parameter counts per module")
    target = info.add_mutually_exclusive_group(required=True)
    target.add_argument("dir", nargs="?", help="a model folder")
    target.add_argument("--preset", help="a preset, built on the meta device (no memory)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=run_info)

    imp = model_sub.add_parser(
        "import-official", help="convert a released EchoX-3B/8B folder into our model format"
    )
    imp.add_argument("src", help="folder laid out like the released EchoX checkpoint")
    imp.add_argument("--out", required=True, help="model folder to write")
    imp.set_defaults(handler=run_import_official)


def run_init(args: argparse.Namespace) -> int:
    from echox.checkpoint import EchoX
    from echox.models.presets import get_preset

    config = get_preset(args.preset)
    if args.preset != "tiny":
        raise EchoXError(f"random init of {args.preset} would take tens of GB; use --preset tiny")
    folder = EchoX.random_init(config, seed=args.seed).save_pretrained(args.out)
    print(f"wrote a random-init {args.preset} model to {folder}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    import torch

    from echox.checkpoint import read_config
    from echox.models.echox import EchoXModel
    from echox.models.presets import get_preset
    from echox.paths import resolve_model_dir

    if args.preset:
        config, source = get_preset(args.preset), f"preset {args.preset}"
    else:
        folder = resolve_model_dir(args.dir)
        config, source = read_config(folder), str(folder)
    with torch.device("meta"):
        counts = EchoXModel(config).parameter_counts()
    report = {
        "source": source,
        "parameters": counts,
        "speech_encoder_b": round(counts["speech_encoder"] / 1e9, 4),
        "llm_b": round(counts["llm"] / 1e9, 4),
        "official_compat": config.official_compat,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"EchoX model: {source}")
    for name, count in counts.items():
        print(f"  {name:<16} {count:>15,d}  ({count / 1e6:,.2f} M)")
    return 0


def run_import_official(args: argparse.Namespace) -> int:
    from echox.convert.official import import_official

    folder = import_official(args.src, args.out)
    print(f"imported the official checkpoint into {folder}")
    return 0
