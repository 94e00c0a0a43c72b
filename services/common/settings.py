"""One settings system for every process: environment variables with the ECHOX_ prefix."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ECHOX_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Training: where recipes may read data from, and where runs are written.
    data_root: Path = REPO_ROOT / "data"
    runs_root: Path = REPO_ROOT / "runs"
    celery_broker_url: str | None = None  # defaults to redis_url
    celery_result_url: str | None = None  # defaults to redis_url
    stage_time_limit_s: int = 3600

    # Serving: the bus and conversation state ("memory://" in embedded mode), models, workers.
    bus_url: str | None = None  # defaults to redis_url
    bus_prefix: str = "echox:"  # every stream and key the services write starts with this
    stream_maxlen: int = 10_000  # every bus stream is capped near this many entries (MAXLEN ~)
    session_ttl_s: float = 3600.0  # a conversation's state expires this long after its last turn
    session_max_turns: int = 50  # turns of history kept per conversation
    redis_socket_timeout_s: float = 5.0  # a Redis call that gets no answer fails (BusError) after this
    model_dir: Path | None = None  # defaults to the embedded default model
    backend: str = "local"  # "local" (in-process torch) or "triton"
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC address, for backend=triton
    worker_concurrency: int = 1  # turns or segments one worker serves at once
    reclaim_idle_ms: int = 3000  # a message pending this long belongs to a dead worker
    max_deliveries: int = 3  # a message handed out more often is dead-lettered (poison)
    turn_deadline_s: float = 60.0  # every turn ends by then, with an error event if need be
    max_turn_audio_s: float = 30.0  # longest caller turn accepted
    hidden_dtype: str = "float16"  # hidden states on the wire: float16, bfloat16 or float32
    metrics_port: int | None = None  # Prometheus /metrics of this process, when set
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    # The edge and control plane (HTTP: browser page, API, WebSocket transports; LiveKit).
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    api_key: str | None = None  # the first admin key (stored hashed); more are made through the API
    token_secret: str | None = None  # signs session tokens; shared by every API/gateway replica
    session_token_ttl_s: float = 900.0
    livekit_enabled: bool = True  # the gateway process joins LiveKit rooms (echox serve: --livekit)
    livekit_url: str = "ws://127.0.0.1:7880"
    livekit_api_key: str = "devkey"
    livekit_api_secret: str = "secret"
    max_request_bytes: int = 10 * 1024 * 1024  # request size limit of the HTTP API
    rate_limit_per_minute: int = 600  # requests per API key per minute
    public_url: str | None = None  # the address callers reach the HTTP side at (behind a proxy); default: the request's
    api_metrics_public: bool = False  # /metrics on the HTTP port without a key: only where that port is internal
    celery_queue: str | None = None  # the Celery queue training jobs go to (None: Celery's default queue)
    job_kill_after_s: float = 10.0  # a cancelled stage still running this long after SIGTERM gets SIGKILL
    triton_model_repository: Path = REPO_ROOT / "deploy" / "triton" / "model_repository"  # models publish here
    triton_http_url: str | None = None  # Triton's HTTP address (http://host:8000): published versions load there
    vad_threshold: float = 0.5  # speech probability above which the caller is talking
    vad_end_of_turn_ms: int = 600  # silence that ends the caller's turn
    vad_barge_in_ms: int = 200  # speech over the agent this long interrupts it
    vad_model: str = "silero"  # the WebSocket transports' VAD: "silero" (ONNX, offline) or "energy" (tests)
    # The browser page at / may create its own session (POST /web/session, no API key): right for
    # `echox serve --embedded` and demos. Production turns it off (ECHOX_PUBLIC_PAGE=false) and
    # hands out session tokens through the API; /ws and /twilio always need a session token.
    public_page: bool = True
    log_level: str = "INFO"
    log_json: bool = True  # one JSON object per line, with session_id and turn_id

    @property
    def bus(self) -> str:
        return self.bus_url or self.redis_url

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    @property
    def result_url(self) -> str:
        return self.celery_result_url or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
