"""OpenAI chat completions <-> internal types: messages -> one GenerateRequest, results -> OpenAI JSON.

A conversation about one image becomes clients.contract.dialogue_prompt (the model card's and LAVIS's format):
"Question: q1 Answer: a1. Question: q2 Answer:". System messages go first, as they are. A single user turn
with an image and no text is plain captioning (empty prompt).
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal

import httpx
import numpy as np
from blip2_serve.clients.contract import EMBED_TEXT_MODEL, dialogue_prompt
from blip2_serve.deployments import jsonbody
from blip2_serve.deployments.errors import InvalidInput, ModelNotFound
from blip2_serve.deployments.guided import json_regex
from blip2_serve.deployments.images import ImageLimits, check_image
from blip2_serve.deployments.types import EncodedImage, GenerateChunk, GenerateRequest, GenerateResult, GenerationParams
from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from blip2_serve.serve.config import ServerConfig
    from blip2_serve.serve.frontdoor import FrontDoor

MAX_CHOICES = 16  # `n`: the samples of one request, admitted together into one engine batch (STAGE_BATCH_SIZE)
MAX_TOP_LOGPROBS = 20  # OpenAI's own bound for top_logprobs

# Fields this server does not implement; sending them with a non-default value is a 400, not silently ignored.
_UNSUPPORTED = {
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that BLIP-2 can honour."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    min_tokens: int | None = None  # vLLM's extension: generate at least this many (end-of-sequence held back)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None

    @classmethod
    def parse(cls, body: bytes) -> ChatCompletionRequest:
        try:
            request = cls.model_validate_json(body)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
            raise InvalidInput(f"invalid chat completion request: {problems}") from None
        for name, default in _UNSUPPORTED.items():
            if (request.model_extra or {}).get(name, default) not in (default, None):
                raise InvalidInput(f"'{name}' is not supported by this server")
        if request.n is not None and not 1 <= request.n <= MAX_CHOICES:
            raise InvalidInput(f"'n' must be between 1 and {MAX_CHOICES}, not {request.n}")
        if request.top_logprobs is not None:
            if not request.logprobs:
                raise InvalidInput("'top_logprobs' needs 'logprobs': true")
            if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidInput(f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}")
        if request.stream and request.choices > 1:
            raise InvalidInput("'n' above 1 is not supported with stream: true on this server")
        if request.stream and request.logprobs:
            raise InvalidInput("'logprobs' is not supported with stream: true on this server")
        if request.response_format is not None and not isinstance(request.response_format.get("type"), str):
            raise InvalidInput("'response_format' needs a 'type': text, json_object or json_schema")
        if request.stream_options is not None and not request.stream:
            raise InvalidInput("'stream_options' is only allowed with stream: true")
        return request

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def wanted_logprobs(self) -> int | None:
        """GenerateRequest.logprobs: the top count where logprobs are asked, 0 (each token's own, for the choices'
        scores) where several choices are, else None (none computed)."""
        if self.logprobs:
            return self.top_logprobs or 0
        return 0 if self.choices > 1 else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and (self.stream_options or {}).get("include_usage"))

    def params(self, defaults: GenerationParams) -> GenerationParams:
        """OpenAI sampling fields as generation parameters; no temperature (or 0) means greedy decoding."""
        values: dict[str, Any] = {}
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is not None:
            values["max_new_tokens"] = max_tokens
        if self.min_tokens is not None:
            values["min_new_tokens"] = self.min_tokens
        if self.temperature:
            values.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                values["top_p"] = self.top_p
        for name in ("seed", "stop"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return GenerationParams.from_mapping(values, base=defaults)


def _parts(message: dict[str, Any], index: int) -> tuple[list[str], list[str]]:
    """(texts, image URLs) of one message."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return ([content] if content else []), []
    if not isinstance(content, list):
        raise InvalidInput(f"messages[{index}].content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise InvalidInput(f"messages[{index}]: image_url needs a 'url' string")
            images.append(url)
        else:
            raise InvalidInput(f"messages[{index}]: content parts must be 'text' or 'image_url', not {kind!r}")
    return texts, images


def conversation_prompt(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """(BLIP-2 prompt, the image URL) of a conversation about one image."""
    if not messages:
        raise InvalidInput("'messages' must not be empty")
    system: list[str] = []
    turns: list[tuple[str, str | None]] = []  # (question, answer); the last answer is None
    image_urls: list[str] = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise InvalidInput(f"messages[{index}].role must be system, user or assistant, not {role!r}")
        texts, images = _parts(message, index)
        if images and role != "user":
            raise InvalidInput(f"messages[{index}]: only user messages may carry an image")
        image_urls += images
        text = " ".join(t.strip() for t in texts if t.strip())
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            if turns and turns[-1][1] is None:  # consecutive user messages: one question
                turns[-1] = (f"{turns[-1][0]} {text}".strip(), None)
            else:
                turns.append((text, None))
        else:
            if not turns or turns[-1][1] is not None:
                raise InvalidInput(f"messages[{index}]: an assistant message must answer a user message")
            turns[-1] = (turns[-1][0], text)
    if not turns or turns[-1][1] is not None:
        raise InvalidInput("the last message must be from the user")
    if len(image_urls) != 1:
        raise InvalidInput(f"a conversation must carry exactly one image (in a user message), not {len(image_urls)}")
    if len(turns) == 1 and not turns[0][0]:
        return " ".join(system), image_urls[0]  # captioning
    answered = [(question, answer or "") for question, answer in turns[:-1]]
    return dialogue_prompt(answered, turns[-1][0], " ".join(system)), image_urls[0]


async def load_image(
    url: str, limits: ImageLimits, allowlist: tuple[str, ...], timeout_s: float = 10.0
) -> EncodedImage:
    """A data: URI, or an http(s) URL that starts with an allow-listed prefix; nothing else is fetched."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise InvalidInput("image data URIs must look like data:image/<type>;base64,<data>")
        try:
            return check_image(base64.b64decode(payload, validate=True), limits)
        except (binascii.Error, ValueError):
            raise InvalidInput("the image data URI is not valid base64") from None
    if not url.startswith(("http://", "https://")):
        raise InvalidInput("image_url must be a data: URI or an http(s) URL")
    if not any(url.startswith(prefix) for prefix in allowlist):
        raise InvalidInput(
            "this server fetches no remote images: send the image as a data: URI "
            "(or ask the operator to allow-list this URL with server.image_url_allowlist)"
        )
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidInput(f"fetching the image gave HTTP {response.status_code}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limits.max_bytes:
                        raise InvalidInput(f"the image at image_url is over {limits.max_bytes} bytes")
    except httpx.HTTPError as exc:
        raise InvalidInput(f"fetching the image failed: {exc}") from None
    return check_image(bytes(data), limits)


async def to_generate_request(
    chat: ChatCompletionRequest,
    model_name: str,
    limits: ImageLimits,
    allowlist: tuple[str, ...],
    defaults: GenerationParams,
) -> GenerateRequest:
    """The one GenerateRequest a chat completion request asks for."""
    if chat.model != model_name:
        raise ModelNotFound(f"The model '{chat.model}' does not exist; this server serves '{model_name}'")
    prompt, url = conversation_prompt(chat.messages)
    params = chat.params(defaults)
    if chat.wanted_logprobs is not None and params.num_beams > 1:
        raise InvalidInput("'logprobs' and 'n' above 1 need num_beams 1 (this server's default is beam search)")
    grammar = json_regex(chat.response_format) if chat.response_format is not None else None
    image = await load_image(url, limits, allowlist)
    return GenerateRequest(
        f"chatcmpl-{uuid.uuid4().hex}", image, prompt, params, logprobs=chat.wanted_logprobs, grammar=grammar
    )


def choice_requests(chat: ChatCompletionRequest, request: GenerateRequest) -> list[GenerateRequest]:
    """The requests behind `n` choices: one where they would all be equal (greedy decoding: the one result is
    repeated), else one per choice, a seeded request's choice i seeded with seed + i (reproducible as a whole)."""
    if chat.choices == 1 or not request.params.do_sample:
        return [request]
    seed = request.params.seed
    return [
        replace(
            request,
            request_id=f"{request.request_id}-{index}",
            params=replace(request.params, seed=None if seed is None else (seed + index) % 2**63),
        )
        for index in range(chat.choices)
    ]


async def choices(door: FrontDoor, chat: ChatCompletionRequest, request: GenerateRequest) -> list[GenerateResult]:
    """The results of a chat completion's `n` choices; several samples go in one call (one image: the vision stage
    encodes it once, the engine admits the samples together)."""
    requests = choice_requests(chat, request)
    if len(requests) == 1:
        return [await door.generate(requests[0])] * chat.choices
    return await door.generate_many(requests)


async def parse_chat(raw: bytes, server: ServerConfig) -> tuple[ChatCompletionRequest, GenerateRequest]:
    """A chat completion request's body, checked and parsed, and the GenerateRequest it asks for (its image loaded
    within the server's limits)."""
    chat = ChatCompletionRequest.parse(raw)
    limits, allowlist = server.image_limits(), tuple(server.image_url_allowlist)
    return chat, await to_generate_request(chat, server.model_name, limits, allowlist, server.default_params())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token(token_id: int, text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def logprobs_content(result: GenerateResult) -> dict[str, Any]:
    """OpenAI's `logprobs` object of a choice: each token, its log-probability and the most likely alternatives."""
    return {
        "content": [
            {**_token(t.token_id, t.text, t.logprob), "top_logprobs": [_token(*alt) for alt in t.top]}
            for t in result.logprobs or ()
        ],
        "refusal": None,
    }


def completion(model: str, results: list[GenerateResult], request_id: str, logprobs: bool = False) -> dict[str, Any]:
    """A `chat.completion` object with a choice per result; `score` (the mean token log-probability, which ranks
    the choices) where log-probabilities were computed, their tokens where `logprobs` was asked."""
    choices = []
    for index, result in enumerate(results):
        choice = {
            "index": index,
            "message": {"role": "assistant", "content": result.text, "refusal": None},
            "logprobs": logprobs_content(result) if logprobs else None,
            "finish_reason": result.finish_reason,
        }
        if result.score is not None:
            choice["score"] = result.score
        choices.append(choice)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(results[0].prompt_tokens, sum(len(r.token_ids) for r in results)),
    }


def chunk(
    request_id: str,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: Literal["stop", "length"] | None = None,
    include_usage: bool = False,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk`; `delta=None` is the closing usage chunk (no choices)."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }
    body["choices"] = (
        [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    if include_usage:
        body["usage"] = usage_counts
    return body


def chunks(model: str, stream: AsyncIterator[GenerateChunk], include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """The chunk objects of a stream: the role, each text delta, the finish reason, then usage if asked."""

    async def generate():
        last = None
        async for item in stream:
            if last is None:
                yield chunk(item.request_id, model, {"role": "assistant", "content": ""}, None, include_usage)
            last = item
            if item.text:
                yield chunk(item.request_id, model, {"content": item.text}, None, include_usage)
        yield chunk(last.request_id, model, {}, last.finish_reason, include_usage)
        if include_usage:
            yield chunk(last.request_id, model, None, None, True, usage(last.prompt_tokens, last.completion_tokens))

    return generate()


def models_list(model: str) -> dict[str, Any]:
    """`GET /v1/models`."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "blip2-serve"}]}


def embeddings_request(raw: bytes, served: bool, max_inputs: int) -> tuple[str, list[str], str]:
    """An embeddings request body as (model, texts, encoding_format), checked; `served`: whether this server embeds
    text (a retrieval checkpoint is configured)."""
    body = jsonbody.loads_object(raw, "the request body")
    model = body.get("model")
    if not served or model != EMBED_TEXT_MODEL:
        raise ModelNotFound(f"The model '{model}' does not exist; this server embeds text with '{EMBED_TEXT_MODEL}'")
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InvalidInput("'input' must be a non-empty string or a list of non-empty strings")
    if len(texts) > max_inputs:
        raise InvalidInput(f"'input' takes at most {max_inputs} strings")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidInput("'encoding_format' must be 'float' or 'base64'")
    return model, texts, encoding


def embeddings(model: str, vectors: np.ndarray, token_counts: list[int], encoding: str) -> dict[str, Any]:
    """OpenAI's embeddings response: one entry per row of `vectors`, as floats or base64 of little-endian fp32."""
    data = []
    for index, vector in enumerate(vectors):
        vector = np.asarray(vector, dtype="<f4")
        embedding = base64.b64encode(vector.tobytes()).decode() if encoding == "base64" else vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": sum(token_counts), "total_tokens": sum(token_counts)}
    return {"object": "list", "data": data, "model": model, "usage": usage}


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable",
    504: "timeout",
}


def openai_error(status: int, message: str, code: str | None = None) -> dict:
    """OpenAI's error object, as a response body or a stream's error event."""
    return {
        "error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"), "param": None, "code": code}
    }
