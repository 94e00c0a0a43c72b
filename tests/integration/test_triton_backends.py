"""The `triton` backends against a REAL Triton server (the binary scripts/install-triton.sh
installs) serving deploy/triton/model_repository on the committed default model: the same
outputs as the local stages, cancellation that reaches the model, clear errors.

A missing server binary is a failure, never a skip.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from echox.audio import FloatArray
from echox.checkpoint import EchoX
from echox.espeak import speak
from echox.events import TextDeltaEvent, TranscriptEvent
from echox.paths import DEFAULT_MODEL_DIR
from echox.streaming.stages import (
    AnswerEnd,
    HiddenSegment,
    SpeechLLMOutput,
    SpeechLLMStage,
    UnitSegment,
    UnitStage,
    VocoderStage,
)
from echox.tokenizer import Turn
from services.common.backends.base import BackendError
from services.common.backends.triton import TritonSpeechLLM, TritonUnits, TritonVocoder
from services.common.triton_server import INSTALL_HINT, TritonServer, TritonServerError, triton_home

pytestmark = pytest.mark.integration

HISTORY = [Turn("What is the capital of Sweden?", "The capital of Sweden is Stockholm.")]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The served models run with one torch thread (config.pbtxt); so does the local reference,
    so both sum in the same order and pick the same tokens."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    binary = triton_home() / "bin" / "tritonserver"
    if not binary.is_file():
        pytest.fail(f"no tritonserver at {binary}: {INSTALL_HINT}")
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(DEFAULT_MODEL_DIR, log_path=log) as running:
        yield running
        stopping = time.monotonic()
    # Every model unloads at once: no request (cancelled, failed or done) is left held in Triton.
    assert time.monotonic() - stopping < 10.0, f"Triton took its whole exit timeout to stop; see {log}"


@pytest.fixture(scope="module")
def echox() -> EchoX:
    return EchoX.from_pretrained(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def question() -> FloatArray:
    return speak("What is the capital of France?", voice="en-us+m5")


async def collect(
    llm: TritonSpeechLLM, audio: FloatArray, history: Sequence[Turn] = (), cancel_after: int | None = None,
    cancel_on_transcript: bool = False,
) -> list[SpeechLLMOutput]:
    cancel, items = asyncio.Event(), []
    async for item in llm.stream(audio, history, cancel):
        items.append(item)
        deltas = sum(isinstance(i, TextDeltaEvent) for i in items)
        if (cancel_after is not None and deltas >= cancel_after) or (
            cancel_on_transcript and isinstance(item, TranscriptEvent)
        ):
            cancel.set()
    return items


def cancellations_seen(server: TritonServer) -> int:
    """How many cancelled requests the speech_llm model has logged."""
    assert server.log_path is not None
    return server.log_path.read_text(errors="replace").count("speech_llm: request cancelled")


@pytest.mark.parametrize("case", ["question", "question+history", "silence"])
async def test_speech_llm_streams_what_the_local_stage_gives(
    server: TritonServer, echox: EchoX, question: FloatArray, case: str
) -> None:
    # Silence: an empty transcript, so empty strings cross the wire too.
    audio = np.zeros(16_000, dtype=np.float32) if case == "silence" else question
    history = HISTORY if case.endswith("history") else []
    llm = TritonSpeechLLM(server.grpc_url)
    remote = await collect(llm, audio, history)
    await llm.close()
    local = list(SpeechLLMStage(echox).run(audio, history))
    assert [type(i) for i in remote] == [type(i) for i in local]
    assert sum(isinstance(i, HiddenSegment) for i in remote) >= 1
    for got, expected in zip(remote, local, strict=True):
        if isinstance(expected, HiddenSegment):
            assert isinstance(got, HiddenSegment)
            assert (got.index, got.start, got.token_ids, got.text) == (
                expected.index, expected.start, expected.token_ids, expected.text,
            )
            assert got.hidden.dtype == torch.float16 and got.hidden.shape == expected.hidden.shape
            torch.testing.assert_close(got.hidden.float(), expected.hidden, atol=2e-3, rtol=2e-3)
        else:
            assert got == expected


async def test_unit_generator_and_vocoder_give_what_the_local_stages_give(
    server: TritonServer, echox: EchoX, question: FloatArray
) -> None:
    llm, units, vocoder = TritonSpeechLLM(server.grpc_url), TritonUnits(server.grpc_url), TritonVocoder(server.grpc_url)
    remote_segments = [i for i in await collect(llm, question) if isinstance(i, HiddenSegment)]
    local_segments = [i for i in SpeechLLMStage(echox).run(question) if isinstance(i, HiddenSegment)]
    for remote, local in zip(remote_segments, local_segments, strict=True):
        expected = UnitStage(echox).generate(local)
        assert await units.generate(local) == expected  # fp32 hidden states: exactly local
        # fp16 hidden states from the served speech_llm: what the local stage makes of them.
        assert await units.generate(remote) == UnitStage(echox).generate(remote)
        audio = await vocoder.synthesize(expected)
        pcm = VocoderStage(echox).synthesize(expected).pcm
        assert audio.index == local.index and audio.pcm.shape == pcm.shape and len(pcm) > 0
        np.testing.assert_allclose(audio.pcm, pcm, atol=1e-4)
    for backend in (llm, units, vocoder):
        await backend.close()


async def test_concurrent_vocoder_requests_of_different_lengths_are_batched_correctly(
    server: TritonServer, echox: EchoX
) -> None:
    vocoder = TritonVocoder(server.grpc_url)
    num_units = echox.config.vocoder.num_units
    segments = [UnitSegment(i, (), tuple((np.arange(5 + 7 * i) * 13 % num_units).tolist())) for i in range(6)]
    results = await asyncio.gather(*(vocoder.synthesize(s) for s in segments))
    await vocoder.close()
    for segment, audio in zip(segments, results, strict=True):
        expected = VocoderStage(echox).synthesize(segment).pcm
        assert audio.index == segment.index
        np.testing.assert_allclose(audio.pcm, expected, atol=1e-4)


async def test_cancel_mid_answer_ends_the_stream_promptly(server: TritonServer, question: FloatArray) -> None:
    llm = TritonSpeechLLM(server.grpc_url)
    full = (await collect(llm, question))[-1]
    started = time.monotonic()
    items = await collect(llm, question, cancel_after=2)
    await llm.close()
    end = items[-1]
    assert isinstance(full, AnswerEnd) and isinstance(end, AnswerEnd)
    assert end.cancelled and not full.cancelled
    assert end.token_ids == full.token_ids[:2] and len(end.token_ids) < len(full.token_ids)
    assert time.monotonic() - started < 5.0


async def test_a_cancel_reaches_the_model_and_it_stops_decoding(server: TritonServer, question: FloatArray) -> None:
    llm = TritonSpeechLLM(server.grpc_url)
    before = cancellations_seen(server)
    items = await collect(llm, question, cancel_on_transcript=True)
    assert items[-1] == AnswerEnd((), "", cancelled=True)
    deadline = time.monotonic() + 10.0
    while cancellations_seen(server) == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert cancellations_seen(server) == before + 1, "the model did not see request.is_cancelled()"
    # The instance is free again: the next turn is answered in full.
    end = (await collect(llm, question))[-1]
    await llm.close()
    assert isinstance(end, AnswerEnd) and not end.cancelled and "Paris" in end.text


async def test_an_unreachable_server_and_a_missed_deadline_are_backend_errors(
    server: TritonServer, question: FloatArray
) -> None:
    with socket.socket() as holder:  # bound, never listening: refused, and no one else takes it
        holder.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{holder.getsockname()[1]}"
        llm, vocoder = TritonSpeechLLM(nowhere, timeout_s=5.0), TritonVocoder(nowhere, timeout_s=5.0)
        with pytest.raises(BackendError, match=rf"speech_llm.*{re.escape(nowhere)}.*UNAVAILABLE"):
            await collect(llm, question)
        with pytest.raises(BackendError, match=rf"vocoder.*{re.escape(nowhere)}.*UNAVAILABLE"):
            await vocoder.synthesize(UnitSegment(0, (), (1, 2, 3)))
    hasty, patient = TritonSpeechLLM(server.grpc_url, timeout_s=0.001), TritonSpeechLLM(server.grpc_url)
    with pytest.raises(BackendError, match="DEADLINE_EXCEEDED"):
        await collect(hasty, question)
    # The abandoned request may still be running on the server; the next one waits it out.
    end = (await collect(patient, question))[-1]
    assert isinstance(end, AnswerEnd) and "Paris" in end.text
    hasty_vocoder, patient_vocoder = TritonVocoder(server.grpc_url, timeout_s=0.001), TritonVocoder(server.grpc_url)
    units = UnitSegment(0, (), tuple(range(1, 100)))
    with pytest.raises(BackendError, match=r"vocoder.*DEADLINE_EXCEEDED"):
        await hasty_vocoder.synthesize(units)
    assert (await patient_vocoder.synthesize(units)).pcm.size > 0
    for backend in (llm, vocoder, hasty, patient, hasty_vocoder, patient_vocoder):
        await backend.close()


async def test_bad_requests_are_clear_errors_and_the_server_keeps_serving(
    server: TritonServer, echox: EchoX, question: FloatArray
) -> None:
    llm, units, vocoder = TritonSpeechLLM(server.grpc_url), TritonUnits(server.grpc_url), TritonVocoder(server.grpc_url)
    with pytest.raises(BackendError, match=r"speech_llm.*the audio is empty"):
        await collect(llm, np.zeros(0, dtype=np.float32))
    too_long = np.zeros(int(16_000 * (echox.config.encoder.window_seconds + 1)), dtype=np.float32)
    with pytest.raises(BackendError, match="window"):
        await collect(llm, too_long)
    with pytest.raises(BackendError, match=r"unit_generator.*\[n >= 1, 256\]"):
        await units.generate(HiddenSegment(0, 0, (1,), "x", torch.zeros(1, 3)))
    with pytest.raises(BackendError, match=r"vocoder.*units must lie in"):
        await vocoder.synthesize(UnitSegment(0, (), (10**6,)))
    end = (await collect(llm, question))[-1]
    assert isinstance(end, AnswerEnd) and "Paris" in end.text
    for backend in (llm, units, vocoder):
        await backend.close()


def test_a_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(TritonServerError, match=f"cannot serve the model folder {missing}.*no model folder"):
        TritonServer(missing).start()


def test_a_missing_server_binary_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(TritonServerError, match=r"install-triton\.sh"):
        TritonServer(DEFAULT_MODEL_DIR, home=tmp_path).start()


def test_a_model_that_fails_to_load_is_a_clear_error_with_the_reason(tmp_path: Path) -> None:
    """The folder passes the launcher's check (config.json) but the weights are missing:
    model.py's initialize fails inside Triton, and the error says why."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_bytes((DEFAULT_MODEL_DIR / "config.json").read_bytes())
    server = TritonServer(broken, models=["vocoder"], log_path=tmp_path / "triton.log", start_timeout_s=120)
    with pytest.raises(TritonServerError, match=r"vocoder: .*model\.safetensors is missing"):
        server.start()
    assert not server.alive()


def test_an_error_after_the_deadline_is_reported_as_the_deadline() -> None:
    """The server may report a deadline's cancel as an INTERNAL error before the client's own
    DEADLINE_EXCEEDED arrives; past the deadline the error says it was the deadline."""
    from tritonclient.utils import InferenceServerException

    internal = InferenceServerException("Internal error from Core")
    for backend in (TritonSpeechLLM("127.0.0.1:1", timeout_s=0.001), TritonVocoder("127.0.0.1:1", timeout_s=0.001)):
        late = str(backend.error(internal, deadline=time.monotonic() - 1.0))
        assert "DEADLINE_EXCEEDED" in late and "Internal error from Core" in late
        for early in (backend.error(internal, deadline=time.monotonic() + 60.0), backend.error(internal)):
            assert "DEADLINE_EXCEEDED" not in str(early) and "Internal error from Core" in str(early)
