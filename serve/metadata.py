"""Server and model metadata, and the Triton-style model configuration, all derived from clients.contract."""

from __future__ import annotations

from typing import Any

from blip2_serve.clients.contract import INPUTS, MODEL_VERSION, OUTPUTS, SERVER_NAME, TensorSpec
from blip2_serve.serve import __version__
from blip2_serve.serve.config import AppConfig

EXTENSIONS = ("binary_tensor_data", "parameters", "model_configuration")


def server_metadata() -> dict[str, Any]:
    """`GET /v2`."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def _metadata_tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.dims]}


def model_metadata(config: AppConfig) -> dict[str, Any]:
    """`GET /v2/models/{name}`: tensor shapes include the batch dimension (-1)."""
    return {
        "name": config.server.model_name,
        "versions": [MODEL_VERSION],
        "platform": SERVER_NAME,
        "inputs": [_metadata_tensor(spec) for spec in INPUTS],
        "outputs": [_metadata_tensor(spec) for spec in OUTPUTS],
    }


def _config_tensor(spec: TensorSpec) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": spec.name, "data_type": spec.triton_type, "dims": list(spec.dims)}
    if spec.optional:
        tensor["optional"] = True
    return tensor


def model_config(config: AppConfig) -> dict[str, Any]:
    """`GET /v2/models/{name}/config`: a Triton ModelConfig in its JSON form."""
    return {
        "name": config.server.model_name,
        "platform": SERVER_NAME,
        "backend": "ray_serve",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": config.server.max_images_per_request,
        "input": [_config_tensor(spec) for spec in INPUTS],
        "output": [_config_tensor(spec) for spec in OUTPUTS],
        "dynamic_batching": {
            "preferred_batch_size": [config.llm.batch.max_batch_size],
            "max_queue_delay_microseconds": int(config.llm.batch.wait_timeout_s * 1e6),
        },
        "parameters": {
            "checkpoint": {"string_value": config.model.checkpoint},
            "dtype": {"string_value": config.model.dtype},
            "quantization": {"string_value": config.model.quantization},
        },
    }
