"""The vision stage on ONNX Runtime: the graph `blip2-serve export onnx` writes (exporters/onnx_export.py)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from blip2_serve.clients.contract import IMAGE_EMBEDS, PIXEL_VALUES

logger = logging.getLogger(__name__)

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def default_providers() -> list[str]:
    """TensorRT and CUDA where a GPU is present and ORT has them, then CPU. (Asking for CUDA without a GPU
    only logs an error and falls back, so it is not asked.)"""
    import onnxruntime as ort

    available = ort.get_available_providers()
    gpu = torch.cuda.is_available()
    return [p for p in _GPU_PROVIDERS if gpu and p in available] + ["CPUExecutionProvider"]


class OnnxVisionBackend:
    """An ONNX Runtime session of `pixel_values [B,3,H,W] -> image_embeds [B,Q,llm_hidden]`."""

    name = "onnxruntime"

    def __init__(self, path: str | None, providers: list[str] | None = None):
        import onnxruntime as ort

        if not path:
            raise ValueError("the onnxruntime vision backend needs onnx_path (written by `blip2-serve export onnx`)")
        self.session = ort.InferenceSession(path, providers=list(providers or default_providers()))
        graph_input = self.session.get_inputs()[0]
        if graph_input.name != PIXEL_VALUES.name:
            raise ValueError(f"{path}: input {graph_input.name!r}, expected {PIXEL_VALUES.name!r}")
        self.device = (
            "cuda"
            if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(self.session.get_providers())
            else "cpu"
        )
        self._input_dtype = np.float16 if graph_input.type == "tensor(float16)" else np.float32
        logger.info("ONNX vision backend %s on %s", path, self.session.get_providers())

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feed = {PIXEL_VALUES.name: pixel_values.numpy().astype(self._input_dtype)}
        (image_embeds,) = self.session.run([IMAGE_EMBEDS.name], feed)
        return torch.from_numpy(image_embeds.astype(np.float32))
