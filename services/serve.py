"""`echox serve`: the data plane on this machine.

Distributed: Redis (started if none answers), Triton with the three stage models, N worker
processes per stage, and the gRPC Converse API in this process. Embedded (`--embedded`): the
same stage code in one process on the in-memory bus with local backends. Both stop cleanly on
Ctrl-C or SIGTERM. `LocalCluster` is also what the integration tests and `echox bench serve`
drive (start a worker, kill one, restart Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from services.common.processes import stop_process
from services.common.settings import REPO_ROOT, Settings
from services.common.stack import STAGES, Models, embedded_data_plane, open_bus, open_sessions, stop_on_signals
from services.gateway.edge import api_app, edge_running


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s).ping())
    except redis.RedisError:
        return False


def start_redis(port: int) -> subprocess.Popen[bytes]:
    """A private redis-server without persistence (what `echox serve` starts if none runs)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no Redis answers and redis-server is not installed (apt-get install redis-server)")
    process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10.0
    while not redis_answers(url, 0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.05)
    return process


@dataclasses.dataclass
class LocalCluster:
    """Worker processes (and optionally Redis and Triton) run by this process."""

    settings: Settings
    log_dir: Path
    workers: dict[str, list[subprocess.Popen[bytes]]] = dataclasses.field(default_factory=dict)
    redis: subprocess.Popen[bytes] | None = None
    triton: Any = None  # services.common.triton_server.TritonServer

    def ensure_redis(self) -> None:
        if redis_answers(self.settings.bus):
            return
        parsed = urlparse(self.settings.bus)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            raise RuntimeError(f"no Redis answers at {self.settings.bus}")
        self.redis = start_redis(parsed.port or 6379)

    def start_triton(self, model_dir: Path) -> str:
        from services.common.triton_server import TritonServer

        self.triton = TritonServer(model_dir=model_dir, log_path=self.log_dir / "triton.log")
        self.triton.start()
        self.settings = self.settings.model_copy(update={"triton_url": self.triton.grpc_url, "backend": "triton"})
        return str(self.triton.grpc_url)

    def worker_env(self) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ, ECHOX_BUS_URL=s.bus, ECHOX_BUS_PREFIX=s.bus_prefix, ECHOX_BACKEND=s.backend,
                   ECHOX_TRITON_URL=s.triton_url, ECHOX_RECLAIM_IDLE_MS=str(s.reclaim_idle_ms),
                   ECHOX_TURN_DEADLINE_S=str(s.turn_deadline_s), ECHOX_LOG_LEVEL=s.log_level,
                   ECHOX_WORKER_CONCURRENCY=str(s.worker_concurrency), HF_HUB_OFFLINE="1",
                   PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if s.model_dir is not None:
            env["ECHOX_MODEL_DIR"] = str(s.model_dir)
        env.pop("ECHOX_METRICS_PORT", None)
        return env

    def start_worker(self, stage: str) -> subprocess.Popen[bytes]:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        index = len(self.workers.get(stage, []))
        log = open(self.log_dir / f"{stage}-{index}.log", "ab")  # noqa: SIM115 (the child owns it)
        process = subprocess.Popen([sys.executable, "-m", f"services.{stage}"], env=self.worker_env(),
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        log.close()
        self.workers.setdefault(stage, []).append(process)
        return process

    def alive(self) -> dict[str, int]:
        return {stage: sum(p.poll() is None for p in procs) for stage, procs in self.workers.items()}

    def stop(self) -> None:
        for procs in self.workers.values():
            for process in procs:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        for procs in self.workers.values():
            for process in procs:
                stop_process(process)
        if self.triton is not None:
            self.triton.stop()
        if self.redis is not None:
            stop_process(self.redis)


async def wait_for_workers(settings: Settings, stages: tuple[str, ...] = STAGES, timeout_s: float = 120.0) -> None:
    """Until every stage's consumer group exists: a worker creates it once it is up and
    connected (Redis registers a consumer only when it is first served, so that can't be used)."""
    import redis.asyncio as aioredis

    from services.common import messages

    streams = {"speech_llm": messages.TURNS, "unit_generator": messages.SEGMENTS, "vocoder": messages.UNITS}
    client = aioredis.Redis.from_url(settings.bus)
    deadline = time.monotonic() + timeout_s
    try:
        for stage in stages:
            key = settings.bus_prefix + streams[stage]
            while True:
                with contextlib.suppress(Exception):
                    groups = await client.xinfo_groups(key)
                    if any(g["name"] in (stage, stage.encode()) for g in groups):
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {stage} worker registered within {timeout_s:.0f} s")
                await asyncio.sleep(0.2)
    finally:
        await client.aclose()


async def serve_embedded(settings: Settings, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    """Everything in one process: in-memory bus and state, local backends, the gRPC API, and the
    HTTP side (page, WebSocket transports, API) on settings.http_host:http_port. No LiveKit: its
    jobs run on event loops of their own, which the in-memory bus cannot reach."""
    from services.common.tokens import new_secret

    # One secret for everything in this process that mints or checks session tokens.
    settings = settings.model_copy(update={"token_secret": settings.token_secret or new_secret(),
                                           "livekit_enabled": False})
    async with embedded_data_plane(settings) as plane:
        app = api_app(plane.settings, plane.sessions)
        async with edge_running(plane.settings, plane.bus, plane.sessions, app) as (grpc_port, http_port):
            print(f"echox serve --embedded: the page on http://{settings.http_host}:{http_port}/", flush=True)
            print(f"echox serve --embedded: Converse on grpc://{settings.grpc_host}:{grpc_port} (Ctrl-C stops)",
                  flush=True)
            if ready is not None:
                ready.set()
            await stop.wait()


async def serve_distributed(cluster: LocalCluster, workers_per_stage: int, stop: asyncio.Event) -> None:
    """Workers run as processes; this process is the edge and the control plane over Redis:
    Converse, the page, WebSocket transports and API on HTTP, and LiveKit rooms if enabled."""
    from services.common.tokens import new_secret

    settings = cluster.settings.model_copy(update={"token_secret": cluster.settings.token_secret or new_secret()})
    for stage in STAGES:
        for _ in range(workers_per_stage):
            cluster.start_worker(stage)
    await wait_for_workers(settings)
    bus, sessions = open_bus(settings), open_sessions(settings)
    try:
        async with edge_running(settings, bus, sessions, api_app(settings, sessions)) as (grpc_port, http_port):
            print(f"echox serve: the page and API on http://{settings.http_host}:{http_port}/", flush=True)
            print(f"echox serve: Converse on grpc://{settings.grpc_host}:{grpc_port}; {workers_per_stage} worker(s) "
                  f"per stage, backend {settings.backend}; logs in {cluster.log_dir} (Ctrl-C stops)", flush=True)
            await stop.wait()
    finally:
        await sessions.close()
        await bus.close()


def run_serve(settings: Settings, embedded: bool, workers_per_stage: int, backend: str, log_dir: Path) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        if embedded:
            await serve_embedded(settings, stop)
            return
        cluster = LocalCluster(settings, log_dir)
        try:
            cluster.ensure_redis()
            if backend == "triton":
                model_dir = Models.load(settings.model_dir, "triton").folder
                print(f"starting Triton on {model_dir} ...", flush=True)
                cluster.start_triton(model_dir)
            else:
                cluster.settings = settings.model_copy(update={"backend": "local"})
            await serve_distributed(cluster, workers_per_stage, stop)
        finally:
            cluster.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    print("echox serve: stopped", flush=True)
    return 0
