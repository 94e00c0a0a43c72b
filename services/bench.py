"""`echox bench serve`: the distributed stack against the in-process pipeline, same model,
same run. Prints time to first audio (p50/p95) of both and their ratio, the bus overhead per
hop, and turns per second at N concurrent sessions; writes a plot."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from echox.audio import FloatArray

QUESTIONS = ("What is the capital of France?", "What is two plus three?", "What is the capital of Sweden?")
VOICE = "en-us+m5"


def register(bench_sub: Any) -> None:
    p = bench_sub.add_parser("serve", help="distributed stack vs in-process: TTFA, bus hop, turns/s")
    p.add_argument("--model", help="model folder (default: the embedded default model)")
    p.add_argument("--sessions", default="1,4,8", help="concurrent sessions to measure (default: 1,4,8)")
    p.add_argument("--turns", type=int, default=12, help="turns per measurement at 1 session (default: 12)")
    p.add_argument("--backend", choices=("triton", "local"), default="triton",
                   help="model backend of the distributed workers (default: triton)")
    p.add_argument("--plot", default="runs/bench-serve.png", help="where to write the plot")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_bench_serve)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def questions_audio() -> list[FloatArray]:
    from echox.espeak import speak

    return [speak(q, voice=VOICE) for q in QUESTIONS]


def in_process_ttfa(model_dir: Path, audios: list[FloatArray], turns: int) -> list[float]:
    """Time to first audio of the embedded StreamingResponder, one turn at a time, on one torch
    thread as each distributed stage has."""
    import torch

    from echox.checkpoint import EchoX
    from echox.events import DoneEvent
    from echox.streaming.responder import StreamingResponder

    torch.set_num_threads(1)
    responder = StreamingResponder(EchoX.from_pretrained(model_dir))
    for _warm_up in responder.respond(audios[0]):
        pass
    ttfa = []
    for i in range(turns):
        for event in responder.respond(audios[i % len(audios)]):
            if isinstance(event, DoneEvent) and event.timings.first_audio_ms is not None:
                ttfa.append(event.timings.first_audio_ms)
    return ttfa


async def bus_hop_ms(url: str, prefix: str, payload_bytes: int = 8192, count: int = 200) -> list[float]:
    """Publish → consumer-group read → ack of one stage-sized message: one hop's overhead."""
    from services.common.bus import make_bus

    bus = make_bus(url, prefix)
    stream, group = f"bench-hop-{uuid.uuid4().hex[:8]}", "bench"
    await bus.ensure_group(stream, group)
    payload = bytes(payload_bytes)
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            await bus.publish(stream, payload)
            (delivery,) = await bus.consume(stream, group, "c", count=1, block_ms=1000)
            await bus.ack(stream, group, delivery.id)
            samples.append((time.perf_counter() - started) * 1000.0)
    finally:
        await bus.delete(stream)
        await bus.close()
    return samples


async def distributed_turns(target: str, audios: list[FloatArray], sessions: int, turns_each: int
                            ) -> tuple[list[float], float, int]:
    """`sessions` concurrent conversations of `turns_each` turns; (TTFA ms, wall s, errors)."""
    from services.gateway.client import ConverseClient

    ttfa: list[float] = []
    errors = 0

    async def conversation(k: int) -> None:
        nonlocal errors
        async with ConverseClient(target, timeout_s=300) as client:
            for i in range(turns_each):
                result = await client.turn(audios[(k + i) % len(audios)])
                if result.error is not None or result.first_audio_ms is None:
                    errors += 1
                else:
                    ttfa.append(result.first_audio_ms)

    started = time.perf_counter()
    await asyncio.gather(*(conversation(k) for k in range(sessions)))
    return ttfa, time.perf_counter() - started, errors


def run_bench_serve(args: argparse.Namespace) -> int:
    from echox.paths import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    levels = [int(n) for n in args.sessions.split(",")]
    report = asyncio.run(_bench(model_dir, levels, args.turns, args.backend))
    _plot(report, Path(args.plot))
    report["plot"] = args.plot
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


async def _bench(model_dir: Path, levels: list[int], turns: int, backend: str) -> dict[str, Any]:
    from services.common.processes import free_port
    from services.common.settings import get_settings
    from services.serve import LocalCluster, serve_distributed

    audios = questions_audio()
    local_ttfa = await asyncio.to_thread(in_process_ttfa, model_dir, audios, turns)
    prefix = f"echox-bench-{uuid.uuid4().hex[:8]}:"
    settings = get_settings().model_copy(update={"model_dir": model_dir, "bus_prefix": prefix,
                                                  "grpc_port": free_port(), "backend": backend})
    with tempfile.TemporaryDirectory() as logs:
        cluster = LocalCluster(settings, Path(logs))
        stop = asyncio.Event()
        try:
            cluster.ensure_redis()
            if backend == "triton":
                cluster.start_triton(model_dir)
            server = asyncio.create_task(serve_distributed(cluster, 1, stop))
            target = f"127.0.0.1:{settings.grpc_port}"
            await _wait_serving(target, server)
            await distributed_turns(target, audios, 1, 1)  # warm-up
            rows = []
            for n in levels:
                ttfa, wall, errors = await distributed_turns(target, audios, n, max(2, turns // n))
                rows.append({"sessions": n, "ttfa_p50_ms": percentile(ttfa, 50), "ttfa_p95_ms": percentile(ttfa, 95),
                             "turns_per_s": (len(ttfa) + errors) / wall, "turns": len(ttfa), "errors": errors})
            hop_redis = await bus_hop_ms(cluster.settings.bus, prefix)
        finally:
            stop.set()
            await asyncio.sleep(0.5)
            cluster.stop()
    hop_memory = await bus_hop_ms("memory://", prefix)
    one = rows[0] if rows and rows[0]["sessions"] == 1 else None
    local_p50 = percentile(local_ttfa, 50)
    return {
        "model": str(model_dir), "backend": backend, "machine": f"{platform.machine()}, {_cores()} cores",
        "in_process": {"ttfa_p50_ms": local_p50, "ttfa_p95_ms": percentile(local_ttfa, 95), "turns": len(local_ttfa)},
        "distributed": rows,
        "ttfa_ratio_p50": (one["ttfa_p50_ms"] / local_p50) if one else None,
        "bus_hop_ms": {"redis_p50": statistics.median(hop_redis), "redis_p95": percentile(hop_redis, 95),
                       "memory_p50": statistics.median(hop_memory)},
    }


async def _wait_serving(target: str, server: asyncio.Task[None], timeout_s: float = 180.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.done():
                server.result()  # re-raises why the stack did not come up
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError(f"the distributed stack did not serve on {target} within {timeout_s:.0f} s")


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def _print(report: dict[str, Any]) -> None:
    local = report["in_process"]
    print(f"model {report['model']} · backend {report['backend']} · {report['machine']}")
    print(f"in-process   TTFA p50 {local['ttfa_p50_ms']:.1f} ms  p95 {local['ttfa_p95_ms']:.1f} ms")
    for row in report["distributed"]:
        print(f"distributed  {row['sessions']} session(s): TTFA p50 {row['ttfa_p50_ms']:.1f} ms  "
              f"p95 {row['ttfa_p95_ms']:.1f} ms  {row['turns_per_s']:.2f} turns/s  errors {row['errors']}")
    if report["ttfa_ratio_p50"] is not None:
        print(f"distributed / in-process TTFA p50 at 1 session: {report['ttfa_ratio_p50']:.2f}×")
    hop = report["bus_hop_ms"]
    print(f"bus hop (publish → group read → ack, 8 KB): Redis p50 {hop['redis_p50']:.2f} ms "
          f"p95 {hop['redis_p95']:.2f} ms; in-memory p50 {hop['memory_p50']:.3f} ms")
    print(f"plot: {report['plot']}")


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["distributed"]
    n = [r["sessions"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(n, [r["ttfa_p50_ms"] for r in rows], "o-", label="distributed p50")
    left.plot(n, [r["ttfa_p95_ms"] for r in rows], "o--", label="distributed p95")
    left.axhline(report["in_process"]["ttfa_p50_ms"], color="gray", linestyle=":", label="in-process p50 (1 session)")
    left.set(xlabel="concurrent sessions", ylabel="time to first audio (ms)", title="Time to first audio")
    left.legend(fontsize=8)
    right.plot(n, [r["turns_per_s"] for r in rows], "o-")
    right.set(xlabel="concurrent sessions", ylabel="turns / s", title="Throughput")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
