"""API keys: who may call the control plane, and as what.

A key is a random secret shown once, when it is created; only its SHA-256 is kept. Keys live in
Redis under the bus prefix (`{prefix}api:key:{sha256}` → the JSON record, `{prefix}api:keys` →
a hash of key id → sha256) or, in embedded mode, in memory: the store is chosen by URL, like the
session store. Scopes: `admin` (every route) and `client` (sessions only).

The first admin key comes from ECHOX_API_KEY. It is configuration: kept hashed in memory, listed
as `configured`, and retired by changing the setting, never through the API.

Every authenticated request also counts against its key's rate limit (see limits.py): the order
is authenticate (401) → rate limit (429) → scope (403).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

if TYPE_CHECKING:
    import redis.asyncio as aredis

    from services.api.limits import RateLimiter

KEY_PREFIX = "echox_"  # every key this API makes starts so, which makes leaked keys easy to find
CONFIGURED_KEY_ID = "configured"


class Scope(enum.StrEnum):
    ADMIN = "admin"
    CLIENT = "client"


def hash_key(secret: str) -> str:
    """The stored form of a key. Keys made here carry 256 random bits, so a fast hash is enough;
    the configured key is the operator's choice and should be as long."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """What is kept of a key: never the secret."""

    id: str
    name: str
    scope: Scope
    created_at: float
    hint: str  # the first characters of the secret, to tell keys apart
    configured: bool = False

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "scope": self.scope.value})

    @classmethod
    def from_json(cls, raw: bytes | str) -> KeyRecord:
        data = json.loads(raw)
        return cls(**{**data, "scope": Scope(data["scope"])})


def new_key(name: str, scope: Scope) -> tuple[str, str, KeyRecord]:
    """(secret, its hash, its record) of a fresh key."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    record = KeyRecord(id="key_" + uuid.uuid4().hex[:16], name=name, scope=scope, created_at=time.time(),
                       hint=secret[: len(KEY_PREFIX) + 4])
    return secret, hash_key(secret), record


class KeyStore(Protocol):
    async def add(self, key_hash: str, record: KeyRecord) -> None: ...

    async def lookup(self, key_hash: str) -> KeyRecord | None: ...

    async def list(self) -> list[KeyRecord]: ...

    async def revoke(self, key_id: str) -> bool:
        """Forgets the key; False when there was no such key."""
        ...


class MemoryKeyStore:
    def __init__(self) -> None:
        self._by_hash: dict[str, KeyRecord] = {}

    async def add(self, key_hash: str, record: KeyRecord) -> None:
        self._by_hash[key_hash] = record

    async def lookup(self, key_hash: str) -> KeyRecord | None:
        return self._by_hash.get(key_hash)

    async def list(self) -> list[KeyRecord]:
        return sorted(self._by_hash.values(), key=lambda r: r.created_at)

    async def revoke(self, key_id: str) -> bool:
        for key_hash, record in list(self._by_hash.items()):
            if record.id == key_id:
                del self._by_hash[key_hash]
                return True
        return False


class RedisKeyStore:
    """Keys in Redis; every Redis failure surfaces as BusError (the app answers 503)."""

    def __init__(self, client: aredis.Redis, prefix: str, where: str) -> None:
        self._client = client
        self._index = f"{prefix}api:keys"
        self._prefix = f"{prefix}api:key:"
        self._where = where

    async def _call(self, op: str, pending: Awaitable[Any]) -> Any:
        from services.common.bus.redis import call

        return await call(op, self._where, pending)

    async def add(self, key_hash: str, record: KeyRecord) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(self._prefix + key_hash, record.to_json())
            pipe.hset(self._index, record.id, key_hash)
            await self._call("SET api key", pipe.execute())

    async def lookup(self, key_hash: str) -> KeyRecord | None:
        raw = await self._call("GET api key", self._client.get(self._prefix + key_hash))
        return KeyRecord.from_json(raw) if raw else None

    async def list(self) -> list[KeyRecord]:
        hashes = await self._call("HGETALL api keys", self._client.hgetall(self._index))
        if not hashes:
            return []
        keys = [self._prefix + key_hash.decode() for key_hash in hashes.values()]
        raws = await self._call("MGET api keys", self._client.mget(keys))
        return sorted((KeyRecord.from_json(raw) for raw in raws if raw), key=lambda r: r.created_at)

    async def revoke(self, key_id: str) -> bool:
        key_hash = await self._call("HGET api key", self._client.hget(self._index, key_id))
        if key_hash is None:
            return False
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._prefix + key_hash.decode())
            pipe.hdel(self._index, key_id)
            await self._call("DEL api key", pipe.execute())
        return True


class Authenticator:
    """Turns a presented secret into a KeyRecord: the configured admin key first, then the store."""

    def __init__(self, store: KeyStore, limiter: RateLimiter, configured_key: str | None) -> None:
        self.store = store
        self.limiter = limiter
        self._configured_hash = hash_key(configured_key) if configured_key else None
        self.configured = (
            KeyRecord(id=CONFIGURED_KEY_ID, name="ECHOX_API_KEY", scope=Scope.ADMIN, created_at=time.time(),
                      hint="", configured=True)  # no characters of an operator-chosen secret
            if configured_key else None
        )

    async def identify(self, secret: str) -> KeyRecord | None:
        key_hash = hash_key(secret)
        if self._configured_hash and hmac.compare_digest(key_hash, self._configured_hash):
            return self.configured
        return await self.store.lookup(key_hash)

    async def list(self) -> list[KeyRecord]:
        return ([self.configured] if self.configured else []) + await self.store.list()


_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key, as an alternative header")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def require(scope: Scope) -> Callable[..., Awaitable[KeyRecord]]:
    """A FastAPI dependency: the caller's key, which must hold `scope` (admin holds every scope)."""

    async def dependency(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
        header: Annotated[str | None, Security(_header)],
    ) -> KeyRecord:
        secret = bearer.credentials if bearer else header
        if not secret:
            raise _unauthorized("an API key is required (Authorization: Bearer <key>)")
        auth: Authenticator = request.app.state.api.auth
        record = await auth.identify(secret)
        if record is None:
            raise _unauthorized("unknown or revoked API key")
        allowed, retry_after = await auth.limiter.hit(record.id)
        if not allowed:
            raise HTTPException(429, "rate limit exceeded for this API key",
                                headers={"Retry-After": str(retry_after)})
        if scope is Scope.ADMIN and record.scope is not Scope.ADMIN:
            raise HTTPException(403, f"this route needs an {scope.value} key")
        return record

    dependency.__name__ = f"require_{scope.value}"
    return dependency


require_admin = require(Scope.ADMIN)
require_client = require(Scope.CLIENT)
