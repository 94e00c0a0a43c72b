"""echox.hosting: what a model-server instance loads, and DLPack tensors to numpy."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.dlpack import to_dlpack

from echox.errors import EchoXError
from echox.hosting import (
    PythonBackendIO,
    dlpack_to_numpy,
    load_hosted_model,
    load_instance_model,
    model_parameters,
    read_input,
    serve_each,
)


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


def test_an_input_is_read_through_the_servers_lookup() -> None:
    inputs = {"UNITS": ServerTensor(torch.tensor([3, 1, 2]))}

    def lookup(request: object, name: str) -> ServerTensor | None:
        return inputs.get(name) if request == "request" else None

    units = read_input(lookup, "request", "UNITS")
    assert units is not None and units.tolist() == [3, 1, 2]
    assert read_input(lookup, "request", "HIDDEN") is None


def test_a_python_backend_reads_inputs_and_refuses_through_the_module_it_passes_in() -> None:
    class TritonError:
        def __init__(self, message: str) -> None:
            self.message = message

    class InferenceResponse:
        def __init__(self, error: TritonError) -> None:
            self.error = error

    inputs = {("request", "UNITS"): ServerTensor(torch.tensor([5, 4]))}
    utils = types.SimpleNamespace(
        get_input_tensor_by_name=lambda request, name: inputs.get((request, name)),
        InferenceResponse=InferenceResponse,
        TritonError=TritonError,
    )
    bare = PythonBackendIO(types.ModuleType("triton_python_backend_utils"))  # as the publish test loads model.py
    with pytest.raises(AttributeError):  # the module's functions are looked up per call, not at import
        bare.read_input("request", "UNITS")
    server = PythonBackendIO(utils)
    units = server.read_input("request", "UNITS")
    assert units is not None and units.tolist() == [5, 4]
    assert server.read_input("request", "AUDIO") is None

    def serve(request: str) -> object:
        if server.read_input(request, "AUDIO") is None:
            raise ValueError("AUDIO is missing")
        return "served"

    [response] = serve_each(["request"], serve, server.refuse, "speech_llm")
    assert isinstance(response, InferenceResponse)
    assert response.error.message == "speech_llm: AUDIO is missing"


def test_a_bad_request_is_refused_alone_and_the_batch_goes_on() -> None:
    def serve(request: int) -> str:
        if request == 2:
            raise ValueError("UNITS is missing")
        if request == 3:
            raise EchoXError("audio too long")
        return f"served {request}"

    def refuse(request: int, message: str) -> str:
        return f"refused {request}: {message}"

    assert serve_each([1, 2, 3, 4], serve, refuse, "vocoder") == [
        "served 1", "refused 2: vocoder: UNITS is missing", "refused 3: vocoder: audio too long", "served 4"]


def test_a_failure_that_is_not_the_requests_fault_is_not_swallowed() -> None:
    def serve(request: int) -> str:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        serve_each([1], serve, lambda request, message: message, "vocoder")


def test_the_instance_model_comes_from_the_initialize_args(micro_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHOX_TRITON_DEVICE", "cpu")
    config = json.dumps({"parameters": {"model_dir": {"string_value": str(micro_model_dir)}}})
    model = load_instance_model({"model_config": config, "model_name": "vocoder"})
    assert model.config == load_hosted_model({"model_dir": str(micro_model_dir)}).config
