"""Fuzzing the stage workers with malformed messages (hypothesis): no worker crashes, and every
message is answered (its results, or an error event for its turn) or dead-lettered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from echox.checkpoint import EchoX
from services.common import messages
from services.common.backends.local import LocalSpeechLLM, LocalUnits, LocalVocoder
from services.common.bus import Delivery
from services.common.bus.memory import MemoryBus
from services.common.state import MemorySessionStore
from services.common.worker import StageWorker
from services.proto import stages_pb2 as pb
from services.speech_llm import SpeechLLMWorker
from services.unit_generator import UnitGeneratorWorker
from services.vocoder import VocoderWorker

pytestmark = pytest.mark.unit
KNOWN_SESSION = "known"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _header(draw: Any) -> pb.Header:
    # Mostly well-addressed headers, so the fuzzing reaches the payload checks behind them.
    session = draw(st.sampled_from([KNOWN_SESSION, KNOWN_SESSION, KNOWN_SESSION, "unknown", ""]))
    turn = draw(st.sampled_from(["t", "t", "t", ""]))
    header = messages.new_header(session, turn, deadline_s=draw(st.sampled_from([60.0, 60.0, -1.0])))
    header.version = draw(st.sampled_from([1, 1, 1, 0, 2]))
    return header


@st.composite
def turn_requests(draw: Any) -> bytes:
    audio = draw(st.one_of(st.binary(max_size=64), st.binary(min_size=3200, max_size=3210)))
    message = pb.TurnRequest(header=_header(draw), audio=audio, sample_rate=draw(st.integers(0, 200_000)),
                             encoding=draw(st.integers(0, 4)))
    return message.SerializeToString()


@st.composite
def hidden_segments(draw: Any) -> bytes:
    n = draw(st.integers(0, 4))
    tensor = pb.Tensor(shape=draw(st.lists(st.integers(0, 70), max_size=3)),
                       dtype=draw(st.sampled_from(["float16", "bfloat16", "float32", "int8", ""])),
                       data=draw(st.binary(max_size=600)))
    message = pb.HiddenSegment(header=_header(draw), index=draw(st.integers(0, 2**32 - 1)),
                               token_ids=draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n)),
                               hidden=tensor, text=draw(st.text(max_size=20)))
    return message.SerializeToString()


@st.composite
def unit_segments(draw: Any) -> bytes:
    message = pb.UnitSegment(header=_header(draw), index=draw(st.integers(0, 10)),
                             units=draw(st.lists(st.integers(0, 2**32 - 1), max_size=30)),
                             unit_tokens=draw(st.lists(st.integers(0, 2**32 - 1), max_size=30)))
    return message.SerializeToString()


def _any_payload(structured: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(structured, st.binary(max_size=256))


async def _feed(worker: StageWorker[Any], bus: MemoryBus, payload: bytes, outputs: tuple[str, ...]) -> None:
    watched = (messages.DEADLETTER, *outputs, messages.events_stream(KNOWN_SESSION), messages.events_stream("unknown"))
    before = {s: await bus.last_id(s) for s in watched}
    outcome = await worker._handle(Delivery(worker.input_stream, "1-0", payload))
    event(f"outcome: {outcome}")
    grew = {s: bool(await bus.read(s, after=after, block_ms=0)) for s, after in before.items()}
    assert outcome in ("ok", "error", "deadletter", "expired", "cancelled")
    if outcome == "deadletter":
        assert grew[messages.DEADLETTER]
    elif outcome in ("error", "expired"):
        assert grew[messages.events_stream(KNOWN_SESSION)] or grew[messages.events_stream("unknown")]
    elif outcome == "ok":
        assert any(grew[s] for s in outputs) or grew[messages.events_stream(KNOWN_SESSION)]


def _run(make: Any, payload: bytes, outputs: tuple[str, ...]) -> None:
    async def go() -> None:
        bus = MemoryBus()
        sessions = MemorySessionStore(ttl_s=60)
        await sessions.create(KNOWN_SESSION)
        await _feed(make(bus, sessions), bus, payload, outputs)

    asyncio.run(go())


@FUZZ
@given(payload=_any_payload(turn_requests()))
def test_speech_llm_worker_survives_anything(micro_echox: EchoX, payload: bytes) -> None:
    backend = LocalSpeechLLM(micro_echox)
    _run(lambda bus, sessions: SpeechLLMWorker(bus, backend, sessions), payload, (messages.SEGMENTS,))


@FUZZ
@given(payload=_any_payload(hidden_segments()))
def test_unit_generator_worker_survives_anything(micro_echox: EchoX, payload: bytes) -> None:
    width = micro_echox.config.llm.hidden_size
    backend = LocalUnits(micro_echox)
    _run(lambda bus, _: UnitGeneratorWorker(bus, backend, hidden_size=width), payload, (messages.UNITS,))


@FUZZ
@given(payload=_any_payload(unit_segments()))
def test_vocoder_worker_survives_anything(micro_echox: EchoX, payload: bytes) -> None:
    units = micro_echox.config.vocoder.num_units
    # The vocoder does not look the session up: its audio goes to whichever session is named.
    _run(lambda bus, _: VocoderWorker(bus, LocalVocoder(micro_echox), num_units=units), payload,
         (messages.audio_stream(KNOWN_SESSION), messages.audio_stream("unknown")))
