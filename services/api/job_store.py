"""Training jobs behind the API: their records, and the Celery side that runs them.

A job is one chain of stage tasks (training.celery_app.submit_job) into one run folder under
runs_root. Its record (recipe, stages, run, the task id of every stage, cancellation, and the
final status once it is reached) lives in Redis under the bus prefix (`{prefix}api:job:{id}`,
the ordered index `{prefix}api:jobs`, and `{prefix}api:run:{run}` → the job that last used a
run folder) or in memory in embedded mode. Celery keeps task states for a day only, so the
final status is copied into the record when it is first seen.

The Celery calls are blocking; routes run them in a thread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import redis.asyncio as aredis

logger = logging.getLogger("echox.api")
MAX_JOBS_KEPT = 1000  # the index keeps the newest ones; older records expire with it


class JobBackendError(Exception):
    """The Celery broker or result backend cannot be reached."""


@dataclasses.dataclass
class JobRecord:
    id: str
    recipe: str  # as submitted
    recipe_path: str  # the file it resolved to
    run: str
    run_dir: str
    stages: list[str]
    task_ids: list[str]  # one per stage, in order
    created_at: float
    submitted_by: str  # the key id
    cancelled_at: float | None = None
    final: dict[str, Any] | None = None  # the status once terminal

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> JobRecord:
        return cls(**json.loads(raw))


class JobStore(Protocol):
    async def put(self, record: JobRecord) -> None: ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def list(self, limit: int) -> list[JobRecord]:
        """The newest `limit` jobs, newest first."""
        ...

    async def run_owner(self, run: str) -> str | None:
        """The id of the job that last used run folder `run`."""
        ...

    async def set_run_owner(self, run: str, job_id: str) -> None: ...


class MemoryJobStore:
    def __init__(self) -> None:
        self._jobs: dict[str, JobRecord] = {}
        self._runs: dict[str, str] = {}

    async def put(self, record: JobRecord) -> None:
        self._jobs[record.id] = dataclasses.replace(record)
        if len(self._jobs) > MAX_JOBS_KEPT:
            oldest = min(self._jobs.values(), key=lambda r: r.created_at)
            del self._jobs[oldest.id]

    async def get(self, job_id: str) -> JobRecord | None:
        found = self._jobs.get(job_id)
        return dataclasses.replace(found) if found else None

    async def list(self, limit: int) -> list[JobRecord]:
        newest = sorted(self._jobs.values(), key=lambda r: r.created_at, reverse=True)
        return [dataclasses.replace(r) for r in newest[:limit]]

    async def run_owner(self, run: str) -> str | None:
        return self._runs.get(run)

    async def set_run_owner(self, run: str, job_id: str) -> None:
        self._runs[run] = job_id


class RedisJobStore:
    def __init__(self, client: aredis.Redis, prefix: str, where: str) -> None:
        self._client = client
        self._job = f"{prefix}api:job:"
        self._index = f"{prefix}api:jobs"
        self._run = f"{prefix}api:run:"
        self._where = where

    async def _call(self, op: str, pending: Awaitable[Any]) -> Any:
        from services.common.bus.redis import call

        return await call(op, self._where, pending)

    async def put(self, record: JobRecord) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(self._job + record.id, record.to_json())
            pipe.zadd(self._index, {record.id: record.created_at})
            await self._call("SET api job", pipe.execute())
        # Beyond the newest MAX_JOBS_KEPT, records go (they are history, not state).
        stale = await self._call("ZRANGE api jobs", self._client.zrange(self._index, 0, -MAX_JOBS_KEPT - 1))
        if stale:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(self._index, *stale)
                pipe.delete(*[self._job + s.decode() for s in stale])
                await self._call("DEL api jobs", pipe.execute())

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._call("GET api job", self._client.get(self._job + job_id))
        return JobRecord.from_json(raw) if raw else None

    async def list(self, limit: int) -> list[JobRecord]:
        ids = await self._call("ZREVRANGE api jobs", self._client.zrevrange(self._index, 0, limit - 1))
        if not ids:
            return []
        raws = await self._call("MGET api jobs", self._client.mget([self._job + i.decode() for i in ids]))
        return [JobRecord.from_json(raw) for raw in raws if raw]

    async def run_owner(self, run: str) -> str | None:
        raw = await self._call("GET api run", self._client.get(self._run + run))
        return raw.decode() if raw else None

    async def set_run_owner(self, run: str, job_id: str) -> None:
        await self._call("SET api run", self._client.set(self._run + run, job_id))


class JobRunner(Protocol):
    """Where jobs run (blocking calls)."""

    def submit(self, recipe_path: str, run_dir: str, stages: list[str]) -> list[str]:
        """Queues the chain; the task id of every stage, in order."""
        ...

    def task_state(self, task_id: str) -> tuple[str, Any]:
        """(Celery state, its payload: PROGRESS meta, the stage summary, or the error)."""
        ...

    def cancel(self, task_ids: list[str]) -> None: ...

    def close(self) -> None: ...


def _backend_errors() -> tuple[type[BaseException], ...]:
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    return (OperationalError, RedisError, OSError)


class CeleryRunner:
    """Jobs on training.celery_app (broker and results as the ECHOX_ settings of this process
    say), sent to `queue` (None: Celery's default queue).

    Cancelling terminates the running stage with SIGTERM, so it unwinds (its helper processes
    and files are cleaned up), then, `kill_after_s` later, with SIGKILL: a SIGTERM that lands while
    Python runs a weakref callback or a __del__ is swallowed there, and the stage would train on
    while Celery already reports it revoked. The second revoke is a no-op for a stage that stopped.
    """

    def __init__(self, queue: str | None = None, kill_after_s: float = 10.0) -> None:
        self.queue = queue
        self.kill_after_s = kill_after_s
        self._kills: dict[threading.Timer, list[str]] = {}
        self._lock = threading.Lock()

    def submit(self, recipe_path: str, run_dir: str, stages: list[str]) -> list[str]:
        from training.celery_app import submit_job

        try:
            last = submit_job(recipe_path, run_dir, stages, queue=self.queue)
        except _backend_errors() as exc:
            raise JobBackendError(f"the Celery broker is unavailable: {type(exc).__name__}: {exc}") from exc
        ids = []
        node: Any = last
        while node is not None:  # a chain's result links each task to the one before it
            ids.append(node.id)
            node = node.parent
        return ids[::-1]

    def task_state(self, task_id: str) -> tuple[str, Any]:
        from training.celery_app import app

        try:
            meta = app.backend.get_task_meta(task_id)
        except _backend_errors() as exc:
            raise JobBackendError(f"the Celery result backend is unavailable: {type(exc).__name__}") from exc
        return str(meta["status"]), meta.get("result")

    def _revoke(self, task_ids: list[str], signal: str) -> None:
        from training.celery_app import app

        try:
            # terminate: the prefork pool signals the child running the stage; queued ones are dropped on receipt.
            app.control.revoke(task_ids, terminate=True, signal=signal)
        except _backend_errors() as exc:
            raise JobBackendError(f"the Celery broker is unavailable: {type(exc).__name__}: {exc}") from exc

    def cancel(self, task_ids: list[str]) -> None:
        self._revoke(task_ids, "SIGTERM")
        timer = threading.Timer(self.kill_after_s, self._kill, args=(task_ids,))
        timer.name, timer.daemon = "echox-job-kill", True
        with self._lock:
            self._kills[timer] = task_ids
        timer.start()

    def _kill(self, task_ids: list[str]) -> None:
        with self._lock:
            self._kills = {t: ids for t, ids in self._kills.items() if ids is not task_ids}
        try:
            self._revoke(task_ids, "SIGKILL")
        except JobBackendError as exc:
            logger.warning("could not SIGKILL cancelled tasks %s: %s", task_ids, exc)

    def close(self) -> None:
        """At shutdown, the pending SIGKILLs go now rather than never."""
        with self._lock:
            pending, self._kills = self._kills, {}
        for timer, task_ids in pending.items():
            timer.cancel()
            self._kill(task_ids)
