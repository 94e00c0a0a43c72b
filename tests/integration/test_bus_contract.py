"""One contract for both buses: every test runs on MemoryBus and on RedisBus (the machine's
Redis, under a key prefix of its own that the fixture deletes afterwards).

Waits are bounded by `guard` (a hang guard, never a timing assertion)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis as redis_lib

from services.common.bus import Bus, BusError, MemoryBus, RedisBus

pytestmark = pytest.mark.integration

BusFactory = Callable[..., Bus]
HANG_GUARD_S = 15.0


def guard() -> asyncio.Timeout:
    return asyncio.timeout(HANG_GUARD_S)


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[BusFactory]:
    """Builds buses of the parametrized kind; closes them and deletes their keys afterwards."""
    made: list[Bus] = []
    prefix = f"test:bus:{uuid.uuid4().hex[:12]}:"
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""

    def factory(maxlen: int = 10_000) -> Bus:
        bus: Bus = MemoryBus(maxlen=maxlen) if request.param == "memory" else RedisBus(url, prefix, maxlen)
        made.append(bus)
        return bus

    yield factory
    for bus in made:
        await bus.close()
    if url:
        client = redis_lib.Redis.from_url(url)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()


@pytest.fixture
async def bus(make: BusFactory) -> Bus:
    return make()


def parse(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


async def test_publish_consume_ack(bus: Bus) -> None:
    await bus.ensure_group("work", "g")
    await bus.ensure_group("work", "g")  # idempotent
    payloads = [b"", bytes(range(256)), b"third"]
    ids = [await bus.publish("work", p) for p in payloads]
    async with guard():
        got = await bus.consume("work", "g", "c1", count=10, block_ms=500)
    assert [(d.stream, d.id, d.payload, d.deliveries) for d in got] == [
        ("work", i, p, 1) for i, p in zip(ids, payloads, strict=True)
    ]
    for d in got:
        await bus.ack("work", "g", d.id)
    assert await bus.reclaim("work", "g", "c2", min_idle_ms=0) == []  # acked: nothing pending
    async with guard():
        assert await bus.consume("work", "g", "c1", block_ms=50) == []
    await bus.ack("work", "g", ids[0])  # acking twice, or in a missing group, is a no-op
    await bus.ack("work", "nogroup", ids[0])


async def test_ids_increase_and_group_starts_at_beginning(bus: Bus) -> None:
    ids = [await bus.publish("work", b"%d" % i) for i in range(50)]
    assert [parse(i) for i in ids] == sorted({parse(i) for i in ids})  # strictly increasing
    await bus.ensure_group("work", "late")  # created after the publishes: still sees them all
    async with guard():
        got = await bus.consume("work", "late", "c", count=100, block_ms=100)
    assert [d.id for d in got] == ids


async def test_consume_count_limits_a_batch(bus: Bus) -> None:
    await bus.ensure_group("work", "g")
    for i in range(5):
        await bus.publish("work", b"%d" % i)
    async with guard():
        first = await bus.consume("work", "g", "c", count=2, block_ms=100)
        rest = await bus.consume("work", "g", "c", count=10, block_ms=100)
    assert [d.payload for d in first] == [b"0", b"1"]
    assert [d.payload for d in rest] == [b"2", b"3", b"4"]


async def test_each_entry_goes_to_one_consumer_of_a_group(bus: Bus) -> None:
    await bus.ensure_group("work", "g")
    ids = [await bus.publish("work", b"%d" % i) for i in range(10)]
    seen: dict[str, list[str]] = {"c1": [], "c2": []}
    async with guard():
        while True:
            batch = {c: await bus.consume("work", "g", c, count=3, block_ms=50) for c in seen}
            if not any(batch.values()):
                break
            for c, deliveries in batch.items():
                seen[c] += [d.id for d in deliveries]
    assert sorted(seen["c1"] + seen["c2"]) == sorted(ids)  # all of them, none twice
    assert seen["c1"] and seen["c2"]


async def test_blocked_consumers_share_one_entry(bus: Bus) -> None:
    await bus.ensure_group("work", "g")
    async with guard():
        waiting = [asyncio.create_task(bus.consume("work", "g", c, block_ms=800)) for c in ("c1", "c2")]
        await asyncio.sleep(0.1)
        entry_id = await bus.publish("work", b"only")
        results = await asyncio.gather(*waiting)
    assert sorted(len(r) for r in results) == [0, 1]
    assert [d.id for r in results for d in r] == [entry_id]


async def test_every_group_gets_every_entry(bus: Bus) -> None:
    for group in ("a", "b"):
        await bus.ensure_group("work", group)
    ids = [await bus.publish("work", b"%d" % i) for i in range(4)]
    async with guard():
        for group in ("a", "b"):
            got = await bus.consume("work", group, "c", count=10, block_ms=100)
            assert [d.id for d in got] == ids


async def test_unacked_entries_are_reclaimed_after_min_idle_only(bus: Bus) -> None:
    await bus.ensure_group("work", "g")
    entry_id = await bus.publish("work", b"job")
    async with guard():
        (first,) = await bus.consume("work", "g", "dead", block_ms=500)
        assert first.deliveries == 1
        assert await bus.consume("work", "g", "live", block_ms=50) == []  # pending, not new
        assert await bus.reclaim("work", "g", "live", min_idle_ms=60_000) == []  # not idle long enough
        await asyncio.sleep(0.2)
        (second,) = await bus.reclaim("work", "g", "live", min_idle_ms=100)
        assert (second.id, second.payload, second.deliveries) == (entry_id, b"job", 2)
        assert await bus.reclaim("work", "g", "third", min_idle_ms=60_000) == []  # reclaim reset the idle time
        await asyncio.sleep(0.2)
        (third,) = await bus.reclaim("work", "g", "third", min_idle_ms=100)
        assert third.deliveries == 3
        await bus.ack("work", "g", entry_id)
        await asyncio.sleep(0.2)
        assert await bus.reclaim("work", "g", "fourth", min_idle_ms=100) == []


async def test_reclaim_count_limits_a_batch(bus: Bus) -> None:
    await bus.ensure_group("work", "g")
    for i in range(5):
        await bus.publish("work", b"%d" % i)
    async with guard():
        assert len(await bus.consume("work", "g", "dead", count=5, block_ms=100)) == 5
        await asyncio.sleep(0.15)
        first = await bus.reclaim("work", "g", "live", min_idle_ms=100, count=2)
        rest = await bus.reclaim("work", "g", "live2", min_idle_ms=100, count=10)
    assert [d.payload for d in first] == [b"0", b"1"]
    assert [d.payload for d in rest] == [b"2", b"3", b"4"]


async def test_touch_prevents_reclaim(bus: Bus) -> None:
    await bus.ensure_group("work", "g")
    entry_id = await bus.publish("work", b"slow job")
    async with guard():
        await bus.consume("work", "g", "busy", block_ms=500)
        await asyncio.sleep(0.6)
        await bus.touch("work", "g", "busy", [entry_id])
        await bus.touch("work", "g", "busy", [])
        assert await bus.reclaim("work", "g", "other", min_idle_ms=500) == []
        await asyncio.sleep(0.6)  # stops touching: now it may be taken over
        (taken,) = await bus.reclaim("work", "g", "other", min_idle_ms=500)
        assert (taken.id, taken.deliveries) == (entry_id, 2)


async def test_touch_does_not_take_back_a_reclaimed_entry(bus: Bus) -> None:
    await bus.ensure_group("work", "g")
    entry_id = await bus.publish("work", b"job")
    async with guard():
        await bus.consume("work", "g", "slow", block_ms=500)
        await asyncio.sleep(0.2)
        assert len(await bus.reclaim("work", "g", "rescuer", min_idle_ms=100)) == 1
        await asyncio.sleep(0.2)
        await bus.touch("work", "g", "slow", [entry_id])  # not slow's any more: no effect
        (again,) = await bus.reclaim("work", "g", "third", min_idle_ms=100)
    assert (again.id, again.deliveries) == (entry_id, 3)


async def test_consume_on_an_unknown_group_fails(bus: Bus) -> None:
    await bus.publish("work", b"x")
    with pytest.raises(BusError):
        await bus.consume("work", "never-ensured", "c", block_ms=0)
    with pytest.raises(BusError):
        await bus.reclaim("work", "never-ensured", "c", min_idle_ms=0)
    with pytest.raises(BusError):
        await bus.touch("work", "never-ensured", "c", ["1-0"])


async def test_read_after_start_id_and_now(bus: Bus) -> None:
    ids = [await bus.publish("out", b"%d" % i) for i in range(3)]
    async with guard():
        assert [e.id for e in await bus.read("out", "0", block_ms=0)] == ids
        assert [e.payload for e in await bus.read("out", ids[0], block_ms=100)] == [b"1", b"2"]
        assert [e.payload for e in await bus.read("out", "0", count=2, block_ms=100)] == [b"0", b"1"]
        assert await bus.read("out", ids[-1], block_ms=50) == []
        assert await bus.read("out", "$", block_ms=0) == []
        # Read twice from the start: reading moves nothing (no group).
        assert len(await bus.read("out", "0", block_ms=0)) == 3


async def test_read_dollar_sees_only_newer_entries(bus: Bus) -> None:
    await bus.publish("out", b"old")
    async with guard():
        reader = asyncio.create_task(bus.read("out", "$", block_ms=5000))
        while not reader.done():  # keep publishing until the blocked reader has seen one
            await bus.publish("out", b"new")
            await asyncio.sleep(0.05)
        got = await reader
    assert got and all(e.payload == b"new" for e in got)


async def test_blocked_read_wakes_on_publish(bus: Bus) -> None:
    async with guard():
        reader = asyncio.create_task(bus.read("out", "0", block_ms=5000))  # stream does not exist yet
        await asyncio.sleep(0.1)
        entry_id = await bus.publish("out", b"hello")
        assert [(e.id, e.payload) for e in await reader] == [(entry_id, b"hello")]


async def test_block_ms_returns_empty_after_the_deadline(bus: Bus) -> None:
    await bus.ensure_group("idle", "g")
    async with guard():
        assert await bus.consume("idle", "g", "c", block_ms=200) == []
        assert await bus.consume("idle", "g", "c", block_ms=0) == []
        assert await bus.read("idle", "0", block_ms=200) == []
        assert await bus.read("missing", "$", block_ms=200) == []
        assert await bus.read("missing", "0", block_ms=0) == []


async def test_streams_are_capped_near_maxlen(make: BusFactory) -> None:
    bus = make(maxlen=100)
    ids = [await bus.publish("capped", b"%d" % i) for i in range(1000)]
    kept = await bus.read("capped", "0", count=10_000, block_ms=0)
    assert 100 <= len(kept) <= 300  # approximate capping (MAXLEN ~), newest entries kept
    assert [e.id for e in kept] == ids[-len(kept) :]


async def test_last_id(bus: Bus) -> None:
    assert await bus.last_id("out") == "0"
    await bus.publish("out", b"a")
    newest = await bus.publish("out", b"b")
    assert await bus.last_id("out") == newest
    async with guard():
        assert await bus.read("out", await bus.last_id("out"), block_ms=0) == []


async def test_delete(bus: Bus) -> None:
    await bus.ensure_group("work", "g")
    await bus.publish("work", b"gone")
    await bus.delete("work")
    await bus.delete("never-existed")
    assert await bus.last_id("work") == "0"
    async with guard():
        assert await bus.read("work", "0", block_ms=0) == []
        # The group went with the stream; a bus that ensured it recreates it on the next consume.
        assert await bus.consume("work", "g", "c", block_ms=0) == []
        entry_id = await bus.publish("work", b"after")
        assert [d.id for d in await bus.consume("work", "g", "c", block_ms=500)] == [entry_id]


async def test_ping_and_close_wakes_blocked_readers(bus: Bus) -> None:
    await bus.ping()
    await bus.ensure_group("work", "g")
    async with guard():
        blocked = [
            asyncio.create_task(bus.read("out", "$", block_ms=10_000)),
            asyncio.create_task(bus.consume("work", "g", "c", block_ms=10_000)),
        ]
        await asyncio.sleep(0.2)
        await bus.close()
        results = await asyncio.gather(*blocked, return_exceptions=True)
    for result in results:  # ended early: empty, or a BusError for a closed connection
        assert result == [] or isinstance(result, BusError), result


async def test_expire_deletes_a_stream_later_unless_renewed(bus: Bus) -> None:
    await bus.publish("session-out", b"a")
    await bus.expire("session-out", 60.0)
    assert await bus.last_id("session-out") != "0", "not deleted before its time"
    await bus.expire("session-out", 0.001)
    await asyncio.sleep(0.05)
    await bus.publish("other", b"x")  # any later operation sees it gone
    assert await bus.last_id("session-out") == "0"
