"""Triton model `blip2` (Python backend): IMAGE bytes + PROMPT -> TEXT, the contract of the Ray Serve `blip2`.

It decodes and checks images and parameters with the project's KServe code, preprocesses images, and calls
`blip2_vision` and `blip2_llm` with BLS requests: one vision request for every image of the batch, one LLM
request per set of generation parameters, so that the batch Triton gathered stays one batch downstream.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from blip2_serve.clients.contract import IMAGE_EMBEDS, INPUTS, PIXEL_VALUES, PROMPT, TEXT
from blip2_serve.deployments import kserve
from blip2_serve.deployments.errors import Blip2ServeError, InvalidInput
from blip2_serve.deployments.generator import PromptEncoder
from blip2_serve.deployments.loading import load_blip2_config
from blip2_serve.deployments.types import GenerateRequest, GenerationParams
from blip2_serve.deployments.vision_encoder import ImagePreprocessor
from blip2_serve.exporters.triton_models.common import TritonSettings, error_response


def _raise_if_error(response) -> None:
    """A composing model's error. Triton 2.51 reports every BLS error as INTERNAL, so requests are checked
    here before they are sent (images and prompts), and what still fails here is the server's fault."""
    if response.has_error():
        error = response.error()
        if error.code() == pb_utils.TritonError.INVALID_ARG:
            raise InvalidInput(error.message())
        raise Blip2ServeError(error.message())


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.settings = TritonSettings.from_args(args)
        self.preprocess = ImagePreprocessor(self.settings.model, self.settings.limits())
        blip2 = load_blip2_config(self.settings.model)
        self.prompts = PromptEncoder(self.preprocess.tokenizer, blip2, self.settings.max_prompt_tokens)

    def _requests(self, request) -> list[GenerateRequest]:
        inputs = {}
        for spec in INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is not None:
                array = tensor.as_numpy()
                elements = tuple(bytes(e) for e in array.reshape(-1))
                inputs[spec.name] = kserve.InputTensor(spec.name, spec.datatype, tuple(array.shape), elements)
        infer = kserve.InferRequest(request.request_id(), json.loads(request.parameters() or "{}"), inputs)
        settings = self.settings
        rows = kserve.to_generate_requests(infer, settings.limits(), settings.max_batch_size, settings.defaults())
        for row in rows:  # a prompt blip2_llm would refuse fails here, alone, before it joins a batch
            self.prompts.encode(row)
        return rows

    def _embed(self, rows: list[GenerateRequest]) -> dict[str, np.ndarray]:
        """image_embeds of each distinct image, in blip2_vision requests of at most max_batch_size images."""
        distinct = {row.image.digest: row.image for row in rows}
        pixel_values = {digest: self.preprocess(image) for digest, image in distinct.items()}
        digests, embeds = list(pixel_values), []
        for start in range(0, len(digests), self.settings.max_batch_size):
            chunk = np.stack([pixel_values[d].numpy() for d in digests[start : start + self.settings.max_batch_size]])
            request = pb_utils.InferenceRequest(
                model_name=self.settings.vision_model,
                requested_output_names=[IMAGE_EMBEDS.name],
                inputs=[pb_utils.Tensor(PIXEL_VALUES.name, chunk.astype(np.float32))],
            )
            response = request.exec()
            _raise_if_error(response)
            embeds.append(pb_utils.get_output_tensor_by_name(response, IMAGE_EMBEDS.name).as_numpy())
        return dict(zip(digests, np.concatenate(embeds)))

    def _generate(
        self, rows: list[GenerateRequest], embeds: dict[str, np.ndarray], params: GenerationParams
    ) -> list[str]:
        """TEXT for rows sharing generation parameters: one blip2_llm request (decoupled: read to the end)."""
        texts = []
        for start in range(0, len(rows), self.settings.max_batch_size):
            chunk = rows[start : start + self.settings.max_batch_size]
            request = pb_utils.InferenceRequest(
                model_name=self.settings.llm_model,
                requested_output_names=[TEXT.name],
                inputs=[
                    pb_utils.Tensor(IMAGE_EMBEDS.name, np.stack([embeds[r.image.digest] for r in chunk])),
                    pb_utils.Tensor(
                        PROMPT.name, np.array([[r.prompt.encode("utf-8")] for r in chunk], dtype=np.object_)
                    ),
                ],
                parameters=params.as_parameters(),
            )
            for response in request.exec(decoupled=True):
                _raise_if_error(response)
                output = pb_utils.get_output_tensor_by_name(response, TEXT.name)
                if output is not None:
                    texts += [t.decode("utf-8") for t in output.as_numpy().reshape(-1)]
        return texts

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        parsed: dict[int, list[GenerateRequest]] = {}
        for index, request in enumerate(requests):
            try:
                parsed[index] = self._requests(request)
            except Exception as exc:
                responses[index] = error_response(exc)
        try:
            embeds = self._embed([row for rows in parsed.values() for row in rows])
        except Exception as exc:  # a vision failure fails the requests that needed it, not the others' answers
            embeds, vision_error = {}, exc
        else:
            vision_error = None
        by_params: dict[GenerationParams, list[tuple[int, int]]] = {}
        for index, rows in parsed.items():
            for row_index, row in enumerate(rows):
                by_params.setdefault(row.params, []).append((index, row_index))
        texts: dict[tuple[int, int], str] = {}
        failed: dict[int, Exception] = {}
        for params, members in by_params.items():
            if vision_error is not None:
                failed.update({index: vision_error for index, _ in members})
                continue
            try:
                texts.update(zip(members, self._generate([parsed[i][r] for i, r in members], embeds, params)))
            except Exception:  # one request's prompt must not fail its neighbours: each request alone
                for index in dict.fromkeys(i for i, _ in members):
                    try:
                        mine = [(i, r) for i, r in members if i == index]
                        texts.update(zip(mine, self._generate([parsed[i][r] for i, r in mine], embeds, params)))
                    except Exception as exc:
                        failed[index] = exc
        for index, rows in parsed.items():
            if index in failed:
                responses[index] = error_response(failed[index])
                continue
            column = np.array([[texts[(index, r)].encode("utf-8")] for r in range(len(rows))], dtype=np.object_)
            responses[index] = pb_utils.InferenceResponse([pb_utils.Tensor(TEXT.name, column)])
        return responses
