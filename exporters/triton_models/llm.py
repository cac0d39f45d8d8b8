"""Triton model `blip2_llm` (Python backend, decoupled): `image_embeds [N,Q,H]` + PROMPT -> TEXT.

Generation parameters are request parameters. Requests of a dynamic batch that may share a generate call do
(LanguageGenerator.run groups them); each request gets one final response with its rows' TEXT. A request with
the parameter `stream: true` (one row) gets its text as it is generated: one response per new piece, the last
one final. Decoupled mode is what lets a model answer with several responses.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from blip2_serve.clients.contract import IMAGE_EMBEDS, PROMPT, TEXT
from blip2_serve.deployments.errors import InvalidInput
from blip2_serve.deployments.generator import LanguageGenerator, PreparedRequest
from blip2_serve.deployments.text import TextAssembler
from blip2_serve.deployments.types import GenerateRequest, GenerationParams
from blip2_serve.exporters.triton_models.common import TritonSettings, error_response, request_parameters

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _text_tensor(texts: list[str]) -> pb_utils.Tensor:
    return pb_utils.Tensor(TEXT.name, np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.settings = TritonSettings.from_args(args)
        self.generator = LanguageGenerator(self.settings.model, self.settings.max_prompt_tokens)

    def _prepare(self, request) -> tuple[list[PreparedRequest], bool]:
        embeds = pb_utils.get_input_tensor_by_name(request, IMAGE_EMBEDS.name).as_numpy()  # [N, Q, llm_hidden]
        prompt_tensor = pb_utils.get_input_tensor_by_name(request, PROMPT.name)
        prompts = [""] * len(embeds)
        if prompt_tensor is not None:
            try:
                prompts = [p.decode("utf-8") for p in prompt_tensor.as_numpy().reshape(-1)]
            except UnicodeDecodeError:
                raise InvalidInput("PROMPT must be UTF-8 text") from None
        parameters = request_parameters(request)
        stream = bool(parameters.pop("stream", False))
        if stream and len(embeds) != 1:
            raise InvalidInput(f"streaming takes one row per request, not {len(embeds)}")
        params = GenerationParams.from_mapping(parameters, base=self.settings.defaults())
        rows = [GenerateRequest(f"{request.request_id()}/{i}", None, p, params) for i, p in enumerate(prompts)]
        return [
            self.generator.prepare(row, torch.from_numpy(np.array(e)), streaming=stream) for row, e in zip(rows, embeds)
        ], stream

    def _stream(self, sender, item: PreparedRequest) -> None:
        assembler = TextAssembler(self.generator.tokenizer, item.request.params.stop)
        cancelled = threading.Event()

        def on_tokens(tokens: list[int]) -> None:
            if sender.is_cancelled():  # the client went away: stop generating
                cancelled.set()
                return
            text = assembler.update(tokens)
            if text:
                sender.send(pb_utils.InferenceResponse([_text_tensor([text])]))
            if assembler.stopped:
                cancelled.set()

        self.generator.stream(item, on_tokens, cancelled)
        sender.send(pb_utils.InferenceResponse([_text_tensor([assembler.finish()])]), flags=FINAL)

    def execute(self, requests: list) -> None:
        batched: list[tuple[object, list[PreparedRequest]]] = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                prepared, stream = self._prepare(request)
                if stream:
                    self._stream(sender, prepared[0])
                else:
                    batched.append((sender, prepared))
            except Exception as exc:
                sender.send(error_response(exc), flags=FINAL)
        results = self.generator.run([item for _, items in batched for item in items])
        start = 0
        for sender, items in batched:
            mine, start = results[start : start + len(items)], start + len(items)
            failed = next((r for r in mine if isinstance(r, BaseException)), None)
            if failed is not None:
                sender.send(error_response(failed), flags=FINAL)
            else:
                sender.send(pb_utils.InferenceResponse([_text_tensor([r.text for r in mine])]), flags=FINAL)
        return None
