"""The playground: a page at `/` and `/playground` where a person drops an image, captions it, asks about it (the
answer streams in), and scores image-text matches where a retrieval model is served.

Three static files (serve/playground/), no build step and nothing fetched from elsewhere (a server may have no
internet). The page calls the server's own OpenAI and KServe routes with the API key the person types (the page
itself is public: it holds no secret). Served with a strict Content-Security-Policy: scripts and styles only from
files of this server, so the page has no inline script.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in route signatures.
import html
from functools import cache
from importlib.resources import files

from blip2_serve.serve.asgi import front_door
from blip2_serve.serve.frontdoor import FrontDoor
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

router = APIRouter()

# images: the person's own, read into data: URIs; connections: this server only
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


@cache
def _asset(name: str) -> str:
    return files("blip2_serve.serve").joinpath("playground", name).read_text(encoding="utf-8")


def _headers() -> dict[str, str]:
    return {"content-security-policy": POLICY, "x-content-type-options": "nosniff", "cache-control": "no-cache"}


@router.get("/", include_in_schema=False)
@router.get("/playground", include_in_schema=False)
async def page(request: Request, door: FrontDoor = Depends(front_door)) -> Response:
    """The page, with where this application is mounted (its route prefix) and the model name filled in."""
    root = html.escape(request.scope.get("root_path", "").rstrip("/"), quote=True)
    model = html.escape(door.server.model_name, quote=True)
    body = _asset("index.html").replace("{{ROOT}}", root).replace("{{MODEL}}", model)
    return HTMLResponse(body, headers=_headers())


@router.get("/playground/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(_asset(name), media_type=ASSETS[name], headers=_headers())
