"""The retrieval models' KServe v2 codec (HTTP and gRPC share it): blip2_embed_image, blip2_embed_text, blip2_itm.

A decoded infer request becomes a checked RetrievalRequest for the front door (serve/frontdoor.py), whose answer is
FP32 arrays by output name. Served only when the config has a `retrieval:` checkpoint.
"""

from __future__ import annotations

from blip2_serve.clients.contract import IMAGE, RETRIEVAL_MODELS, TEXT_IN
from blip2_serve.deployments import kserve
from blip2_serve.deployments.errors import InvalidInput
from blip2_serve.deployments.images import ImageLimits, check_image
from blip2_serve.serve.frontdoor import RetrievalRequest


def names(model: str) -> tuple[frozenset[str], frozenset[str]]:
    inputs, outputs = RETRIEVAL_MODELS[model]
    return frozenset(s.name for s in inputs), frozenset(s.name for s in outputs)


def _texts(tensor: kserve.InputTensor) -> list[str]:
    try:
        return [element.decode("utf-8") for element in tensor.elements]
    except UnicodeDecodeError:
        raise InvalidInput("TEXT must be UTF-8 text") from None


def to_retrieval_request(
    model: str, infer: kserve.InferRequest, limits: ImageLimits, max_rows: int
) -> RetrievalRequest:
    """A decoded KServe request to a retrieval model as the front door's RetrievalRequest; every row is checked
    before any model work."""
    inputs, _ = RETRIEVAL_MODELS[model]
    rows = set()
    for spec in inputs:
        if spec.name not in infer.inputs:
            raise InvalidInput(f"input {spec.name!r} is required")
        rows.add(kserve.bytes_rows(infer.inputs[spec.name]))
    if len(rows) != 1:
        raise InvalidInput(f"the inputs of {model} must have the same number of rows, not {sorted(rows)}")
    (count,) = rows
    if not 1 <= count <= max_rows:
        raise InvalidInput(f"batch size must be 1..{max_rows}, not {count}")
    images = [check_image(d, limits) for d in infer.inputs[IMAGE.name].elements] if IMAGE in inputs else []
    texts = _texts(infer.inputs[TEXT_IN.name]) if TEXT_IN in inputs else []
    if any(not text.strip() for text in texts):
        raise InvalidInput("TEXT must be non-empty text")
    return RetrievalRequest(model, images, texts)
