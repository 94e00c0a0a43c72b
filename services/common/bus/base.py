"""The one message-bus interface of the services: streams of opaque byte payloads.

Two implementations behind it: `MemoryBus` (embedded mode: one process, asyncio) and
`RedisBus` (Redis Streams). The semantics, which one contract test suite checks on both:

- `publish` appends to a stream; every stream is capped (approximately `maxlen` entries).
- Work streams are read through consumer groups: `consume` hands each entry to one consumer
  of the group; the entry stays *pending* until that consumer `ack`s it, which a worker does
  only after it has published its result.
- A dead consumer's pending entries are taken over by a live one with `reclaim`, once they
  have been idle at least `min_idle_ms`; a live consumer still working on an entry calls
  `touch` now and then so that its work is not reclaimed from under it.
- `Delivery.deliveries` counts how often an entry was handed out, so a poison message
  (one that kills every worker that takes it) can be dead-lettered instead of looping.
- Broadcast and per-session output streams are read without a group with `read`, from an
  entry id onwards (`"0"`: from the start; `"$"`: only what is published after the call).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


class BusError(Exception):
    """The bus is unreachable or refused an operation (e.g. Redis restarted or down)."""


@dataclasses.dataclass(frozen=True)
class Delivery:
    stream: str
    id: str
    payload: bytes
    deliveries: int = 1  # times this entry has been handed to a consumer, this one included


@dataclasses.dataclass(frozen=True)
class Entry:
    id: str
    payload: bytes


class Bus(Protocol):
    async def publish(self, stream: str, payload: bytes) -> str:
        """Appends `payload`; returns the entry id."""
        ...

    async def ensure_group(self, stream: str, group: str) -> None:
        """Creates the consumer group (and the stream) if missing; new groups start at the
        beginning of the stream so nothing published before a worker started is lost."""
        ...

    async def consume(
        self, stream: str, group: str, consumer: str, count: int = 1, block_ms: int = 1000
    ) -> list[Delivery]:
        """New entries for this consumer, waiting up to `block_ms` for the first."""
        ...

    async def ack(self, stream: str, group: str, entry_id: str) -> None: ...

    async def reclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int = 10
    ) -> list[Delivery]:
        """Takes over entries pending (unacknowledged) for at least `min_idle_ms` in any consumer."""
        ...

    async def touch(self, stream: str, group: str, consumer: str, entry_ids: list[str]) -> None:
        """Resets the idle time of entries this consumer is still working on."""
        ...

    async def read(self, stream: str, after: str = "0", count: int = 100, block_ms: int = 1000) -> list[Entry]:
        """Entries after id `after` without a group (broadcast, per-session output)."""
        ...

    async def last_id(self, stream: str) -> str:
        """The id of the newest entry ("0" for an empty or missing stream)."""
        ...

    async def delete(self, stream: str) -> None: ...

    async def expire(self, stream: str, ttl_s: float) -> None:
        """Deletes the stream `ttl_s` from now unless called again (per-session streams of
        conversations nobody continues must not pile up)."""
        ...

    async def ping(self) -> None:
        """Raises BusError when the bus cannot be reached."""
        ...

    async def close(self) -> None: ...
