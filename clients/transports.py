"""The SDK's two transports behind one small protocol: KServe v2 over HTTP (tritonclient.http.aio, plus the
server's OpenAI and generate_stream routes through httpx) and over gRPC (tritonclient.grpc.aio).
"""

from __future__ import annotations

import base64
import json
from typing import Any, AsyncIterator

import numpy as np
from blip2_serve.clients.contract import BYTES, IMAGE, PROMPT, TEXT
from blip2_serve.clients.errors import Blip2Error, ConnectionFailedError, error_for

# Generation parameters that also exist in OpenAI's chat API, and their names there.
_OPENAI_NAMES = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
}


def _openai_parameters(parameters: dict) -> dict:
    """The SDK's generation keywords as OpenAI's fields; a keyword the OpenAI route has no field for is a TypeError."""
    unknown = set(parameters) - set(_OPENAI_NAMES)
    if unknown:
        raise TypeError(f"the OpenAI route takes {sorted(_OPENAI_NAMES)}, not {sorted(unknown)}")
    return {_OPENAI_NAMES[k]: v for k, v in parameters.items()}


def _messages(image: bytes, turns: list[str]) -> list[dict]:
    """OpenAI messages: the image (and the first question, if any) in the first user message, then the turns."""
    image_part = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()},
    }
    first = [image_part] + ([{"type": "text", "text": turns[0]}] if turns else [])
    messages = [{"role": "user", "content": first}]
    for index, text in enumerate(turns[1:], start=1):
        messages.append({"role": "assistant" if index % 2 else "user", "content": text})
    return messages


def bytes_inputs(module, images: list[bytes], prompts: list[str] | None = None) -> list:
    """IMAGE [N, 1] (and PROMPT [len(prompts), 1]) as tritonclient InferInputs of `module` (http, grpc, or aio)."""
    tensor = module.InferInput(IMAGE.name, [len(images), 1], IMAGE.datatype)
    tensor.set_data_from_numpy(np.array([[image] for image in images], dtype=np.object_))
    inputs = [tensor]
    if prompts is not None:
        prompt = module.InferInput(PROMPT.name, [len(prompts), 1], PROMPT.datatype)
        prompt.set_data_from_numpy(np.array([[p.encode("utf-8")] for p in prompts], dtype=np.object_))
        inputs.append(prompt)
    return inputs


def _texts(result) -> list[str]:
    return [t.decode("utf-8") if isinstance(t, bytes) else t for t in result.as_numpy(TEXT.name).reshape(-1)]


def _typed(exc: Exception) -> Blip2Error:
    """tritonclient's and the connection's errors as the SDK's."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, Blip2Error):
        return exc
    if isinstance(exc, InferenceServerException):
        message, status = exc.message() or str(exc), exc.status()
        code, _, reason = message.partition(": ")
        if status is None and code.isupper() and reason:  # a stream error: "<gRPC code>: <reason>"
            return error_for(f"StatusCode.{code}", reason)
        return error_for(status, message)
    code = getattr(exc, "code", None)  # a grpc.RpcError, as tritonclient's aio streams raise them
    if callable(code) and getattr(code(), "name", None):
        return error_for(f"StatusCode.{code().name}", exc.details() or str(exc))
    return ConnectionFailedError(f"cannot reach the server: {exc}")


async def _guarded(call):
    """Await a tritonclient call, raising the SDK's typed errors."""
    try:
        return await call
    except Exception as exc:
        raise _typed(exc) from None


class _TritonTransport:
    """What both protocols do through a tritonclient aio client; `_call_options` go with every call."""

    def __init__(self, module, triton, model: str, call_options: dict[str, Any]):
        self._module, self._triton, self._model, self._call_options = module, triton, model, call_options

    async def infer(self, images: list[bytes], prompts: list[str] | None, parameters: dict) -> list[str]:
        inputs = bytes_inputs(self._module, images, prompts)
        call = self._triton.infer(self._model, inputs, parameters=parameters or None, **self._call_options)
        return _texts(await _guarded(call))

    async def infer_tensors(self, model: str, tensors: dict[str, list[bytes]], outputs: list[str]) -> dict:
        """Any served model with BYTES [N, 1] inputs: its named outputs as numpy arrays."""
        inputs = []
        for name, values in tensors.items():
            tensor = self._module.InferInput(name, [len(values), 1], BYTES)
            tensor.set_data_from_numpy(np.array([[v] for v in values], dtype=np.object_))
            inputs.append(tensor)
        requested = [self._module.InferRequestedOutput(name) for name in outputs]
        result = await _guarded(self._triton.infer(model, inputs, outputs=requested, **self._call_options))
        return {name: result.as_numpy(name) for name in outputs}

    async def health(self) -> dict[str, bool]:
        options = {k: v for k, v in self._call_options.items() if k == "headers"}
        live = await _guarded(self._triton.is_server_live(**options))
        ready = await _guarded(self._triton.is_server_ready(**options))
        model_ready = await _guarded(self._triton.is_model_ready(self._model, **options))
        return {"live": live, "ready": ready, "model_ready": model_ready}

    async def close(self) -> None:
        await self._triton.close()


class HttpTransport(_TritonTransport):
    """`url` is host:port[/prefix] (a scheme is allowed and dropped for tritonclient)."""

    def __init__(self, url: str, model: str, timeout_s: float, headers: dict[str, str] | None = None):
        import httpx
        import tritonclient.http.aio as triton_http

        address = url.split("://", 1)[-1].rstrip("/")
        triton = triton_http.InferenceServerClient(address, conn_timeout=timeout_s)
        super().__init__(triton_http, triton, model, {"headers": headers} if headers else {})
        self._http = httpx.AsyncClient(base_url=f"http://{address}", timeout=timeout_s, headers=headers or {})

    async def _post(self, path: str, body: dict, stream: bool = False):
        import httpx

        try:
            request = self._http.build_request("POST", path, json=body)
            response = await self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise ConnectionFailedError(f"cannot reach the server: {exc}") from None
        if response.status_code != 200:
            await response.aread()
            error = response.json().get("error") if "json" in response.headers.get("content-type", "") else None
            message = error.get("message") if isinstance(error, dict) else error
            await response.aclose()
            raise error_for(response.status_code, message or response.text)
        return response

    async def stream(self, image: bytes, prompt: str, parameters: dict) -> AsyncIterator[str]:
        """Triton's generate_stream route: server-sent events, each with the text added since the last."""
        body = {IMAGE.name: base64.b64encode(image).decode(), PROMPT.name: prompt, "parameters": parameters}
        response = await self._post(f"/v2/models/{self._model}/generate_stream", body, stream=True)
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    raise error_for(None, event["error"])
                if event.get(TEXT.name):
                    yield event[TEXT.name]
        finally:
            await response.aclose()

    async def chat(self, image: bytes, turns: list[str], parameters: dict) -> str:
        """The OpenAI route: the server turns the conversation into BLIP-2's dialogue prompt."""
        body = {"model": self._model, "messages": _messages(image, turns), **_openai_parameters(parameters)}
        response = await self._post("/v1/chat/completions", body)
        return response.json()["choices"][0]["message"]["content"]

    async def samples(self, image: bytes, question: str | None, options: dict, parameters: dict) -> list[dict]:
        """The OpenAI route's choices for one image and question (none: a caption); `options` are OpenAI fields
        as they are (n, logprobs, top_logprobs, response_format)."""
        body = {
            "model": self._model,
            "messages": _messages(image, [question] if question else []),
            **options,
            **_openai_parameters(parameters),
        }
        return (await self._post("/v1/chat/completions", body)).json()["choices"]

    async def metadata(self) -> dict:
        return await _guarded(self._triton.get_model_metadata(self._model, **self._call_options))

    async def close(self) -> None:
        await super().close()
        await self._http.aclose()


class GrpcTransport(_TritonTransport):
    """`url` is host:port; `headers` go with every call (e.g. {"application": name} on a multi-app Ray Serve)."""

    def __init__(self, url: str, model: str, timeout_s: float, headers: dict[str, str] | None = None):
        import tritonclient.grpc.aio as triton_grpc

        triton = triton_grpc.InferenceServerClient(url.split("://", 1)[-1])
        super().__init__(triton_grpc, triton, model, {"headers": headers, "client_timeout": timeout_s})
        self._timeout_s = timeout_s
        self._headers = headers

    async def stream(self, image: bytes, prompt: str, parameters: dict) -> AsyncIterator[str]:
        """ModelStreamInfer: each response carries the text added since the last."""

        async def requests():
            yield {
                "model_name": self._model,
                "inputs": bytes_inputs(self._module, [image], [prompt]),
                "parameters": parameters,
            }

        responses = self._triton.stream_infer(requests(), stream_timeout=self._timeout_s, headers=self._headers)
        try:
            async for result, error in responses:
                if error is not None:
                    raise _typed(error)
                text = _texts(result)[0]
                if text:
                    yield text
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
        except Blip2Error:
            raise
        except Exception as exc:
            raise _typed(exc) from None
        finally:
            responses.cancel()

    async def chat(self, image: bytes, turns: list[str], parameters: dict) -> str:
        """BLIP-2's dialogue prompt, built here as the server builds it for the OpenAI route."""
        from blip2_serve.clients.contract import dialogue_prompt

        answered = list(zip(turns[:-1:2], turns[1:-1:2]))
        return (await self.infer([image], [dialogue_prompt(answered, turns[-1])], parameters))[0]

    async def samples(self, image: bytes, question: str | None, options: dict, parameters: dict) -> list[dict]:
        raise TypeError("samples() and extract() use the OpenAI route: Blip2Client(url) with protocol='http'")

    async def metadata(self) -> dict:
        return await _guarded(self._triton.get_model_metadata(self._model, headers=self._headers, as_json=True))


def make_transport(
    url: str, protocol: str, model: str, timeout_s: float, headers: dict[str, str] | None
) -> HttpTransport | GrpcTransport:
    """The SDK's transport for `protocol` ("http" or "grpc"): stock tritonclient underneath."""
    if protocol == "http":
        return HttpTransport(url, model, timeout_s, headers)
    if protocol == "grpc":
        return GrpcTransport(url, model, timeout_s, headers)
    raise ValueError(f"protocol must be 'http' or 'grpc', not {protocol!r}")
