"""KServe v2 HTTP routes: parse (deployments/kserve.py), call the pipeline, render.

`ingress` is the replica's Ingress instance (serve/asgi.current_ingress).
"""

# No `from __future__ import annotations`: FastAPI must see real classes in route signatures.
import asyncio
import json
from typing import Any

from blip2_serve.clients.contract import MODEL_VERSION, TEXT
from blip2_serve.deployments import kserve
from blip2_serve.deployments.errors import InvalidInput, Unavailable, status_of
from blip2_serve.deployments.metrics import render as render_metrics
from blip2_serve.serve import metadata, retrieval, schemas
from blip2_serve.serve.asgi import current_ingress, primed, read_body
from blip2_serve.serve.deadline import Deadline, deadline_s, within
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

router = APIRouter()
Ingress = Any  # serve/ingress.Ingress; not imported here, it imports this module
# The request bodies in the OpenAPI document; the routes read raw bodies (the binary extension included)
INFER_BODY = schemas.body(schemas.InferRequestBody, binary=True)
GENERATE_BODY = schemas.body(schemas.GenerateBody)


@router.get("/v2")
async def server_metadata(ingress: Ingress = Depends(current_ingress)) -> dict:
    return metadata.server_metadata()


@router.get("/v2/health/live")
async def live(ingress: Ingress = Depends(current_ingress)) -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(ingress: Ingress = Depends(current_ingress)) -> Response:
    pending = await ingress.not_ready()
    if pending:
        raise Unavailable(_not_ready_message(pending))
    return Response(status_code=200)


def _not_ready_message(pending: list[str]) -> str:
    if pending == ["draining"]:
        return "the server is shutting down"
    return f"not ready: no replica of the {', '.join(pending)} stage(s) answers yet"


@router.post("/v2/repository/index")
async def repository_index(ingress: Ingress = Depends(current_ingress)) -> list[dict[str, str]]:
    """Triton's repository index: every model served here, READY or UNAVAILABLE with the stages it waits for."""
    return await ingress.repository_index()


@router.get("/v2/models/stats")
@router.get("/v2/models/{model_name}/stats")
@router.get("/v2/models/{model_name}/versions/{version}/stats")
async def model_statistics(
    model_name: str = "", version: str = "", ingress: Ingress = Depends(current_ingress)
) -> dict:
    """Triton's statistics extension: every model (and stage) served here, or the one named."""
    return await ingress.model_statistics(model_name, version)


@router.post("/v2/repository/models/{model_name}/load")
@router.post("/v2/repository/models/{model_name}/unload")
@router.get("/v2/systemsharedmemory/status")
@router.get("/v2/cudasharedmemory/status")
@router.get("/v2/trace/setting")
@router.get("/v2/logging")
async def unimplemented(request: Request, model_name: str = "", version: str = "") -> Response:
    """Triton extensions this server does not offer: a KServe-shaped 400 that tritonclient decodes."""
    from blip2_serve.deployments.errors import Unimplemented

    raise Unimplemented.of(f"{request.method} {request.url.path}")


@router.get("/v2/models/{model_name}")
@router.get("/v2/models/{model_name}/versions/{version}")
async def model_metadata(model_name: str, version: str = "", ingress: Ingress = Depends(current_ingress)) -> dict:
    ingress.check_model(model_name, version)
    if ingress.serves_retrieval(model_name):
        return retrieval.model_metadata(model_name)
    return metadata.model_metadata(ingress.config)


@router.get("/v2/models/{model_name}/ready")
@router.get("/v2/models/{model_name}/versions/{version}/ready")
async def model_ready(model_name: str, version: str = "", ingress: Ingress = Depends(current_ingress)) -> Response:
    ingress.check_model(model_name, version)
    pending = await ingress.not_ready(model_name)
    if pending:
        raise Unavailable(_not_ready_message(pending))
    return Response(status_code=200)


@router.get("/v2/models/{model_name}/config")
@router.get("/v2/models/{model_name}/versions/{version}/config")
async def model_config(model_name: str, version: str = "", ingress: Ingress = Depends(current_ingress)) -> dict:
    ingress.check_model(model_name, version)
    if ingress.serves_retrieval(model_name):
        return retrieval.model_config(model_name, ingress.server.max_images_per_request)
    return metadata.model_config(ingress.config)


@router.post("/v2/models/{model_name}/infer", openapi_extra=INFER_BODY)
@router.post("/v2/models/{model_name}/versions/{version}/infer", openapi_extra=INFER_BODY)
async def infer(
    model_name: str, request: Request, version: str = "", ingress: Ingress = Depends(current_ingress)
) -> Response:
    ingress.check_model(model_name, version)
    if ingress.serves_retrieval(model_name):
        return await _retrieval_infer(model_name, request, ingress)
    with ingress.metrics.request() as counted:
        body = await read_body(request, ingress.server.max_request_bytes)
        infer = kserve.decode_infer_request(body, _header_length(request))
        requests = kserve.to_generate_requests(
            infer, ingress.server.image_limits(), ingress.server.max_images_per_request, ingress.server.default_params()
        )
        counted["rows"] = len(requests)
        results = await within(deadline_s(infer.parameters, request.headers), ingress.pipeline.generate_all(requests))
    content, headers = kserve.encode_infer_response(ingress.server.model_name, infer, results)
    return Response(content=content, headers=headers)


def _header_length(request: Request) -> int | None:
    header_length = request.headers.get("inference-header-content-length")
    if header_length is not None and not header_length.isdigit():
        raise InvalidInput("Inference-Header-Content-Length must be an integer")
    return int(header_length) if header_length else None


async def _retrieval_infer(model_name: str, request: Request, ingress: Ingress) -> Response:
    body = await read_body(request, ingress.server.max_request_bytes)
    inputs, outputs = retrieval.names(model_name)
    infer = kserve.decode_infer_request(body, _header_length(request), inputs, outputs)
    result = await within(deadline_s(infer.parameters, request.headers), retrieval.run(ingress, model_name, infer))
    content, headers = kserve.encode_fp32_response(model_name, infer, result)
    return Response(content=content, headers=headers)


async def _generate_request(request: Request, ingress: Ingress):
    if ingress.serves_retrieval(request.path_params.get("model_name", "")):
        raise InvalidInput("the retrieval models answer the infer route, not generate")
    body = await read_body(request, ingress.server.max_request_bytes)
    server = ingress.server
    infer = kserve.decode_generate_request(body)
    (generate,) = kserve.to_generate_requests(infer, server.image_limits(), 1, server.default_params())
    return infer, generate


def _generate_response(ingress: Ingress, infer: kserve.InferRequest, text: str, **extra) -> dict:
    body = {"model_name": ingress.server.model_name, "model_version": MODEL_VERSION, TEXT.name: text, **extra}
    if infer.id:
        body["id"] = infer.id
    return body


@router.post("/v2/models/{model_name}/generate", openapi_extra=GENERATE_BODY)
@router.post("/v2/models/{model_name}/versions/{version}/generate", openapi_extra=GENERATE_BODY)
async def generate(
    model_name: str, request: Request, version: str = "", ingress: Ingress = Depends(current_ingress)
) -> Response:
    """Triton's generate extension: one image (base64) and an optional prompt in, the text out."""
    ingress.check_model(model_name, version)
    with ingress.metrics.request():
        infer, generate_request = await _generate_request(request, ingress)
        deadline = deadline_s(infer.parameters, request.headers)
        result = await within(deadline, ingress.pipeline.generate(generate_request))
    return JSONResponse(_generate_response(ingress, infer, result.text, finish_reason=result.finish_reason))


@router.post("/v2/models/{model_name}/generate_stream", openapi_extra=GENERATE_BODY)
@router.post("/v2/models/{model_name}/versions/{version}/generate_stream", openapi_extra=GENERATE_BODY)
async def generate_stream(
    model_name: str, request: Request, version: str = "", ingress: Ingress = Depends(current_ingress)
) -> Response:
    """The same, as server-sent events: each carries the text added since the last; the last, finish_reason."""
    ingress.check_model(model_name, version)
    with ingress.metrics.request():
        infer, generate_request = await _generate_request(request, ingress)
        deadline = Deadline(deadline_s(infer.parameters, request.headers))
        stream = deadline.stream(await deadline.run(primed(ingress.pipeline.stream(generate_request))))

    async def events():
        try:
            async for chunk in stream:
                extra = {"finish_reason": chunk.finish_reason} if chunk.finish_reason else {}
                if chunk.text or extra:
                    yield f"data: {json.dumps(_generate_response(ingress, infer, chunk.text, **extra))}\n\n"
        except Exception as exc:  # after the 200: Triton reports errors as an event
            yield f"data: {json.dumps({'error': status_of(exc)[2]})}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


@router.get("/metrics")
async def metrics(ingress: Ingress = Depends(current_ingress)) -> Response:
    """Prometheus text: Triton-named per-model series for blip2, blip2_vision and blip2_llm (this node's replicas)."""
    text, content_type = await asyncio.to_thread(render_metrics, ingress.metrics_directory)
    return Response(content=text, headers={"content-type": content_type})
