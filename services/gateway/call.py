"""The call core: one live call, whatever carries it (browser WebSocket, Twilio, LiveKit).

The transport feeds the caller's audio as it arrives (any rate; `Call.feed`) and reports how
far its playback got (`Call.played`). The core resamples to 16 kHz, runs a VAD per 32 ms frame,
ends the caller's turn after `end_of_turn_ms` of silence (or at the turn length cap), runs the
turn through the ConversationEdge, and hands the answer's audio segments to the transport in
order (`CallTransport.play`). Caller speech of `barge_in_ms` while the agent is busy with a turn
(thinking or speaking) is a barge-in: `CallTransport.stop_playback` at once, the turn is
cancelled with the number of segments the caller really heard, and the interrupting speech
becomes the next turn. `close()` (the caller hung up) cancels whatever is in flight.

Time in the VAD is audio time (frames), so the core behaves the same however fast audio
arrives; wall-clock deadlines cover the rest: audio that stops arriving mid-utterance ends the
turn, a transport that never reports playback is taken as done shortly after the audio's
length, a turn that cannot be published gives up.

Usage (a transport):

    call = Call(edge, session_id, transport, CallConfig.from_settings(settings), SileroVad())
    await call.start()
    ... await call.feed(samples_float32, sample_rate)   # per received chunk
    ... call.played(turn_id, index)                     # segment `index` finished playing
    await call.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from typing import Any, Protocol

import numpy as np

from services.common.bus import BusError
from services.common.logs import log
from services.common.metrics import BARGE_IN
from services.common.settings import Settings
from services.gateway.codecs import (
    AudioFormatError,
    FloatArray,
    StreamResampler,
    f32_to_float,
    float_to_pcm16,
    pcm16_to_float,
    resample,
)
from services.gateway.session import ConversationEdge, TurnRun
from services.gateway.vad import SAMPLE_RATE, VoiceActivity
from services.proto import stages_pb2 as pb

logger = logging.getLogger("echox.call")
Event = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CallConfig:
    vad_threshold: float = 0.5  # P(speech) at or above this is speech
    end_of_turn_ms: int = 600  # silence that ends the caller's turn
    barge_in_ms: int = 200  # caller speech over a busy agent this long interrupts it
    max_turn_audio_s: float = 30.0  # a caller turn is cut (and sent) at this length
    min_speech_ms: int = 150  # an utterance with less speech (a click, a cough) is not a turn
    preroll_ms: int = 300  # audio kept from before the onset: the VAD lags the first syllable
    trailing_ms: int = 250  # silence kept after the last speech
    barge_in_gap_ms: int = 200  # a pause this long forgets a would-be barge-in
    playback_grace_s: float = 2.0  # a reporting transport counts as done this long after the audio's end
    turn_start_timeout_s: float = 10.0  # publishing a turn gives up after this

    @classmethod
    def from_settings(cls, settings: Settings) -> CallConfig:
        return cls(vad_threshold=settings.vad_threshold, end_of_turn_ms=settings.vad_end_of_turn_ms,
                   barge_in_ms=settings.vad_barge_in_ms, max_turn_audio_s=settings.max_turn_audio_s)


@dataclasses.dataclass(frozen=True)
class Playback:
    """One answer segment to play: PCM16 LE mono at `sample_rate` (16 kHz)."""

    turn_id: str
    index: int
    pcm: bytes
    sample_rate: int
    text: str

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate


class CallTransport(Protocol):
    """What the core needs of a transport. Exceptions from these are logged, never fatal."""

    # True when the transport calls Call.played as segments finish; otherwise the core
    # estimates playback from the audio's length.
    reports_playback: bool

    async def send_event(self, event: Event) -> None:
        """A JSON-able event for the caller's UI (see EVENTS); a transport may drop them."""

    async def play(self, segment: Playback) -> None:
        """Queue the segment for playback after the ones before it; must not wait for it to play."""

    async def stop_playback(self, turn_id: str) -> None:
        """Barge-in: silence now, drop everything queued."""


# The events a transport receives (all have "type"; turn events have "turn_id"):
EVENTS = {
    "speech_started": "{}: the caller started talking",
    "turn_started": "{turn_id, audio_ms, reason: silence|cap|end_turn|stalled}: the caller's turn was sent",
    "transcript": "{turn_id, text}: what the model heard",
    "text": "{turn_id, index, text}: one token of the answer, as it streams",
    "latency": "{turn_id, first_audio_ms, response_ms}: the first answer audio is out",
    "barge_in": "{turn_id, played_segments, latency_ms}: the caller interrupted; playback stopped",
    "done": "{turn_id, transcript, text, cancelled, segments, first_audio_ms, response_ms, total_ms}: the "
            "turn is over, once its audio has played; after a barge-in `text` is what was heard",
    "error": "{turn_id?, code, message}",
}


@dataclasses.dataclass
class TurnStats:
    """One turn's figures. response_ms counts from the last caller speech received (so it
    includes the end-of-turn silence); first_audio_ms from the turn's publication."""

    reason: str
    audio_ms: float
    speech_end_at: float
    turn_id: str = ""
    published_at: float = 0.0
    first_audio_ms: float | None = None
    response_ms: float | None = None
    barge_in_ms: float | None = None
    cancelled: bool = False
    error: str | None = None
    transcript: str = ""
    text: str = ""


@dataclasses.dataclass
class _Turn:
    stats: TurnStats
    task: asyncio.Task[None] | None = None
    run: TurnRun | None = None
    handed: int = 0  # segments given to the transport
    cuts: int = 0  # segments the model announced (SegmentCut events)
    played: int = 0  # segments the transport reported played
    ends: list[float] = dataclasses.field(default_factory=list)  # estimated playback end per segment
    stopped: bool = False  # barge-in or hang-up: nothing more is played

    @property
    def turn_id(self) -> str:
        return self.stats.turn_id


def decode_pcm(data: bytes, encoding: str) -> FloatArray:
    """Bytes of a declared sample format to float audio (AudioFormatError if they are not)."""
    if encoding == "pcm_s16le":
        return pcm16_to_float(data)
    if encoding == "pcm_f32le":
        return f32_to_float(data)
    raise AudioFormatError(f"unknown encoding {encoding!r} (pcm_s16le or pcm_f32le)")


class Call:
    """One live call. Methods are called from one event loop; feed() calls must not overlap."""

    def __init__(self, edge: ConversationEdge, session_id: str, transport: CallTransport, config: CallConfig,
                 vad: VoiceActivity) -> None:
        self.edge = edge
        self.session_id = session_id
        self.transport = transport
        self.config = config
        self.vad = vad
        self.turns: list[TurnStats] = []  # every turn of the call, for reports and benchmarks
        self._frame_ms = vad.frame_samples * 1000.0 / SAMPLE_RATE
        self._resampler = StreamResampler(SAMPLE_RATE, SAMPLE_RATE)
        self._pending = np.zeros(0, dtype=np.float32)
        self._preroll: deque[FloatArray] = deque(maxlen=max(1, round(config.preroll_ms / self._frame_ms)))
        self._utterance: list[FloatArray] = []
        self._collecting = False
        self._candidate = False  # collecting over a busy agent: a barge-in if it lasts
        self._speaking = False  # the VAD's hysteresis state
        self._speech_ms = self._silence_ms = 0.0
        self._onset_at = self._last_speech_at = self._last_audio_at = 0.0
        self._deaf = False  # after a capped turn: ignore speech until the caller pauses
        self._deaf_silence_ms = 0.0
        self._turn: _Turn | None = None
        self._lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False

    # --- what the transport calls ---------------------------------------------------------

    async def start(self) -> None:
        self._watchdog = asyncio.create_task(self._watch())

    async def feed(self, audio: FloatArray, sample_rate: int = SAMPLE_RATE) -> None:
        """Caller audio as it arrives: mono float32 in [-1, 1] at `sample_rate` (8..48 kHz)."""
        if self._closed:
            return
        if not 8000 <= sample_rate <= 48000:
            raise AudioFormatError(f"sample rate {sample_rate} Hz is outside 8000..48000")
        if audio.ndim != 1 or not np.all(np.isfinite(audio)):
            raise AudioFormatError("the audio must be mono and finite (no NaN or infinity)")
        if sample_rate != self._resampler.from_rate:
            self._resampler = StreamResampler(sample_rate, SAMPLE_RATE)
        self._last_audio_at = time.monotonic()
        self._pending = np.concatenate([self._pending, self._resampler(audio)])
        n = self.vad.frame_samples
        async with self._lock:
            while self._pending.size >= n and not self._closed:
                frame, self._pending = self._pending[:n], self._pending[n:]
                await self._on_frame(frame)

    async def end_turn(self) -> None:
        """The caller says the turn is over (push-to-talk released): no silence to wait for."""
        async with self._lock:
            if self._collecting:
                if self._candidate:
                    await self._barge_in()
                await self._end_utterance("end_turn")

    def played(self, turn_id: str, index: int) -> None:
        """The transport finished playing segment `index` of `turn_id`."""
        turn = self._turn
        if turn is not None and turn.turn_id == turn_id and not turn.stopped and index >= 0:
            turn.played = max(turn.played, min(index + 1, turn.handed))

    async def close(self) -> None:
        """The call is over: nothing keeps running for it (the turn in flight is cancelled)."""
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        turn = self._turn
        if turn is not None and turn.task is not None and not turn.task.done():
            turn.stopped = True
            turn.stats.cancelled = True
            if turn.run is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(turn.run.cancel(self._heard(turn)), timeout=5.0)
            turn.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(turn.task, timeout=5.0)
            log(logger, logging.INFO, "caller left mid-turn; turn cancelled", session_id=self.session_id,
                turn_id=turn.turn_id)

    @property
    def agent_busy(self) -> bool:
        """A turn is being answered or its audio is still playing."""
        turn = self._turn
        if turn is None or turn.stopped:
            return False
        if turn.task is not None and not turn.task.done():
            return True
        return self._still_playing(turn)

    # --- turn taking ------------------------------------------------------------------------

    async def _on_frame(self, frame: FloatArray) -> None:
        speech = self._hysteresis(self.vad.probability(frame))
        now = time.monotonic()
        if self._collecting:
            await self._continue_utterance(frame, speech, now)
        elif speech and not self._deaf:
            self._utterance = [*self._preroll, frame]
            self._preroll.clear()
            self._collecting, self._speech_ms, self._silence_ms = True, self._frame_ms, 0.0
            self._onset_at = self._last_speech_at = now
            self._candidate = self.agent_busy
            if not self._candidate:
                await self._send({"type": "speech_started"})
            elif self._speech_ms >= self.config.barge_in_ms:
                await self._barge_in()
        else:
            self._preroll.append(frame)
            if self._deaf:
                self._deaf_silence_ms = 0.0 if speech else self._deaf_silence_ms + self._frame_ms
                self._deaf = self._deaf_silence_ms < self.config.end_of_turn_ms

    async def _continue_utterance(self, frame: FloatArray, speech: bool, now: float) -> None:
        self._utterance.append(frame)
        if speech:
            self._speech_ms += self._frame_ms
            self._silence_ms = 0.0
            self._last_speech_at = now
        else:
            self._silence_ms += self._frame_ms
        if self._candidate and not self.agent_busy:
            self._candidate = False  # the agent finished meanwhile: an ordinary turn
        if self._candidate:
            if self._speech_ms >= self.config.barge_in_ms:
                await self._barge_in()
            elif self._silence_ms >= self.config.barge_in_gap_ms:
                self._reset_utterance()  # a short sound over the agent: not an interruption
            return
        if self._silence_ms >= self.config.end_of_turn_ms:
            await self._end_utterance("silence")
        elif (len(self._utterance) + 1) * self.vad.frame_samples > self.config.max_turn_audio_s * SAMPLE_RATE:
            await self._end_utterance("cap")
            self._deaf, self._deaf_silence_ms = True, 0.0

    def _hysteresis(self, probability: float) -> bool:
        # Silero's own rule: speech from the threshold up, silence only 0.15 below it.
        if probability >= self.config.vad_threshold:
            self._speaking = True
        elif probability < max(0.01, self.config.vad_threshold - 0.15):
            self._speaking = False
        return self._speaking

    def _reset_utterance(self) -> None:
        self._utterance, self._collecting, self._candidate = [], False, False
        self._speech_ms = self._silence_ms = 0.0

    async def _end_utterance(self, reason: str) -> None:
        frames, speech_ms, silence_ms = self._utterance, self._speech_ms, self._silence_ms
        self._reset_utterance()
        if speech_ms < self.config.min_speech_ms or not frames:
            return  # noise, not a turn
        audio = np.concatenate(frames)
        extra = int(max(0.0, silence_ms - self.config.trailing_ms) * SAMPLE_RATE / 1000)
        if 0 < extra < audio.size:
            audio = audio[:-extra]
        await self._start_turn(audio, reason)

    async def _start_turn(self, audio: FloatArray, reason: str) -> None:
        previous = self._turn
        if previous is not None and previous.task is not None and not previous.task.done():
            if not previous.stopped:
                await self._barge_in()  # only on end_turn: speech over a busy agent otherwise barges in
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(previous.task), timeout=self.config.turn_start_timeout_s)
        stats = TurnStats(reason=reason, audio_ms=audio.size * 1000.0 / SAMPLE_RATE,
                          speech_end_at=self._last_speech_at)
        self.turns.append(stats)
        turn = _Turn(stats)
        turn.task = asyncio.create_task(self._run_turn(turn, float_to_pcm16(audio)))
        self._turn = turn

    async def _barge_in(self) -> None:
        self._candidate = False
        turn = self._turn
        if turn is None or turn.stopped:
            return
        turn.stopped = True
        turn.stats.cancelled = True
        await self._transport_call(self.transport.stop_playback(turn.turn_id))
        turn.stats.barge_in_ms = (time.monotonic() - self._onset_at) * 1000.0
        BARGE_IN.labels(getattr(self.edge, "transport", "unknown")).observe(turn.stats.barge_in_ms / 1000.0)
        heard = self._heard(turn)
        if turn.run is not None:
            await turn.run.cancel(heard)
        log(logger, logging.INFO, "barge-in", session_id=self.session_id, turn_id=turn.turn_id,
            played_segments=heard, latency_ms=round(turn.stats.barge_in_ms, 1))
        await self._send({"type": "barge_in", "turn_id": turn.turn_id, "played_segments": heard,
                          "latency_ms": round(turn.stats.barge_in_ms, 1)})

    # --- one turn ---------------------------------------------------------------------------

    async def _run_turn(self, turn: _Turn, pcm: bytes) -> None:
        try:
            run = await asyncio.wait_for(self.edge.turn(self.session_id, pcm, SAMPLE_RATE, pb.PCM_S16LE),
                                         timeout=self.config.turn_start_timeout_s)
        except (TimeoutError, BusError) as exc:
            turn.stats.error = "bus_unavailable"
            await self._send({"type": "error", "code": "bus_unavailable", "message": f"cannot start the turn: {exc}"})
            return
        turn.run, turn.stats.turn_id, turn.stats.published_at = run, run.turn_id, time.monotonic()
        if turn.stopped:
            await run.cancel(0)  # interrupted (or hung up) while the turn was being published
        await self._send({"type": "turn_started", "turn_id": run.turn_id, "audio_ms": round(turn.stats.audio_ms),
                          "reason": turn.stats.reason})
        try:
            async for item in run:
                if isinstance(item, pb.AudioSegment):
                    await self._play(turn, item)
                    if run.summary.text and turn.handed >= turn.cuts:
                        await self._hold_until_played(turn)
                else:
                    turn.cuts += item.WhichOneof("kind") == "segment"
                    event = self._event(turn, item)
                    if event is not None:
                        await self._send(event)
        except Exception as exc:  # a bug or a dead transport: the turn must not outlive it
            log(logger, logging.WARNING, "turn relay failed; cancelling", session_id=self.session_id,
                turn_id=run.turn_id, error=repr(exc))
            await run.cancel(self._heard(turn))

    async def _play(self, turn: _Turn, segment: pb.AudioSegment) -> None:
        if turn.stopped:
            return
        playback = Playback(turn.turn_id, segment.index, _pcm16_16k(segment), SAMPLE_RATE, segment.text)
        stats = turn.stats
        if stats.first_audio_ms is None:
            now = time.monotonic()
            stats.first_audio_ms = (now - stats.published_at) * 1000.0
            stats.response_ms = (now - stats.speech_end_at) * 1000.0
            await self._send({"type": "latency", "turn_id": turn.turn_id, "first_audio_ms": round(stats.first_audio_ms),
                              "response_ms": round(stats.response_ms)})
        if turn.stopped:
            return  # interrupted while the event went out: no await between this check and play()
        now = time.monotonic()
        turn.ends.append(max(now, turn.ends[-1] if turn.ends else now) + playback.duration_s)
        turn.handed += 1
        await self._transport_call(self.transport.play(playback))

    def _event(self, turn: _Turn, item: pb.TurnEvent) -> Event | None:
        kind = item.WhichOneof("kind")
        base: Event = {"turn_id": turn.turn_id}
        if kind == "transcript":
            turn.stats.transcript = item.transcript.text
            return {"type": "transcript", **base, "text": item.transcript.text}
        if kind == "text_delta":
            return {"type": "text", **base, "index": item.text_delta.index, "text": item.text_delta.text}
        if kind == "error":
            turn.stats.error = item.error.code
            return {"type": "error", **base, "code": item.error.code, "message": item.error.message}
        if kind == "done":
            done, stats = item.done, turn.stats
            stats.text, stats.transcript = done.text, done.transcript or stats.transcript
            stats.cancelled = stats.cancelled or done.cancelled
            total = (time.monotonic() - stats.published_at) * 1000.0
            return {"type": "done", **base, "transcript": stats.transcript, "text": done.text,
                    "cancelled": stats.cancelled, "segments": done.num_segments,
                    "first_audio_ms": _ms(stats.first_audio_ms), "response_ms": _ms(stats.response_ms),
                    "total_ms": round(total)}
        return None

    # --- playback bookkeeping ---------------------------------------------------------------

    async def _hold_until_played(self, turn: _Turn) -> None:
        """The run's last audio is out (its Done has come, every announced segment is handed
        over): the next pull would end the run and write the history as fully heard. Hold it
        while the audio plays, so a barge-in until then still cancels the run and the history
        keeps only what was heard. (If Done comes after the last audio, the run ends unheld.)"""
        deadline = turn.ends[-1] + self.config.playback_grace_s if turn.ends else 0.0
        while not turn.stopped and not self._closed and self._still_playing(turn) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _still_playing(self, turn: _Turn) -> bool:
        if not turn.ends:
            return False
        now = time.monotonic()
        if self.transport.reports_playback:
            return turn.played < turn.handed and now < turn.ends[-1] + self.config.playback_grace_s
        return now < turn.ends[-1]

    def _heard(self, turn: _Turn) -> int:
        """Segments the caller heard to the end: as reported, or as the clock says."""
        if self.transport.reports_playback:
            return turn.played
        now = time.monotonic()
        return sum(end <= now for end in turn.ends)

    async def _watch(self) -> None:
        """Wall-clock deadlines: caller audio that stops arriving mid-utterance ends the turn."""
        gap_s = self.config.end_of_turn_ms / 1000.0
        while not self._closed:
            await asyncio.sleep(min(0.1, gap_s / 2))
            if self._collecting and not self._lock.locked() and time.monotonic() - self._last_audio_at > gap_s:
                async with self._lock:
                    if self._collecting:
                        if self._candidate:
                            self._reset_utterance()
                        else:
                            await self._end_utterance("stalled")

    async def _send(self, event: Event) -> None:
        await self._transport_call(self.transport.send_event(event))

    async def _transport_call(self, call: Any) -> None:
        try:
            await call
        except Exception as exc:  # the caller's side is gone or broken: the call goes on until closed
            log(logger, logging.DEBUG, "transport call failed", session_id=self.session_id, error=repr(exc))


def _pcm16_16k(segment: pb.AudioSegment) -> bytes:
    """The segment as PCM16 at 16 kHz (what the vocoder produces; converted if it ever is not)."""
    rate = segment.sample_rate or SAMPLE_RATE
    if segment.encoding != pb.PCM_F32LE and rate == SAMPLE_RATE:
        return bytes(segment.pcm)
    audio = decode_pcm(segment.pcm, "pcm_f32le" if segment.encoding == pb.PCM_F32LE else "pcm_s16le")
    return float_to_pcm16(resample(audio, rate, SAMPLE_RATE))


def _ms(value: float | None) -> int | None:
    return None if value is None else round(value)
