"""In-process streaming: one object that takes 16 kHz audio and yields a turn's events.

The LLM decodes on the caller's thread; each segment the trigger cuts goes to a speech worker
thread (denoising adapter → echo decoder → units → vocoder), so segment k is spoken while the
LLM decodes what follows. Audio comes out in segment order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import numpy.typing as npt

from echox.checkpoint import EchoX
from echox.errors import EchoXError
from echox.events import (
    AudioEvent,
    DoneEvent,
    Event,
    SegmentEvent,
    TextDeltaEvent,
    Timings,
    TranscriptEvent,
)
from echox.streaming.stages import HiddenSegment, SpeechLLMStage, UnitStage, VocoderStage
from echox.tokenizer import Turn

_END = object()


class Conversation:
    """The text of earlier turns: what the caller said and what the agent actually spoke."""

    def __init__(self, turns: list[Turn] | None = None) -> None:
        self.turns: list[Turn] = list(turns or [])

    def add(self, user: str, assistant: str) -> None:
        self.turns.append(Turn(user, assistant))


class StreamingResponder:
    """Speech in, events out; `cancel()` stops a running response within one decoding step."""

    def __init__(self, echox: EchoX, speech_deadline_s: float = 60.0) -> None:
        self.speech_llm = SpeechLLMStage(echox)
        self.units = UnitStage(echox)
        self.vocoder = VocoderStage(echox)
        self.tokenizer = echox.tokenizer
        self.speech_deadline_s = speech_deadline_s
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def respond(
        self,
        samples: npt.ArrayLike,
        sample_rate: int = 16_000,
        conversation: Conversation | None = None,
    ) -> Iterator[Event]:
        """Yields Transcript, TextDelta, Segment and Audio events as they happen, then Done.

        Bad audio raises AudioInputError before anything is yielded.
        """
        audio = self.speech_llm.prepare(samples, sample_rate)
        self._cancel = cancel = threading.Event()
        started = time.perf_counter()
        segments: queue.Queue[HiddenSegment | object] = queue.Queue()
        spoken: queue.Queue[AudioEvent | BaseException | object] = queue.Queue()
        worker = threading.Thread(target=self._speak, args=(segments, spoken, cancel), name="echox-speech")
        worker.start()
        clock = _TurnClock(started)
        transcript, first_cut = "", None
        cut_tokens: dict[int, tuple[int, ...]] = {}
        played: list[int] = []
        try:
            for item in self.speech_llm.run(audio, conversation.turns if conversation else (), cancel):
                if isinstance(item, TranscriptEvent):
                    transcript = item.text
                    yield item
                elif isinstance(item, TextDeltaEvent):
                    clock.text()
                    yield item
                elif isinstance(item, HiddenSegment):
                    first_cut = item.start + len(item.token_ids) if first_cut is None else first_cut
                    cut_tokens[item.index] = item.token_ids
                    segments.put(item)
                    yield SegmentEvent(item.index, item.start, item.token_ids, item.text)
                else:
                    answer = item
                yield from self._play(self._ready(spoken, block=False), cancel, clock, played)
            segments.put(_END)
            yield from self._play(self._ready(spoken, block=True), cancel, clock, played)
        finally:
            if worker.is_alive():
                cancel.set()
                segments.put(_END)
            worker.join(timeout=self.speech_deadline_s)
        cancelled = cancel.is_set() or answer.cancelled
        if conversation is not None:
            # After a barge-in the history keeps only what the caller actually heard.
            heard = [t for i in played for t in cut_tokens[i]] if cancelled else list(answer.token_ids)
            conversation.add(transcript, self.tokenizer.decode(heard))
        yield DoneEvent(
            transcript=transcript,
            text=answer.text,
            timings=clock.finish(),
            first_segment_tokens=first_cut,
            num_tokens=len(answer.token_ids),
            cancelled=cancelled,
        )

    @staticmethod
    def _play(
        ready: Iterator[AudioEvent], cancel: threading.Event, clock: _TurnClock, played: list[int]
    ) -> Iterator[AudioEvent]:
        for event in ready:
            if cancel.is_set():
                continue  # barge-in: nothing more reaches the caller
            clock.audio()
            played.append(event.index)
            yield event

    def _speak(
        self,
        segments: queue.Queue[HiddenSegment | object],
        spoken: queue.Queue[AudioEvent | BaseException | object],
        cancel: threading.Event,
    ) -> None:
        """Worker thread: segments in order → audio events in order."""
        try:
            while (segment := segments.get()) is not _END and not cancel.is_set():
                assert isinstance(segment, HiddenSegment)
                units = self.units.generate(segment)
                if cancel.is_set():
                    break
                audio = self.vocoder.synthesize(units)
                spoken.put(AudioEvent(audio.index, audio.pcm))
        except BaseException as exc:  # handed to the caller's thread, which re-raises it
            spoken.put(exc)
        finally:
            spoken.put(_END)

    def _ready(
        self, spoken: queue.Queue[AudioEvent | BaseException | object], block: bool
    ) -> Iterator[AudioEvent]:
        deadline = time.monotonic() + self.speech_deadline_s
        while True:
            try:
                timeout = max(0.0, deadline - time.monotonic()) if block else None
                item = spoken.get(block=block, timeout=timeout)
            except queue.Empty:
                if block:
                    raise EchoXError(f"speech generation gave no audio within {self.speech_deadline_s:.0f} s") from None
                return
            if item is _END:
                spoken.put(_END)  # later drains see the end too
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, AudioEvent)
            yield item


class _TurnClock:
    """Milliseconds from the start of the turn to the first text, first audio and the end."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first_text: float | None = None
        self.first_audio: float | None = None

    def _ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0

    def text(self) -> None:
        self.first_text = self.first_text if self.first_text is not None else self._ms()

    def audio(self) -> None:
        self.first_audio = self.first_audio if self.first_audio is not None else self._ms()

    def finish(self) -> Timings:
        return Timings(self.first_text, self.first_audio, self._ms())
