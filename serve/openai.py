"""OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions` (plain and server-sent events).

`ingress` is the replica's Ingress instance (serve/asgi.current_ingress). A stream's first chunk is awaited
before the response starts, so that a bad request still gets a 4xx; when the client disconnects, the stream is
closed and the LLM stage stops generating.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in route signatures.
import json
from typing import Any

from blip2_serve.deployments import jsonbody
from blip2_serve.deployments.errors import status_of
from blip2_serve.serve import openai_codec as codec
from blip2_serve.serve import schemas
from blip2_serve.serve.asgi import current_ingress, openai_error, primed, read_body
from blip2_serve.serve.deadline import Deadline, deadline_s
from blip2_serve.serve.openai_codec import ChatCompletionRequest
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

router = APIRouter()
Ingress = Any  # serve/ingress.Ingress; not imported here, it imports this module


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
async def openai_models(ingress: Ingress = Depends(current_ingress)) -> dict:
    return codec.models_list(ingress.server.model_name)


@router.post("/v1/chat/completions", openapi_extra=schemas.body(ChatCompletionRequest))
async def chat_completions(request: Request, ingress: Ingress = Depends(current_ingress)) -> Response:
    server = ingress.server
    with ingress.metrics.request():
        chat = codec.ChatCompletionRequest.parse(await read_body(request, server.max_request_bytes))
        generate = await codec.to_generate_request(
            chat, server.model_name, server.image_limits(), tuple(server.image_url_allowlist), server.default_params()
        )
        deadline = Deadline(deadline_s({}, request.headers))
        if not chat.stream:
            result = await deadline.run(ingress.pipeline.generate(generate))
            return JSONResponse(codec.completion(server.model_name, result))
        stream = await deadline.run(primed(ingress.pipeline.stream(generate)))
    return _sse(codec.chunks(server.model_name, deadline.stream(stream), chat.include_usage))


@router.post("/v1/embeddings", openapi_extra=schemas.body(schemas.EmbeddingsBody))
async def embeddings(request: Request, ingress: Ingress = Depends(current_ingress)) -> Response:
    """OpenAI's embeddings API for text (`model`: blip2_embed_text): L2-normalised BLIP-2 text embeddings, which
    compare by cosine with blip2_embed_image's image embeddings."""
    import asyncio
    import base64

    import numpy as np
    from blip2_serve.clients.contract import EMBED_TEXT_MODEL
    from blip2_serve.deployments.errors import InvalidInput, ModelNotFound

    raw = await read_body(request, ingress.server.max_request_bytes)
    body = jsonbody.loads_object(raw, "the request body")
    model = body.get("model")
    if ingress.retrieval is None or model != EMBED_TEXT_MODEL:
        raise ModelNotFound(f"The model '{model}' does not exist; this server embeds text with '{EMBED_TEXT_MODEL}'")
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InvalidInput("'input' must be a non-empty string or a list of non-empty strings")
    if len(texts) > ingress.server.max_images_per_request:
        raise InvalidInput(f"'input' takes at most {ingress.server.max_images_per_request} strings")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidInput("'encoding_format' must be 'float' or 'base64'")
    stage = ingress.retrieval
    vectors, counts = await asyncio.gather(
        asyncio.gather(*(stage.embed_text.remote(text) for text in texts)), stage.token_counts.remote(texts)
    )
    data = []
    for index, vector in enumerate(vectors):
        vector = np.asarray(vector, dtype="<f4")
        embedding = base64.b64encode(vector.tobytes()).decode() if encoding == "base64" else vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
    return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage})
