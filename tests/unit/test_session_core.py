"""The session core's history after a barge-in that comes once the answer was delivered in full
(a gRPC client plays what it received and only then hears the caller talk over it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from echox.espeak import speak
from services.common.settings import get_settings
from services.common.stack import embedded_data_plane
from services.gateway.session import ConversationEdge
from services.proto import stages_pb2 as pb

pytestmark = pytest.mark.unit


async def test_a_late_barge_in_keeps_only_what_was_heard(random_tiny_model: Path) -> None:
    settings = get_settings().model_copy(update={"model_dir": random_tiny_model})
    async with embedded_data_plane(settings) as plane:
        edge = ConversationEdge.from_settings(plane.bus, plane.sessions, plane.settings)
        session = await edge.open()
        audio = speak("What is the capital of France?", voice="en-us+m5")
        run = await edge.turn(session, (audio * 32767).astype("<i2").tobytes(), 16000)
        segments = [item for item in [i async for i in run] if isinstance(item, pb.TurnEvent)
                    and item.WhichOneof("kind") == "segment"]
        assert len(segments) >= 2, "a multi-segment answer"
        (saved,) = await plane.sessions.history(session)
        assert saved.assistant == run.summary.text  # delivered in full: saved in full
        await run.cancel(played_segments=1)  # the caller heard one segment, then spoke over the rest
        (amended,) = await plane.sessions.history(session)
        assert amended.assistant == segments[0].segment.text.strip()
        assert amended.user == saved.user
