"""A phone call over Twilio Media Streams, end to end: a scripted Twilio client streams a
dev-voice question as μ-law 8 kHz in real time over a real WebSocket to the embedded stack
(trained default model, silero VAD), gets the spoken answer as μ-law with marks, echoes the
marks as it "plays" them, and interrupts a later answer by speaking: the server sends `clear`
and answers the interruption.

The default model is trained with phone-band augmentation (8 kHz G.711 μ-law round trips), so
over μ-law it answers "What is the capital of France?" right, though a transcript heard over the
phone band can be rough (the previous default model's: "What is the capital of Iiarance"): the
test checks the answer text in the session's transcript (from the control plane) and that the
judge (evaluation only) hears "paris" in the μ-law audio the caller received.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from echox.espeak import speak
from services.gateway.bench_ws import TwilioCaller, Utterance, embedded_stack, new_session

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    return speak("What is the capital of France?", voice="en-us+m5")


API_KEY = "twilio-test-admin-key"


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    async with embedded_stack(vad_model="silero", turn_deadline_s=60.0, api_key=API_KEY) as url:
        yield url


async def transcript(base_url: str, session_id: str) -> list[dict[str, str]]:
    import httpx

    async with httpx.AsyncClient(base_url=base_url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        response = await client.get(f"/v1/sessions/{session_id}/transcript")
        response.raise_for_status()
        turns: list[dict[str, str]] = response.json()["turns"]
        return turns


async def call(base_url: str) -> tuple[TwilioCaller, str]:
    session = await new_session(base_url)
    return TwilioCaller(base_url.replace("http", "ws", 1) + "/twilio", session["token"]), session["session_id"]


async def ask(caller: TwilioCaller, question: np.ndarray) -> Utterance:
    """Speaks `question` half a second into the call; returns it once its last frame is sent."""
    await asyncio.sleep(0.5)
    asked = caller.say(question)
    await caller.wait_for(lambda: asked.end_sent_at is not None, 30, "the question sent")
    return asked


async def test_a_spoken_question_gets_a_spoken_answer_with_marks(base_url: str, question: np.ndarray) -> None:
    from training.judge import Judge, normalize

    caller, session_id = await call(base_url)
    async with caller:
        asked = await ask(caller, question)
        assert asked.end_sent_at is not None
        await caller.wait_answer_played(asked.end_sent_at, timeout_s=90)
        first = caller.first_media_after(asked.end_sent_at)
        assert first is not None
        print(f"\ntime to first audio over Twilio: {(first - asked.end_sent_at) * 1000:.0f} ms "
              f"(from the end of the caller's speech)")
    assert not caller.clears, "nobody spoke over the answer"
    names = [name for _, name in caller.marks]
    turn_ids = {name.rpartition(":")[0] for name in names}
    assert len(turn_ids) == 1 and [int(n.rpartition(":")[2]) for n in names] == list(range(len(names)))
    assert caller.echoed == names, "every mark came back once its audio had played"
    answer = caller.answer_audio(since=asked.end_sent_at)
    assert answer.size > 0.5 * 16000, "at least half a second of spoken answer"
    turns = await transcript(base_url, session_id)
    assert len(turns) == 1 and turns[0]["user"] and turns[0]["assistant"]
    said, heard = normalize(turns[0]["assistant"]), normalize(Judge().transcribe(answer))
    print(f"the model heard {turns[0]['user']!r} and said {turns[0]['assistant']!r}; the judge hears {heard}")
    assert 0.5 * len(said) <= len(heard) <= 2 * len(said) + 1, "the caller hears a spoken answer of its length"
    assert "paris" in said and "paris" in heard, "the right answer, in text and in the phone audio"


async def test_speaking_over_the_answer_gets_a_clear_and_a_new_answer(base_url: str, question: np.ndarray) -> None:
    caller, _ = await call(base_url)
    async with caller:
        asked = await ask(caller, question)
        await caller.wait_for(lambda: caller.first_media_after(asked.end_sent_at or 0) is not None, 90, "answer audio")
        interruption = caller.say(question)
        await caller.wait_for(lambda: bool(caller.clears), 30, "clear")
        assert interruption.onset_sent_at is not None
        latency_ms = (caller.clears[0] - interruption.onset_sent_at) * 1000
        print(f"\nbarge-in latency over Twilio: {latency_ms:.0f} ms (speech onset → clear)")
        assert latency_ms < 1500
        first_turn = caller.marks[0][1].rpartition(":")[0] if caller.marks else None
        await caller.wait_answer_played(caller.clears[0], timeout_s=90)
    later = [name.rpartition(":")[0] for t, name in caller.marks if t > caller.clears[0]]
    assert later and all(turn != first_turn for turn in later), "the interruption was answered as a new turn"
    assert caller.answer_audio(since=caller.clears[0]).size > 0
