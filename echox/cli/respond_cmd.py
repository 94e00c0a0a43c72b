"""`echox respond IN.wav --model DIR --out OUT.wav [--json]`: one spoken turn."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from echox.audio import FloatArray, read_wav, write_wav
from echox.paths import resolve_model_dir

if TYPE_CHECKING:  # the model stack (torch, transformers) loads only when a command runs
    from echox.checkpoint import EchoX


def register(sub: Any) -> None:
    p = sub.add_parser("respond", help="answer one spoken question: WAV in, WAV out")
    p.add_argument("input", help="the question, an audio file (any rate; stereo is mixed down)")
    p.add_argument("--model", help="model folder (default: the embedded default model)")
    p.add_argument("--out", required=True, help="where to write the spoken answer (16 kHz WAV)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a live view")
    p.set_defaults(handler=run_respond)


def run_respond(args: argparse.Namespace) -> int:
    from echox.checkpoint import EchoX

    echox = EchoX.from_pretrained(resolve_model_dir(args.model))
    audio = read_wav(args.input)
    result = respond_to_file(echox, audio, args.out, live=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def respond_to_file(echox: EchoX, audio: FloatArray, out: str, live: bool) -> dict[str, Any]:
    """Runs one turn, optionally printing it live, writes the answer WAV, returns the summary."""
    from echox.events import AudioEvent, DoneEvent, SegmentEvent, TextDeltaEvent, TranscriptEvent
    from echox.streaming.responder import StreamingResponder

    responder = StreamingResponder(echox)
    segments: dict[int, dict[str, Any]] = {}
    chunks: list[AudioEvent] = []
    done: DoneEvent | None = None
    for event in responder.respond(audio):
        if isinstance(event, TranscriptEvent) and live:
            print(f"heard:  {event.text}\nanswer: ", end="", flush=True)
        elif isinstance(event, TextDeltaEvent) and live:
            print(event.text, end="", flush=True)
        elif isinstance(event, SegmentEvent):
            segments[event.index] = {"index": event.index, "tokens": event.tokens, "text": event.text}
        elif isinstance(event, AudioEvent):
            chunks.append(event)
            segments[event.index]["audio_seconds"] = round(event.seconds, 3)
        elif isinstance(event, DoneEvent):
            done = event
    assert done is not None
    pcm = np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, dtype=np.float32)
    write_wav(out, pcm)
    t = done.timings
    timings_ms = {"first_text": _ms(t.first_text_ms), "first_audio": _ms(t.first_audio_ms), "total": _ms(t.total_ms)}
    audio_seconds = round(len(pcm) / 16_000, 3)
    summary = {
        "transcript": done.transcript,
        "text": done.text,
        "segments": [segments[i] for i in sorted(segments)],
        "first_segment_tokens": done.first_segment_tokens,
        "timings_ms": timings_ms,
        "audio_seconds": audio_seconds,
    }
    if live:
        print(
            f"\ntimings: first text {timings_ms['first_text']} ms, first audio {timings_ms['first_audio']} ms, "
            f"total {timings_ms['total']} ms; {audio_seconds} s of speech → {out}"
        )
    return summary


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
