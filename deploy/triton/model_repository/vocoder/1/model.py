"""Triton Python-backend model `vocoder`: a thin adapter over echox's VocoderStage.

Dynamic batching with ragged inputs (see config.pbtxt): each request is UNITS int64 [1, n]
and gets PCM fp32 [1, m] (16 kHz); the requests one execute() call gathers are synthesized
one by one, since the echox vocoder takes one unit sequence at a time.

The model folder: the `model_dir` parameter of config.pbtxt when not empty, else the server's
ECHOX_MODEL_DIR environment variable, else the committed default model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack

from echox.checkpoint import EchoX
from echox.errors import EchoXError
from echox.paths import resolve_model_dir
from echox.streaming.stages import UnitSegment, VocoderStage


def load_echox(args: dict[str, Any]) -> EchoX:
    """The EchoX model named by the model config (see the module docstring), torch threads set."""
    params = json.loads(args["model_config"]).get("parameters", {})
    folder = params.get("model_dir", {}).get("string_value", "") or os.environ.get("ECHOX_MODEL_DIR") or None
    threads = int(params.get("torch_threads", {}).get("string_value", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)  # this stub process runs one model instance only
    # The GPU when the server has one (the instance group stays KIND_CPU: one config for
    # CPU and GPU deployments); ECHOX_TRITON_DEVICE=cpu keeps a GPU server's models on CPU.
    use_gpu = torch.cuda.is_available() and os.environ.get("ECHOX_TRITON_DEVICE", "auto") != "cpu"
    return EchoX.from_pretrained(resolve_model_dir(folder), device="cuda" if use_gpu else "cpu")


def read_input(request: Any, name: str) -> np.ndarray | None:
    """An input as numpy, read through DLPack: under numpy 2 the stub's `as_numpy()` returns
    arrays whose every element reads as the first one."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return from_dlpack(tensor.to_dlpack()).numpy()


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        echox = load_echox(args)
        self.stage = VocoderStage(echox)
        self.num_units = echox.config.vocoder.num_units

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:  # the dynamic batch: one synthesis per request
            try:
                responses.append(self._synthesize(request))
            except (EchoXError, ValueError, RuntimeError) as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"vocoder: {exc}")))
        return responses

    def _synthesize(self, request: Any) -> Any:
        units = read_input(request, "UNITS")
        if units is None:
            raise ValueError("UNITS is missing")
        units = units.reshape(-1)
        if units.size and (units.min() < 0 or units.max() >= self.num_units):
            raise ValueError(f"units must lie in [0, {self.num_units}), got {units.min()}..{units.max()}")
        audio = self.stage.synthesize(UnitSegment(0, (), tuple(int(u) for u in units)))
        # The output goes through DLPack too: the stub's numpy path loses it under numpy 2.
        pcm = torch.from_numpy(np.ascontiguousarray(audio.pcm, dtype=np.float32).reshape(1, -1))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor.from_dlpack("PCM", pcm)])

    def finalize(self) -> None:
        return None
