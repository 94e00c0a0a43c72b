"""The `triton` backends: the stage models on a Triton server, over tritonclient.grpc.aio.

They return the same echox dataclasses as the local backends. speech_llm is a decoupled model
streamed with stream_infer: setting the cancel event cancels the gRPC stream, Triton cancels
the in-flight request (the model sees request.is_cancelled() and stops decoding), and the
stream ends here at once with AnswerEnd(cancelled=True). Every call has a deadline
(`timeout_s`); connection, deadline and model errors all become BackendError.

The tensors of each model are described in deploy/triton/model_repository/*/config.pbtxt.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np
import torch
from tritonclient.grpc import InferInput, InferResult
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from echox.audio import FloatArray
from echox.events import TextDeltaEvent, TranscriptEvent
from echox.streaming.stages import AnswerEnd, AudioSegment, HiddenSegment, SpeechLLMOutput, UnitSegment
from echox.tokenizer import Turn
from services.common.backends.base import BackendError


def _input(name: str, value: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor


def _text(result: InferResult, name: str = "TEXT") -> str:
    """Strings travel as UTF-8 bytes in UINT8 tensors (the model's stub garbles BYTES tensors)."""
    value = result.as_numpy(name)
    return "" if value is None else value.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _ints(result: InferResult, name: str) -> tuple[int, ...]:
    value = result.as_numpy(name)
    return () if value is None else tuple(int(v) for v in value.reshape(-1))


def _message(exc: BaseException) -> str:
    if isinstance(exc, InferenceServerException):
        status = exc.status()  # e.g. "StatusCode.UNAVAILABLE"; None for a model's own error
        return f"{str(status).removeprefix('StatusCode.')}: {exc.message()}" if status else str(exc.message() or exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class _TritonModel:
    """One model on one server; the gRPC client is made inside the running loop, on first use,
    so a backend object belongs to one event loop (as a worker's does)."""

    def __init__(self, url: str, model_name: str, timeout_s: float) -> None:
        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s
        self._client: InferenceServerClient | None = None

    @property
    def client(self) -> InferenceServerClient:
        if self._client is None:
            self._client = InferenceServerClient(self.url)
        return self._client

    def error(self, exc: BaseException | str, deadline: float | None = None) -> BackendError:
        """The error of a call; one that ends past the call's `deadline` (time.monotonic()) says
        so: the server cancels a call at its deadline and may report that cancel (an INTERNAL
        error from its core) before the client's own DEADLINE_EXCEEDED arrives."""
        reason = exc if isinstance(exc, str) else _message(exc)
        if deadline is not None and time.monotonic() >= deadline and "DEADLINE_EXCEEDED" not in reason:
            reason = f"DEADLINE_EXCEEDED: no answer within {self.timeout_s} s (the server said: {reason})"
        return BackendError(f"Triton model {self.model_name!r} at {self.url}: {reason}")

    async def infer(self, inputs: list[InferInput]) -> InferResult:
        deadline = time.monotonic() + self.timeout_s
        try:
            return await self.client.infer(self.model_name, inputs, client_timeout=self.timeout_s)
        except (InferenceServerException, grpc.RpcError) as exc:
            raise self.error(exc, deadline) from exc

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class TritonSpeechLLM(_TritonModel):
    """The decoupled `speech_llm` model: one streamed request per turn."""

    def __init__(
        self, url: str, model_name: str = "speech_llm", *, timeout_s: float = 60.0, max_audio_seconds: float = 30.0
    ) -> None:
        super().__init__(url, model_name, timeout_s)
        # The model's window is only known to the server; it rejects longer audio clearly.
        self.max_audio_seconds = max_audio_seconds

    def _request(self, audio: FloatArray, history: Sequence[Turn]) -> dict[str, Any]:
        turns = json.dumps([{"user": t.user, "assistant": t.assistant} for t in history])
        return {
            "model_name": self.model_name,
            "inputs": [
                _input("AUDIO", np.ascontiguousarray(audio, dtype=np.float32).reshape(-1), "FP32"),
                _input("HISTORY", np.frombuffer(turns.encode("utf-8"), dtype=np.uint8), "UINT8"),
            ],
        }

    async def stream(
        self, audio: FloatArray, history: Sequence[Turn], cancel: asyncio.Event
    ) -> AsyncIterator[SpeechLLMOutput]:
        request = self._request(audio, history)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request

        try:
            responses = self.client.stream_infer(requests(), stream_timeout=self.timeout_s)
        except (InferenceServerException, grpc.RpcError) as exc:
            raise self.error(exc) from exc
        answer, deadline = _Answer(), time.monotonic() + self.timeout_s
        cancelled = asyncio.ensure_future(cancel.wait())
        step: asyncio.Future[Any] | None = None
        complete = False
        try:
            while True:
                step = asyncio.ensure_future(responses.__anext__())
                await asyncio.wait({step, cancelled}, return_when=asyncio.FIRST_COMPLETED)
                if cancel.is_set():
                    # Cancelling the gRPC stream cancels the request on the server.
                    responses.cancel()
                    yield AnswerEnd(tuple(answer.tokens), answer.text, cancelled=True)
                    return
                try:
                    item = self._item(step, answer, deadline)
                except BackendError:
                    complete = await _finish(responses)
                    raise
                if isinstance(item, AnswerEnd):
                    complete = await _finish(responses)
                yield item
                if isinstance(item, AnswerEnd):
                    return
        finally:
            if not complete:  # failed, cancelled, or the consumer stopped early: free the call
                responses.cancel()
            cancelled.cancel()
            if step is not None and not step.done():
                step.cancel()

    def _item(self, step: asyncio.Future[Any], answer: _Answer, deadline: float) -> SpeechLLMOutput:
        try:
            result, error = step.result()
        except StopAsyncIteration:
            raise self.error("the stream ended before the answer did") from None
        except (InferenceServerException, grpc.RpcError, asyncio.CancelledError) as exc:
            raise self.error(exc, deadline) from exc
        if error is not None:
            raise self.error(error, deadline)
        return answer.parse(result)


async def _finish(responses: Any, timeout_s: float = 2.0) -> bool:
    """Reads the stream to its end after the FINAL response, so the RPC closes with OK: a
    stream cancelled after its last response can leave the request held in Triton, and the
    speech_llm model then never unloads when the server stops."""
    try:
        await asyncio.wait_for(responses.__anext__(), timeout_s)
    except StopAsyncIteration:
        return True
    except (TimeoutError, grpc.RpcError, InferenceServerException):
        return False
    return False  # one more response after FINAL: not expected; cancel the call


class _Answer:
    """The answer so far, to end a cancelled stream with what was decoded."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.text = ""

    def parse(self, result: InferResult) -> SpeechLLMOutput:
        kind = _text(result, "KIND")
        if kind == "transcript":
            return TranscriptEvent(_text(result))
        if kind == "delta":
            (index,), (token,), text = _ints(result, "INDEX"), _ints(result, "TOKEN_IDS"), _text(result)
            self.tokens.append(token)
            self.text += text
            return TextDeltaEvent(index, token, text)
        if kind == "segment":
            hidden = torch.from_numpy(np.array(result.as_numpy("HIDDEN")))
            (index,), (start,) = _ints(result, "INDEX"), _ints(result, "START")
            return HiddenSegment(index, start, _ints(result, "TOKEN_IDS"), _text(result), hidden)
        if kind == "end":
            cancelled = result.as_numpy("CANCELLED")
            return AnswerEnd(_ints(result, "TOKEN_IDS"), _text(result), bool(cancelled is not None and cancelled[0]))
        raise BackendError(f"speech_llm sent an unknown response kind {kind!r}")


class TritonUnits(_TritonModel):
    """The unary `unit_generator` model. Hidden states travel in their own precision: float16
    as HIDDEN_FP16, anything else as float32 HIDDEN."""

    def __init__(self, url: str, model_name: str = "unit_generator", *, timeout_s: float = 60.0) -> None:
        super().__init__(url, model_name, timeout_s)

    async def generate(self, segment: HiddenSegment) -> UnitSegment:
        hidden = segment.hidden.detach().cpu()
        if hidden.dtype == torch.float16:
            tensor = _input("HIDDEN_FP16", hidden.numpy(), "FP16")
        else:
            tensor = _input("HIDDEN", hidden.float().numpy(), "FP32")
        inputs = [tensor]
        if segment.token_ids:
            inputs.append(_input("TOKEN_IDS", np.asarray(segment.token_ids, dtype=np.int64), "INT64"))
        result = await self.infer(inputs)
        return UnitSegment(segment.index, _ints(result, "UNIT_TOKENS"), _ints(result, "UNITS"))


class TritonVocoder(_TritonModel):
    """The dynamically batched `vocoder` model: UNITS [1, n] → PCM [1, m]."""

    def __init__(self, url: str, model_name: str = "vocoder", *, timeout_s: float = 60.0) -> None:
        super().__init__(url, model_name, timeout_s)

    async def synthesize(self, segment: UnitSegment) -> AudioSegment:
        if not segment.units:  # what VocoderStage does, without a round trip
            return AudioSegment(segment.index, np.zeros(0, dtype=np.float32))
        units = np.asarray(segment.units, dtype=np.int64).reshape(1, -1)
        result = await self.infer([_input("UNITS", units, "INT64")])
        pcm = result.as_numpy("PCM")
        if pcm is None:
            raise self.error("the response has no PCM")
        return AudioSegment(segment.index, np.ascontiguousarray(pcm.reshape(-1), dtype=np.float32))

