"""Server and model metadata, the Triton-style model configuration and statistics of every model served, each
rendered once from clients.contract's tensor specs."""

from __future__ import annotations

from typing import Any

from blip2_serve.clients.contract import INPUTS, MODEL_VERSION, OUTPUTS, RETRIEVAL_MODELS, SERVER_NAME, TensorSpec
from blip2_serve.serve import __version__
from blip2_serve.serve.config import AppConfig

EXTENSIONS = ("binary_tensor_data", "parameters", "model_configuration")


def server_metadata() -> dict[str, Any]:
    """`GET /v2`."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def _tensors(model_name: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """A served model's inputs and outputs: a retrieval model's, or the BLIP-2 model's."""
    return RETRIEVAL_MODELS.get(model_name, (INPUTS, OUTPUTS))


def model_metadata(config: AppConfig, model_name: str) -> dict[str, Any]:
    """`GET /v2/models/{name}` of a model served here: tensor shapes include the batch dimension (-1)."""
    inputs, outputs = _tensors(model_name)
    return {
        "name": model_name,
        "versions": [MODEL_VERSION],
        "platform": SERVER_NAME,
        "inputs": [spec.metadata() for spec in inputs],
        "outputs": [spec.metadata() for spec in outputs],
    }


def model_config(config: AppConfig, model_name: str) -> dict[str, Any]:
    """`GET /v2/models/{name}/config` of a model served here: a Triton ModelConfig in its JSON form (the same
    message the Triton repository's config.pbtxt files print, exporters/triton_repo.py)."""
    inputs, outputs = _tensors(model_name)
    described: dict[str, Any] = {
        "name": model_name,
        "platform": SERVER_NAME,
        "backend": "ray_serve",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": config.server.max_images_per_request,
        "input": [spec.config() for spec in inputs],
        "output": [spec.config() for spec in outputs],
        "dynamic_batching": {},
    }
    if model_name in RETRIEVAL_MODELS:
        return described
    described["dynamic_batching"] = {
        "preferred_batch_size": [config.llm.batch.max_batch_size],
        "max_queue_delay_microseconds": int(config.llm.batch.wait_timeout_s * 1e6),
    }
    described["parameters"] = {
        "checkpoint": {"string_value": config.model.checkpoint},
        "dtype": {"string_value": config.model.dtype},
        "quantization": {"string_value": config.model.quantization},
    }
    return described


def _duration(count: float, microseconds: float) -> dict[str, int]:
    return {"count": int(count), "ns": int(microseconds * 1000)}


def model_statistics(totals: dict[str, dict[str, float]], names: list[str]) -> dict[str, Any]:
    """Triton's statistics extension (`GET /v2/models[/{name}]/stats`, gRPC ModelStatistics) for `names`, from the
    same counters /metrics exports (deployments/metrics.totals): cumulative counts and nanoseconds since the
    application was built. Queue and compute times are the stages' (blip2_vision, blip2_llm, blip2_retrieval; the
    LLM stage counts decode steps as executions); blip2 and the retrieval models count requests at the server."""
    stats = []
    for name in names:
        values = totals.get(name, {})
        success, failure = (
            values.get("nv_inference_request_success", 0.0),
            values.get("nv_inference_request_failure", 0.0),
        )
        failed_us = values.get("blip2_failed_request_duration_us", 0.0)
        zero = {"count": 0, "ns": 0}
        stats.append(
            {
                "name": name,
                "version": MODEL_VERSION,
                "last_inference": int(values.get("blip2_last_inference_ms", 0.0)),
                "inference_count": int(values.get("nv_inference_count", 0.0)),
                "execution_count": int(values.get("nv_inference_exec_count", 0.0)),
                "inference_stats": {
                    "success": _duration(success, values.get("nv_inference_request_duration_us", 0.0) - failed_us),
                    "fail": _duration(failure, failed_us),
                    "queue": _duration(success, values.get("nv_inference_queue_duration_us", 0.0)),
                    "compute_input": zero,
                    "compute_infer": _duration(success, values.get("nv_inference_compute_infer_duration_us", 0.0)),
                    "compute_output": zero,
                    "cache_hit": _duration(values.get("blip2_embedding_cache_hits", 0.0), 0.0),
                    "cache_miss": _duration(values.get("blip2_embedding_cache_misses", 0.0), 0.0),
                },
                "batch_stats": [],
            }
        )
    return {"model_stats": stats}
