"""Rate limits of the HTTP API: requests per key per minute.

A fixed one-minute window per key, counted in Redis (`{prefix}api:rate:{key}:{window}`, INCR and
expiry in one script, so every replica shares the count) or in memory (embedded mode). Over the
limit a request gets 429 with `Retry-After`: the seconds until the window turns.

(The request size limit is FastAPI's own `max_body_size`, set in app.py: 413 from the declared
Content-Length before the body is read, or as soon as a chunked body grows past it.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import redis.asyncio as aredis

WINDOW_S = 60

# Counts one request and starts the window's expiry with its first request, atomically.
_HIT_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class RateLimiter(Protocol):
    async def hit(self, key_id: str) -> tuple[bool, int]:
        """Counts a request of `key_id`: (allowed, seconds until the window turns)."""
        ...


def _window(clock: Callable[[], float]) -> tuple[int, int]:
    """(this window's number, whole seconds until the next one, at least 1)."""
    now = clock()
    window = int(now // WINDOW_S)
    return window, max(1, math.ceil((window + 1) * WINDOW_S - now))


class MemoryRateLimiter:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.time) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._counts: dict[str, tuple[int, int]] = {}  # key id → (window, requests in it)

    async def hit(self, key_id: str) -> tuple[bool, int]:
        window, retry_after = _window(self._clock)
        seen_window, count = self._counts.get(key_id, (window, 0))
        count = count + 1 if seen_window == window else 1
        self._counts[key_id] = (window, count)
        return count <= self.per_minute, retry_after


class RedisRateLimiter:
    def __init__(self, client: aredis.Redis, prefix: str, per_minute: int, where: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.per_minute = per_minute
        self._prefix = f"{prefix}api:rate:"
        self._script = client.register_script(_HIT_LUA)
        self._where = where
        self._clock = clock

    async def hit(self, key_id: str) -> tuple[bool, int]:
        from services.common.bus.redis import call

        window, retry_after = _window(self._clock)
        pending: Awaitable[Any] = self._script(keys=[f"{self._prefix}{key_id}:{window}"], args=[WINDOW_S * 2000])
        count = int(await call("INCR api rate", self._where, pending))
        return count <= self.per_minute, retry_after
