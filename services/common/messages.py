"""The protobuf messages of protos/echox/v1 as the services use them: stream names, headers
with schema version and trace context, strict parsing, and tensor/audio payloads."""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from echox.audio import FloatArray, to_pcm16
from services.proto import stages_pb2 as pb

if TYPE_CHECKING:  # torch loads only in processes that handle hidden states
    import torch

SCHEMA_VERSION = 1

# Work streams (consumer groups) and broadcast streams; per-session output streams below.
TURNS = "turns"
SEGMENTS = "segments"
UNITS = "units"
CANCELS = "cancels"
DEADLETTER = "deadletter"


def events_stream(session_id: str) -> str:
    return f"events:{session_id}"


def audio_stream(session_id: str) -> str:
    return f"audio:{session_id}"


class MessageError(Exception):
    """A message that cannot be served: malformed, from a newer schema, or missing its ids."""

    def __init__(self, code: str, message: str, header: pb.Header | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.header = header


M = TypeVar("M", bound=Message)

_DTYPES = ("float16", "bfloat16", "float32")


def _torch_dtype(name: str) -> torch.dtype | None:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(name)


def now_ms() -> int:
    return int(time.time() * 1000)


def new_trace() -> pb.TraceContext:
    """A fresh W3C traceparent (version 00, sampled)."""
    return pb.TraceContext(traceparent=f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01")


def child_trace(parent: pb.TraceContext) -> pb.TraceContext:
    """Same trace, new span id: each hop is a span of the turn's trace."""
    parts = parent.traceparent.split("-")
    if len(parts) != 4:
        return new_trace()
    return pb.TraceContext(traceparent=f"{parts[0]}-{parts[1]}-{secrets.token_hex(8)}-{parts[3]}",
                           tracestate=parent.tracestate)


def new_header(session_id: str, turn_id: str, deadline_s: float, trace: pb.TraceContext | None = None) -> pb.Header:
    created = now_ms()
    return pb.Header(version=SCHEMA_VERSION, session_id=session_id, turn_id=turn_id,
                     trace=trace or new_trace(), deadline_unix_ms=created + int(deadline_s * 1000),
                     created_unix_ms=created)


def child_header(parent: pb.Header) -> pb.Header:
    """The header of a message caused by `parent`: same session, turn and deadline."""
    return pb.Header(version=SCHEMA_VERSION, session_id=parent.session_id, turn_id=parent.turn_id,
                     trace=child_trace(parent.trace), deadline_unix_ms=parent.deadline_unix_ms,
                     created_unix_ms=now_ms())


def parse(message_type: type[M], payload: bytes) -> M:
    """Decodes and checks a stage message; raises MessageError (never anything else)."""
    message = message_type()
    try:
        message.ParseFromString(payload)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise MessageError("malformed", f"malformed {message_type.__name__}: {exc}") from None
    header = getattr(message, "header", None)
    if not isinstance(header, pb.Header):
        raise MessageError("malformed", f"{message_type.__name__} has no header")
    # Only a message naming its session and turn can be answered with an error event.
    answerable = header if header.session_id and header.turn_id else None
    if header.version > SCHEMA_VERSION:
        raise MessageError("schema_version", f"{message_type.__name__} has schema version {header.version}; "
                           f"this worker understands up to {SCHEMA_VERSION}", answerable)
    if header.version == 0 or answerable is None:
        raise MessageError("malformed", f"{message_type.__name__} lacks a version, session id or turn id", answerable)
    return message


def expired(header: pb.Header) -> bool:
    return header.deadline_unix_ms > 0 and now_ms() > header.deadline_unix_ms


def tensor_to_proto(tensor: torch.Tensor, dtype: str = "float16") -> pb.Tensor:
    import torch

    torch_dtype = _torch_dtype(dtype)
    if torch_dtype is None:
        raise ValueError(f"unsupported tensor dtype {dtype!r} (one of {', '.join(_DTYPES)})")
    data = tensor.detach().to("cpu", torch_dtype).contiguous()
    raw = data.view(torch.int16) if dtype != "float32" else data.view(torch.int32)
    return pb.Tensor(shape=list(data.shape), dtype=dtype, data=raw.numpy().tobytes())


def tensor_from_proto(message: pb.Tensor) -> torch.Tensor:
    """Raises MessageError when dtype, shape and byte count disagree."""
    import torch

    dtype = _torch_dtype(message.dtype)
    if dtype is None:
        raise MessageError("malformed", f"unsupported tensor dtype {message.dtype!r}")
    shape = tuple(message.shape)
    count = int(np.prod(shape)) if shape else 0
    width = torch.finfo(dtype).bits // 8
    if count == 0 or len(message.data) != count * width:
        raise MessageError("malformed", f"tensor of shape {shape} and dtype {message.dtype} "
                           f"cannot hold {len(message.data)} bytes")
    raw = np.frombuffer(message.data, dtype=np.int16 if width == 2 else np.int32).copy()
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def pcm16_bytes(audio: FloatArray) -> bytes:
    return to_pcm16(audio).astype("<i2").tobytes()


def decode_audio(data: bytes, encoding: int) -> FloatArray:
    """Wire audio → float32 samples; raises MessageError on a bad encoding or byte count."""
    if encoding in (pb.PCM_S16LE, pb.AUDIO_ENCODING_UNSPECIFIED):
        if len(data) % 2:
            raise MessageError("bad_audio", "PCM16 audio has an odd number of bytes")
        return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)
    if encoding == pb.PCM_F32LE:
        if len(data) % 4:
            raise MessageError("bad_audio", "float32 audio is not a whole number of samples")
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    raise MessageError("bad_audio", f"unknown audio encoding {encoding}")


def error_event(header: pb.Header, stage: str, code: str, message: str) -> pb.TurnEvent:
    return pb.TurnEvent(header=child_header(header), stage=stage, error=pb.Error(code=code, message=message))
