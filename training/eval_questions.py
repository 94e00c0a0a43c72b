"""`echox eval` of the whole model: spoken questions in, the real streaming pipeline, judged answers out.

The questions are synthesized here with espeak-ng from the fact base, so no run folder is needed:
one question per fact (the first `limit` facts taking the categories in turn), its template and
voice (one of the split's voices) drawn from (seed, fact id), rate and pitch drawn exactly as the
synth stage draws them. With the recipe's seed the clean questions are the corpus's rendition r0.

Every question is answered by `StreamingResponder`, the path `echox respond` takes, under each
condition: clean, 20 dB SNR noise (`training.augment.add_noise`), the slowest and fastest speaking
rates of voices.json, the phone band (8 kHz μ-law) and a 0.5 s pause before the question. A turn
is right in text (S2T) when its answer text holds the fact's key words, and in speech (S2S) when
the judge (Whisper tiny.en) hears them in the spoken answer. S2S is read against the judge's share
on espeak-ng renderings of the reference answers in the agent voice (the judge does not hear all
of those either). The streaming figures (tokens before the first segment cut, time to first text
and audio, real-time factor, unit compression of the generated units) come from the clean turns.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echox.audio import SAMPLE_RATE, FloatArray, write_wav
from echox.checkpoint import EchoX
from echox.errors import EchoXError
from echox.espeak import speak
from echox.events import AudioEvent, DoneEvent
from echox.streaming.responder import StreamingResponder
from echox.streaming.stages import HiddenSegment, UnitSegment, UnitStage
from echox.units.codec import UnitLanguageCodec
from training.evaluate import Listener
from training.judge import has_key_words
from training.stages.synth import FactBase, Rendition, limit_facts, question_renditions

NOISE_SNR_DB = 20.0
PAUSE_S = 0.5  # long enough that a model trained only on clips starting at the first word drops it


@dataclasses.dataclass(frozen=True)
class EvalQuestion:
    """One spoken question about one fact, and the fact's reference answer."""

    id: str
    fact_id: str
    text: str
    answer: str
    keys: tuple[str, ...]
    voice: str
    rate: int
    pitch: int


@dataclasses.dataclass(frozen=True)
class Condition:
    """How a question is spoken: at its own rate (or a fixed one), with or without noise, over a
    phone line or not, after a pause or not."""

    name: str
    label: str
    rate_wpm: int | None = None
    snr_db: float | None = None
    phone: bool = False  # 8 kHz G.711 μ-law and back, as a phone call carries it
    pause_s: float = 0.0  # silence before the question, as a caller who pauses first


@dataclasses.dataclass(frozen=True)
class TurnResult:
    """What one streamed turn produced."""

    transcript: str
    text: str
    speech: FloatArray
    first_segment_tokens: int | None
    first_text_ms: float | None
    first_audio_ms: float | None
    total_ms: float
    units: tuple[tuple[int, ...], ...]  # the deduplicated units of each spoken segment


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One question under one condition, judged."""

    question: EvalQuestion
    condition: str
    turn: TurnResult
    judge_heard: str
    s2t: bool
    s2s: bool


def _stable_seed(seed: int, name: str) -> list[int]:
    """A generator seed from (seed, name) that does not depend on the process or the work order."""
    return [seed, zlib.crc32(name.encode())]


def eval_questions(base: FactBase, split: str, seed: int, limit: int | None) -> list[EvalQuestion]:
    """One `split`-voice question per fact, for the first `limit` facts (all for None)."""
    facts = limit_facts(base.facts, limit)
    by_fact: dict[str, list[Rendition]] = {}
    for rendition in question_renditions(base, facts, seed, renditions=1):
        if rendition.split == split:
            by_fact.setdefault(rendition.fact_id, []).append(rendition)
    if not by_fact:
        raise EchoXError(f"eval: the fact base has no {split!r} voices")
    questions = []
    for fact in facts:
        candidates = by_fact[fact["id"]]
        chosen = candidates[int(np.random.default_rng(_stable_seed(seed, fact["id"])).integers(len(candidates)))]
        questions.append(
            EvalQuestion(
                id=chosen.id,
                fact_id=fact["id"],
                text=chosen.text,
                answer=fact["answer"],
                keys=tuple(fact["key"]),
                voice=chosen.voice,
                rate=chosen.rate,
                pitch=chosen.pitch,
            )
        )
    return questions


def conditions(voices: Mapping[str, Any]) -> list[Condition]:
    """Clean, 20 dB SNR noise, the slowest and fastest speaking rates of voices.json, the phone
    band, and a pause before the question."""
    slowest, fastest = (int(x) for x in voices["rate_wpm"])
    return [
        Condition("clean", "clean"),
        Condition("noise", f"noise {NOISE_SNR_DB:g} dB SNR", snr_db=NOISE_SNR_DB),
        Condition("rate_min", f"rate {slowest} wpm", rate_wpm=slowest),
        Condition("rate_max", f"rate {fastest} wpm", rate_wpm=fastest),
        Condition("phone", "phone band (8 kHz μ-law)", phone=True),
        Condition("pause", f"{PAUSE_S:g} s pause first", pause_s=PAUSE_S),
    ]


def question_audio(question: EvalQuestion, condition: Condition, seed: int) -> FloatArray:
    """The question spoken under `condition` (deterministic for a seed)."""
    rate = condition.rate_wpm if condition.rate_wpm is not None else question.rate
    audio = speak(question.text, voice=question.voice, rate_wpm=rate, pitch=question.pitch)
    if condition.snr_db is not None:
        from training.augment import add_noise

        audio = add_noise(audio, condition.snr_db, np.random.default_rng(_stable_seed(seed, question.id)))
    if condition.pause_s:
        from training.augment import pad_silence

        audio = pad_silence(audio, condition.pause_s, 0.0)
    if condition.phone:
        from training.augment import phone_band

        audio = phone_band(audio)
    return audio


def reference_audio(question: EvalQuestion, agent: Mapping[str, Any]) -> FloatArray:
    """The reference answer in the agent voice, as the synth stage renders the corpus answers."""
    return speak(question.answer, voice=str(agent["voice"]), rate_wpm=int(agent["rate_wpm"]), pitch=int(agent["pitch"]))


class PipelineTurns:
    """Turns through `StreamingResponder` (the path of `echox respond`), keeping the generated units."""

    def __init__(self, echox: EchoX) -> None:
        self.responder = StreamingResponder(echox)
        self.recorder = RecordingUnitStage(echox)
        self.responder.units = self.recorder

    def __call__(self, audio: FloatArray) -> TurnResult:
        self.recorder.generated.clear()
        chunks: list[FloatArray] = []
        done: DoneEvent | None = None
        for event in self.responder.respond(audio):
            if isinstance(event, AudioEvent):
                chunks.append(event.pcm)
            elif isinstance(event, DoneEvent):
                done = event
        assert done is not None  # respond() always ends with Done
        timings = done.timings
        return TurnResult(
            transcript=done.transcript,
            text=done.text,
            speech=np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32),
            first_segment_tokens=done.first_segment_tokens,
            first_text_ms=timings.first_text_ms,
            first_audio_ms=timings.first_audio_ms,
            total_ms=timings.total_ms,
            units=tuple(self.recorder.generated),
        )


class RecordingUnitStage(UnitStage):
    """The echo decoder's stage of the responder, noting the units of every segment it speaks."""

    def __init__(self, echox: EchoX) -> None:
        super().__init__(echox)
        self.generated: list[tuple[int, ...]] = []

    def generate(self, segment: HiddenSegment) -> UnitSegment:
        result = super().generate(segment)
        self.generated.append(result.units)
        return result


def judge_turns(
    turns: Callable[[FloatArray], TurnResult],
    judge: Listener,
    questions: Sequence[EvalQuestion],
    condition_list: Sequence[Condition],
    seed: int,
    on_each: Callable[[], None] = lambda: None,
    samples_dir: Path | None = None,
) -> list[Verdict]:
    """Every question under every condition, answered by `turns` and judged."""
    verdicts = []
    for question in questions:
        for condition in condition_list:
            turn = turns(question_audio(question, condition, seed))
            heard = judge.transcribe(turn.speech)
            verdicts.append(
                Verdict(
                    question=question,
                    condition=condition.name,
                    turn=turn,
                    judge_heard=heard,
                    s2t=has_key_words(turn.text, question.keys),
                    s2s=has_key_words(heard, question.keys),
                )
            )
            if samples_dir is not None:
                write_wav(samples_dir / f"{question.id}.{condition.name}.wav", turn.speech)
            on_each()
    return verdicts


def judge_references(
    judge: Listener,
    questions: Sequence[EvalQuestion],
    agent: Mapping[str, Any],
    on_each: Callable[[], None] = lambda: None,
) -> list[bool]:
    """Whether the judge hears the key words in each question's reference answer."""
    heard = []
    for question in questions:
        heard.append(has_key_words(judge.transcribe(reference_audio(question, agent)), question.keys))
        on_each()
    return heard


def share(flags: Iterable[bool]) -> float:
    """The share of true flags (0.0 for none at all)."""
    values = list(flags)
    return sum(values) / len(values) if values else 0.0


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is 0."""
    return numerator / denominator if denominator else None


def percentiles(values: Iterable[float | None]) -> dict[str, float | None]:
    """p50 and p95 (linear interpolation) of the values that are not None."""
    present = [v for v in values if v is not None]
    if not present:
        return {"p50": None, "p95": None}
    p50, p95 = np.percentile(np.asarray(present, dtype=np.float64), [50, 95])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1)}


def mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def streaming_figures(turns: Sequence[TurnResult], codec: UnitLanguageCodec) -> dict[str, Any]:
    """Latency, first cut, real-time factor and unit compression of a set of turns."""
    speech_seconds = sum(t.speech.size for t in turns) / SAMPLE_RATE
    generated = [units for t in turns for units in t.units if units]
    return {
        "first_segment_tokens_mean": mean(t.first_segment_tokens for t in turns),
        "first_text_ms": percentiles(t.first_text_ms for t in turns),
        "first_audio_ms": percentiles(t.first_audio_ms for t in turns),
        "total_ms": percentiles(t.total_ms for t in turns),
        "no_audio": sum(t.first_audio_ms is None for t in turns),
        "real_time_factor": ratio(sum(t.total_ms for t in turns) / 1000.0, speech_seconds),
        "compression_generated": codec.compression_ratio(generated) if generated else None,
    }


def questions_report(
    verdicts: Sequence[Verdict],
    references: Sequence[bool],
    condition_list: Sequence[Condition],
    codec: UnitLanguageCodec,
) -> dict[str, Any]:
    """Accuracies per condition against the reference share, the clean turns' streaming figures,
    and the misses (what the model heard, said and the judge heard)."""
    reference = share(references)
    accuracies = {}
    for condition in condition_list:
        judged = [v for v in verdicts if v.condition == condition.name]
        s2s = share(v.s2s for v in judged)
        accuracies[condition.name] = {
            "label": condition.label,
            "s2t": share(v.s2t for v in judged),
            "s2s": s2s,
            "s2s_vs_reference": ratio(s2s, reference),
            "turns": len(judged),
        }
    misses = [
        {
            "id": v.question.id,
            "condition": v.condition,
            "question": v.question.text,
            "heard": v.turn.transcript,
            "text": v.turn.text,
            "judge_heard": v.judge_heard,
            "s2t": v.s2t,
            "s2s": v.s2s,
        }
        for v in verdicts
        if not (v.s2t and v.s2s)
    ]
    clean = [v.turn for v in verdicts if v.condition == condition_list[0].name]
    return {
        "questions": len(references),
        "reference": reference,
        "accuracy": accuracies,
        "streaming": streaming_figures(clean, codec),
        "misses": misses,
    }


def evaluate_questions(
    turns: Callable[[FloatArray], TurnResult],
    judge: Listener,
    questions: Sequence[EvalQuestion],
    voices: Mapping[str, Any],
    codec: UnitLanguageCodec,
    seed: int,
    on_each: Callable[[], None] = lambda: None,
    samples_dir: Path | None = None,
) -> dict[str, Any]:
    """The whole-model report: references judged, every question under every condition, figures."""
    condition_list = conditions(voices)
    references = judge_references(judge, questions, voices["agent"], on_each)
    verdicts = judge_turns(turns, judge, questions, condition_list, seed, on_each, samples_dir)
    return questions_report(verdicts, references, condition_list, codec)
