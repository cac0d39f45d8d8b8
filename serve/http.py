"""The HTTP ingress: KServe v2 routes on a FastAPI app served by a Ray Serve deployment.

Routes parse (serve/kserve.py), call the pipeline (deployments/ingress.py) and render; errors are raised and
turned into responses by one handler that reads deployments/errors.status_of.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in route signatures.
import logging
import zlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from clients.contract import MODEL_VERSION
from deployments.errors import Blip2ServeError, InvalidInput, ModelNotFound, PayloadTooLarge, Unavailable, status_of
from deployments.ingress import Blip2Pipeline
from deployments.types import GenerateRequest, GenerateResult
from serve import kserve, metadata
from serve.config import AppConfig

logger = logging.getLogger(__name__)

app = FastAPI(title="blip2-serve", docs_url=None, redoc_url=None)


async def _error_response(request: Request, exc: Exception) -> Response:
    status, _, message = status_of(exc)
    if status >= 500 and not isinstance(exc, Blip2ServeError):
        logger.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": message}, status_code=status)


async def _validation_response(request: Request, exc: RequestValidationError) -> Response:
    return JSONResponse({"error": f"invalid request: {exc.errors()}"}, status_code=400)


app.add_exception_handler(Blip2ServeError, _error_response)
app.add_exception_handler(RequestValidationError, _validation_response)
app.add_exception_handler(Exception, _error_response)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed (gzip/deflate) where the client compressed it, at most `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("", "identity"):
        return bytes(body)
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(bytes(body), limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding}: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body is over the limit of {limit} bytes")
    return data


@serve.deployment(name="Ingress")
@serve.ingress(app)
class HttpIngress:
    """The public edge of one BLIP-2 application; holds the handles of the two model stages."""

    def __init__(self, vision: DeploymentHandle, llm: DeploymentHandle, config: AppConfig):
        self._pipeline = Blip2Pipeline(vision, llm)
        self._config = config
        self._server = config.server

    # Python callers (other Serve apps, tests) use these through a DeploymentHandle, with no HTTP in between.
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await self._pipeline.generate(request)

    async def generate_all(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        return await self._pipeline.generate_all(requests)

    async def stats(self) -> dict:
        return await self._pipeline.stats()

    def _check_model(self, model_name: str, version: str = "") -> None:
        if model_name != self._server.model_name:
            raise ModelNotFound(f"Request for unknown model: '{model_name}' is not found")
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(f"Request for unknown model: '{model_name}' version {version} is not found")

    @app.get("/v2")
    async def server_metadata(self) -> dict:
        return metadata.server_metadata()

    @app.get("/v2/health/live")
    async def live(self) -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready(self) -> Response:
        if not await self._pipeline.ready():
            raise Unavailable("model stages are not ready")
        return Response(status_code=200)

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{version}")
    async def model_metadata(self, model_name: str, version: str = "") -> dict:
        self._check_model(model_name, version)
        return metadata.model_metadata(self._config)

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{version}/ready")
    async def model_ready(self, model_name: str, version: str = "") -> Response:
        self._check_model(model_name, version)
        return await self.ready()

    @app.get("/v2/models/{model_name}/config")
    @app.get("/v2/models/{model_name}/versions/{version}/config")
    async def model_config(self, model_name: str, version: str = "") -> dict:
        self._check_model(model_name, version)
        return metadata.model_config(self._config)

    @app.post("/v2/models/{model_name}/infer")
    @app.post("/v2/models/{model_name}/versions/{version}/infer")
    async def infer(self, model_name: str, request: Request, version: str = "") -> Response:
        self._check_model(model_name, version)
        body = await read_body(request, self._server.max_request_bytes)
        header_length = request.headers.get("inference-header-content-length")
        if header_length is not None and not header_length.isdigit():
            raise InvalidInput("Inference-Header-Content-Length must be an integer")
        infer = kserve.decode_infer_request(body, int(header_length) if header_length else None)
        requests = kserve.to_generate_requests(
            infer, self._server.image_limits(), self._server.max_images_per_request, self._server.default_params()
        )
        results = await self._pipeline.generate_all(requests)
        content, headers = kserve.encode_infer_response(self._server.model_name, infer, results)
        return Response(content=content, headers=headers)

