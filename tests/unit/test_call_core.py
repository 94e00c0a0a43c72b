"""The call core (services.gateway.call) on a scripted edge and the energy VAD: turn end on
silence, the turn length cap, ordered playback, played tracking, barge-in, hang-up mid-answer,
audio that stops arriving. Audio time drives the VAD, so feeding faster than real time is fine."""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from services.common.state import UnknownSession
from services.gateway.call import Call, CallConfig, Playback
from services.gateway.codecs import (
    AudioFormatError,
    StreamResampler,
    float_to_mulaw,
    float_to_pcm16,
    mulaw_to_float,
    pcm16_to_float,
)
from services.gateway.vad import EnergyVad, SileroVad
from services.proto import stages_pb2 as pb

RATE = 16_000


def tone(seconds: float, rate: int = RATE, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.float32)


class FakeRun:
    """A scripted turn: a transcript, then per segment a text delta and its audio, then done."""

    def __init__(self, turn_id: str, audio: bytes, segments: int, delay_s: float, first_delay_s: float,
                 segment_s: float = 0.1) -> None:
        self.turn_id = turn_id
        self.segment_s = segment_s
        self.audio = audio
        self.segments = segments
        self.delay_s = delay_s
        self.first_delay_s = first_delay_s
        self.cancelled_with: int | None = None
        self.summary = types.SimpleNamespace(text="")  # as TurnRun's: the answer, once its Done has come
        self._cancel = asyncio.Event()

    async def cancel(self, played_segments: int | None = None) -> None:
        self.cancelled_with = played_segments
        self._cancel.set()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._outputs()

    async def _wait(self, seconds: float) -> bool:
        """False when cancelled meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cancel.wait(), seconds)
        return not self._cancel.is_set()

    async def _outputs(self) -> AsyncIterator[Any]:
        yield pb.TurnEvent(transcript=pb.Transcript(text="what is the capital of france"))
        sent = 0
        for index in range(self.segments):
            if not await self._wait(self.first_delay_s if index == 0 else self.delay_s):
                break
            yield pb.TurnEvent(segment=pb.SegmentCut(index=index, text=f"w{index}"))
            yield pb.TurnEvent(text_delta=pb.TextDelta(index=index, text=f"word{index} "))
            if index == self.segments - 1:
                self.summary.text = "word0 word1"  # Done came before the last audio, as it usually does
            pcm = float_to_pcm16(tone(self.segment_s))
            yield pb.AudioSegment(index=index, pcm=pcm, sample_rate=RATE, encoding=pb.PCM_S16LE, text=f"w{index}")
            sent += 1
        cancelled = self._cancel.is_set()
        done = pb.Done(transcript="what is the capital of france", text="heard" if cancelled else "word0 word1",
                       num_segments=sent, cancelled=cancelled)
        yield pb.TurnEvent(done=done)


class FakeEdge:
    """Stands in for ConversationEdge: every turn gets a FakeRun."""

    def __init__(self, segments: int = 3, delay_s: float = 0.01, first_delay_s: float = 0.01,
                 segment_s: float = 0.1) -> None:
        self.runs: list[FakeRun] = []
        self.segments, self.delay_s, self.first_delay_s = segments, delay_s, first_delay_s
        self.segment_s = segment_s
        self.sessions: set[str] = set()

    async def open(self, session_id: str | None = None) -> str:
        if session_id:
            if session_id not in self.sessions:
                raise UnknownSession(session_id)
            return session_id
        session_id = f"s{len(self.sessions)}"
        self.sessions.add(session_id)
        return session_id

    async def turn(self, session_id: str, audio: bytes, sample_rate: int, encoding: int = 1) -> FakeRun:
        run = FakeRun(f"t{len(self.runs)}", audio, self.segments, self.delay_s, self.first_delay_s, self.segment_s)
        self.runs.append(run)
        return run


class FakeTransport:
    """Records what the core asks; with `autoplay` it reports each segment played after its
    duration, as a real player would."""

    def __init__(self, reports_playback: bool = True, autoplay: bool = True) -> None:
        self.reports_playback = reports_playback
        self.autoplay = autoplay
        self.call: Call | None = None
        self._playhead = 0.0
        self.events: list[dict[str, Any]] = []
        self.played: list[Playback] = []
        self.stops: list[str] = []

    async def send_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    async def play(self, segment: Playback) -> None:
        self.played.append(segment)
        if self.autoplay and self.call is not None:
            loop = asyncio.get_running_loop()
            self._playhead = max(loop.time(), self._playhead) + segment.duration_s
            loop.call_later(self._playhead - loop.time(), self.call.played, segment.turn_id, segment.index)

    async def stop_playback(self, turn_id: str) -> None:
        self.stops.append(turn_id)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


CONFIG = CallConfig(end_of_turn_ms=300, barge_in_ms=200, max_turn_audio_s=2.0, min_speech_ms=150)


async def make_call(edge: FakeEdge | None = None, transport: FakeTransport | None = None,
                    config: CallConfig = CONFIG) -> tuple[Call, FakeEdge, FakeTransport]:
    edge = edge or FakeEdge()
    transport = transport or FakeTransport()
    call = Call(edge, "s0", transport, config, EnergyVad())  # type: ignore[arg-type]
    transport.call = call
    await call.start()
    return call, edge, transport


async def feed(call: Call, audio: np.ndarray, rate: int = RATE, chunk_s: float = 0.02) -> None:
    step = int(chunk_s * rate)
    for start in range(0, audio.size, step):
        await call.feed(audio[start:start + step], rate)


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_silence_ends_the_turn_and_the_answer_plays_in_order() -> None:
    call, edge, transport = await make_call()
    await feed(call, np.concatenate([silence(0.5), tone(0.8), silence(0.2)]))
    assert not edge.runs, "a 200 ms pause is not the end of the turn"
    await feed(call, silence(0.2))
    await until(lambda: transport.of_type("done"))
    assert len(edge.runs) == 1
    seconds = len(edge.runs[0].audio) / 2 / RATE
    assert 0.8 <= seconds <= 0.8 + CONFIG.preroll_ms / 1000 + CONFIG.trailing_ms / 1000 + 0.07
    assert [p.index for p in transport.played] == [0, 1, 2]
    kinds = [e["type"] for e in transport.events]
    assert kinds[0] == "speech_started" and kinds[-1] == "done"
    assert kinds.index("turn_started") < kinds.index("transcript") < kinds.index("latency") < kinds.index("done")
    assert call.turns[0].reason == "silence" and call.turns[0].response_ms is not None
    await call.close()


async def test_audio_at_other_rates_is_resampled() -> None:
    call, edge, transport = await make_call()
    await feed(call, np.concatenate([tone(0.8, 8000), silence(0.6, 8000)]), rate=8000)
    await until(lambda: transport.of_type("done"))
    assert 0.8 <= len(edge.runs[0].audio) / 2 / RATE <= 1.5
    await call.close()


async def test_a_click_is_not_a_turn() -> None:
    call, edge, _ = await make_call()
    await feed(call, np.concatenate([tone(0.064), silence(1.0)]))
    await asyncio.sleep(0.05)
    assert not edge.runs
    await call.close()


async def test_a_caller_who_never_stops_talking_is_cut_at_the_cap() -> None:
    call, edge, transport = await make_call(FakeEdge(segments=1))
    await feed(call, tone(5.0))
    await until(lambda: transport.of_type("done"))
    assert len(edge.runs) == 1, "the talking after the cap neither barges in nor starts a turn"
    assert call.turns[0].reason == "cap" and len(edge.runs[0].audio) / 2 / RATE <= CONFIG.max_turn_audio_s
    assert not transport.stops
    await feed(call, np.concatenate([silence(0.5), tone(0.5), silence(0.5)]))
    await until(lambda: len(edge.runs) == 2)  # after a pause the caller is heard again
    await call.close()


async def test_barge_in_stops_playback_cancels_with_what_was_heard_and_starts_the_next_turn() -> None:
    call, edge, transport = await make_call(FakeEdge(segments=20, delay_s=0.1), FakeTransport(autoplay=False))
    await feed(call, np.concatenate([tone(0.6), silence(0.4)]))
    await until(lambda: len(transport.played) >= 2)
    call.played(edge.runs[0].turn_id, 0)  # the caller heard segment 0 to its end
    await feed(call, tone(0.5))
    assert transport.stops == [edge.runs[0].turn_id]
    assert edge.runs[0].cancelled_with == 1
    barge = transport.of_type("barge_in")[0]
    assert barge["played_segments"] == 1 and barge["latency_ms"] >= 0
    await until(lambda: any(e.get("cancelled") for e in transport.of_type("done")))
    handed = len(transport.played)
    await asyncio.sleep(0.3)
    assert len(transport.played) == handed, "nothing is played after the barge-in"
    await feed(call, silence(0.4))
    await until(lambda: len(edge.runs) == 2)  # the interruption is the next turn
    assert len(edge.runs[1].audio) / 2 / RATE >= 0.5
    await call.close()


async def test_a_barge_in_after_the_last_audio_went_out_still_cancels_the_turn() -> None:
    call, edge, transport = await make_call(FakeEdge(segments=2, segment_s=0.5))
    await feed(call, np.concatenate([tone(0.6), silence(0.4)]))
    await until(lambda: len(transport.played) == 2)
    await asyncio.sleep(0.6)  # the first segment has played, the second is playing
    await feed(call, tone(0.3))
    assert edge.runs[0].cancelled_with == 1
    await until(lambda: transport.of_type("done"))
    assert transport.of_type("done")[0]["cancelled"], "the history keeps only what was heard"
    await call.close()


async def test_barge_in_while_the_agent_is_still_thinking() -> None:
    call, edge, transport = await make_call(FakeEdge(segments=2, first_delay_s=2.0))
    await feed(call, np.concatenate([tone(0.6), silence(0.4)]))
    await until(lambda: edge.runs)
    await feed(call, tone(0.3))
    assert edge.runs[0].cancelled_with == 0 and not transport.played
    await call.close()


async def test_a_short_sound_over_the_agent_is_not_a_barge_in() -> None:
    call, edge, transport = await make_call(FakeEdge(segments=20, delay_s=0.1))
    await feed(call, np.concatenate([tone(0.6), silence(0.4)]))
    await until(lambda: transport.played)
    await feed(call, np.concatenate([tone(0.1), silence(0.3), tone(0.1), silence(0.3)]))
    assert not transport.stops and edge.runs[0].cancelled_with is None
    await call.close()


async def test_played_reports_of_another_turn_or_out_of_range_are_ignored() -> None:
    call, edge, transport = await make_call(FakeEdge(segments=20, delay_s=0.1), FakeTransport(autoplay=False))
    await feed(call, np.concatenate([tone(0.6), silence(0.4)]))
    await until(lambda: transport.played)
    call.played("other-turn", 5)
    call.played(edge.runs[0].turn_id, 99)  # capped at what was handed out
    await feed(call, tone(0.3))
    assert edge.runs[0].cancelled_with is not None and edge.runs[0].cancelled_with <= len(transport.played)
    await call.close()


async def test_without_playback_reports_the_clock_says_what_was_heard() -> None:
    call, edge, transport = await make_call(FakeEdge(segments=3, segment_s=0.5), FakeTransport(reports_playback=False))
    await feed(call, np.concatenate([tone(0.6), silence(0.4)]))
    await until(lambda: len(transport.played) == 3)
    await asyncio.sleep(0.7)
    assert call.agent_busy, "1.5 s of answer audio: the second segment is playing"
    assert not transport.of_type("done"), "the run is held open while its audio plays"
    await feed(call, tone(0.3))
    assert transport.stops and edge.runs[0].cancelled_with == 1, "the first segment was heard by the clock"
    await until(lambda: transport.of_type("done"))
    assert transport.of_type("done")[0]["cancelled"]
    call2, _, transport2 = await make_call(FakeEdge(segments=2), FakeTransport(reports_playback=False))
    await feed(call2, np.concatenate([tone(0.6), silence(0.4)]))
    await until(lambda: transport2.of_type("done"))
    assert not call2.agent_busy, "done comes once the 0.2 s of audio are over"
    await call.close()
    await call2.close()


async def test_hanging_up_mid_answer_cancels_the_turn_and_leaves_nothing_running() -> None:
    before = set(asyncio.all_tasks())
    call, edge, transport = await make_call(FakeEdge(segments=50, delay_s=0.1))
    await feed(call, np.concatenate([tone(0.6), silence(0.4)]))
    await until(lambda: transport.played)
    await call.close()
    assert edge.runs[0].cancelled_with is not None
    await asyncio.sleep(0)
    assert set(asyncio.all_tasks()) - before == set(), "no task outlives the call"
    await call.feed(tone(0.5))  # audio after the hang-up is ignored
    assert len(edge.runs) == 1


async def test_audio_that_stops_arriving_mid_utterance_ends_the_turn() -> None:
    call, edge, _ = await make_call()
    await feed(call, tone(0.6))
    await until(lambda: edge.runs, timeout_s=2.0)
    assert call.turns[0].reason == "stalled"
    await call.close()


async def test_end_turn_sends_the_turn_without_waiting_for_silence() -> None:
    call, edge, _ = await make_call()
    await feed(call, tone(0.6))
    await call.end_turn()
    assert call.turns[0].reason == "end_turn"
    await until(lambda: edge.runs, timeout_s=0.2)  # well before the watchdog's end_of_turn_ms
    await call.close()


async def test_bad_audio_is_refused() -> None:
    call, _, _ = await make_call()
    with pytest.raises(AudioFormatError, match="finite"):
        await call.feed(np.full(320, np.nan, dtype=np.float32))
    with pytest.raises(AudioFormatError, match="sample rate"):
        await call.feed(tone(0.02), 4000)
    with pytest.raises(AudioFormatError, match="2-byte"):
        pcm16_to_float(b"\x00\x01\x02")
    await call.close()


def test_mulaw_round_trip_and_stream_resampling() -> None:
    audio = tone(0.5, 8000)
    decoded = mulaw_to_float(float_to_mulaw(audio))
    assert np.max(np.abs(decoded - audio)) < 0.02  # μ-law's step near 0.3 full scale
    resampler = StreamResampler(8000, RATE)
    out = np.concatenate([resampler(audio[i:i + 160]) for i in range(0, audio.size, 160)] +
                         [resampler(np.zeros(0, np.float32), last=True)])
    assert abs(out.size - 2 * audio.size) <= 2


def test_silero_hears_speech_and_not_silence() -> None:
    from echox.espeak import speak

    speech = speak("What is the capital of France?", voice="en-us+m5")
    vad = SileroVad()
    assert vad.probability(np.zeros(512, np.float32)) < 0.1
    probabilities = [vad.probability(speech[i:i + 512]) for i in range(0, speech.size - 511, 512)]
    assert np.mean(np.array(probabilities) > 0.5) > 0.6
    with pytest.raises(ValueError):
        vad.probability(np.zeros(100, np.float32))
