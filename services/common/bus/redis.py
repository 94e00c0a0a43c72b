"""`RedisBus`: the bus on Redis Streams, with consumer groups (redis.asyncio, hiredis).

Failure model: a down or restarted Redis makes each call fail fast with `BusError` (no
client-side retries, bounded socket timeouts); the next call reconnects by itself. Redis runs
without persistence, so a restart loses the consumer groups: calls that need a group recreate
the ones this object ensured (at id 0) on NOGROUP and try once more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.typing import KeyT, StreamIdT

from services.common.bus.base import BusError, Delivery, Entry

T = TypeVar("T")

_FIELD = b"p"  # the one field of every stream entry: the payload

# Resets the idle time of the given entries, but only of those still pending for this consumer:
# a plain XCLAIM would take back an entry another consumer has reclaimed meanwhile.
_TOUCH_LUA = """
local group, consumer = ARGV[1], ARGV[2]
local claim = {'XCLAIM', KEYS[1], group, consumer, '0'}
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], group, ARGV[i], ARGV[i], 1, consumer) > 0 then
    claim[#claim + 1] = ARGV[i]
  end
end
if #claim == 5 then return 0 end
claim[#claim + 1] = 'JUSTID'
return #redis.call(unpack(claim))
"""


class RedisRefused(BusError):
    """Redis answered with an error reply; `code` is its first word (NOGROUP, BUSYGROUP, ...)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def redact_url(url: str) -> str:
    """The URL without user, password or query (which may carry a password), for messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host += f":{parts.port}"
    except ValueError:
        return "<unparseable redis url>"
    return f"{parts.scheme}://{host}{parts.path}"


def open_client(url: str, socket_timeout_s: float | None, connect_timeout_s: float) -> aredis.Redis:
    """A retry-free client: a down server fails the call at once instead of after backoffs.
    The pool reconnects on the next call (it replaces connections the server closed)."""
    return aredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
        protocol=2,  # the reply shapes parsed below
        decode_responses=False,
    )


async def close_client(client: aredis.Redis) -> None:
    """Closes the client and its pool; a server that is already gone is not an error here."""
    with contextlib.suppress(RedisError, OSError):
        await client.aclose()


async def call(op: str, where: str, pending: Awaitable[T], timeout_s: float | None = None) -> T:
    """Awaits one Redis call, turning every failure into a BusError that names `op` and `where`."""
    try:
        if timeout_s is None:
            return await pending
        return await asyncio.wait_for(pending, timeout_s)
    except ResponseError as exc:
        text = str(exc)
        code = "NOGROUP" if "NOGROUP" in text else text.split(" ", 1)[0]  # scripts prefix their errors
        raise RedisRefused(f"redis {op} on {where} refused: {text}", code) from exc
    except (RedisError, OSError) as exc:  # OSError includes asyncio's TimeoutError
        detail = str(exc) or "timed out"
        raise BusError(f"redis {op} on {where} failed: {type(exc).__name__}: {detail}") from exc


def _id(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _entries(reply: Any) -> list[tuple[str, bytes]]:
    """(id, payload) of the one stream in an XREAD/XREADGROUP reply (RESP2: [[key, entries]])."""
    if not reply:
        return []
    return [(_id(eid), fields.get(_FIELD, b"")) for eid, fields in reply[0][1] if eid is not None]


class RedisBus:
    """Streams `<prefix><stream>` on one Redis server (or any server the URL names)."""

    def __init__(self, url: str, prefix: str = "echox:", maxlen: int = 10_000, socket_timeout_s: float = 5.0) -> None:
        self.prefix = prefix
        self.maxlen = maxlen
        self.socket_timeout_s = socket_timeout_s
        self._where = redact_url(url)
        self._client = open_client(url, socket_timeout_s, socket_timeout_s)
        # Blocking reads wait longer than any socket timeout: their own client, bounded per call.
        self._blocking = open_client(url, None, socket_timeout_s)
        self._touch = self._client.register_script(_TOUCH_LUA)
        self._ensured: set[tuple[str, str]] = set()

    def _key(self, stream: str) -> str:
        return self.prefix + stream

    async def publish(self, stream: str, payload: bytes) -> str:
        entry_id = await call(
            "XADD", self._where, self._client.xadd(self._key(stream), {_FIELD: payload}, maxlen=self.maxlen)
        )
        return _id(entry_id)

    async def ensure_group(self, stream: str, group: str) -> None:
        await self._create_group(stream, group)
        self._ensured.add((stream, group))

    async def _create_group(self, stream: str, group: str) -> None:
        pending = self._client.xgroup_create(self._key(stream), group, id="0", mkstream=True)
        try:
            await call("XGROUP CREATE", self._where, pending)
        except RedisRefused as exc:
            if exc.code != "BUSYGROUP":
                raise

    async def _with_group(self, stream: str, group: str, attempt: Any) -> Any:
        """Runs `attempt()`; on NOGROUP for a group this bus ensured (lost in a Redis restart or
        with its stream), recreates the group and runs it once more."""
        try:
            return await attempt()
        except RedisRefused as exc:
            if exc.code != "NOGROUP" or (stream, group) not in self._ensured:
                raise
        await self._create_group(stream, group)
        return await attempt()

    async def consume(
        self, stream: str, group: str, consumer: str, count: int = 1, block_ms: int = 1000
    ) -> list[Delivery]:
        streams: dict[KeyT, StreamIdT] = {self._key(stream): ">"}

        async def attempt() -> Any:
            if block_ms <= 0:  # Redis reads BLOCK 0 as "forever": every wait here has a deadline
                return await call("XREADGROUP", self._where, self._client.xreadgroup(group, consumer, streams, count))
            pending = self._blocking.xreadgroup(group, consumer, streams, count, block=block_ms)
            return await call("XREADGROUP", self._where, pending, block_ms / 1000 + self.socket_timeout_s)

        reply = await self._with_group(stream, group, attempt)
        return [Delivery(stream, eid, payload, 1) for eid, payload in _entries(reply)]

    async def ack(self, stream: str, group: str, entry_id: str) -> None:
        # XACK in a missing group answers 0, not NOGROUP: after a restart there is nothing to ack.
        await call("XACK", self._where, self._client.xack(self._key(stream), group, entry_id))

    async def reclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int = 10
    ) -> list[Delivery]:
        key = self._key(stream)

        async def attempt() -> Any:
            pending = self._client.xautoclaim(key, group, consumer, min_idle_ms, start_id="0-0", count=count)
            return await call("XAUTOCLAIM", self._where, pending)

        # Redis 7: [cursor, entries, deleted ids]; 6.2: [cursor, entries] with None for deleted ones.
        reply = await self._with_group(stream, group, attempt)
        claimed = [(_id(eid), fields.get(_FIELD, b"")) for eid, fields in reply[1] if eid is not None]
        if not claimed:
            return []
        counts = await self._delivery_counts(key, group, consumer, [eid for eid, _ in claimed])
        # An entry missing from `counts` was reclaimed by someone else meanwhile: theirs now.
        return [Delivery(stream, eid, payload, counts[eid]) for eid, payload in claimed if eid in counts]

    async def _delivery_counts(self, key: str, group: str, consumer: str, ids: list[str]) -> dict[str, int]:
        """Delivery counts (XAUTOCLAIM's increment included) of the entries `consumer` holds."""
        async with self._client.pipeline(transaction=False) as pipe:
            for eid in ids:
                pipe.xpending_range(key, group, min=eid, max=eid, count=1, consumername=consumer)
            replies = await call("XPENDING", self._where, pipe.execute())
        return {_id(row["message_id"]): int(row["times_delivered"]) for rows in replies for row in rows}

    async def touch(self, stream: str, group: str, consumer: str, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        key = self._key(stream)

        async def attempt() -> Any:
            pending = self._touch(keys=[key], args=[group, consumer, *entry_ids])
            return await call("XCLAIM (touch)", self._where, pending)

        await self._with_group(stream, group, attempt)

    async def read(self, stream: str, after: str = "0", count: int = 100, block_ms: int = 1000) -> list[Entry]:
        streams: dict[KeyT, StreamIdT] = {self._key(stream): after}
        if block_ms <= 0:
            reply = await call("XREAD", self._where, self._client.xread(streams, count))
        else:
            pending = self._blocking.xread(streams, count, block=block_ms)
            reply = await call("XREAD", self._where, pending, block_ms / 1000 + self.socket_timeout_s)
        return [Entry(eid, payload) for eid, payload in _entries(reply)]

    async def last_id(self, stream: str) -> str:
        newest = await call("XREVRANGE", self._where, self._client.xrevrange(self._key(stream), "+", "-", count=1))
        return _id(newest[0][0]) if newest else "0"

    async def delete(self, stream: str) -> None:
        await call("DEL", self._where, self._client.delete(self._key(stream)))

    async def expire(self, stream: str, ttl_s: float) -> None:
        await call("PEXPIRE", self._where, self._client.pexpire(self._key(stream), max(1, int(ttl_s * 1000))))

    async def ping(self) -> None:
        await call("PING", self._where, self._client.ping())

    async def close(self) -> None:
        await close_client(self._client)
        await close_client(self._blocking)
