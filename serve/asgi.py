"""The one FastAPI app every HTTP route hangs on, its error handlers, and body reading with limits.

Errors are raised in routes and rendered here from deployments/errors.status_of: KServe v2 routes answer
`{"error": "..."}` (what tritonclient reads), OpenAI routes answer OpenAI's `{"error": {"message", "type", ...}}`.
"""

# No `from __future__ import annotations`: FastAPI must see real classes in signatures.
import logging
import zlib
from typing import AsyncIterator, TypeVar

from blip2_serve.deployments.errors import Blip2ServeError, InvalidInput, PayloadTooLarge, status_of
from blip2_serve.serve.auth import is_public_path
from blip2_serve.serve.frontdoor import FrontDoor
from blip2_serve.serve.openai_codec import openai_error
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

T = TypeVar("T")

app = FastAPI(title="blip2-serve", docs_url=None, redoc_url=None)


def _is_openai_route(request: Request) -> bool:
    return _route_path(request.scope).startswith("/v1/")


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _headers_for(status: int) -> dict[str, str]:
    if status == 503:  # retriable: say when (overload, a replica being replaced)
        door = _door_or_none()
        return {"retry-after": str(door.server.retry_after_s if door is not None else 1)}
    if status == 401:
        return {"www-authenticate": 'Bearer realm="blip2-serve"'}
    return {}


def error_response(request: Request, status: int, message: str, code: str | None = None) -> Response:
    """The error body for the route's protocol."""
    headers = _headers_for(status)
    if _is_openai_route(request):
        return JSONResponse(openai_error(status, message, code), status, headers=headers)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _on_error(request: Request, exc: Exception) -> Response:
    status, _, message = status_of(exc)
    if status >= 500 and not isinstance(exc, Blip2ServeError):
        logger.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(request, status, message, getattr(exc, "code", None))


async def _on_validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
    return error_response(request, 400, f"invalid request: {problems}")


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Starlette's own errors (no such route, wrong method) in the route's protocol's shape, which tritonclient and
    openai decode, instead of FastAPI's {"detail": ...}."""
    if exc.status_code == 404:
        message = f"no such route: {request.method} {_route_path(request.scope)}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {_route_path(request.scope)}"
    else:
        message = str(exc.detail)
    return error_response(request, exc.status_code, message)


app.add_exception_handler(Blip2ServeError, _on_error)
app.add_exception_handler(StarletteHTTPException, _on_http_error)
app.add_exception_handler(RequestValidationError, _on_validation_error)
app.add_exception_handler(Exception, _on_error)


def _replica_door() -> FrontDoor:
    from ray import serve

    return serve.get_replica_context().servable_object.door


async def front_door() -> FrontDoor:
    """The FrontDoor of the Ingress replica serving this request (a FastAPI dependency): routes are plain
    functions that receive it. Async because FastAPI runs a plain function dependency on its thread pool: a hop to
    another thread and back for every request."""
    return _replica_door()


def _door_or_none() -> FrontDoor | None:
    try:
        return _replica_door()
    except Exception:  # outside a replica (unit tests of the app)
        return None


class EdgeMiddleware:
    """Every HTTP request but KServe health: refused without the replica's API key (when one is configured: 401
    in the route's error shape), refused while the server drains for shutdown (503, Retry-After), and counted in
    flight until its response (a stream included) is complete. Plain ASGI, so streams and disconnects pass through."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        door = _door_or_none() if scope["type"] == "http" else None
        if door is None or is_public_path(_route_path(scope)):
            await self.app(scope, receive, send)
            return
        key = door.api_key
        if key is not None:
            authorization = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
            if not key.accepts(authorization):
                message = "missing or wrong API key: send Authorization: Bearer <key>"
                await error_response(Request(scope), 401, message, "invalid_api_key")(scope, receive, send)
                return
        if door.draining:
            message = "the server is shutting down; retry (another replica or server takes it)"
            await error_response(Request(scope), 503, message)(scope, receive, send)
            return
        with door.admitted(pending=_route_path(scope) != "/metrics"):  # a scrape does not count itself
            await self.app(scope, receive, send)


app.add_middleware(EdgeMiddleware)


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


async def primed(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Await a stream's first item now, so that its errors (bad image, prompt) become a 4xx before a streaming
    response starts; the returned iterator yields every item, the first included."""
    first = await anext(stream)

    async def items() -> AsyncIterator[T]:
        yield first
        async for item in stream:
            yield item

    return items()
