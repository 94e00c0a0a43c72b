"""The `local` backends: the echox stages run in this process (the embedded mode, and workers
started with ECHOX_BACKEND=local).

Torch work never runs on the event loop: each backend owns a small thread pool, and the
streaming speech LLM runs its decoding loop in a dedicated thread that hands outputs to the
loop through an asyncio.Queue. The caller's asyncio cancel event is bridged to the
threading.Event that SpeechLLMStage.run checks before every decoding step.

Workers get their backends from services.common.stack.make_backend (as ECHOX_BACKEND says).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

from echox.audio import FloatArray
from echox.checkpoint import EchoX
from echox.errors import EchoXError
from echox.events import TextDeltaEvent
from echox.streaming.stages import (
    AnswerEnd,
    AudioSegment,
    HiddenSegment,
    SpeechLLMOutput,
    SpeechLLMStage,
    UnitSegment,
    UnitStage,
    VocoderStage,
)
from echox.tokenizer import Turn
from services.common.backends.base import BackendError

T = TypeVar("T")
_END = object()


class _Pooled:
    """A stage run on its own small thread pool, so a slow stage cannot starve the others."""

    def __init__(self, name: str, workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"echox-{name}")
        self._name = name

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except EchoXError as exc:
            raise BackendError(f"{self._name}: {exc}") from exc
        except (RuntimeError, ValueError, IndexError) as exc:  # torch errors: a bad input
            raise BackendError(f"{self._name} failed: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class LocalSpeechLLM:
    """SpeechLLMStage in a dedicated thread per turn; outputs stream to the loop as they happen.

    Setting `cancel` ends the stream at once with AnswerEnd(cancelled=True) holding the tokens
    the consumer has seen (outputs the thread produced meanwhile are dropped, as a cancelled
    Triton stream drops them), and the thread stops decoding at its next step."""

    def __init__(self, echox: EchoX) -> None:
        self.stage = SpeechLLMStage(echox)
        self.tokenizer = echox.tokenizer
        self.max_audio_seconds = self.stage.max_audio_seconds

    def _start(self, audio: FloatArray, history: Sequence[Turn], stop: threading.Event) -> asyncio.Queue[object]:
        """Runs the stage in a thread that feeds the returned queue, ending with _END."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[object] = asyncio.Queue()

        def put(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(outputs.put_nowait, item)

        def decode() -> None:
            try:
                for item in self.stage.run(audio, tuple(history), stop):
                    put(item)
            except BaseException as exc:  # re-raised on the loop's side
                put(exc)
            finally:
                put(_END)

        threading.Thread(target=decode, name="echox-speech-llm", daemon=True).start()
        return outputs

    async def stream(
        self, audio: FloatArray, history: Sequence[Turn], cancel: asyncio.Event
    ) -> AsyncIterator[SpeechLLMOutput]:
        stop = threading.Event()
        outputs = self._start(audio, history, stop)
        tokens: list[int] = []
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            while True:
                get = asyncio.ensure_future(outputs.get())
                await asyncio.wait({get, cancelled}, return_when=asyncio.FIRST_COMPLETED)
                if cancel.is_set():
                    get.cancel()
                    yield AnswerEnd(tuple(tokens), self.tokenizer.decode(tokens), cancelled=True)
                    return
                item = get.result()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    reason = str(item) if isinstance(item, EchoXError) else f"{type(item).__name__}: {item}"
                    raise BackendError(f"speech_llm: {reason}") from item
                if isinstance(item, TextDeltaEvent):
                    tokens.append(item.token_id)
                yield cast(SpeechLLMOutput, item)
                if isinstance(item, AnswerEnd):
                    return
        finally:
            # Cancelled, ended, or the consumer stopped early: the thread stops within one step.
            stop.set()
            cancelled.cancel()

    async def close(self) -> None:
        return None


class LocalUnits(_Pooled):
    """UnitStage.generate on a thread pool (`workers` segments at once)."""

    def __init__(self, echox: EchoX, workers: int = 1) -> None:
        super().__init__("unit_generator", workers)
        self.stage = UnitStage(echox)

    async def generate(self, segment: HiddenSegment) -> UnitSegment:
        return await self._call(self.stage.generate, segment)


class LocalVocoder(_Pooled):
    """VocoderStage.synthesize on a thread pool (`workers` segments at once)."""

    def __init__(self, echox: EchoX, workers: int = 1) -> None:
        super().__init__("vocoder", workers)
        self.stage = VocoderStage(echox)

    async def synthesize(self, segment: UnitSegment) -> AudioSegment:
        return await self._call(self.stage.synthesize, segment)
