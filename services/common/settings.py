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

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    @property
    def result_url(self) -> str:
        return self.celery_result_url or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
