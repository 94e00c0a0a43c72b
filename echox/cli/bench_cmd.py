"""`echox bench respond`: per-stage cost and end-to-end timings, printed as figures."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

from echox.espeak import espeak_available, speak
from echox.paths import resolve_model_dir

BENCH_QUESTION = "What is the capital of France?"


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    p = bench_sub.add_parser("respond", help="per-stage cost of one in-process turn")
    p.add_argument("--model", help="model folder (default: the embedded default model)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, one core)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions per figure (median)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_bench_respond)


def run_bench_respond(args: argparse.Namespace) -> int:
    import torch

    from echox.bench import bench_stages, bench_turn, silence_safe_audio
    from echox.checkpoint import EchoX

    torch.set_num_threads(args.threads)
    folder = resolve_model_dir(args.model)
    echox = EchoX.from_pretrained(folder)
    audio = speak(BENCH_QUESTION, voice="en-us+m5") if espeak_available() else silence_safe_audio()
    stages = bench_stages(echox, audio, repeats=args.repeats)
    turn = bench_turn(echox, audio, repeats=max(1, args.repeats // 2))
    report = {
        "model": str(folder),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "audio_seconds": round(len(audio) / 16_000, 2),
        "stages": {k: round(v, 3) for k, v in stages.items()},
        "turn": {k: (None if v is None else round(v, 1)) for k, v in turn.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    s = report["stages"]
    print(f"model {folder}, {args.threads} thread(s), {report['audio_seconds']} s question")
    print(f"  speech encoder   {s['encoder_ms_per_audio_s']:8.2f} ms per second of audio")
    print(f"  LLM              {s['llm_ms_per_token']:8.2f} ms per token")
    print(f"  T2C              {s['t2c_ms_per_unit_token']:8.2f} ms per unit-language token")
    print(f"  vocoder          {s['vocoder_rtf']:8.3f} real-time factor")
    t = report["turn"]
    print(f"  turn             first text {t['first_text_ms']} ms, first audio {t['first_audio_ms']} ms, "
          f"total {t['total_ms']} ms ({t['answer_tokens']:.0f} tokens)")
    return 0
