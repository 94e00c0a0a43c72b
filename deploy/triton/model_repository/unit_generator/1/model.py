"""Triton Python-backend model `unit_generator`: a thin adapter over echox's UnitStage.

Unary: HIDDEN fp32 [n, H] or HIDDEN_FP16 [n, H] (exactly one), optional TOKEN_IDS [n] →
UNIT_TOKENS [-1] (unit-language tokens) and UNITS [-1] (deduplicated speech units).

The model folder: the `model_dir` parameter of config.pbtxt when not empty, else the server's
ECHOX_MODEL_DIR environment variable, else the committed default model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from echox import hosting
from echox.streaming.stages import HiddenSegment, UnitStage

SERVER = hosting.PythonBackendIO(pb_utils)  # inputs and error responses


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        echox = hosting.load_instance_model(args)
        self.stage = UnitStage(echox)
        self.hidden_size = echox.config.llm.hidden_size

    def execute(self, requests: list[Any]) -> list[Any]:
        return hosting.serve_each(requests, self._generate, SERVER.refuse, "unit_generator")

    def _hidden(self, request: Any) -> torch.Tensor:
        given = [t for t in (SERVER.read_input(request, name) for name in ("HIDDEN", "HIDDEN_FP16")) if t is not None]
        if len(given) != 1:
            raise ValueError("send exactly one of HIDDEN (fp32) or HIDDEN_FP16, shaped [n, hidden size]")
        hidden = given[0]
        if hidden.ndim != 2 or hidden.shape[0] == 0 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"hidden states must be [n >= 1, {self.hidden_size}], got {list(hidden.shape)}")
        if not np.all(np.isfinite(hidden)):
            raise ValueError("hidden states contain NaN or infinite values")
        return torch.from_numpy(np.array(hidden))  # a copy that outlives the request's buffer

    def _generate(self, request: Any) -> Any:
        hidden = self._hidden(request)
        ids = SERVER.read_input(request, "TOKEN_IDS")
        token_ids = tuple(int(i) for i in ids.reshape(-1)) if ids is not None else ()
        if token_ids and len(token_ids) != hidden.shape[0]:
            raise ValueError(f"{len(token_ids)} TOKEN_IDS for {hidden.shape[0]} hidden states")
        units = self.stage.generate(HiddenSegment(0, 0, token_ids, "", hidden))
        # Outputs go through DLPack too: the stub's numpy path loses them under numpy 2.
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor.from_dlpack("UNIT_TOKENS", torch.tensor(units.unit_tokens, dtype=torch.int64)),
            pb_utils.Tensor.from_dlpack("UNITS", torch.tensor(units.units, dtype=torch.int64)),
        ])

    def finalize(self) -> None:
        return None
