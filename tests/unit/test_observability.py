"""Every stage reports Prometheus metrics, and logs are JSON lines carrying the session and
turn ids and the trace context, in embedded mode as in the distributed one."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from prometheus_client import REGISTRY

from echox.espeak import speak
from services.common.logs import JsonFormatter
from services.common.metrics import METRIC_NAMES
from services.common.processes import free_port
from services.common.settings import get_settings
from services.gateway.client import ConverseClient
from services.serve import serve_embedded

pytestmark = pytest.mark.unit


def _count(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_turn_is_measured_and_logged_with_its_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)
    stages = ("speech_llm", "unit_generator", "vocoder")
    before = {s: _count("echox_stage_latency_seconds_count", {"stage": s}) for s in stages}
    ttfa_before = _count("echox_time_to_first_audio_seconds_count", {"transport": "grpc"})
    port = free_port()
    stop, ready = asyncio.Event(), asyncio.Event()
    settings = get_settings().model_copy(update={"grpc_port": port, "http_port": 0})
    server = asyncio.create_task(serve_embedded(settings, stop, ready))
    try:
        await asyncio.wait_for(ready.wait(), timeout=120)
        async with ConverseClient(f"127.0.0.1:{port}") as client:
            result = await client.turn(speak("What is the capital of France?", voice="en-us+m5"))
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=30)
        root.removeHandler(handler)
        root.setLevel(previous)
    assert result.error is None
    for stage in stages:
        assert _count("echox_stage_latency_seconds_count", {"stage": stage}) > before[stage], stage
        assert _count("echox_queue_lag_seconds_count", {"stage": stage}) > 0, stage
    assert _count("echox_time_to_first_audio_seconds_count", {"transport": "grpc"}) == ttfa_before + 1
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ours = [line for line in lines if line.get("turn_id") == result.turn_id]
    assert {line["msg"] for line in ours} >= {"served", "turn finished"}
    assert all(line["session_id"] == result.session_id and line["traceparent"].startswith("00-") for line in ours)


def test_every_metric_name_is_registered() -> None:
    registered = {metric.name for metric in REGISTRY.collect()}
    # Counters are collected without their _total suffix.
    assert {name.removesuffix("_total") for name in METRIC_NAMES} <= registered
