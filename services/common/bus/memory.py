"""`MemoryBus`: the bus in one process (embedded mode), with Redis Streams semantics.

It mirrors what `RedisBus` does with XADD/XREADGROUP/XACK/XAUTOCLAIM/XREAD so that code
tested on one runs unchanged on the other (one contract suite checks both). Single event
loop only: no locks, because nothing here awaits between reading and changing state.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import time

from services.common.bus.base import BusError, Delivery, Entry

_Id = tuple[int, int]  # (milliseconds, sequence), ordered like Redis stream ids


def _format_id(entry_id: _Id) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


def _parse_id(text: str) -> _Id:
    """ "<ms>-<seq>" or "<ms>" (sequence 0), like Redis accepts in XREAD."""
    try:
        ms, _, seq = text.partition("-")
        return int(ms), int(seq or 0)
    except ValueError:
        raise BusError(f"invalid stream entry id {text!r}") from None


@dataclasses.dataclass
class _Pending:
    consumer: str
    delivered_at: float  # time.monotonic() of the last delivery or touch
    deliveries: int


@dataclasses.dataclass
class _Group:
    last_delivered: _Id = (0, 0)
    # Insertion order is id order: entries join in delivery order, and claims keep their place.
    pending: dict[str, _Pending] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Stream:
    ids: list[_Id] = dataclasses.field(default_factory=list)  # sorted, for bisect
    payloads: dict[str, bytes] = dataclasses.field(default_factory=dict)
    groups: dict[str, _Group] = dataclasses.field(default_factory=dict)

    def after(self, entry_id: _Id, count: int) -> list[Entry]:
        start = bisect.bisect_right(self.ids, entry_id)
        return [self.entry(i) for i in self.ids[start : start + count]]

    def entry(self, entry_id: _Id) -> Entry:
        text = _format_id(entry_id)
        return Entry(text, self.payloads[text])


@dataclasses.dataclass
class _Signal:
    event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    waiters: int = 0


class MemoryBus:
    """Streams, consumer groups and pending-entries lists in dictionaries."""

    def __init__(self, maxlen: int = 10_000) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be at least 1, not {maxlen}")
        self.maxlen = maxlen
        self._streams: dict[str, _Stream] = {}
        self._ensured: set[tuple[str, str]] = set()
        self._signals: dict[str, _Signal] = {}  # set (and dropped) by the next publish
        self._last: _Id = (0, 0)
        self._closed = False
        self._expiry: dict[str, float] = {}  # stream → time.monotonic() deadline

    def _next_id(self) -> _Id:
        # Bus-wide and strictly increasing, even if the wall clock steps back.
        ms = int(time.time() * 1000)
        self._last = (ms, 0) if ms > self._last[0] else (self._last[0], self._last[1] + 1)
        return self._last

    async def publish(self, stream: str, payload: bytes) -> str:
        self._drop_expired()
        s = self._streams.setdefault(stream, _Stream())
        entry_id = self._next_id()
        text = _format_id(entry_id)
        s.ids.append(entry_id)
        s.payloads[text] = bytes(payload)
        self._trim(s)
        signal = self._signals.pop(stream, None)
        if signal is not None:
            signal.event.set()
        return text

    def _trim(self, s: _Stream) -> None:
        # Approximate like MAXLEN ~: trim in batches so a publish is O(1) amortised.
        if len(s.ids) <= self.maxlen + max(1, self.maxlen // 10):
            return
        excess = len(s.ids) - self.maxlen
        for dropped in s.ids[:excess]:
            del s.payloads[_format_id(dropped)]
        del s.ids[:excess]

    async def ensure_group(self, stream: str, group: str) -> None:
        self._streams.setdefault(stream, _Stream()).groups.setdefault(group, _Group())
        self._ensured.add((stream, group))

    def _group(self, stream: str, group: str) -> tuple[_Stream, _Group]:
        s = self._streams.get(stream)
        g = s.groups.get(group) if s is not None else None
        if s is None or g is None:
            if (stream, group) not in self._ensured:
                raise BusError(f"no consumer group {group!r} on stream {stream!r} (call ensure_group first)")
            # Ensured once and gone since (the stream was deleted): recreate, as RedisBus does.
            s = self._streams.setdefault(stream, _Stream())
            g = s.groups.setdefault(group, _Group())
        return s, g

    async def consume(
        self, stream: str, group: str, consumer: str, count: int = 1, block_ms: int = 1000
    ) -> list[Delivery]:
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        while True:
            s, g = self._group(stream, group)
            fresh = s.after(g.last_delivered, count)
            if fresh:
                now = time.monotonic()
                g.last_delivered = _parse_id(fresh[-1].id)
                for e in fresh:
                    g.pending[e.id] = _Pending(consumer, now, 1)
                return [Delivery(stream, e.id, e.payload, 1) for e in fresh]
            if not await self._wait(stream, deadline):
                return []

    async def _wait(self, stream: str, deadline: float) -> bool:
        """Waits for the next publish to `stream`; False once the deadline passed or the bus closed."""
        remaining = deadline - time.monotonic()
        if self._closed or remaining <= 0:
            return False
        signal = self._signals.setdefault(stream, _Signal())
        signal.waiters += 1
        try:
            await asyncio.wait_for(signal.event.wait(), remaining)
        except TimeoutError:
            return False
        finally:
            signal.waiters -= 1
            if signal.waiters == 0 and self._signals.get(stream) is signal:
                del self._signals[stream]  # no one waits: don't keep one per dead session stream
        return not self._closed

    async def ack(self, stream: str, group: str, entry_id: str) -> None:
        s = self._streams.get(stream)
        g = s.groups.get(group) if s is not None else None
        if g is not None:  # like XACK: acknowledging in a missing group is a no-op
            g.pending.pop(entry_id, None)

    async def reclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int = 10
    ) -> list[Delivery]:
        s, g = self._group(stream, group)
        now = time.monotonic()
        taken: list[Delivery] = []
        for entry_id, p in list(g.pending.items()):
            if len(taken) >= count:
                break
            if (now - p.delivered_at) * 1000 < min_idle_ms:
                continue
            payload = s.payloads.get(entry_id)
            if payload is None:  # trimmed away: XAUTOCLAIM drops it from the PEL too
                del g.pending[entry_id]
                continue
            p.consumer, p.delivered_at, p.deliveries = consumer, now, p.deliveries + 1
            taken.append(Delivery(stream, entry_id, payload, p.deliveries))
        return taken

    async def touch(self, stream: str, group: str, consumer: str, entry_ids: list[str]) -> None:
        _, g = self._group(stream, group)
        now = time.monotonic()
        for entry_id in entry_ids:
            p = g.pending.get(entry_id)
            if p is not None and p.consumer == consumer:  # never take back what was reclaimed
                p.delivered_at = now

    async def read(self, stream: str, after: str = "0", count: int = 100, block_ms: int = 1000) -> list[Entry]:
        cursor = _parse_id(await self.last_id(stream)) if after == "$" else _parse_id(after)
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        while True:
            s = self._streams.get(stream)
            found = s.after(cursor, count) if s is not None else []
            if found or not await self._wait(stream, deadline):
                return found

    async def last_id(self, stream: str) -> str:
        s = self._streams.get(stream)
        return _format_id(s.ids[-1]) if s is not None and s.ids else "0"

    async def delete(self, stream: str) -> None:
        self._streams.pop(stream, None)
        self._expiry.pop(stream, None)

    async def expire(self, stream: str, ttl_s: float) -> None:
        if stream in self._streams:
            self._expiry[stream] = time.monotonic() + ttl_s
        self._drop_expired()

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for stream in [s for s, deadline in self._expiry.items() if deadline <= now]:
            self._streams.pop(stream, None)
            del self._expiry[stream]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._closed = True
        for signal in self._signals.values():
            signal.event.set()
        self._signals.clear()
