"""echox.hosting: what a model-server instance loads, and DLPack tensors to numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.dlpack import to_dlpack

from echox.hosting import dlpack_to_numpy, load_hosted_model, model_parameters


class ServerTensor:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def to_dlpack(self) -> object:
        return to_dlpack(self.tensor)


def test_string_parameters_are_read_from_the_model_config() -> None:
    config = json.dumps({"parameters": {"model_dir": {"string_value": "/m"}, "torch_threads": {"string_value": "1"}}})
    assert model_parameters(config) == {"model_dir": "/m", "torch_threads": "1"}
    assert model_parameters(json.dumps({"name": "x"})) == {}


def test_the_model_dir_parameter_wins_over_the_environment(micro_model_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHOX_MODEL_DIR", "/nowhere")
    monkeypatch.setenv("ECHOX_TRITON_DEVICE", "cpu")
    model = load_hosted_model({"model_dir": str(micro_model_dir)})
    assert model.model.device.type == "cpu"


def test_dlpack_tensors_read_as_numpy() -> None:
    values = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert np.array_equal(dlpack_to_numpy(ServerTensor(values)), values.numpy())
