"""Serving subcommands of `echox` (registered through the `echox.commands` entry point):
`serve`, `call`, `triton start`, and `bench serve` under the core's `bench`."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    from services.triton_cmd import register as register_triton

    p = sub.add_parser("serve", help="run the serving stack: distributed on this machine, or --embedded")
    p.add_argument("--embedded", action="store_true", help="one process: in-memory bus, local models, no Redis/Triton")
    p.add_argument("--model", help="model folder (default: the embedded default model)")
    p.add_argument("--grpc-port", type=int, help="Converse API port (default: ECHOX_GRPC_PORT or 50051)")
    p.add_argument("--http-port", type=int,
                   help="the page, WebSocket transports and API (default: ECHOX_HTTP_PORT or 8080; 0: a free port)")
    p.add_argument("--api-key", help="the first admin API key (default: ECHOX_API_KEY)")
    p.add_argument("--livekit", action="store_true",
                   help="also join LiveKit rooms (ECHOX_LIVEKIT_URL, _API_KEY, _API_SECRET); distributed only")
    p.add_argument("--workers", type=int, default=1, help="worker processes per stage (default: 1)")
    p.add_argument("--backend", choices=("triton", "local"), default="triton",
                   help="where the distributed workers run the models (default: triton)")
    p.add_argument("--log-dir", default="runs/serve-logs", help="worker and Triton logs (default: runs/serve-logs)")
    p.set_defaults(handler=run_serve_cmd)

    p = sub.add_parser("call", help="one spoken turn through the Converse API: WAV in, WAV out")
    p.add_argument("input", help="the question, an audio file (any rate; stereo is mixed down)")
    p.add_argument("--url", default="grpc://127.0.0.1:50051", help="Converse address (default: grpc://127.0.0.1:50051)")
    p.add_argument("--out", required=True, help="where to write the spoken answer (16 kHz WAV)")
    p.add_argument("--session", default="", help="continue this conversation (its session_id)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up (default: 120)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_call)

    register_triton(sub)
    bench = _subcommands(sub.choices["bench"])
    if bench is not None:
        from services.bench import register as register_bench
        from services.gateway.bench_ws import register as register_bench_ws

        register_bench(bench)
        register_bench_ws(bench)


def _subcommands(parser: argparse.ArgumentParser) -> Any:
    """The subparsers of an existing command (argparse has no public accessor)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def run_serve_cmd(args: argparse.Namespace) -> int:
    from services.common.settings import get_settings
    from services.serve import run_serve

    settings = get_settings()
    update: dict[str, Any] = {}
    if args.model:
        update["model_dir"] = Path(args.model)
    if args.grpc_port is not None:
        update["grpc_port"] = args.grpc_port
    if args.http_port is not None:
        update["http_port"] = args.http_port
    if args.api_key:
        update["api_key"] = args.api_key
    update["livekit_enabled"] = bool(args.livekit)
    return run_serve(settings.model_copy(update=update), args.embedded, args.workers, args.backend, Path(args.log_dir))


def run_call(args: argparse.Namespace) -> int:
    from echox.audio import read_wav, write_wav
    from echox.errors import EchoXError
    from services.gateway.client import CallError, ConverseClient

    audio = read_wav(args.input)

    async def call() -> Any:
        async with ConverseClient(args.url, args.session, args.timeout) as client:
            return await client.turn(audio)

    try:
        result = asyncio.run(call())
    except CallError as exc:
        raise EchoXError(f"call to {args.url} failed: {exc}") from None
    write_wav(args.out, result.pcm())
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        t = summary["timings_ms"]
        print(f"session {result.session_id}\nheard:  {result.transcript}\nanswer: {result.text}")
        print(f"timings: first text {t['first_text']} ms, first audio {t['first_audio']} ms, total {t['total']} ms; "
              f"{summary['audio_seconds']} s of speech → {args.out}")
    if result.error is not None:
        raise EchoXError(f"the turn failed: {result.error.code}: {result.error.message}")
    return 0
