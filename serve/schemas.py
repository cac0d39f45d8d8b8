"""Request bodies as the OpenAPI document (`/openapi.json`, `/docs`) shows them: a pydantic model per JSON route.

The routes still read the raw body with the bounded parsers (deployments/jsonbody.py, deployments/kserve.py,
serve/openai_codec.py), which refuse with a 400 what these models call invalid and also take KServe's binary tensor
extension (`application/octet-stream`, declared beside the JSON body here). The models document the routes and let
schema-driven tools generate real bodies (schemathesis in tests/test_fuzz.py). Generation parameters come from the
one table of them, clients.contract.GENERATION_PARAMETERS.
"""

from __future__ import annotations

from typing import Any, Literal

from blip2_serve.clients.contract import BYTES, EMBED_TEXT_MODEL, GENERATION_PARAMETERS, IMAGE, PROMPT, TEXT, ParamSpec
from pydantic import BaseModel, ConfigDict, Field, create_model


def _parameter_field(spec: ParamSpec) -> tuple[Any, Any]:
    bounds: dict[str, float] = {}
    if spec.kind is str:  # stop: its length is bounded
        bounds = {"min_length": int(spec.minimum or 0), "max_length": int(spec.maximum or 0)}
    elif spec.kind is not bool:
        if spec.minimum is not None:
            bounds["gt" if spec.exclusive_min else "ge"] = spec.minimum
        if spec.maximum is not None:
            bounds["le"] = spec.maximum
    return spec.kind | None, Field(None, **bounds)


GenerationParameters = create_model(
    "GenerationParameters",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Generation parameters of a KServe v2 infer or generate request; unknown names are refused.",
    timeout=(
        int | None,
        Field(None, ge=1, description="deadline in microseconds (what tritonclient's timeout= sends)"),
    ),
    binary_data_output=(bool | None, Field(None, description="outputs as binary tensors (KServe's extension)")),
    **{spec.name: _parameter_field(spec) for spec in GENERATION_PARAMETERS},
)


class InferInputTensor(BaseModel):
    """One input tensor: IMAGE (base64 of the encoded image file, BYTES) and PROMPT (text, BYTES), rows x 1."""

    name: Literal[IMAGE.name, PROMPT.name, TEXT.name]  # type: ignore[valid-type]  (the contract's names)
    shape: list[int] = Field(min_length=1, max_length=2)
    datatype: Literal[BYTES]  # type: ignore[valid-type]
    data: list[str] | None = None
    parameters: dict[str, Any] | None = None  # binary_data_size: where the binary extension carries the data


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None  # binary_data: this output as a binary tensor


class InferRequestBody(BaseModel):
    """KServe v2 inference request (JSON), as tritonclient sends it."""

    id: str | None = None
    inputs: list[InferInputTensor] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = None
    parameters: GenerationParameters | None = None  # type: ignore[valid-type]


class GenerateBody(BaseModel):
    """Triton's generate extension: one image and an optional prompt."""

    model_config = ConfigDict(extra="forbid")

    IMAGE: str = Field(description="the encoded image file, base64")
    PROMPT: str | None = None
    parameters: GenerationParameters | None = None  # type: ignore[valid-type]
    id: str | None = None


class EmbeddingsBody(BaseModel):
    """OpenAI's embeddings request, for text (images embed through blip2_embed_image on the infer route)."""

    model: Literal[EMBED_TEXT_MODEL]  # type: ignore[valid-type]
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"


def _inlined(schema: dict) -> dict:
    """`model_json_schema()` with its `$defs` references replaced by the definitions (OpenAPI has no `$defs`)."""
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            reference = node.get("$ref", "")
            if reference.startswith("#/$defs/"):
                return inline(definitions[reference.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


def body(model: type[BaseModel], binary: bool = False) -> dict[str, Any]:
    """A route's `openapi_extra`: `model` as its JSON request body (and the binary tensor extension if `binary`)."""
    content: dict[str, Any] = {"application/json": {"schema": _inlined(model.model_json_schema())}}
    if binary:
        content["application/octet-stream"] = {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": "KServe's binary tensor extension: the JSON request, then the tensors' bytes; the "
                "Inference-Header-Content-Length header gives the JSON's length",
            }
        }
    return {"requestBody": {"required": True, "content": content}}
