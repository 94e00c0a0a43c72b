"""What every stage worker shares: the consume → process → publish → acknowledge loop.

A worker takes messages from its work stream through a consumer group, serves them, publishes
its results, and only then acknowledges (so a crash mid-message loses nothing: another worker
reclaims the message once it has been idle `reclaim_idle_ms`). While working it touches its
pending messages so a live worker's work is never reclaimed from under it. Cancelled turns
are dropped, queued or in flight; a message that cannot be served gets an error event for its
turn, or goes to the dead-letter stream when it has no usable header; the worker keeps going.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable
from typing import Generic, TypeVar

from google.protobuf.message import Message

from services.common import messages
from services.common.bus import Bus, BusError, Delivery
from services.common.logs import log, turn_context
from services.common.metrics import ERRORS, IN_FLIGHT, MESSAGES, QUEUE_LAG, STAGE_LATENCY
from services.proto import stages_pb2 as pb

M = TypeVar("M", bound=Message)
T = TypeVar("T")
logger = logging.getLogger("echox.worker")


class TurnFailed(Exception):
    """A clear, expected failure of one turn (bad audio, unknown session): an error event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class CancelWatch:
    """Turns cancelled by barge-in, learned from the broadcast `cancels` stream."""

    def __init__(self, bus: Bus, keep_s: float = 600.0) -> None:
        self.bus = bus
        self.keep_s = keep_s
        self._cancelled: dict[str, float] = {}
        self._events: dict[str, asyncio.Event] = {}

    def is_cancelled(self, turn_id: str) -> bool:
        return turn_id in self._cancelled

    def event_for(self, turn_id: str) -> asyncio.Event:
        """An event set when the turn is cancelled (already set if it was)."""
        event = self._events.setdefault(turn_id, asyncio.Event())
        if turn_id in self._cancelled:
            event.set()
        return event

    def release(self, turn_id: str) -> None:
        self._events.pop(turn_id, None)

    def mark(self, turn_id: str) -> None:
        self._cancelled[turn_id] = time.monotonic()
        if turn_id in self._events:
            self._events[turn_id].set()

    async def run(self, stop: asyncio.Event) -> None:
        after = "0"  # from the start of the capped stream: a cancel sent before we started counts
        while not stop.is_set():
            try:
                entries = await self.bus.read(messages.CANCELS, after=after, count=500, block_ms=500)
            except BusError as exc:
                log(logger, logging.WARNING, "cannot read cancels", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            for entry in entries:
                after = entry.id
                try:
                    cancel = messages.parse(pb.Cancel, entry.payload)
                except messages.MessageError:
                    continue
                self.mark(cancel.header.turn_id)
            self._forget_old()

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self.keep_s
        for turn_id in [t for t, at in self._cancelled.items() if at < horizon]:
            del self._cancelled[turn_id]


def consumer_name(stage: str) -> str:
    return f"{stage}-{socket.gethostname()}-{os.getpid()}"


class StageWorker(abc.ABC, Generic[M]):
    """One stage's worker: subclasses say what they read and how they serve one message."""

    stage: str
    input_stream: str
    message_type: type[M]

    def __init__(
        self,
        bus: Bus,
        *,
        consumer: str | None = None,
        concurrency: int = 1,
        reclaim_idle_ms: int = 3000,
        max_deliveries: int = 3,
        cancels: CancelWatch | None = None,
    ) -> None:
        self.bus = bus
        self.group = self.stage
        self.consumer = consumer or consumer_name(self.stage)
        self.concurrency = concurrency
        self.reclaim_idle_ms = reclaim_idle_ms
        self.max_deliveries = max_deliveries
        self.cancels = cancels or CancelWatch(bus)
        self._owns_cancels = cancels is None
        self._working: dict[str, Delivery] = {}
        self._group_ready = False

    @abc.abstractmethod
    async def process(self, message: M, cancel: asyncio.Event) -> None:
        """Serves one message and publishes its results; raises TurnFailed for a clear error."""

    async def run(self, stop: asyncio.Event) -> None:
        """Serves until `stop` is set; survives bus outages (retries with a pause)."""
        background = [asyncio.create_task(self._heartbeat(stop))]
        if self._owns_cancels:
            background.append(asyncio.create_task(self.cancels.run(stop)))
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        next_reclaim = 0.0
        try:
            while not stop.is_set():
                await slots.acquire()
                try:
                    deliveries, next_reclaim = await self._next(next_reclaim)
                except BusError as exc:
                    slots.release()
                    self._group_ready = False  # a restarted Redis has lost the groups
                    log(logger, logging.WARNING, "bus unavailable; retrying", stage=self.stage, error=str(exc))
                    await _sleep_or_stop(stop, 1.0)
                    continue
                if not deliveries:
                    slots.release()
                    continue
                for i, delivery in enumerate(deliveries):
                    if i:
                        await slots.acquire()
                    task = asyncio.create_task(self._serve(delivery, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            for task in background:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)

    async def _next(self, next_reclaim: float) -> tuple[list[Delivery], float]:
        if not self._group_ready:
            await self.bus.ensure_group(self.input_stream, self.group)
            self._group_ready = True
        now = time.monotonic()
        if now >= next_reclaim:
            next_reclaim = now + self.reclaim_idle_ms / 2000.0
            taken = await self.bus.reclaim(self.input_stream, self.group, self.consumer, self.reclaim_idle_ms, count=1)
            if taken:
                log(logger, logging.INFO, "reclaimed a dead worker's message", stage=self.stage, id=taken[0].id)
                return taken, next_reclaim
        return await self.bus.consume(self.input_stream, self.group, self.consumer, count=1, block_ms=500), next_reclaim

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        """Keeps our pending messages fresh so no live work is reclaimed."""
        while not stop.is_set():
            await _sleep_or_stop(stop, self.reclaim_idle_ms / 3000.0)
            ids = list(self._working)
            if ids:
                with contextlib.suppress(BusError):
                    await self.bus.touch(self.input_stream, self.group, self.consumer, ids)

    async def _serve(self, delivery: Delivery, slots: asyncio.Semaphore) -> None:
        self._working[delivery.id] = delivery
        IN_FLIGHT.labels(self.stage).inc()
        try:
            outcome = await self._handle(delivery)
            MESSAGES.labels(self.stage, outcome).inc()
            await self._ack(delivery)
        except BusError as exc:
            # Not acknowledged: the message stays pending and is served again after recovery.
            log(logger, logging.WARNING, "bus failed mid-message", stage=self.stage, error=str(exc))
        finally:
            IN_FLIGHT.labels(self.stage).dec()
            self._working.pop(delivery.id, None)
            slots.release()

    async def _ack(self, delivery: Delivery) -> None:
        await self.bus.ack(self.input_stream, self.group, delivery.id)

    async def _handle(self, delivery: Delivery) -> str:
        """Serves one delivery; returns its outcome. Only BusError escapes."""
        try:
            message = messages.parse(self.message_type, delivery.payload)
        except messages.MessageError as exc:
            return await self._reject(delivery, exc)
        header: pb.Header = message.header  # type: ignore[attr-defined]
        with turn_context(header.session_id, header.turn_id, header.trace.traceparent):
            QUEUE_LAG.labels(self.stage).observe(max(0.0, (messages.now_ms() - header.created_unix_ms) / 1000.0))
            if delivery.deliveries > self.max_deliveries:
                await self._fail(header, "poison", f"message failed {delivery.deliveries - 1} times; dead-lettered")
                await self.bus.publish(messages.DEADLETTER, delivery.payload)
                return "deadletter"
            if self.cancels.is_cancelled(header.turn_id):
                return "cancelled"
            if messages.expired(header):
                await self._fail(header, "deadline", f"{self.stage}: the turn's deadline passed before it was served")
                return "expired"
            return await self._process_timed(message, header)

    async def _process_timed(self, message: M, header: pb.Header) -> str:
        cancel = self.cancels.event_for(header.turn_id)
        started = time.perf_counter()
        try:
            await self.process(message, cancel)
        except TurnFailed as exc:
            await self._fail(header, exc.code, str(exc))
            return "error"
        except BusError:
            raise
        except Exception as exc:  # a bug or a backend failure must not kill the worker
            logger.exception("stage failed", extra={"fields": {"stage": self.stage}})
            await self._fail(header, "internal", f"{self.stage} failed: {type(exc).__name__}: {exc}")
            return "error"
        finally:
            self.cancels.release(header.turn_id)
            STAGE_LATENCY.labels(self.stage).observe(time.perf_counter() - started)
        outcome = "cancelled" if cancel.is_set() else "ok"
        # A line per turn at INFO (speech_llm), per segment at DEBUG (the later stages).
        level = logging.INFO if self.input_stream == messages.TURNS else logging.DEBUG
        log(logger, level, "served", stage=self.stage, outcome=outcome,
            ms=round((time.perf_counter() - started) * 1000, 1))
        return outcome

    async def _reject(self, delivery: Delivery, exc: messages.MessageError) -> str:
        """A message we cannot parse: an error event if we know its turn, else dead-letter."""
        if exc.header is not None:
            with turn_context(exc.header.session_id, exc.header.turn_id):
                await self._fail(exc.header, exc.code, str(exc))
            return "error"
        log(logger, logging.WARNING, "dead-lettered an unreadable message", stage=self.stage, error=str(exc))
        ERRORS.labels(self.stage, exc.code).inc()
        await self.bus.publish(messages.DEADLETTER, delivery.payload)
        return "deadletter"

    async def _fail(self, header: pb.Header, code: str, message: str) -> None:
        log(logger, logging.WARNING, "turn failed", stage=self.stage, code=code, error=message)
        ERRORS.labels(self.stage, code).inc()
        event = messages.error_event(header, self.stage, code, message)
        await self.bus.publish(messages.events_stream(header.session_id), event.SerializeToString())

    @staticmethod
    async def unless_cancelled(work: Awaitable[T], cancel: asyncio.Event) -> T | None:
        """Awaits `work`, or abandons it (cancelling an in-flight request) once `cancel` is set."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return None

    async def emit(self, header: pb.Header, event: pb.TurnEvent) -> None:
        """Publishes an event of this turn on the session's events stream."""
        event.header.CopyFrom(messages.child_header(header))
        event.stage = self.stage
        await self.bus.publish(messages.events_stream(header.session_id), event.SerializeToString())


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
