"""OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions` (plain and server-sent events).

`ingress` is the replica's Ingress instance (serve/asgi.current_ingress). A stream's first chunk is awaited
before the response starts, so that a bad request still gets a 4xx; when the client disconnects, the stream is
closed and the LLM stage stops generating.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in route signatures.
import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve import openai_codec as codec
from serve.asgi import current_ingress, primed, read_body
from serve.deadline import deadline_s, within

router = APIRouter()
Ingress = Any  # serve/ingress.Ingress; not imported here, it imports this module


def _sse(events) -> StreamingResponse:
    async def body():
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


@router.get("/v1/models")
async def openai_models(ingress: Ingress = Depends(current_ingress)) -> dict:
    return codec.models_list(ingress.server.model_name)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, ingress: Ingress = Depends(current_ingress)) -> Response:
    server = ingress.server
    with ingress.metrics.request():
        chat = codec.ChatCompletionRequest.parse(await read_body(request, server.max_request_bytes))
        generate = await codec.to_generate_request(
            chat, server.model_name, server.image_limits(), tuple(server.image_url_allowlist), server.default_params()
        )
        if not chat.stream:
            result = await within(deadline_s({}, request.headers), ingress.pipeline.generate(generate))
            return JSONResponse(codec.completion(server.model_name, result))
        stream = await primed(ingress.pipeline.stream(generate))
    return _sse(codec.chunks(server.model_name, stream, chat.include_usage))
