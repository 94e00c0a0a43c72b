"""The in-process streaming responder: events, order, cancellation, multi-turn, and the
streaming == offline property of segments and units."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from echox.checkpoint import EchoX
from echox.errors import AudioInputError
from echox.events import AudioEvent, DoneEvent, SegmentEvent, TextDeltaEvent, TranscriptEvent
from echox.models.echox import EchoXModel
from echox.streaming.responder import Conversation, StreamingResponder
from echox.streaming.segmenter import cosine_scores, segment_offline
from echox.streaming.stages import AnswerEnd, HiddenSegment, SpeechLLMStage, UnitStage
from tests.unit.conftest import micro_config


def _audio(seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16_000 * seconds))).astype(np.float32)


class _NeverEndsHead(torch.nn.Linear):
    """An LM head that can never choose the end-of-answer token."""

    def __init__(self, weight: torch.Tensor, eos_id: int) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias=False)
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.eos_id = eos_id

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().forward(hidden)
        logits[..., self.eos_id] = float("-inf")
        return logits


@pytest.fixture(scope="module")
def chatty() -> EchoX:
    """A random model whose answers always run to the token cap (20 tokens)."""
    echox = EchoX.random_init(micro_config(max_answer_tokens=20), seed=1)
    llm = echox.model.llm
    llm.lm_head = _NeverEndsHead(llm.get_output_embeddings().weight, echox.tokenizer.eos_id)
    return echox


def test_events_arrive_in_order_and_audio_matches_segments(chatty: EchoX) -> None:
    events = list(StreamingResponder(chatty).respond(_audio()))
    assert isinstance(events[0], TranscriptEvent) and isinstance(events[-1], DoneEvent)
    done = events[-1]
    segments = [e for e in events if isinstance(e, SegmentEvent)]
    audio = [e for e in events if isinstance(e, AudioEvent)]
    deltas = [e for e in events if isinstance(e, TextDeltaEvent)]
    assert done.num_tokens == 20 == len(deltas)
    assert [a.index for a in audio] == [s.index for s in segments] == list(range(len(segments)))
    assert sum(s.tokens for s in segments) == done.num_tokens  # segments tile the answer
    assert done.first_segment_tokens == segments[0].tokens
    assert "".join(d.text for d in deltas) == done.text
    assert done.timings.first_text_ms is not None and done.timings.first_audio_ms is not None
    assert done.timings.first_text_ms <= done.timings.total_ms
    hop = chatty.config.vocoder.hop_length
    assert all(len(a.pcm) % hop == 0 and a.pcm.dtype == np.float32 for a in audio)


def test_speech_overlaps_decoding(chatty: EchoX) -> None:
    """The first audio is yielded before the LLM has finished the answer."""
    events = list(StreamingResponder(chatty).respond(_audio()))
    kinds = [type(e).__name__ for e in events]
    first_audio = kinds.index("AudioEvent")
    last_delta = len(kinds) - 1 - kinds[::-1].index("TextDeltaEvent")
    assert len([e for e in events if isinstance(e, SegmentEvent)]) >= 2
    # Audio may land after the last delta on a slow machine; the segment must not.
    assert kinds.index("SegmentEvent") < last_delta
    assert first_audio > 0


def _run_offline(echox: EchoX, audio: np.ndarray) -> tuple[list[int], list[torch.Tensor]]:
    """Decode the whole answer first, keeping each token's predicting hidden state."""
    stage = SpeechLLMStage(echox)
    segments: list[HiddenSegment] = []
    end = None
    for item in stage.run(audio):
        if isinstance(item, HiddenSegment):
            segments.append(item)
        elif isinstance(item, AnswerEnd):
            end = item
    assert end is not None
    hidden = [h for s in segments for h in s.hidden]
    return list(end.token_ids), hidden


def test_streaming_and_offline_give_identical_segments_and_units(chatty: EchoX) -> None:
    audio = _audio(seed=3)
    stage, units = SpeechLLMStage(chatty), UnitStage(chatty)
    streamed = [i for i in stage.run(audio) if isinstance(i, HiddenSegment)]
    tokens, hidden = _run_offline(chatty, audio)
    model: EchoXModel = chatty.model
    period = model.llm.get_output_embeddings().weight[chatty.tokenizer.period_id]
    scores = cosine_scores(torch.stack(hidden), period).tolist()
    offline = segment_offline(scores, model.config.segmenter)
    assert [(s.start, s.end) for s in offline] == [(s.start, s.start + len(s.token_ids)) for s in streamed]
    for cut, seg in zip(offline, streamed, strict=True):
        redone = HiddenSegment(cut.index, cut.start, tuple(tokens[cut.start : cut.end]), seg.text,
                               torch.stack(hidden[cut.start : cut.end]))  # fmt: skip
        assert units.generate(redone) == units.generate(seg)


def test_cancel_stops_within_one_step(chatty: EchoX) -> None:
    responder = StreamingResponder(chatty)
    seen = 0
    events = []
    for event in responder.respond(_audio()):
        events.append(event)
        if isinstance(event, TextDeltaEvent):
            seen += 1
            if seen == 3:
                responder.cancel()
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.cancelled
    assert done.num_tokens == 3
    after_cancel = events[[i for i, e in enumerate(events) if isinstance(e, TextDeltaEvent)][-1] + 1 :]
    assert not any(isinstance(e, AudioEvent) for e in after_cancel)


def test_cancel_from_another_thread(chatty: EchoX) -> None:
    responder = StreamingResponder(chatty)
    timer = threading.Timer(0.0, responder.cancel)
    events = []
    for event in responder.respond(_audio()):
        events.append(event)
        if isinstance(event, TranscriptEvent):
            timer.start()
            timer.join()
    assert isinstance(events[-1], DoneEvent) and events[-1].cancelled


def _contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_multi_turn_keeps_prior_text(chatty: EchoX) -> None:
    conversation = Conversation()
    responder = StreamingResponder(chatty)
    first = list(responder.respond(_audio(seed=1), conversation=conversation))[-1]
    assert isinstance(first, DoneEvent) and not first.cancelled
    assert conversation.turns[0].assistant == first.text
    next_prompt = chatty.tokenizer.prompt_ids(conversation.turns)
    assert _contains(next_prompt, chatty.tokenizer.encode(first.text))
    list(responder.respond(_audio(seed=2), conversation=conversation))
    assert len(conversation.turns) == 2


def test_barge_in_history_keeps_only_played_text(chatty: EchoX) -> None:
    conversation = Conversation()
    responder = StreamingResponder(chatty)
    segments: dict[int, tuple[int, ...]] = {}
    played: list[int] = []
    for event in responder.respond(_audio(), conversation=conversation):
        if isinstance(event, SegmentEvent):
            segments[event.index] = event.token_ids
        if isinstance(event, AudioEvent):
            played.append(event.index)
            responder.cancel()  # the caller speaks over the first segment
    assert played == [0]
    assert conversation.turns[0].assistant == chatty.tokenizer.decode(list(segments[0]))


@pytest.mark.parametrize(
    ("samples", "rate", "reason"),
    [
        (np.zeros(0, np.float32), 16_000, "empty"),
        (np.array([np.nan] * 100, np.float32), 16_000, "NaN"),
        (np.zeros(16_000 * 20, np.float32), 16_000, "window"),
    ],
    ids=["empty", "nan", "too-long"],
)
def test_bad_audio_raises_before_any_event(micro_echox: EchoX, samples: np.ndarray, rate: int, reason: str) -> None:
    with pytest.raises(AudioInputError, match=reason):
        next(StreamingResponder(micro_echox).respond(samples, rate))


def test_other_sample_rates_are_resampled(micro_echox: EchoX) -> None:
    audio = _audio(seconds=1.0)
    stereo_44k = np.stack([audio[: 16_000], audio[: 16_000]], axis=1).repeat(3, axis=0)
    events = list(StreamingResponder(micro_echox).respond(stereo_44k, 48_000))
    assert isinstance(events[-1], DoneEvent)
