"""KServe v2 HTTP routes: parse (serve/kserve.py), call the pipeline, render.

`ingress` is the replica's Ingress instance (serve/asgi.current_ingress).
"""

# No `from __future__ import annotations`: FastAPI must see real classes in route signatures.
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from deployments.errors import InvalidInput, Unavailable
from serve import kserve, metadata
from serve.asgi import current_ingress, read_body

router = APIRouter()
Ingress = Any  # serve/ingress.Ingress; not imported here, it imports this module


@router.get("/v2")
async def server_metadata(ingress: Ingress = Depends(current_ingress)) -> dict:
    return metadata.server_metadata()


@router.get("/v2/health/live")
async def live(ingress: Ingress = Depends(current_ingress)) -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(ingress: Ingress = Depends(current_ingress)) -> Response:
    if not await ingress.pipeline.ready():
        raise Unavailable("model stages are not ready")
    return Response(status_code=200)


@router.get("/v2/models/{model_name}")
@router.get("/v2/models/{model_name}/versions/{version}")
async def model_metadata(model_name: str, version: str = "", ingress: Ingress = Depends(current_ingress)) -> dict:
    ingress.check_model(model_name, version)
    return metadata.model_metadata(ingress.config)


@router.get("/v2/models/{model_name}/ready")
@router.get("/v2/models/{model_name}/versions/{version}/ready")
async def model_ready(model_name: str, version: str = "", ingress: Ingress = Depends(current_ingress)) -> Response:
    ingress.check_model(model_name, version)
    return await ready(ingress)


@router.get("/v2/models/{model_name}/config")
@router.get("/v2/models/{model_name}/versions/{version}/config")
async def model_config(model_name: str, version: str = "", ingress: Ingress = Depends(current_ingress)) -> dict:
    ingress.check_model(model_name, version)
    return metadata.model_config(ingress.config)


@router.post("/v2/models/{model_name}/infer")
@router.post("/v2/models/{model_name}/versions/{version}/infer")
async def infer(
    model_name: str, request: Request, version: str = "", ingress: Ingress = Depends(current_ingress)
) -> Response:
    ingress.check_model(model_name, version)
    body = await read_body(request, ingress.server.max_request_bytes)
    header_length = request.headers.get("inference-header-content-length")
    if header_length is not None and not header_length.isdigit():
        raise InvalidInput("Inference-Header-Content-Length must be an integer")
    infer = kserve.decode_infer_request(body, int(header_length) if header_length else None)
    requests = kserve.to_generate_requests(
        infer, ingress.server.image_limits(), ingress.server.max_images_per_request, ingress.server.default_params()
    )
    results = await ingress.pipeline.generate_all(requests)
    content, headers = kserve.encode_infer_response(ingress.server.model_name, infer, results)
    return Response(content=content, headers=headers)
