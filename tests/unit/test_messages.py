"""Stage messages: strict parsing, schema versions, tensors and audio on the wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common import messages
from services.proto import stages_pb2 as pb


def _request(**header: object) -> bytes:
    base = messages.new_header("s1", "t1", deadline_s=10)
    for key, value in header.items():
        setattr(base, key, value)
    return pb.TurnRequest(header=base, audio=b"\0\0", sample_rate=16000).SerializeToString()


def test_a_valid_message_round_trips() -> None:
    message = messages.parse(pb.TurnRequest, _request())
    assert (message.header.session_id, message.header.turn_id) == ("s1", "t1")
    assert message.header.version == messages.SCHEMA_VERSION
    assert message.header.trace.traceparent.startswith("00-")


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05abc"])
def test_garbage_is_a_message_error(payload: bytes) -> None:
    with pytest.raises(messages.MessageError) as info:
        messages.parse(pb.TurnRequest, payload)
    assert info.value.code == "malformed"


def test_a_newer_schema_is_refused_with_its_header() -> None:
    with pytest.raises(messages.MessageError) as info:
        messages.parse(pb.TurnRequest, _request(version=messages.SCHEMA_VERSION + 1))
    assert info.value.code == "schema_version"
    assert info.value.header is not None and info.value.header.turn_id == "t1"


def test_missing_ids_are_malformed() -> None:
    with pytest.raises(messages.MessageError, match="session id"):
        messages.parse(pb.TurnRequest, _request(session_id=""))


def test_child_headers_keep_the_trace_and_deadline() -> None:
    parent = messages.new_header("s", "t", deadline_s=5)
    child = messages.child_header(parent)
    assert child.trace.traceparent.split("-")[1] == parent.trace.traceparent.split("-")[1]
    assert child.trace.traceparent != parent.trace.traceparent
    assert child.deadline_unix_ms == parent.deadline_unix_ms


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_tensors_round_trip(dtype: str) -> None:
    hidden = torch.randn(3, 8)
    back = messages.tensor_from_proto(messages.tensor_to_proto(hidden, dtype))
    assert back.shape == (3, 8)
    assert torch.allclose(back.float(), hidden, atol=0.05, rtol=0.01)


def test_a_tensor_whose_bytes_do_not_fit_its_shape_is_refused() -> None:
    proto = messages.tensor_to_proto(torch.zeros(2, 4))
    proto.shape[:] = [3, 4]
    with pytest.raises(messages.MessageError, match="cannot hold"):
        messages.tensor_from_proto(proto)


def test_audio_encodings() -> None:
    audio = np.linspace(-0.5, 0.5, 160, dtype=np.float32)
    assert np.allclose(messages.decode_audio(messages.pcm16_bytes(audio), pb.PCM_S16LE), audio, atol=1e-4)
    assert np.array_equal(messages.decode_audio(audio.astype("<f4").tobytes(), pb.PCM_F32LE), audio)
    with pytest.raises(messages.MessageError, match="odd number"):
        messages.decode_audio(b"\0\0\0", pb.PCM_S16LE)
    with pytest.raises(messages.MessageError, match="unknown audio encoding"):
        messages.decode_audio(b"\0\0", 7)
