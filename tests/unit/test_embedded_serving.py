"""`echox serve --embedded`: the whole data plane in one process (in-memory bus and state,
local backends) behind the real gRPC Converse API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from echox.espeak import speak
from services.common.processes import free_port
from services.common.settings import get_settings
from services.gateway.client import CallError, ConverseClient
from services.proto import stages_pb2 as pb
from services.serve import serve_embedded

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    return speak("What is the capital of France?", voice="en-us+m5")


async def _serving(model_dir: Path | None) -> AsyncIterator[str]:
    port = free_port()
    settings = get_settings().model_copy(update={"grpc_port": port, "http_port": 0, "model_dir": model_dir,
                                                  "turn_deadline_s": 60.0})
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve_embedded(settings, stop, ready))
    await asyncio.wait({task, asyncio.ensure_future(ready.wait())}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


@pytest.fixture
async def target() -> AsyncIterator[str]:
    async for address in _serving(None):
        yield address


@pytest.fixture
async def long_answer_target(random_tiny_model: Path) -> AsyncIterator[str]:
    """A random-weight model: it talks for 128 tokens, long enough to interrupt."""
    async for address in _serving(random_tiny_model):
        yield address


async def test_a_multi_turn_conversation(target: str, question: np.ndarray) -> None:
    async with ConverseClient(target) as client:
        first = await client.turn(question)
        second = await client.turn(question)
    for result in (first, second):
        assert result.error is None, result.error
        assert "paris" in result.text.lower()
        indices = [index for index, _ in result.audio]
        assert indices == list(range(len(result.segments))) and indices, "each segment once, in order"
        assert result.pcm().size > 0 and result.first_audio_ms is not None
    async with ConverseClient(target, session_id=first.session_id) as again:
        assert again.session_id == first.session_id  # the conversation can be continued


async def test_an_unknown_session_is_refused(target: str) -> None:
    with pytest.raises(CallError, match="not_found"):
        async with ConverseClient(target, session_id="no-such-session"):
            pass


async def test_bad_audio_gets_an_error_event_and_the_call_goes_on(target: str, question: np.ndarray) -> None:
    async with ConverseClient(target) as client:
        odd = await client.turn(b"\x01\x02\x03")
        assert odd.error is not None and odd.error.code == "bad_audio"
        good = await client.turn(question)
        assert good.error is None and good.audio
    async with ConverseClient(target, encoding=pb.PCM_F32LE) as floats:
        nan = await floats.turn(np.full(1600, np.nan, dtype=np.float32))
        assert nan.error is not None and nan.error.code == "bad_audio" and "NaN" in nan.error.message
        fine = await floats.turn(question)
        assert fine.error is None and fine.audio


async def test_barge_in_stops_the_answer(long_answer_target: str, question: np.ndarray) -> None:
    async with ConverseClient(long_answer_target) as client:

        async def interrupt(result: object, index: int) -> None:
            if index == 0:
                await client.cancel(played_segments=1)

        cut = await client.turn(question, on_audio=interrupt)
        assert cut.cancelled and cut.error is None
        assert [index for index, _ in cut.audio] == [0], "nothing is played after the barge-in"
        assert cut.text == cut.segments[0]["text"].strip(), "the history keeps only what was heard"
        after = await client.turn(question)  # the conversation goes on
        assert after.error is None and after.audio
