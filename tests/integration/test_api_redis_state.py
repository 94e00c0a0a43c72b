"""The API's state in the real Redis: keys and rate limits hold across replicas, and a Redis
that cannot be reached makes routes answer 503 and readiness fail, never a 500."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib
from fastapi.testclient import TestClient

from services.api import create_app
from services.common.processes import free_port
from services.common.settings import Settings

ADMIN = "admin-key-of-the-redis-state-test-0123456789"


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    prefix = f"echox-test-apistate-{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis_lib.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def _settings(url: str, prefix: str, per_minute: int = 1000) -> Settings:
    return Settings(redis_url=url, bus_url=url, bus_prefix=prefix, api_key=ADMIN, token_secret="state-test",
                    rate_limit_per_minute=per_minute, redis_socket_timeout_s=1.0,
                    livekit_api_secret="state-test-livekit-secret-0123456789abcdef")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_and_limits_are_shared_by_replicas(redis_url: str, prefix: str) -> None:
    with TestClient(create_app(_settings(redis_url, prefix, per_minute=4))) as one, \
            TestClient(create_app(_settings(redis_url, prefix, per_minute=4))) as two:
        made = one.post("/v1/keys", json={"name": "app", "scope": "client"}, headers=_auth(ADMIN)).json()
        assert two.post("/v1/sessions", headers=_auth(made["key"])).status_code == 201
        assert two.post("/v1/jobs", json={"recipe": "tiny"}, headers=_auth(made["key"])).status_code == 403
        assert one.delete(f"/v1/keys/{made['id']}", headers=_auth(ADMIN)).status_code == 204
        assert two.post("/v1/sessions", headers=_auth(made["key"])).status_code == 401
        # 4 requests a minute for the admin key across both replicas (it made 2 so far): 9 more
        # overrun it even if the minute turns meanwhile.
        codes = [replica.get("/v1/keys", headers=_auth(ADMIN)).status_code for replica in (one, two) * 5]
        assert 429 in codes


def test_an_unreachable_redis_is_503_not_500(prefix: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(_settings(dead, prefix))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unready"
        assert client.get("/healthz").status_code == 200
        keyless = client.get("/v1/keys", headers=_auth(ADMIN))  # the configured key needs no Redis…
        assert keyless.status_code == 503  # …but its rate limit does
        assert client.get("/v1/keys", headers=_auth("echox_unknown")).status_code == 503
        assert "unavailable" in keyless.json()["detail"] and "Traceback" not in keyless.text
