"""KServe v2 / Open Inference Protocol: inference requests and responses <-> internal types.

Handles JSON tensors and the binary tensor data extension (what stock `tritonclient.http` sends by default:
a JSON header of `Inference-Header-Content-Length` bytes, then raw tensors; a BYTES element is a
little-endian uint32 length followed by that many bytes). The gRPC servicer builds the same InferRequest.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

from blip2_serve.clients.contract import (
    BYTES,
    IMAGE,
    INPUTS,
    MODEL_VERSION,
    OUTPUTS,
    PROMPT,
    RETRIEVAL_OUTPUTS,
    TEXT,
    TRANSPORT_PARAMETERS,
)
from blip2_serve.deployments import jsonbody
from blip2_serve.deployments.errors import InvalidInput
from blip2_serve.deployments.images import ImageLimits, check_image
from blip2_serve.deployments.types import GenerateRequest, GenerateResult, GenerationParams

_INPUT_NAMES = {spec.name for spec in INPUTS}
_OUTPUT_NAMES = {spec.name for spec in OUTPUTS}


@dataclass(frozen=True)
class InputTensor:
    """One decoded BYTES input: its shape as sent and its elements in row-major order."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    elements: tuple[bytes, ...]


@dataclass(frozen=True)
class InferRequest:
    """A decoded v2 inference request, transport-neutral."""

    id: str
    parameters: dict[str, Any]
    inputs: dict[str, InputTensor]
    requested_outputs: dict[str, bool] = field(default_factory=dict)  # name -> binary; empty: all outputs
    binary_output: bool = False  # for outputs not named in requested_outputs


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise InvalidInput(f"input {name!r}: shape must be a list of non-negative integers, not {raw!r}")
    return tuple(raw)


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [leaf for item in data for leaf in _flatten(item)]
    return [data]


def split_bytes_tensor(raw: bytes, name: str) -> list[bytes]:
    """Elements of a serialized BYTES tensor: repeated (uint32 little-endian length, bytes)."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: binary BYTES data ends inside an element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"input {name!r}: binary BYTES element of {length} bytes runs past the data")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def _json_elements(name: str, data: Any) -> list[bytes]:
    """JSON BYTES elements: UTF-8 strings; IMAGE elements are base64 of the image file."""
    elements = []
    for item in _flatten(data):
        if not isinstance(item, str):
            raise InvalidInput(f"input {name!r}: BYTES elements in JSON must be strings, not {type(item).__name__}")
        if name == IMAGE.name:
            try:
                elements.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise InvalidInput("input 'IMAGE': JSON data must be base64 of the image file") from None
        else:
            elements.append(item.encode("utf-8"))
    return elements


def decode_infer_request(
    body: bytes,
    header_length: int | None,
    input_names: frozenset[str] | set[str] = _INPUT_NAMES,
    output_names: frozenset[str] | set[str] = _OUTPUT_NAMES,
) -> InferRequest:
    """Parse a v2 HTTP inference body, JSON-only or JSON header + binary tensors (for the model whose tensors
    are `input_names` and `output_names`; blip2's by default)."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise InvalidInput(f"Inference-Header-Content-Length {header_length} does not fit a {len(body)}-byte body")
    header = jsonbody.loads_object(body[:header_length] if header_length else body, "inference request")
    binary, offset = (body[header_length:] if header_length else b""), 0

    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("inference request needs a non-empty 'inputs' list")
    inputs: dict[str, InputTensor] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidInput("each input must be an object with a 'name'")
        name = raw["name"]
        if name not in input_names:
            raise InvalidInput(f"unknown input {name!r}; this model takes {sorted(input_names)}")
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears twice")
        shape = _shape(raw.get("shape"), name)
        datatype = raw.get("datatype")
        params = raw.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input {name!r}: binary_data_size {size!r} does not fit the binary data")
            elements = split_bytes_tensor(binary[offset : offset + size], name) if datatype == BYTES else []
            offset += size
        elif "data" in raw:
            elements = _json_elements(name, raw["data"]) if datatype == BYTES else []
        else:
            raise InvalidInput(f"input {name!r} has neither 'data' nor binary_data_size")
        inputs[name] = InputTensor(name, str(datatype), shape, tuple(elements))
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")

    requested: dict[str, bool] = {}
    for raw in header.get("outputs") or []:
        if not isinstance(raw, dict) or raw.get("name") not in output_names:
            raise InvalidInput(f"unknown output {raw!r}; this model gives {sorted(output_names)}")
        params = raw.get("parameters") or {}
        requested[raw["name"]] = bool(params.get("binary_data", False))
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    request_id = header.get("id", "")
    return InferRequest(
        id=request_id if isinstance(request_id, str) else str(request_id),
        parameters=parameters,
        inputs=inputs,
        requested_outputs=requested,
        binary_output=bool(parameters.get("binary_data_output", False)),
    )


def decode_generate_request(body: bytes) -> InferRequest:
    """Triton's generate extension body: {"IMAGE": base64, "PROMPT": text, "parameters": {...}, "id": ...}."""
    header = jsonbody.loads_object(body, "generate request")
    unknown = set(header) - _INPUT_NAMES - {"id", "parameters"}
    if unknown:
        raise InvalidInput(f"unknown fields {sorted(unknown)}; a generate request has IMAGE, PROMPT, parameters, id")
    inputs = {}
    for name in _INPUT_NAMES & set(header):
        if not isinstance(header[name], str):
            raise InvalidInput(f"{name} must be a string (IMAGE: base64 of the image file)")
        elements = _json_elements(name, [header[name]])
        inputs[name] = InputTensor(name, BYTES, (1,), tuple(elements))
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    request_id = header.get("id", "")
    return InferRequest(id=str(request_id), parameters=parameters, inputs=inputs)


def _rows(tensor: InputTensor, expected_type: str) -> int:
    """Batch size of an [N] or [N, 1] BYTES tensor whose element count matches its shape."""
    if tensor.datatype != expected_type:
        raise InvalidInput(f"input {tensor.name!r} must have datatype {expected_type}, not {tensor.datatype}")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise InvalidInput(f"input {tensor.name!r} must have shape [N] or [N, 1], not {list(tensor.shape)}")
    if math.prod(tensor.shape) != len(tensor.elements):
        raise InvalidInput(
            f"input {tensor.name!r}: shape {list(tensor.shape)} needs {math.prod(tensor.shape)} elements, "
            f"got {len(tensor.elements)}"
        )
    return tensor.shape[0]


def to_generate_requests(
    infer: InferRequest, limits: ImageLimits, max_images: int, defaults: GenerationParams
) -> list[GenerateRequest]:
    """One GenerateRequest per row. IMAGE and PROMPT have N rows each, or one of them has one row for all:
    one image with N questions, or N images with one prompt."""
    if IMAGE.name not in infer.inputs:
        raise InvalidInput("input 'IMAGE' is required")
    images = infer.inputs[IMAGE.name]
    image_rows = _rows(images, IMAGE.datatype)
    texts = [""]
    if PROMPT.name in infer.inputs:
        tensor = infer.inputs[PROMPT.name]
        _rows(tensor, PROMPT.datatype)
        try:
            texts = [element.decode("utf-8") for element in tensor.elements]
        except UnicodeDecodeError:
            raise InvalidInput("PROMPT must be UTF-8 text") from None
    rows = max(image_rows, len(texts))
    if not 1 <= rows <= max_images:
        raise InvalidInput(f"batch size (rows of IMAGE or PROMPT) must be 1..{max_images}, not {rows}")
    if image_rows not in (1, rows) or len(texts) not in (1, rows):
        raise InvalidInput(f"IMAGE has {image_rows} rows and PROMPT {len(texts)}: they must be equal, or one of them 1")
    generation = {
        k: v for k, v in infer.parameters.items() if k not in TRANSPORT_PARAMETERS and not k.startswith("triton_")
    }
    params = GenerationParams.from_mapping(generation, base=defaults)
    request_id = infer.id or uuid.uuid4().hex
    checked = [check_image(data, limits) for data in images.elements]
    return [
        GenerateRequest(f"{request_id}/{row}", checked[row % image_rows], texts[row % len(texts)], params)
        for row in range(rows)
    ]


def serialize_bytes(elements: list[bytes]) -> bytes:
    """A BYTES tensor in the binary form both transports use: (uint32 little-endian length, bytes) each."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def output_shape(infer: InferRequest, rows: int) -> list[int]:
    """TEXT has one row per result, with IMAGE's rank ([N] or [N, 1])."""
    return [rows, *infer.inputs[IMAGE.name].shape[1:]]


def encode_infer_response(
    model_name: str, infer: InferRequest, results: list[GenerateResult]
) -> tuple[bytes, dict[str, str]]:
    """The v2 response body and headers; TEXT is binary when the request asked for binary outputs."""
    texts = [result.text.encode("utf-8") for result in results]
    output: dict[str, Any] = {"name": TEXT.name, "datatype": TEXT.datatype, "shape": output_shape(infer, len(texts))}
    binary = infer.requested_outputs.get(TEXT.name, infer.binary_output)
    payload = b""
    if binary:
        payload = serialize_bytes(texts)
        output["parameters"] = {"binary_data_size": len(payload)}
    else:
        output["data"] = [text.decode("utf-8") for text in texts]
    response: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION, "outputs": [output]}
    if infer.id:
        response["id"] = infer.id
    header = json.dumps(response).encode("utf-8")
    if not binary:
        return header, {"content-type": "application/json"}
    return header + payload, {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def bytes_rows(tensor: InputTensor) -> int:
    """Rows of an [N] or [N, 1] BYTES input (checked against its elements)."""
    return _rows(tensor, BYTES)


def encode_fp32_response(model_name: str, infer: InferRequest, outputs: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A v2 response of a retrieval model's outputs (FP32 numpy arrays, RETRIEVAL_OUTPUTS): JSON data, or raw
    little-endian bytes where asked."""
    import numpy as np

    rendered, payloads = [], []
    for name, array in outputs.items():
        array = np.ascontiguousarray(array, dtype="<f4")
        output: dict[str, Any] = {
            "name": name,
            "datatype": RETRIEVAL_OUTPUTS[name].datatype,
            "shape": list(array.shape),
        }
        if infer.requested_outputs.get(name, infer.binary_output):
            payload = array.tobytes()
            output["parameters"] = {"binary_data_size": len(payload)}
            payloads.append(payload)
        else:
            output["data"] = array.reshape(-1).tolist()
        rendered.append(output)
    response: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION, "outputs": rendered}
    if infer.id:
        response["id"] = infer.id
    header = json.dumps(response).encode("utf-8")
    if not payloads:
        return header, {"content-type": "application/json"}
    return header + b"".join(payloads), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
