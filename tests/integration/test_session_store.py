"""Both session stores against one contract: MemorySessionStore, and RedisSessionStore on the
machine's Redis under a key prefix of its own (deleted afterwards). TTLs are checked with a
fake clock (memory) or with PTTL on the keys (Redis), not by sleeping."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis as redis_lib

from echox.tokenizer import Turn
from services.common.state import MemorySessionStore, RedisSessionStore, SessionStore, UnknownSession

pytestmark = pytest.mark.integration

StoreFactory = Callable[..., SessionStore]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def prefix() -> str:
    return f"test:state:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def sync_redis(redis_url: str, prefix: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest, prefix: str, clock: FakeClock) -> AsyncIterator[StoreFactory]:
    made: list[SessionStore] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    if url:
        request.getfixturevalue("sync_redis")  # deletes this test's keys at teardown

    def factory(ttl_s: float = 3600, max_turns: int = 50) -> SessionStore:
        store: SessionStore
        if url:
            store = RedisSessionStore(url, prefix=prefix, ttl_s=ttl_s, max_turns=max_turns)
        else:
            store = MemorySessionStore(ttl_s=ttl_s, max_turns=max_turns, clock=clock)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.close()


async def test_create_exists_history_append_end(make: StoreFactory) -> None:
    store = make()
    sid = await store.create()
    assert len(sid) == 32 and int(sid, 16) >= 0  # uuid4 hex
    assert await store.exists(sid)
    assert await store.history(sid) == []
    turns = [Turn("hello", "hi there"), Turn("ünïcode ✓ \"quotes\"\n", "")]
    for turn in turns:
        await store.append(sid, turn)
    assert await store.history(sid) == turns
    await store.end(sid)
    assert not await store.exists(sid)
    with pytest.raises(UnknownSession):
        await store.history(sid)
    await store.end(sid)  # ending twice is fine


async def test_create_with_a_given_id_keeps_existing_history(make: StoreFactory) -> None:
    store = make()
    assert await store.create("my-session") == "my-session"
    await store.append("my-session", Turn("a", "b"))
    assert await store.create("my-session") == "my-session"
    assert await store.history("my-session") == [Turn("a", "b")]
    assert await store.create() != await store.create()


async def test_amend_last_rewrites_only_the_newest_turn(make: StoreFactory) -> None:
    store = make()
    sid = await store.create()
    await store.amend_last(sid, Turn("x", "y"))  # nothing to amend yet: no error, no turn
    assert await store.history(sid) == []
    await store.append(sid, Turn("q1", "a1"))
    await store.append(sid, Turn("q2", "the whole answer"))
    await store.amend_last(sid, Turn("q2", "the whole"))
    assert await store.history(sid) == [Turn("q1", "a1"), Turn("q2", "the whole")]
    with pytest.raises(UnknownSession):
        await store.amend_last("nope", Turn("a", "b"))


async def test_unknown_session(make: StoreFactory) -> None:
    store = make()
    assert not await store.exists("nope")
    with pytest.raises(UnknownSession) as info:
        await store.history("nope")
    assert info.value.session_id == "nope"
    with pytest.raises(UnknownSession):
        await store.append("nope", Turn("a", "b"))  # never resurrects a session
    assert not await store.exists("nope")


async def test_history_keeps_the_last_max_turns(make: StoreFactory) -> None:
    store = make(max_turns=3)
    sid = await store.create()
    for i in range(5):
        await store.append(sid, Turn(f"u{i}", f"a{i}"))
    assert await store.history(sid) == [Turn(f"u{i}", f"a{i}") for i in (2, 3, 4)]


async def test_sessions_are_independent(make: StoreFactory) -> None:
    store = make()
    a, b = await store.create(), await store.create()
    await store.append(a, Turn("to a", "x"))
    assert await store.history(b) == []
    await store.end(a)
    assert await store.exists(b)


async def test_memory_ttl_is_refreshed_by_append(clock: FakeClock) -> None:
    store = MemorySessionStore(ttl_s=100, clock=clock)
    sid = await store.create()
    clock.now += 90
    await store.append(sid, Turn("a", "b"))  # expires 100 s from now, not 10
    clock.now += 60
    assert await store.history(sid) == [Turn("a", "b")]
    clock.now += 41
    assert not await store.exists(sid)
    with pytest.raises(UnknownSession):
        await store.history(sid)


async def test_redis_keys_and_ttl_refresh(redis_url: str, prefix: str, sync_redis: redis_lib.Redis) -> None:
    store = RedisSessionStore(redis_url, prefix=prefix, ttl_s=100)
    try:
        sid = await store.create()
        marker, history = f"{prefix}session:{sid}", f"{prefix}session:{sid}:history"
        assert 0 < sync_redis.pttl(marker) <= 100_000
        await store.append(sid, Turn("a", "b"))
        assert sync_redis.llen(history) == 1
        for key in (marker, history):  # as if 95 s had passed
            sync_redis.pexpire(key, 5_000)
        await store.append(sid, Turn("c", "d"))
        for key in (marker, history):
            assert 50_000 < sync_redis.pttl(key) <= 100_000
        await store.history(sid)  # reading does not refresh
        assert sync_redis.pttl(marker) <= 100_000
    finally:
        await store.close()


async def test_redis_session_expires(redis_url: str, prefix: str, sync_redis: redis_lib.Redis) -> None:
    store = RedisSessionStore(redis_url, prefix=prefix, ttl_s=0.2)
    try:
        sid = await store.create()
        await store.append(sid, Turn("a", "b"))
        async with asyncio.timeout(10):  # hang guard only
            while await store.exists(sid):
                await asyncio.sleep(0.05)
        with pytest.raises(UnknownSession):
            await store.history(sid)
        assert not sync_redis.exists(f"{prefix}session:{sid}:history")
    finally:
        await store.close()
