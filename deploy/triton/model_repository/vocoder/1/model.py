"""Triton Python-backend model `vocoder`: a thin adapter over echox's VocoderStage.

Dynamic batching with ragged inputs (see config.pbtxt): each request is UNITS int64 [1, n]
and gets PCM fp32 [1, m] (16 kHz); the requests one execute() call gathers are synthesized
one by one, since the echox vocoder takes one unit sequence at a time.

The model folder: the `model_dir` parameter of config.pbtxt when not empty, else the server's
ECHOX_MODEL_DIR environment variable, else the committed default model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from echox import hosting
from echox.streaming.stages import UnitSegment, VocoderStage

SERVER = hosting.PythonBackendIO(pb_utils)  # inputs and error responses


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        echox = hosting.load_instance_model(args)
        self.stage = VocoderStage(echox)
        self.num_units = echox.config.vocoder.num_units

    def execute(self, requests: list[Any]) -> list[Any]:
        return hosting.serve_each(requests, self._synthesize, SERVER.refuse, "vocoder")

    def _synthesize(self, request: Any) -> Any:
        units = SERVER.read_input(request, "UNITS")
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
