"""`echox triton start`: the Triton Inference Server with the EchoX stage models, in the
foreground until Ctrl-C or SIGTERM (then it stops cleanly)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType
from typing import Any


def register(sub: Any) -> None:
    triton = sub.add_parser("triton", help="the Triton Inference Server with the EchoX stage models")
    actions = triton.add_subparsers(dest="triton_command", metavar="ACTION", required=True)
    p = actions.add_parser("start", help="serve speech_llm, unit_generator and vocoder on 127.0.0.1 until Ctrl-C")
    p.add_argument("--model", help="model folder (default: ECHOX_MODEL_DIR or the committed default model)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default: a free one)")
    p.add_argument("--http-port", type=int, help="HTTP port (default: a free one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default: a free one)")
    p.add_argument("--models", default="speech_llm,unit_generator,vocoder",
                   help="comma-separated models to load (default: all three)")
    p.add_argument("--log", help="server log file (default: a temporary file, removed at exit)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the models to load (default: 180)")
    p.set_defaults(handler=run_start)


def run_start(args: argparse.Namespace) -> int:
    from echox.paths import resolve_model_dir
    from services.common.triton_server import TritonServer, log_tail

    server = TritonServer(
        resolve_model_dir(args.model),
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
        log_path=args.log, start_timeout_s=args.timeout,
    )
    ready, stop = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not ready.is_set():
            raise KeyboardInterrupt  # still starting: TritonServer.start stops what it began
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting Triton on {server.model_dir} ...", flush=True)
        server.start()
        ready.set()
        print(f"Triton ready: models {', '.join(server.models)}\n  grpc    {server.grpc_url}\n"
              f"  http    {server.http_url}\n  metrics {server.metrics_url}\n  log     {server.log_path}\n"
              "Ctrl-C stops it.", flush=True)
        while not stop.wait(1.0):
            if not server.alive():
                tail = log_tail(server.log_path) if server.log_path else ""
                print(f"echox: error: tritonserver exited; the end of its log:\n{tail}", file=sys.stderr)
                return 1
        print("stopping Triton ...", flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
