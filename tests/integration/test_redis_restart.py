"""RedisBus and RedisSessionStore through a Redis outage, on a private redis-server (its own
free port, no persistence; the machine's shared Redis is never touched): while it is down every
call fails with BusError within a bounded time, and after it is back the same objects work
again, consumer groups created before the restart included."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from echox.tokenizer import Turn
from services.common.bus import BusError, RedisBus
from services.common.state import RedisSessionStore, UnknownSession

pytestmark = pytest.mark.integration

HANG_GUARD_S = 10.0  # a failing call must end well within this; it is a guard, not a timing claim


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """One redis-server process of this test's own; stop() and start() keep the port."""

    def __init__(self, exe: str, workdir: Path) -> None:
        self.exe, self.workdir, self.port = exe, workdir, _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis_lib.Redis(port=self.port, socket_timeout=1).ping()
                return
            except redis_lib.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                    pytest.fail(f"private redis-server on port {self.port} did not start:\n{log}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    private = PrivateRedis(exe, tmp_path)
    private.start()
    yield private
    private.stop()


@pytest.fixture
async def bus(server: PrivateRedis) -> AsyncIterator[RedisBus]:
    bus = RedisBus(server.url, prefix="restart:", socket_timeout_s=1.0)
    yield bus
    await bus.close()


async def _fails(call: Awaitable[Any], port: int) -> BusError:
    async with asyncio.timeout(HANG_GUARD_S):
        with pytest.raises(BusError) as info:
            await call
    assert f"127.0.0.1:{port}" in str(info.value)
    return info.value


def _bus_calls(bus: RedisBus, entry_id: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "publish": lambda: bus.publish("work", b"x"),
        "ensure_group": lambda: bus.ensure_group("work", "g"),
        "consume": lambda: bus.consume("work", "g", "c", block_ms=0),
        "consume blocking": lambda: bus.consume("work", "g", "c", block_ms=200),
        "ack": lambda: bus.ack("work", "g", entry_id),
        "reclaim": lambda: bus.reclaim("work", "g", "c", min_idle_ms=0),
        "touch": lambda: bus.touch("work", "g", "c", [entry_id]),
        "read": lambda: bus.read("out", "0", block_ms=0),
        "read blocking": lambda: bus.read("out", "$", block_ms=200),
        "last_id": lambda: bus.last_id("out"),
        "delete": lambda: bus.delete("out"),
        "ping": bus.ping,
    }


async def test_bus_fails_fast_while_down_and_recovers(server: PrivateRedis, bus: RedisBus) -> None:
    await bus.ensure_group("work", "g")
    entry_id = await bus.publish("work", b"before")
    assert len(await bus.consume("work", "g", "c", block_ms=500)) == 1
    server.stop()
    for name, call in _bus_calls(bus, entry_id).items():
        error = await _fails(call(), server.port)
        assert error.__cause__ is not None, name
    server.start()
    await _works_again(bus)


async def _works_again(bus: RedisBus) -> None:
    """The group "g" on "work" was ensured before the restart, which lost it."""
    async with asyncio.timeout(HANG_GUARD_S):
        await bus.ping()
        assert await bus.consume("work", "g", "c", block_ms=100) == []  # NOGROUP: recreated
        entry_id = await bus.publish("work", b"after")
        (delivery,) = await bus.consume("work", "g", "c", block_ms=500)
        assert (delivery.id, delivery.payload) == (entry_id, b"after")
        await bus.touch("work", "g", "c", [entry_id])
        await asyncio.sleep(0.15)
        (again,) = await bus.reclaim("work", "g", "other", min_idle_ms=100)
        assert again.deliveries == 2
        await bus.ack("work", "g", entry_id)
        assert [e.payload for e in await bus.read("work", "0", block_ms=100)] == [b"after"]
        assert await bus.last_id("work") == entry_id


async def _restart(server: PrivateRedis) -> None:
    server.stop()
    await asyncio.sleep(0.2)  # a running process's event loop sees the server close its connections
    server.start()


async def _use_both_clients(bus: RedisBus) -> None:
    """Leaves a pooled connection in the plain and in the blocking client."""
    await bus.ensure_group("work", "g")
    await bus.consume("work", "g", "c", block_ms=50)
    await bus.read("out", "0", block_ms=50)


async def test_bus_recovers_after_a_restart_while_idle(server: PrivateRedis, bus: RedisBus) -> None:
    await _use_both_clients(bus)
    await _restart(server)
    await _works_again(bus)


async def test_a_stale_connection_fails_one_call_only(server: PrivateRedis, bus: RedisBus) -> None:
    # Restarted without the event loop running in between: the pooled connections' EOF is not
    # seen yet, so the first call on each may fail; it must not leave the client unusable.
    await _use_both_clients(bus)
    server.stop()
    server.start()
    for call in (bus.ping, lambda: bus.consume("work", "g", "c", block_ms=50)):
        with contextlib.suppress(BusError):
            async with asyncio.timeout(HANG_GUARD_S):
                await call()
    await _works_again(bus)


async def test_reclaim_and_touch_recreate_a_lost_group(server: PrivateRedis, bus: RedisBus) -> None:
    await bus.ensure_group("work", "g")
    await _restart(server)
    async with asyncio.timeout(HANG_GUARD_S):
        assert await bus.reclaim("work", "g", "c", min_idle_ms=0) == []
        await _restart(server)
        await bus.touch("work", "g", "c", ["1-0"])
        assert await bus.consume("work", "g", "c", block_ms=0) == []


async def test_blocked_consume_fails_when_the_server_dies(server: PrivateRedis, bus: RedisBus) -> None:
    await bus.ensure_group("work", "g")
    blocked = asyncio.create_task(bus.consume("work", "g", "c", block_ms=60_000))
    reading = asyncio.create_task(bus.read("out", "$", block_ms=60_000))
    await asyncio.sleep(0.3)
    server.stop()
    for task in (blocked, reading):
        await _fails(task, server.port)


async def test_a_server_that_never_answers_times_out() -> None:
    """Accepts connections and says nothing: socket timeouts, not hangs."""
    silent: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    bus = RedisBus(f"redis://user:secret@127.0.0.1:{port}/0", socket_timeout_s=0.5)
    try:
        for call in (bus.ping(), bus.publish("s", b"x"), bus.consume("s", "g", "c", block_ms=300),
                     bus.read("s", "0", block_ms=300)):
            error = await _fails(call, port)
            assert "secret" not in str(error)
    finally:
        await bus.close()
        for writer in silent:
            writer.close()
        listener.close()
        with contextlib.suppress(Exception):
            await listener.wait_closed()


async def test_session_store_fails_fast_while_down_and_recovers(server: PrivateRedis) -> None:
    store = RedisSessionStore(server.url, prefix="restart:", ttl_s=60, socket_timeout_s=1.0)
    try:
        sid = await store.create()
        await store.append(sid, Turn("a", "b"))
        server.stop()
        calls: list[Awaitable[Any]] = [
            store.create(), store.exists(sid), store.history(sid), store.append(sid, Turn("c", "d")), store.end(sid),
        ]
        for call in calls:
            await _fails(call, server.port)
        server.start()
        async with asyncio.timeout(HANG_GUARD_S):
            assert not await store.exists(sid)  # no persistence: the state is gone, the store works
            with pytest.raises(UnknownSession):
                await store.history(sid)
            await store.create(sid)
            await store.append(sid, Turn("again", "yes"))
            assert await store.history(sid) == [Turn("again", "yes")]
    finally:
        await store.close()
