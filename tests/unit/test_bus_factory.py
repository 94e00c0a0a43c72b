"""make_bus / make_session_store: which implementation a URL selects, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.common.bus import MemoryBus, RedisBus, make_bus, url_kind
from services.common.bus.redis import redact_url
from services.common.state import MemorySessionStore, RedisSessionStore, make_session_store

REDIS_URLS = ["redis://127.0.0.1:6379/0", "rediss://user:pw@cache.example:6380/2", "unix:///run/redis.sock?db=1"]
BAD_URLS = ["", "127.0.0.1:6379", "http://127.0.0.1:6379", "postgres://u:hunter2@db/x", "memory", "redis:/x"]


async def test_memory_url_gives_a_memory_bus() -> None:
    bus = make_bus("memory://", maxlen=7)
    assert isinstance(bus, MemoryBus) and bus.maxlen == 7
    assert url_kind("MEMORY://") == "memory"


@pytest.mark.parametrize("url", REDIS_URLS)
async def test_redis_urls_give_a_redis_bus(url: str) -> None:
    bus = make_bus(url, prefix="p:", maxlen=9)  # connects lazily: no server needed here
    try:
        assert isinstance(bus, RedisBus)
        assert (bus.prefix, bus.maxlen) == ("p:", 9)
        assert "pw" not in bus._where
    finally:
        await bus.close()


@pytest.mark.parametrize("url", BAD_URLS)
def test_other_urls_are_refused_without_leaking_secrets(url: str) -> None:
    with pytest.raises(ValueError, match="memory://, redis://, rediss:// or unix://") as info:
        make_bus(url)
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValueError):
        make_session_store(url)


async def test_session_store_factory() -> None:
    memory = make_session_store("memory://", ttl_s=5)
    assert isinstance(memory, MemorySessionStore) and memory.ttl_s == 5
    store = make_session_store("redis://127.0.0.1:6379/0", prefix="x:", ttl_s=9)
    try:
        assert isinstance(store, RedisSessionStore)
        assert (store.prefix, store.ttl_s) == ("x:", 9)
        assert store.marker_key("s1") == "x:session:s1"
        assert store.history_key("s1") == "x:session:s1:history"
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:secret@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("rediss://user:secret@[::1]:6380/1?password=secret", "rediss://[::1]:6380/1"),
        ("unix:///run/redis.sock?password=secret", "unix:///run/redis.sock"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_embedded_mode_does_not_import_redis() -> None:
    code = (
        "import sys, asyncio\n"
        "from services.common.bus import make_bus\n"
        "from services.common.state import make_session_store\n"
        "make_bus('memory://'); make_session_store('memory://')\n"
        "assert not [m for m in sys.modules if m == 'redis' or m.startswith('redis.')], 'redis imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
