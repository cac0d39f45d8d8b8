"""OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions` (plain and server-sent events),
`POST /v1/embeddings` (with a retrieval checkpoint).

Each route parses (serve/openai_codec.py), calls the replica's FrontDoor (`door`, serve/frontdoor.py), and renders.
A stream's first chunk is awaited before the response starts, so that a bad request still gets a 4xx; when the
client disconnects, the stream is closed and the LLM stage stops generating.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in route signatures.
import asyncio
import json

from blip2_serve.clients.contract import EMBED_TEXT_MODEL
from blip2_serve.deployments.errors import status_of
from blip2_serve.serve import openai_codec as codec
from blip2_serve.serve import schemas
from blip2_serve.serve.asgi import front_door, primed, read_body
from blip2_serve.serve.deadline import Deadline, deadline_s
from blip2_serve.serve.frontdoor import FrontDoor
from blip2_serve.serve.openai_codec import ChatCompletionRequest, openai_error
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

router = APIRouter()


def _sse(events) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except Exception as exc:  # after the 200: an error event in OpenAI's shape, then the stream's end
            status, _, message = status_of(exc)
            yield f"data: {json.dumps(openai_error(status, message))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


@router.get("/v1/models")
async def openai_models(door: FrontDoor = Depends(front_door)) -> dict:
    return codec.models_list(door.server.model_name)


@router.post("/v1/chat/completions", openapi_extra=schemas.body(ChatCompletionRequest))
async def chat_completions(request: Request, door: FrontDoor = Depends(front_door)) -> Response:
    server = door.server
    with door.counted():
        chat, generate = await codec.parse_chat(await read_body(request, server.max_request_bytes), server)
        deadline = Deadline(deadline_s({}, request.headers))
        if not chat.stream:
            results = await deadline.run(codec.choices(door, chat, generate))
            return JSONResponse(codec.completion(server.model_name, results, generate.request_id, bool(chat.logprobs)))
        stream = await deadline.run(primed(door.stream(generate)))
    return _sse(codec.chunks(server.model_name, deadline.stream(stream), chat.include_usage))


@router.post("/v1/embeddings", openapi_extra=schemas.body(schemas.EmbeddingsBody))
async def embeddings(request: Request, door: FrontDoor = Depends(front_door)) -> Response:
    """OpenAI's embeddings API for text (`model`: blip2_embed_text): L2-normalised BLIP-2 text embeddings, which
    compare by cosine with blip2_embed_image's image embeddings."""
    server = door.server
    raw = await read_body(request, server.max_request_bytes)
    model, texts, encoding = codec.embeddings_request(
        raw, door.serves_retrieval(EMBED_TEXT_MODEL), server.max_images_per_request
    )
    vectors, counts = await asyncio.gather(door.embed_texts(texts), door.token_counts(texts))
    return JSONResponse(codec.embeddings(model, vectors, counts, encoding))
