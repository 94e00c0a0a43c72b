"""Conversation state outside the workers, so any replica serves any turn of any session.

A session is a marker plus its history of finished turns, both expiring `ttl_s` after the
last append. `MemorySessionStore` serves embedded mode; `RedisSessionStore` keeps
`{prefix}session:{id}` and the list `{prefix}session:{id}:history` (JSON turns) in Redis.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from echox.tokenizer import Turn
from services.common.bus import url_kind
from services.common.bus.base import BusError

if TYPE_CHECKING:
    import redis.asyncio as aredis

logger = logging.getLogger(__name__)

__all__ = [
    "BusError", "MemorySessionStore", "RedisSessionStore", "SessionStore", "Turn", "UnknownSession",
    "make_session_store",
]


class UnknownSession(LookupError):
    """No such session: never created, ended, or expired."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"unknown session {session_id!r}")
        self.session_id = session_id


class SessionStore(Protocol):
    async def create(self, session_id: str | None = None) -> str:
        """Starts a session (a new uuid4 hex id when None); an existing one keeps its history."""
        ...

    async def exists(self, session_id: str) -> bool: ...

    async def history(self, session_id: str) -> list[Turn]:
        """The finished turns, oldest first; UnknownSession if there is no such session."""
        ...

    async def append(self, session_id: str, turn: Turn) -> None:
        """Adds a turn (keeping the newest `max_turns`) and restarts the TTL; UnknownSession if none."""
        ...

    async def amend_last(self, session_id: str, turn: Turn) -> None:
        """Replaces the newest turn (a barge-in learned after the turn was saved); no-op when the
        history is empty; UnknownSession if none."""
        ...

    async def end(self, session_id: str) -> None: ...

    async def close(self) -> None: ...


class MemorySessionStore:
    """Sessions in a dict; expiry is checked when a session is touched (and swept on create)."""

    def __init__(self, ttl_s: float = 3600, max_turns: int = 50, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_turns = max_turns
        self._clock = clock
        self._sessions: dict[str, tuple[collections.deque[Turn], float]] = {}  # turns, expiry time

    def _live(self, session_id: str) -> collections.deque[Turn] | None:
        found = self._sessions.get(session_id)
        if found is None:
            return None
        if found[1] <= self._clock():
            del self._sessions[session_id]
            return None
        return found[0]

    async def create(self, session_id: str | None = None) -> str:
        now = self._clock()
        for stale in [sid for sid, (_, expiry) in self._sessions.items() if expiry <= now]:
            del self._sessions[stale]  # nothing else would ever drop abandoned sessions
        session_id = session_id or uuid.uuid4().hex
        turns = self._live(session_id)
        self._sessions[session_id] = (turns if turns is not None else collections.deque(maxlen=self.max_turns),
                                      now + self.ttl_s)
        return session_id

    async def exists(self, session_id: str) -> bool:
        return self._live(session_id) is not None

    async def history(self, session_id: str) -> list[Turn]:
        turns = self._live(session_id)
        if turns is None:
            raise UnknownSession(session_id)
        return list(turns)

    async def append(self, session_id: str, turn: Turn) -> None:
        turns = self._live(session_id)
        if turns is None:
            raise UnknownSession(session_id)
        turns.append(turn)
        self._sessions[session_id] = (turns, self._clock() + self.ttl_s)

    async def amend_last(self, session_id: str, turn: Turn) -> None:
        turns = self._live(session_id)
        if turns is None:
            raise UnknownSession(session_id)
        if turns:
            turns[-1] = turn

    async def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def close(self) -> None:
        return None


# Appends only to a live session, trims and restarts both TTLs in one atomic step.
_APPEND_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


def _decode_turn(raw: bytes) -> Turn | None:
    try:
        data = json.loads(raw)
        return Turn(str(data["user"]), str(data["assistant"]))
    except (ValueError, KeyError, TypeError):
        logger.warning("skipping a malformed turn in a session history")
        return None


class RedisSessionStore:
    """Sessions in Redis; every Redis failure surfaces as BusError."""

    def __init__(self, url: str, prefix: str = "echox:", ttl_s: float = 3600, max_turns: int = 50,
                 socket_timeout_s: float = 5.0) -> None:
        from services.common.bus.redis import open_client, redact_url  # redis only when used

        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_turns = max_turns
        self._where = redact_url(url)
        self._client: aredis.Redis = open_client(url, socket_timeout_s, socket_timeout_s)
        self._append = self._client.register_script(_APPEND_LUA)

    def marker_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def history_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}:history"

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    async def _call(self, op: str, pending: Any) -> Any:
        from services.common.bus.redis import call

        return await call(op, self._where, pending)

    async def create(self, session_id: str | None = None) -> str:
        session_id = session_id or uuid.uuid4().hex
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(self.marker_key(session_id), b"1", px=self._ttl_ms)
            pipe.pexpire(self.history_key(session_id), self._ttl_ms)
            await self._call("SET session", pipe.execute())
        return session_id

    async def exists(self, session_id: str) -> bool:
        return bool(await self._call("EXISTS session", self._client.exists(self.marker_key(session_id))))

    async def history(self, session_id: str) -> list[Turn]:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.exists(self.marker_key(session_id))
            pipe.lrange(self.history_key(session_id), 0, -1)
            found, raw = await self._call("LRANGE session history", pipe.execute())
        if not found:
            raise UnknownSession(session_id)
        return [turn for turn in map(_decode_turn, raw) if turn is not None]

    async def append(self, session_id: str, turn: Turn) -> None:
        encoded = json.dumps({"user": turn.user, "assistant": turn.assistant})
        keys = [self.marker_key(session_id), self.history_key(session_id)]
        args: list[str | int] = [encoded, self._ttl_ms, self.max_turns]
        done = await self._call("RPUSH session history", self._append(keys=keys, args=args))
        if not done:
            raise UnknownSession(session_id)

    async def amend_last(self, session_id: str, turn: Turn) -> None:
        if not await self.exists(session_id):
            raise UnknownSession(session_id)
        encoded = json.dumps({"user": turn.user, "assistant": turn.assistant})
        key = self.history_key(session_id)
        with contextlib.suppress(BusError):  # an empty history ("no such key"): nothing to amend
            await self._call("LSET session history", self._client.lset(key, -1, encoded))

    async def end(self, session_id: str) -> None:
        await self._call("DEL session", self._client.delete(self.marker_key(session_id), self.history_key(session_id)))

    async def close(self) -> None:
        from services.common.bus.redis import close_client

        await close_client(self._client)


def make_session_store(url: str, prefix: str = "echox:", ttl_s: float = 3600, max_turns: int = 50) -> SessionStore:
    """The store a URL names, like `make_bus`: `memory://` or a Redis URL."""
    if url_kind(url) == "memory":
        return MemorySessionStore(ttl_s=ttl_s, max_turns=max_turns)
    return RedisSessionStore(url, prefix=prefix, ttl_s=ttl_s, max_turns=max_turns)
