"""`echox demo`: speak a question in a dev voice and answer it with the embedded default model."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from echox.audio import read_wav, write_wav
from echox.cli.respond_cmd import respond_to_file
from echox.espeak import speak
from echox.paths import default_model_dir

DEFAULT_QUESTION = "What is the capital of France?"
DEV_VOICE = "en-us+m5"


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="ask the default model a spoken question and hear the answer")
    p.add_argument("--question", help="a WAV file with the question (default: synthesize one)")
    p.add_argument("--text", default=DEFAULT_QUESTION, help=f"question to synthesize (default: {DEFAULT_QUESTION!r})")
    p.add_argument("--voice", default=DEV_VOICE, help=f"espeak-ng voice for the question (default: {DEV_VOICE})")
    p.add_argument("--model", help="model folder (default: the embedded default model)")
    p.add_argument("--out", default="demo-answer.wav", help="answer WAV (default: demo-answer.wav)")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from echox.checkpoint import EchoX
    from echox.models.presets import preset_tiny

    folder = Path(args.model) if args.model else default_model_dir()
    if folder is None:
        print("note: no trained default model is committed yet; using a random-init tiny model "
              "(the pipeline runs end to end, but the answer is noise)")
        echox = EchoX.random_init(preset_tiny())
    else:
        echox = EchoX.from_pretrained(folder)
    if args.question:
        audio = read_wav(args.question)
        print(f"question: {args.question}")
    else:
        audio = speak(args.text, voice=args.voice)
        with tempfile.NamedTemporaryFile(suffix=".wav", delete=False, prefix="echox-question-") as f:
            write_wav(f.name, audio)
        print(f"question ({args.voice}): {args.text!r} → {f.name}")
    respond_to_file(echox, audio, args.out, live=True)
    return 0
