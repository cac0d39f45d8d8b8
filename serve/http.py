"""KServe v2 HTTP routes: parse (deployments/kserve.py, serve/retrieval.py), call the front door, render.

`door` is the replica's FrontDoor (serve/frontdoor.py, through serve/asgi.front_door).
"""

# No `from __future__ import annotations`: FastAPI must see real classes in route signatures.
import json

from blip2_serve.clients.contract import MODEL_VERSION, TEXT
from blip2_serve.deployments import kserve
from blip2_serve.deployments.errors import InvalidInput, Unavailable, Unimplemented, status_of
from blip2_serve.serve import metadata, retrieval, schemas
from blip2_serve.serve.asgi import front_door, primed, read_body
from blip2_serve.serve.deadline import Deadline, deadline_s, within
from blip2_serve.serve.frontdoor import FrontDoor
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

router = APIRouter()
# The request bodies in the OpenAPI document; the routes read raw bodies (the binary extension included)
INFER_BODY = schemas.body(schemas.InferRequestBody, binary=True)
GENERATE_BODY = schemas.body(schemas.GenerateBody)


@router.get("/v2")
async def server_metadata(door: FrontDoor = Depends(front_door)) -> dict:
    return metadata.server_metadata()


@router.get("/v2/health/live")
async def live(door: FrontDoor = Depends(front_door)) -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(door: FrontDoor = Depends(front_door)) -> Response:
    pending = await door.not_ready()
    if pending:
        raise Unavailable(_not_ready_message(pending))
    return Response(status_code=200)


def _not_ready_message(pending: list[str]) -> str:
    if pending == ["draining"]:
        return "the server is shutting down"
    return f"not ready: no replica of the {', '.join(pending)} stage(s) answers yet"


@router.post("/v2/repository/index")
async def repository_index(door: FrontDoor = Depends(front_door)) -> list[dict[str, str]]:
    """Triton's repository index: every model served here, READY or UNAVAILABLE with the stages it waits for."""
    return await door.repository_index()


@router.get("/v2/models/stats")
@router.get("/v2/models/{model_name}/stats")
@router.get("/v2/models/{model_name}/versions/{version}/stats")
async def model_statistics(model_name: str = "", version: str = "", door: FrontDoor = Depends(front_door)) -> dict:
    """Triton's statistics extension: every model (and stage) served here, or the one named."""
    return await door.statistics(model_name, version)


@router.post("/v2/repository/models/{model_name}/load")
@router.post("/v2/repository/models/{model_name}/unload")
@router.get("/v2/systemsharedmemory/status")
@router.get("/v2/cudasharedmemory/status")
@router.get("/v2/trace/setting")
@router.get("/v2/logging")
async def unimplemented(request: Request, model_name: str = "", version: str = "") -> Response:
    """Triton extensions this server does not offer: a KServe-shaped 400 that tritonclient decodes."""
    raise Unimplemented.of(f"{request.method} {request.url.path}")


@router.get("/v2/models/{model_name}")
@router.get("/v2/models/{model_name}/versions/{version}")
async def model_metadata(model_name: str, version: str = "", door: FrontDoor = Depends(front_door)) -> dict:
    return door.model_metadata(model_name, version)


@router.get("/v2/models/{model_name}/ready")
@router.get("/v2/models/{model_name}/versions/{version}/ready")
async def model_ready(model_name: str, version: str = "", door: FrontDoor = Depends(front_door)) -> Response:
    door.check_model(model_name, version)
    pending = await door.not_ready(model_name)
    if pending:
        raise Unavailable(_not_ready_message(pending))
    return Response(status_code=200)


@router.get("/v2/models/{model_name}/config")
@router.get("/v2/models/{model_name}/versions/{version}/config")
async def model_config(model_name: str, version: str = "", door: FrontDoor = Depends(front_door)) -> dict:
    return door.model_config(model_name, version)


@router.post("/v2/models/{model_name}/infer", openapi_extra=INFER_BODY)
@router.post("/v2/models/{model_name}/versions/{version}/infer", openapi_extra=INFER_BODY)
async def infer(
    model_name: str, request: Request, version: str = "", door: FrontDoor = Depends(front_door)
) -> Response:
    door.check_model(model_name, version)
    if door.serves_retrieval(model_name):
        return await _retrieval_infer(model_name, request, door)
    server = door.server
    with door.counted() as counted:
        body = await read_body(request, server.max_request_bytes)
        infer = kserve.decode_infer_request(body, _header_length(request))
        requests = kserve.to_generate_requests(
            infer, server.image_limits(), server.max_images_per_request, server.default_params()
        )
        counted["rows"] = len(requests)
        results = await within(deadline_s(infer.parameters, request.headers), door.generate_many(requests))
    content, headers = kserve.encode_infer_response(server.model_name, infer, results)
    return Response(content=content, headers=headers)


def _header_length(request: Request) -> int | None:
    header_length = request.headers.get("inference-header-content-length")
    if header_length is not None and not header_length.isdigit():
        raise InvalidInput("Inference-Header-Content-Length must be an integer")
    return int(header_length) if header_length else None


async def _retrieval_infer(model_name: str, request: Request, door: FrontDoor) -> Response:
    server = door.server
    body = await read_body(request, server.max_request_bytes)
    inputs, outputs = retrieval.names(model_name)
    infer = kserve.decode_infer_request(body, _header_length(request), inputs, outputs)
    with door.counted(model_name) as counted:
        retrieve = retrieval.to_retrieval_request(
            model_name, infer, server.image_limits(), server.max_images_per_request
        )
        counted["rows"] = retrieve.rows
        result = await within(deadline_s(infer.parameters, request.headers), door.retrieve(retrieve))
    content, headers = kserve.encode_fp32_response(model_name, infer, result)
    return Response(content=content, headers=headers)


async def _generate_request(request: Request, door: FrontDoor):
    if door.serves_retrieval(request.path_params.get("model_name", "")):
        raise InvalidInput("the retrieval models answer the infer route, not generate")
    server = door.server
    body = await read_body(request, server.max_request_bytes)
    infer = kserve.decode_generate_request(body)
    (generate,) = kserve.to_generate_requests(infer, server.image_limits(), 1, server.default_params())
    return infer, generate


def _generate_response(door: FrontDoor, infer: kserve.InferRequest, text: str, **extra) -> dict:
    body = {"model_name": door.server.model_name, "model_version": MODEL_VERSION, TEXT.name: text, **extra}
    if infer.id:
        body["id"] = infer.id
    return body


@router.post("/v2/models/{model_name}/generate", openapi_extra=GENERATE_BODY)
@router.post("/v2/models/{model_name}/versions/{version}/generate", openapi_extra=GENERATE_BODY)
@router.post("/v2/models/{model_name}/generate_stream", openapi_extra=GENERATE_BODY)
@router.post("/v2/models/{model_name}/versions/{version}/generate_stream", openapi_extra=GENERATE_BODY)
async def generate(
    model_name: str, request: Request, version: str = "", door: FrontDoor = Depends(front_door)
) -> Response:
    """Triton's generate extension: one image (base64) and an optional prompt in, the text out; `generate_stream`
    answers with server-sent events, each carrying the text added since the last, the last one finish_reason."""
    door.check_model(model_name, version)
    with door.counted():
        infer, generate_request = await _generate_request(request, door)
        deadline = Deadline(deadline_s(infer.parameters, request.headers))
        if not request.url.path.endswith("_stream"):
            result = await deadline.run(door.generate(generate_request))
            return JSONResponse(_generate_response(door, infer, result.text, finish_reason=result.finish_reason))
        stream = deadline.stream(await deadline.run(primed(door.stream(generate_request))))

    async def events():
        try:
            async for chunk in stream:
                extra = {"finish_reason": chunk.finish_reason} if chunk.finish_reason else {}
                if chunk.text or extra:
                    yield f"data: {json.dumps(_generate_response(door, infer, chunk.text, **extra))}\n\n"
        except Exception as exc:  # after the 200: Triton reports errors as an event
            yield f"data: {json.dumps({'error': status_of(exc)[2]})}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


@router.get("/metrics")
async def metrics(door: FrontDoor = Depends(front_door)) -> Response:
    """Prometheus text: Triton-named per-model series for blip2, blip2_vision and blip2_llm (this node's replicas)."""
    text, content_type = await door.metrics_text()
    return Response(content=text, headers={"content-type": content_type})
