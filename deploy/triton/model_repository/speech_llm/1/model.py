"""Triton Python-backend model `speech_llm`: a thin adapter over echox's SpeechLLMStage.

Decoupled: each request (AUDIO fp32 [-1], optional HISTORY JSON) gets one response per stage
output as it happens (see config.pbtxt for the tensors of each KIND), the last one flagged
FINAL. Between decoding steps the model polls `request.is_cancelled()` and, once the client has
cancelled, sets the threading.Event SpeechLLMStage checks, so decoding stops within a step.

The model folder: the `model_dir` parameter of config.pbtxt when not empty, else the server's
ECHOX_MODEL_DIR environment variable, else the committed default model.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from echox import hosting
from echox.audio import SAMPLE_RATE, prepare_audio
from echox.errors import EchoXError
from echox.events import TextDeltaEvent, TranscriptEvent
from echox.streaming.stages import AnswerEnd, HiddenSegment, SpeechLLMOutput, SpeechLLMStage
from echox.tokenizer import Turn

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


SERVER = hosting.PythonBackendIO(pb_utils)  # inputs and error responses


def _out(name: str, value: torch.Tensor) -> pb_utils.Tensor:
    """An output tensor, handed over through DLPack (the stub's numpy path is broken under
    numpy 2, see echox.hosting.dlpack_to_numpy); strings travel as their UTF-8 bytes (UINT8)."""
    return pb_utils.Tensor.from_dlpack(name, value.detach().cpu().contiguous())


def _text(name: str, value: str) -> pb_utils.Tensor:
    return _out(name, torch.tensor(list(value.encode("utf-8")), dtype=torch.uint8))


def _ints(name: str, values: Any) -> pb_utils.Tensor:
    return _out(name, torch.tensor(list(values), dtype=torch.int64).reshape(-1))


def to_tensors(item: SpeechLLMOutput) -> list[pb_utils.Tensor]:
    """The response tensors of one stage output."""
    if isinstance(item, TranscriptEvent):
        return [_text("KIND", "transcript"), _text("TEXT", item.text)]
    if isinstance(item, TextDeltaEvent):
        return [_text("KIND", "delta"), _ints("INDEX", [item.index]), _ints("TOKEN_IDS", [item.token_id]),
                _text("TEXT", item.text)]
    if isinstance(item, HiddenSegment):
        return [_text("KIND", "segment"), _ints("INDEX", [item.index]), _ints("START", [item.start]),
                _ints("TOKEN_IDS", item.token_ids), _text("TEXT", item.text),
                _out("HIDDEN", item.hidden.to(torch.float16))]
    assert isinstance(item, AnswerEnd)
    return [_text("KIND", "end"), _ints("TOKEN_IDS", item.token_ids), _text("TEXT", item.text),
            _out("CANCELLED", torch.tensor([item.cancelled], dtype=torch.bool))]


def parse_history(request: Any) -> tuple[Turn, ...]:
    """HISTORY: the UTF-8 bytes of a JSON list of {"user", "assistant"} objects (UINT8, since the
    stub garbles BYTES inputs under numpy 2)."""
    tensor = SERVER.read_input(request, "HISTORY")
    raw = b"" if tensor is None else tensor.astype(np.uint8).tobytes()
    if not raw:
        return ()
    try:
        turns = json.loads(raw.decode("utf-8"))
        return tuple(Turn(str(t["user"]), str(t["assistant"])) for t in turns)
    except (ValueError, TypeError, KeyError) as exc:
        raise EchoXError(f'HISTORY must be UTF-8 JSON: a list of {{"user", "assistant"}} objects ({exc})') from None


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self.stage = SpeechLLMStage(hosting.load_instance_model(args))
        self.logger = pb_utils.Logger

    def execute(self, requests: list[Any]) -> None:
        hosting.serve_each([(request, request.get_response_sender()) for request in requests],
                           lambda pair: self._serve(*pair), self._refuse, "speech_llm")
        return None

    def _serve(self, request: Any, sender: Any) -> None:
        audio = SERVER.read_input(request, "AUDIO")
        if audio is None:
            raise EchoXError("AUDIO is missing")
        audio = prepare_audio(audio.reshape(-1), SAMPLE_RATE, max_seconds=self.stage.max_audio_seconds)
        history = parse_history(request)
        cancel = threading.Event()
        for item in self.stage.run(audio, history, cancel):
            if isinstance(item, AnswerEnd):
                if item.cancelled:
                    self.logger.log_info(f"speech_llm: request cancelled after {len(item.token_ids)} tokens")
                self._send(sender, pb_utils.InferenceResponse(output_tensors=to_tensors(item)), FINAL)
                return
            if request.is_cancelled():
                cancel.set()  # the stage ends with AnswerEnd(cancelled=True) at its next step
                continue
            self._send(sender, pb_utils.InferenceResponse(output_tensors=to_tensors(item)), 0)

    def _refuse(self, pair: tuple[Any, Any], message: str) -> None:
        self._send(pair[1], SERVER.error_response(message), FINAL)

    def _send(self, sender: Any, response: Any, flags: int) -> None:
        try:
            sender.send(response, flags=flags)
        except pb_utils.TritonModelException as exc:  # the client went away; nothing to tell it
            self.logger.log_warn(f"speech_llm: could not send a response: {exc}")

    def finalize(self) -> None:
        return None
