"""The distributed data plane for real: a private Redis, a real Triton server with the three
stage models, two worker processes per stage, the Converse API. Conversations, barge-in,
kill -9 of a busy worker of each stage, and Redis restarted mid-call.

The model has random weights: it answers with its whole 128-token budget in several segments,
which makes each turn long enough to interrupt and to crash a worker in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from echox.espeak import speak
from services.common import messages
from services.common.processes import free_port, stop_process
from services.common.settings import get_settings
from services.common.stack import open_bus, open_sessions
from services.gateway.client import ConverseClient, TurnResult
from services.gateway.converse import start_grpc_server
from services.gateway.session import ConversationEdge
from services.proto import stages_pb2 as pb
from services.serve import LocalCluster, start_redis, wait_for_workers

pytestmark = pytest.mark.integration
STAGE_STREAMS = {"speech_llm": messages.TURNS, "unit_generator": messages.SEGMENTS, "vocoder": messages.UNITS}


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    return speak("What is the capital of France?", voice="en-us+m5")


@pytest.fixture(scope="module")
def private_redis() -> Iterator[dict[str, object]]:
    """A Redis of this module alone (the restart test stops it; never the shared one)."""
    port = free_port()
    server: dict[str, object] = {"port": port, "process": start_redis(port)}
    yield server
    stop_process(server["process"])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cluster(
    private_redis: dict[str, object], random_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    settings = get_settings().model_copy(update={
        "bus_url": f"redis://127.0.0.1:{private_redis['port']}/0", "bus_prefix": f"echox-test-{uuid.uuid4().hex[:8]}:",
        "model_dir": random_tiny_model, "reclaim_idle_ms": 1500, "turn_deadline_s": 120.0,
    })
    logs = tmp_path_factory.mktemp("serve-logs")
    stack = LocalCluster(settings, logs)
    try:
        stack.start_triton(random_tiny_model)
        for stage in STAGE_STREAMS:
            for _ in range(2):
                stack.start_worker(stage)
        asyncio.run(wait_for_workers(stack.settings, timeout_s=180))
        yield stack
    finally:
        stack.stop()
        for log in sorted(logs.glob("*.log")):  # shown by pytest when a test failed
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")


@pytest.fixture
async def target(cluster: LocalCluster) -> AsyncIterator[str]:
    settings = cluster.settings
    bus, sessions = open_bus(settings), open_sessions(settings)
    edge = ConversationEdge.from_settings(bus, sessions, settings)
    server, port = await start_grpc_server(edge, "127.0.0.1", 0)
    yield f"127.0.0.1:{port}"
    await server.stop(grace=1.0)
    await sessions.close()
    await bus.close()


def _redis(cluster: LocalCluster) -> redis.Redis:
    return redis.Redis.from_url(cluster.settings.bus, socket_timeout=5)


def _assert_complete_once(result: TurnResult) -> None:
    assert result.error is None, result.error
    assert not result.cancelled
    indices = [index for index, _ in result.audio]
    assert indices, "no audio"
    assert indices == list(range(len(result.segments))), f"each segment exactly once, in order: {indices}"


def _turn_audio_entries(cluster: LocalCluster, session_id: str, turn_id: str) -> list[int]:
    """Indices of the audio segments the vocoders published for this turn (duplicates included)."""
    key = cluster.settings.bus_prefix + messages.audio_stream(session_id)
    found = []
    for _, fields in _redis(cluster).xrange(key):
        segment = pb.AudioSegment()
        segment.ParseFromString(next(iter(fields.values())))
        if segment.header.turn_id == turn_id:
            found.append(segment.index)
    return found


async def test_a_multi_turn_conversation_through_converse(cluster: LocalCluster, target: str,
                                                          question: np.ndarray) -> None:
    async with ConverseClient(target) as client:
        first = await client.turn(question)
        second = await client.turn(question)
    _assert_complete_once(first)
    _assert_complete_once(second)
    history_key = f"{cluster.settings.bus_prefix}session:{first.session_id}:history"
    assert _redis(cluster).llen(history_key) == 2, "both turns are in the session's history in Redis"
    async with ConverseClient(target, session_id=first.session_id) as again:  # any edge continues it
        third = await again.turn(question)
    _assert_complete_once(third)
    assert _redis(cluster).llen(history_key) == 3


async def test_barge_in_stops_the_turn_in_every_stage(cluster: LocalCluster, target: str,
                                                      question: np.ndarray) -> None:
    async with ConverseClient(target) as client:

        async def interrupt(result: TurnResult, index: int) -> None:
            if index == 0:
                await client.cancel(played_segments=1)

        cut = await client.turn(question, on_audio=interrupt)
        assert cut.cancelled and [index for index, _ in cut.audio] == [0]
        await asyncio.sleep(3.0)  # let every stage see the cancel and drain what it had
        produced = _turn_audio_entries(cluster, client.session_id, cut.turn_id)
        cuts = len(cut.segments)
        assert cuts >= 2, "the answer had more than one segment to cut short"
        assert len(set(produced)) < cuts, f"the vocoders went on after the barge-in: {produced} of {cuts}"
        history = _redis(cluster).lrange(f"{cluster.settings.bus_prefix}session:{client.session_id}:history", 0, -1)
        assert len(history) == 1 and cut.segments[0]["text"].strip() in history[0].decode()
        full = await client.turn(question)  # the next turn is served in full
        _assert_complete_once(full)


async def _kill_busy_worker(cluster: LocalCluster, stage: str, deadline_s: float = 30.0) -> int:
    """kill -9 the worker of `stage` that holds one of this stage's messages (found through
    the group's pending list: consumer names end with the worker's pid)."""
    client = _redis(cluster)
    key = cluster.settings.bus_prefix + STAGE_STREAMS[stage]
    pids = {p.pid for p in cluster.workers[stage] if p.poll() is None}
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for entry in client.xpending_range(key, stage, min="-", max="+", count=10):
            pid = int(entry["consumer"].decode().rsplit("-", 1)[1])
            if pid in pids:
                os.kill(pid, signal.SIGKILL)
                return pid
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {stage} worker was ever busy")


@pytest.mark.parametrize("stage", list(STAGE_STREAMS))
async def test_kill_9_of_a_busy_worker_still_completes_the_turn(cluster: LocalCluster, target: str,
                                                                 question: np.ndarray, stage: str) -> None:
    async with ConverseClient(target) as client:
        turn = asyncio.create_task(client.turn(question))
        killed = await _kill_busy_worker(cluster, stage)
        result = await asyncio.wait_for(turn, timeout=150)
    _assert_complete_once(result)
    assert killed not in {p.pid for p in cluster.workers[stage] if p.poll() is None}
    cluster.start_worker(stage)  # back to two workers for the next test
    await wait_for_workers(cluster.settings, (stage,))


async def test_redis_restarted_mid_call(cluster: LocalCluster, target: str, question: np.ndarray,
                                        private_redis: dict[str, object]) -> None:
    pids_before = {stage: [p.pid for p in procs if p.poll() is None] for stage, procs in cluster.workers.items()}
    port = int(private_redis["port"])  # type: ignore[call-overload]
    async with ConverseClient(target) as client:
        turn = asyncio.create_task(client.turn(question))
        await asyncio.sleep(0.5)
        redis.Redis(port=port).shutdown(nosave=True)  # the bus goes away mid-answer
        broken = await asyncio.wait_for(turn, timeout=150)
        assert broken.error is not None, "the caller is told the turn failed"
        assert broken.error.code in ("bus_unavailable", "deadline"), broken.error
        private_redis["process"] = start_redis(port)  # same port, empty: streams, groups and sessions are gone
        healed = None
        for _ in range(20):  # the workers reconnect on their own; give them a few seconds
            healed = await client.turn(question)
            if healed.error is None:
                break
            await asyncio.sleep(1.0)
    assert healed is not None
    _assert_complete_once(healed)
    alive = {stage: [p.pid for p in procs if p.poll() is None] for stage, procs in cluster.workers.items()}
    assert alive == pids_before, "no worker was restarted"


def test_the_gateway_process_serves_converse_and_http(cluster: LocalCluster, question: np.ndarray,
                                                      tmp_path: Path) -> None:
    """`python -m services.gateway` as deployed: gRPC Converse, /healthz and /metrics on HTTP,
    and the LiveKit worker on (no LiveKit server answers here: the other transports go on)."""
    import subprocess
    import sys
    import urllib.request

    grpc_port, http_port = free_port(), free_port()
    env = {**cluster.worker_env(), "ECHOX_GRPC_PORT": str(grpc_port), "ECHOX_HTTP_PORT": str(http_port),
           "ECHOX_LIVEKIT_ENABLED": "true", "ECHOX_LIVEKIT_URL": f"ws://127.0.0.1:{free_port()}"}
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        gateway = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=2).read()
                break
            except OSError:
                assert gateway.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        assert b"ok" in health

        async def converse() -> TurnResult:
            async with ConverseClient(f"127.0.0.1:{grpc_port}") as client:
                return await client.turn(question)

        _assert_complete_once(asyncio.run(converse()))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
        assert 'echox_time_to_first_audio_seconds_count{transport="grpc"} 1.0' in metrics
        assert urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=5).status == 200  # the page
    finally:
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=30) == 0, log.read_text()[-3000:]
