"""`echox demo`: speak a question in a dev voice and answer it with the embedded default model.

Nothing is trained or downloaded: the model is the committed default (or ECHOX_MODEL_DIR, or
--model); without one, a random-init tiny model shows the pipeline running, with a note saying so.
The question is rendered with espeak-ng in a voice the model never heard in training (a dev voice
of data/spoken_qa/voices.json), unless --question gives a recording.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from echox.audio import FloatArray, read_wav, write_wav
from echox.cli.respond_cmd import respond_to_file
from echox.espeak import speak
from echox.paths import default_model_dir

if TYPE_CHECKING:  # the model stack (torch, transformers) loads only when the command runs
    from echox.checkpoint import EchoX

DEFAULT_QUESTION = "What is the capital of France?"
DEV_VOICE = "en-us+m5"  # the first dev voice of data/spoken_qa/voices.json
RANDOM_MODEL_NOTE = (
    "note: no trained default model is committed yet; using a random-init tiny model "
    "(the pipeline runs end to end, but the answer is noise)"
)


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="ask the default model a spoken question and hear the answer")
    p.add_argument("--question", help="a WAV file with the question (default: synthesize one)")
    p.add_argument("--text", default=DEFAULT_QUESTION, help=f"question to synthesize (default: {DEFAULT_QUESTION!r})")
    p.add_argument("--voice", default=DEV_VOICE, help=f"espeak-ng voice for the question (default: {DEV_VOICE})")
    p.add_argument("--model", help="model folder (default: the embedded default model)")
    p.add_argument(
        "--out", default="demo-answer.wav", help="answer WAV; a synthesized question goes beside it (demo-question.wav)"
    )
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    echox = _load_model(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    audio = _question(args, out.with_name("demo-question.wav"))
    summary = respond_to_file(echox, audio, str(out), live=True)
    total_s, speech_s = summary["timings_ms"]["total"] / 1000.0, summary["audio_seconds"]
    if speech_s:
        print(f"real-time factor: {total_s / speech_s:.2f} ({total_s:.2f} s to produce {speech_s:.2f} s of speech)")
    else:
        print("real-time factor: n/a (the model produced no speech)")
    return 0


def _load_model(model: str | None) -> EchoX:
    from echox.checkpoint import EchoX
    from echox.models.presets import preset_tiny

    folder = Path(model) if model else default_model_dir()
    if folder is None:
        print(RANDOM_MODEL_NOTE)
        return EchoX.random_init(preset_tiny())
    print(f"model: {folder}")
    return EchoX.from_pretrained(folder)


def _question(args: argparse.Namespace, synthesized: Path) -> FloatArray:
    """The question's audio: the given recording, or the text spoken in a dev voice (saved beside the answer)."""
    if args.question:
        print(f"question: {args.question}")
        return read_wav(args.question)
    audio = speak(args.text, voice=args.voice)
    write_wav(synthesized, audio)
    print(f"question ({args.voice}): {args.text!r} → {synthesized}")
    return audio
