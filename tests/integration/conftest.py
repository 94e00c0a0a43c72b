"""Integration tests run against real services: Redis (started by `make test`), real Celery
workers. A missing service is a failure, never a skip."""

from __future__ import annotations

import pytest
import redis as redis_lib

from services.common.settings import get_settings


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = get_settings().redis_url
    try:
        redis_lib.Redis.from_url(url, socket_timeout=2).ping()
    except redis_lib.exceptions.ConnectionError as exc:
        pytest.fail(f"integration tests need Redis at {url} (run `bash scripts/ensure-redis.sh`): {exc}")
    return url
