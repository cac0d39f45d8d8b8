"""The retrieval models over KServe v2 (HTTP and gRPC share this): blip2_embed_image, blip2_embed_text, blip2_itm.

Requests become one Retrieval-stage call per row, sent together (the stage batches them with other requests' rows);
the outputs are FP32 arrays. Served only when the config has a `retrieval:` checkpoint.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from blip2_serve.clients.contract import (
    EMBED_IMAGE_MODEL,
    EMBED_TEXT_MODEL,
    EMBEDDING,
    IMAGE,
    ITC_SCORE,
    ITM_SCORE,
    MODEL_VERSION,
    RETRIEVAL_MODELS,
    SERVER_NAME,
    TEXT_IN,
)
from blip2_serve.deployments import kserve
from blip2_serve.deployments.errors import InvalidInput
from blip2_serve.deployments.images import check_image


def names(model: str) -> tuple[frozenset[str], frozenset[str]]:
    inputs, outputs = RETRIEVAL_MODELS[model]
    return frozenset(s.name for s in inputs), frozenset(s.name for s in outputs)


def _texts(tensor: kserve.InputTensor) -> list[str]:
    try:
        return [element.decode("utf-8") for element in tensor.elements]
    except UnicodeDecodeError:
        raise InvalidInput("TEXT must be UTF-8 text") from None


async def run(ingress: Any, model: str, infer: kserve.InferRequest) -> dict[str, np.ndarray]:
    """The model's outputs for a decoded request, counted in the model's own statistics and metrics."""
    with ingress.metrics_for(model).request() as counted:
        outputs = await _run(ingress, model, infer)
        counted["rows"] = len(next(iter(outputs.values())))
        return outputs


async def _run(ingress: Any, model: str, infer: kserve.InferRequest) -> dict[str, np.ndarray]:
    """Every row is checked before any model work."""
    inputs, _ = RETRIEVAL_MODELS[model]
    rows = set()
    for spec in inputs:
        if spec.name not in infer.inputs:
            raise InvalidInput(f"input {spec.name!r} is required")
        rows.add(kserve.bytes_rows(infer.inputs[spec.name]))
    if len(rows) != 1:
        raise InvalidInput(f"the inputs of {model} must have the same number of rows, not {sorted(rows)}")
    (count,) = rows
    if not 1 <= count <= ingress.server.max_images_per_request:
        raise InvalidInput(f"batch size must be 1..{ingress.server.max_images_per_request}, not {count}")
    stage = ingress.retrieval
    limits = ingress.server.image_limits()
    images = [check_image(d, limits) for d in infer.inputs[IMAGE.name].elements] if IMAGE in inputs else []
    texts = _texts(infer.inputs[TEXT_IN.name]) if TEXT_IN in inputs else []
    if any(not text.strip() for text in texts):
        raise InvalidInput("TEXT must be non-empty text")
    if model == EMBED_IMAGE_MODEL:
        vectors = await asyncio.gather(*(stage.embed_image.remote(image) for image in images))
        return {EMBEDDING.name: np.stack(vectors)}
    if model == EMBED_TEXT_MODEL:
        vectors = await asyncio.gather(*(stage.embed_text.remote(text) for text in texts))
        return {EMBEDDING.name: np.stack(vectors)}
    scores = await asyncio.gather(*(stage.match.remote(i, t) for i, t in zip(images, texts)))
    array = np.asarray(scores, dtype=np.float32).reshape(count, 2)
    return {ITM_SCORE.name: array[:, :1], ITC_SCORE.name: array[:, 1:]}


def model_metadata(model: str, dimension: int | None = None) -> dict[str, Any]:
    inputs, outputs = RETRIEVAL_MODELS[model]

    def tensor(spec) -> dict[str, Any]:
        dims = [dimension if d == -1 and dimension else d for d in spec.dims]
        return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *dims]}

    return {
        "name": model,
        "versions": [MODEL_VERSION],
        "platform": SERVER_NAME,
        "inputs": [tensor(s) for s in inputs],
        "outputs": [tensor(s) for s in outputs],
    }


def model_config(model: str, max_batch_size: int) -> dict[str, Any]:
    inputs, outputs = RETRIEVAL_MODELS[model]

    def tensor(spec) -> dict[str, Any]:
        return {"name": spec.name, "data_type": spec.triton_type, "dims": list(spec.dims)}

    return {
        "name": model,
        "platform": SERVER_NAME,
        "backend": "ray_serve",
        "max_batch_size": max_batch_size,
        "input": [tensor(s) for s in inputs],
        "output": [tensor(s) for s in outputs],
        "dynamic_batching": {},
    }
