"""The `local` backends on the committed default model: the same outputs as the echox stages
run directly, streamed without blocking the event loop, and cancellable mid-answer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

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
    UnitStage,
    VocoderStage,
)
from echox.tokenizer import Turn
from services.common.backends.base import BackendError
from services.common.backends.local import LocalSpeechLLM, LocalUnits, LocalVocoder
from services.common.settings import get_settings
from services.common.stack import STAGES, Models, make_backend


@pytest.fixture(scope="module")
def echox() -> EchoX:
    return EchoX.from_pretrained(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def question() -> FloatArray:
    # A dev voice, as in test_default_model.py.
    return speak("What is the capital of France?", voice="en-us+m5")


async def collect(
    backend: LocalSpeechLLM, audio: FloatArray, history: Sequence[Turn] = (), cancel_after: int | None = None
) -> list[SpeechLLMOutput]:
    """The whole stream; with `cancel_after`, the cancel event is set after that many deltas."""
    cancel, items = asyncio.Event(), []
    async for item in backend.stream(audio, history, cancel):
        items.append(item)
        deltas = sum(isinstance(i, TextDeltaEvent) for i in items)
        if cancel_after is not None and deltas >= cancel_after:
            cancel.set()
    return items


def same_outputs(a: list[SpeechLLMOutput], b: list[SpeechLLMOutput]) -> None:
    assert [type(x) for x in a] == [type(x) for x in b]
    for x, y in zip(a, b, strict=True):
        if isinstance(x, HiddenSegment):
            assert isinstance(y, HiddenSegment)
            assert (x.index, x.start, x.token_ids, x.text) == (y.index, y.start, y.token_ids, y.text)
            assert torch.equal(x.hidden, y.hidden)
        else:
            assert x == y


def test_the_stream_equals_the_stage_run(echox: EchoX, question: FloatArray) -> None:
    streamed = asyncio.run(collect(LocalSpeechLLM(echox), question))
    direct = list(SpeechLLMStage(echox).run(question))
    same_outputs(streamed, direct)
    assert isinstance(streamed[0], TranscriptEvent) and streamed[0].text
    assert any(isinstance(i, TextDeltaEvent) for i in streamed)
    assert any(isinstance(i, HiddenSegment) for i in streamed)
    end = streamed[-1]
    assert isinstance(end, AnswerEnd) and not end.cancelled and "Paris" in end.text


def test_history_reaches_the_stage(echox: EchoX, question: FloatArray) -> None:
    history = [Turn("What is the capital of Sweden?", "The capital of Sweden is Stockholm.")]
    streamed = asyncio.run(collect(LocalSpeechLLM(echox), question, history))
    same_outputs(streamed, list(SpeechLLMStage(echox).run(question, history)))


def test_cancel_ends_the_stream_early(echox: EchoX, question: FloatArray) -> None:
    full = asyncio.run(collect(LocalSpeechLLM(echox), question))[-1]
    items = asyncio.run(collect(LocalSpeechLLM(echox), question, cancel_after=2))
    end = items[-1]
    assert isinstance(end, AnswerEnd) and end.cancelled
    assert isinstance(full, AnswerEnd) and len(end.token_ids) == 2 < len(full.token_ids)
    assert end.token_ids == full.token_ids[:2]
    assert end.text == echox.tokenizer.decode(list(end.token_ids))
    assert sum(isinstance(i, AnswerEnd) for i in items) == 1


def test_a_cancel_before_the_start_gives_an_empty_cancelled_answer(echox: EchoX, question: FloatArray) -> None:
    async def run() -> list[SpeechLLMOutput]:
        cancel = asyncio.Event()
        cancel.set()
        return [item async for item in LocalSpeechLLM(echox).stream(question, (), cancel)]

    assert asyncio.run(run()) == [AnswerEnd((), "", cancelled=True)]


def test_the_event_loop_stays_free_while_the_model_runs(echox: EchoX, question: FloatArray) -> None:
    async def run() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        task = asyncio.create_task(ticker())
        await collect(LocalSpeechLLM(echox), question)
        task.cancel()
        return ticks

    assert asyncio.run(run()) > 10


def test_bad_audio_is_a_backend_error(echox: EchoX) -> None:
    with pytest.raises(BackendError, match="speech_llm"):
        asyncio.run(collect(LocalSpeechLLM(echox), np.zeros(0, dtype=np.float32)))


def test_units_and_vocoder_equal_the_stages(echox: EchoX, question: FloatArray) -> None:
    segments = [i for i in SpeechLLMStage(echox).run(question) if isinstance(i, HiddenSegment)]
    units, vocoder = LocalUnits(echox), LocalVocoder(echox)

    async def run() -> None:
        for segment in segments:
            got = await units.generate(segment)
            assert got == UnitStage(echox).generate(segment)
            audio = await vocoder.synthesize(got)
            expected = VocoderStage(echox).synthesize(got)
            assert audio.index == segment.index and audio.pcm.dtype == np.float32
            np.testing.assert_array_equal(audio.pcm, expected.pcm)
        await units.close()
        await vocoder.close()

    asyncio.run(run())


def test_a_bad_segment_is_a_backend_error(echox: EchoX) -> None:
    bad = HiddenSegment(0, 0, (1,), "x", torch.zeros(1, 3))  # the wrong hidden size

    async def run() -> None:
        await LocalUnits(echox).generate(bad)

    with pytest.raises(BackendError, match="unit_generator"):
        asyncio.run(run())


def test_make_backend() -> None:
    settings = get_settings().model_copy(update={"backend": "local"})
    models = Models.load(DEFAULT_MODEL_DIR, "local")
    llm, units, vocoder = (make_backend(stage, settings, models) for stage in STAGES)
    assert isinstance(llm, LocalSpeechLLM) and isinstance(units, LocalUnits) and isinstance(vocoder, LocalVocoder)
    assert llm.max_audio_seconds > 0
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("speech_llm", settings.model_copy(update={"backend": "remote"}), models)
    remote = make_backend("speech_llm", settings.model_copy(update={"backend": "triton"}), models)
    assert remote.max_audio_seconds == models.config.encoder.window_seconds  # the model's own window
