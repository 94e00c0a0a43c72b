"""Integration tests run against real services: Redis (started by `make test`), real Celery
workers. A missing service is a failure, never a skip."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
import redis as redis_lib

from services.common.settings import get_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = get_settings().redis_url
    try:
        redis_lib.Redis.from_url(url, socket_timeout=2).ping()
    except redis_lib.exceptions.ConnectionError as exc:
        pytest.fail(f"integration tests need Redis at {url} (run `bash scripts/ensure-redis.sh`): {exc}")
    return url


@dataclasses.dataclass
class CeleryWorker:
    """A real `celery -A training.celery_app worker` (prefork, one child) on a queue of its own."""

    queue: str
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        """The process runs and answers a ping over the broker."""
        from training.celery_app import app

        return self.process.poll() is None and bool(app.control.ping(destination=[self.name], timeout=2.0))

    def busy(self) -> list[str]:
        """The ids of the tasks its pool is running now."""
        from training.celery_app import app

        replies = app.control.inspect(destination=[self.name], timeout=2.0).active() or {}
        return [task["id"] for task in replies.get(self.name, [])]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def celery_workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Callable[..., CeleryWorker]]:
    """`start(**env)` starts a worker (with these extra ECHOX_ settings, e.g. ECHOX_DATA_ROOT) and
    returns once it answers a ping; every worker started stops when the module ends."""
    from training.celery_app import app

    started: list[tuple[CeleryWorker, IO[str]]] = []

    def start(**env: str) -> CeleryWorker:
        queue = f"echox-test-{uuid.uuid4().hex[:8]}"
        name = f"{queue}@{socket.gethostname()}"
        log_path = tmp_path_factory.mktemp("celery") / "worker.log"
        log = log_path.open("w")
        cmd = [sys.executable, "-m", "celery", "-A", "training.celery_app", "worker", "--pool", "prefork",
               "--concurrency", "1", "-Q", queue, "-n", name, "--loglevel", "INFO",
               "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        process = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "ECHOX_REDIS_URL": redis_url, **env},
                                   stdout=log, stderr=subprocess.STDOUT)
        worker = CeleryWorker(queue, name, process, log_path)
        started.append((worker, log))
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[name], timeout=1.0):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the celery worker did not come up; see {log_path}")
        return worker

    try:
        yield start
    finally:
        for worker, log in started:
            worker.stop()
            log.close()


@pytest.fixture(scope="module")
def worker_queue(celery_workers: Callable[..., CeleryWorker]) -> str:
    """The queue of a real worker with the default settings."""
    return celery_workers().queue
