"""Prometheus metrics of the data plane: one registry for every service, one name per figure."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

QUEUE_LAG = Histogram(
    "echox_queue_lag_seconds", "Time a message waited on its stream before a worker took it",
    ["stage"], buckets=_LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "echox_stage_latency_seconds", "Time a stage spent on one message (a whole turn for speech_llm)",
    ["stage"], buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_AUDIO = Histogram(
    "echox_time_to_first_audio_seconds", "From the end of the caller's turn to the first answer audio",
    ["transport"], buckets=_LATENCY_BUCKETS,
)
BARGE_IN = Histogram(
    "echox_barge_in_seconds", "From the caller's speech onset over the agent to its playback stopped",
    ["transport"], buckets=_LATENCY_BUCKETS,
)
MESSAGES = Counter(
    "echox_messages_total", "Messages a stage finished, by outcome", ["stage", "outcome"],
)
ERRORS = Counter("echox_errors_total", "Error events published, by stage and code", ["stage", "code"])
TURNS = Counter("echox_turns_total", "Turns finished at the edge, by outcome", ["outcome"])
ACTIVE_SESSIONS = Gauge("echox_active_sessions", "Conversations open at this edge")
IN_FLIGHT = Gauge("echox_in_flight", "Messages a stage is working on now", ["stage"])
API_REQUESTS = Counter(
    "echox_api_requests_total", "HTTP API requests, by route template and status", ["method", "route", "status"],
)
API_LATENCY = Histogram(
    "echox_api_request_seconds", "Time the HTTP API took to answer", ["method", "route"], buckets=_LATENCY_BUCKETS,
)

METRIC_NAMES = (
    "echox_queue_lag_seconds", "echox_stage_latency_seconds", "echox_time_to_first_audio_seconds",
    "echox_barge_in_seconds",
    "echox_messages_total", "echox_errors_total", "echox_turns_total", "echox_active_sessions", "echox_in_flight",
    "echox_api_requests_total", "echox_api_request_seconds",
)


def serve_metrics(port: int | None, host: str = "0.0.0.0") -> None:
    """Exposes /metrics on `port` (no-op when None)."""
    if port is not None:
        start_http_server(port, addr=host)
