"""`echox`: the one command line of the project.

Core subcommands live here (model, respond, bench, demo). services/ and training/ add theirs
(serve, call, train, ...) through the `echox.commands` entry-point group, so the core library
never imports them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from echox.errors import EchoXError

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    from echox.cli import bench_cmd, demo_cmd, model_cmd, respond_cmd

    parser = argparse.ArgumentParser(
        prog="echox",
        description="EchoX Voice: real-time speech-to-speech voice agents (EchoX method).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (model_cmd, respond_cmd, bench_cmd, demo_cmd):
        module.register(sub)
    for entry in entry_points(group="echox.commands"):
        entry.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except EchoXError as exc:
        print(f"echox: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("echox: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
