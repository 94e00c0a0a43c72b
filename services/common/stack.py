"""Assembling the data plane from settings: a stage worker per process (distributed), or all
three stages, the edge and the gRPC API in one process on the in-memory bus (embedded)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.bus import Bus, make_bus
from services.common.logs import log, setup_logging
from services.common.metrics import serve_metrics
from services.common.settings import Settings
from services.common.state import SessionStore, make_session_store
from services.common.worker import CancelWatch, StageWorker

if TYPE_CHECKING:  # torch loads only where a model does (the API process needs none)
    from echox.checkpoint import EchoX
    from echox.models.echox import EchoXConfig

STAGES = ("speech_llm", "unit_generator", "vocoder")
logger = logging.getLogger("echox.stack")


@dataclasses.dataclass
class Models:
    """What the workers need of the model: the loaded model (local backends) or its config."""

    folder: Path
    config: EchoXConfig
    echox: EchoX | None = None

    @classmethod
    def load(cls, model_dir: Path | str | None, backend: str) -> Models:
        from echox.checkpoint import EchoX, read_config
        from echox.paths import resolve_model_dir

        folder = resolve_model_dir(str(model_dir) if model_dir else None)
        if backend == "local":
            echox = EchoX.from_pretrained(folder)
            return cls(folder, echox.config, echox)
        return cls(folder, read_config(folder))


def open_bus(settings: Settings, url: str | None = None) -> Bus:
    """The bus (and below, the session store) that settings name, with their limits."""
    return make_bus(url or settings.bus, settings.bus_prefix, settings.stream_maxlen, settings.redis_socket_timeout_s)


def open_sessions(settings: Settings, url: str | None = None) -> SessionStore:
    return make_session_store(url or settings.bus, settings.bus_prefix, settings.session_ttl_s,
                              settings.session_max_turns)


def make_backend(stage: str, settings: Settings, models: Models) -> Any:
    """The model backend of one stage, as settings.backend says."""
    if settings.backend == "local":
        from services.common.backends import local

        assert models.echox is not None
        kinds = {"speech_llm": local.LocalSpeechLLM, "unit_generator": local.LocalUnits, "vocoder": local.LocalVocoder}
        return kinds[stage](models.echox)
    if settings.backend == "triton":
        from services.common.backends import triton

        deadline = settings.turn_deadline_s
        if stage == "speech_llm":
            window = models.config.encoder.window_seconds
            return triton.TritonSpeechLLM(settings.triton_url, timeout_s=deadline, max_audio_seconds=window)
        kinds = {"unit_generator": triton.TritonUnits, "vocoder": triton.TritonVocoder}
        return kinds[stage](settings.triton_url, timeout_s=deadline)
    raise ValueError(f"unknown backend {settings.backend!r} (local or triton)")


def make_worker(stage: str, bus: Bus, sessions: SessionStore, settings: Settings, models: Models,
                cancels: CancelWatch | None = None, consumer: str | None = None) -> StageWorker[Any]:
    common: dict[str, Any] = dict(
        consumer=consumer, concurrency=settings.worker_concurrency, reclaim_idle_ms=settings.reclaim_idle_ms,
        max_deliveries=settings.max_deliveries, cancels=cancels,
    )
    backend = make_backend(stage, settings, models)
    if stage == "speech_llm":
        from services.speech_llm import SpeechLLMWorker

        return SpeechLLMWorker(bus, backend, sessions, hidden_dtype=settings.hidden_dtype,
                               max_audio_s=settings.max_turn_audio_s, **common)
    if stage == "unit_generator":
        from services.unit_generator import UnitGeneratorWorker

        return UnitGeneratorWorker(bus, backend, hidden_size=models.config.llm.hidden_size, **common)
    if stage == "vocoder":
        from services.vocoder import VocoderWorker

        return VocoderWorker(bus, backend, num_units=models.config.vocoder.num_units, **common)
    raise ValueError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")


@dataclasses.dataclass
class DataPlane:
    """The three stages running in this process on the in-memory bus (embedded mode)."""

    bus: Bus
    sessions: SessionStore
    settings: Settings
    tasks: list[asyncio.Task[None]]


@contextlib.asynccontextmanager
async def embedded_data_plane(settings: Settings, models: Models | None = None) -> AsyncIterator[DataPlane]:
    """Starts one worker per stage (local backends) on a fresh in-memory bus and state; stops
    them on exit. An edge (services.gateway) on `bus` and `sessions` serves calls."""
    settings = settings.model_copy(update={"backend": "local", "bus_url": "memory://"})
    models = models or Models.load(settings.model_dir, "local")
    bus, sessions = open_bus(settings), open_sessions(settings)
    stop = asyncio.Event()
    cancels = CancelWatch(bus)
    workers = [make_worker(stage, bus, sessions, settings, models, cancels, f"{stage}-embedded") for stage in STAGES]
    tasks = [asyncio.create_task(w.run(stop)) for w in workers] + [asyncio.create_task(cancels.run(stop))]
    try:
        yield DataPlane(bus, sessions, settings, tasks)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in workers:
            await worker.backend.close()  # type: ignore[attr-defined]
        await sessions.close()
        await bus.close()


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def run_worker_process(stage: str, settings: Settings) -> None:
    """`python -m services.<stage>`: one worker of one stage until SIGTERM/SIGINT."""
    setup_logging(settings.log_level, settings.log_json)
    serve_metrics(settings.metrics_port)
    models = Models.load(settings.model_dir, settings.backend)
    bus = open_bus(settings)
    sessions = open_sessions(settings)
    worker = make_worker(stage, bus, sessions, settings, models)
    stop = asyncio.Event()
    stop_on_signals(stop)
    log(logger, logging.INFO, "worker started", stage=stage, consumer=worker.consumer, backend=settings.backend)
    try:
        await worker.run(stop)
    finally:
        await worker.backend.close()  # type: ignore[attr-defined]
        await sessions.close()
        await bus.close()
        log(logger, logging.INFO, "worker stopped", stage=stage, consumer=worker.consumer)


def worker_main(stage: str) -> None:
    from services.common.settings import get_settings

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_worker_process(stage, get_settings()))
