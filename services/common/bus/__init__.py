"""The message bus: one interface (base.Bus), in-memory and Redis Streams implementations.

`MemoryBus` and `RedisBus` are imported on first use, so embedded mode never imports redis.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from services.common.bus.base import Bus, BusError, Delivery, Entry

if TYPE_CHECKING:
    from services.common.bus.memory import MemoryBus
    from services.common.bus.redis import RedisBus

__all__ = ["Bus", "BusError", "Delivery", "Entry", "MemoryBus", "RedisBus", "make_bus", "url_kind"]

_LAZY = {"MemoryBus": "services.common.bus.memory", "RedisBus": "services.common.bus.redis"}
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def url_kind(url: str) -> str:
    """"memory" or "redis" for a bus or state URL; ValueError for anything else."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory":
        return "memory"
    if scheme in _REDIS_SCHEMES:
        return "redis"
    # Name the scheme only: the rest of a URL may hold a password.
    found = f"scheme {scheme + '://'!r}" if scheme else "a URL without a scheme"
    raise ValueError(f"unsupported bus/state URL, {found}: expected memory://, redis://, rediss:// or unix://")


def make_bus(url: str, prefix: str = "echox:", maxlen: int = 10_000, socket_timeout_s: float = 5.0) -> Bus:
    """The bus a URL names: `memory://` (one process) or Redis (`redis://`, `rediss://`, `unix://`)."""
    if url_kind(url) == "memory":
        from services.common.bus.memory import MemoryBus

        return MemoryBus(maxlen=maxlen)
    from services.common.bus.redis import RedisBus

    return RedisBus(url, prefix=prefix, maxlen=maxlen, socket_timeout_s=socket_timeout_s)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
