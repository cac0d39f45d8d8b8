"""Triton model `blip2_vision` (Python backend): `pixel_values [N,3,H,W] -> image_embeds [N,Q,llm_hidden]`.

Every request of a dynamic batch goes through one forward pass.
"""

from __future__ import annotations

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from blip2_serve.clients.contract import IMAGE_EMBEDS, PIXEL_VALUES
from blip2_serve.deployments.vision_encoder import TorchVisionBackend
from blip2_serve.exporters.triton_models.common import TritonSettings, error_response


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.backend = TorchVisionBackend(TritonSettings.from_args(args).model)

    def execute(self, requests: list) -> list:
        arrays = [pb_utils.get_input_tensor_by_name(r, PIXEL_VALUES.name).as_numpy() for r in requests]
        try:
            image_embeds = self.backend.encode(torch.from_numpy(np.concatenate(arrays)))  # [sum N, Q, llm_hidden]
        except Exception as exc:  # every request of this batch gets the error; none is lost
            return [error_response(exc) for _ in requests]
        rows = image_embeds.float().cpu().numpy()
        responses, start = [], 0
        for array in arrays:
            chunk = rows[start : start + len(array)]
            start += len(array)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(IMAGE_EMBEDS.name, chunk)]))
        return responses
