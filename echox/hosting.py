"""Loading a model inside a model server (the Triton Python-backend models in deploy/triton):
which folder, which device, how many threads, reading request inputs through DLPack, and serving
a batch of requests where a bad one is refused alone. Server-agnostic: it imports no server
library; the server's own functions (tensor lookup, error responses) are passed in."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.dlpack import from_dlpack

from echox.checkpoint import EchoX
from echox.errors import EchoXError
from echox.paths import resolve_model_dir

Request = TypeVar("Request")
Response = TypeVar("Response")
# What a bad request raises: its client is told why and the instance goes on serving.
REQUEST_ERRORS = (EchoXError, ValueError, RuntimeError)


class DLPackTensor(Protocol):
    def to_dlpack(self) -> Any: ...


def model_parameters(model_config_json: str) -> dict[str, str]:
    """The string parameters of a Triton model config (config.pbtxt `parameters`)."""
    params = json.loads(model_config_json).get("parameters", {})
    return {key: str(value.get("string_value", "")) for key, value in params.items() if isinstance(value, dict)}


def load_hosted_model(params: dict[str, str]) -> EchoX:
    """The model a server instance serves.

    Folder: the `model_dir` parameter when not empty, else ECHOX_MODEL_DIR, else the committed
    default model. Device: the GPU when there is one (the instance group can stay KIND_CPU, so one
    config serves CPU and GPU deployments), unless ECHOX_TRITON_DEVICE=cpu. `torch_threads` > 0
    caps torch's threads: the server process runs this one instance.
    """
    folder = params.get("model_dir") or os.environ.get("ECHOX_MODEL_DIR") or None
    threads = int(params.get("torch_threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    use_gpu = torch.cuda.is_available() and os.environ.get("ECHOX_TRITON_DEVICE", "auto") != "cpu"
    return EchoX.from_pretrained(resolve_model_dir(folder), device="cuda" if use_gpu else "cpu")


def load_instance_model(args: Mapping[str, Any]) -> EchoX:
    """The model of a Python-backend instance, from the `args` its `initialize` gets."""
    return load_hosted_model(model_parameters(args["model_config"]))


def read_input(
    get_tensor: Callable[[Any, str], DLPackTensor | None], request: Any, name: str
) -> npt.NDArray[Any] | None:
    """Input `name` of `request` as numpy, None when the request has none; `get_tensor` is the
    server's lookup (Triton: `pb_utils.get_input_tensor_by_name`)."""
    tensor = get_tensor(request, name)
    return None if tensor is None else dlpack_to_numpy(tensor)


class PythonBackendIO:
    """Request inputs and error responses of a Triton Python-backend model, through the
    `triton_python_backend_utils` module the model passes in (this library imports no server
    library). Attributes are looked up at call time, so a stand-in module serves tests."""

    def __init__(self, backend_utils: Any) -> None:
        self.utils = backend_utils

    def read_input(self, request: Any, name: str) -> npt.NDArray[Any] | None:
        """Input `name` of a request as numpy, None when the request has none."""
        return read_input(self.utils.get_input_tensor_by_name, request, name)

    def error_response(self, message: str) -> Any:
        """The response that tells a client why its request was not served."""
        return self.utils.InferenceResponse(error=self.utils.TritonError(message))

    def refuse(self, request: Any, message: str) -> Any:
        """`serve_each`'s refusal for a unary model: the error response."""
        return self.error_response(message)


def serve_each(
    requests: Iterable[Request],
    serve: Callable[[Request], Response],
    refuse: Callable[[Request, str], Response],
    model: str,
) -> list[Response]:
    """`serve` for each request of a batch, in order; a request it rejects (REQUEST_ERRORS) gets
    `refuse(request, "<model>: <why>")` instead, and the others are served all the same."""
    responses = []
    for request in requests:
        try:
            responses.append(serve(request))
        except REQUEST_ERRORS as exc:
            responses.append(refuse(request, f"{model}: {exc}"))
    return responses


def dlpack_to_numpy(tensor: DLPackTensor) -> npt.NDArray[Any]:
    """A server tensor as numpy, through DLPack (under numpy 2 the Triton stub's own `as_numpy()`
    returns arrays whose every element reads as the first one)."""
    return np.asarray(from_dlpack(tensor.to_dlpack()).cpu().numpy())
