"""Image file -> pixel_values -> image_embeds, with a choice of backend; no Ray.

Shared by the Ray Serve vision stage (deployments/vision.py) and Triton's Python backend
(exporters/triton_models). A backend is a small class with `encode`; ONNX Runtime's is in vision_onnx.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Protocol

import torch
from blip2_serve.deployments.config import ModelConfig, VisionBackendConfig
from blip2_serve.deployments.images import ImageLimits, decode_image
from blip2_serve.deployments.loading import load_processor, load_vision
from blip2_serve.deployments.types import EncodedImage

logger = logging.getLogger(__name__)


class ImagePreprocessor:
    """The checkpoint's image processor behind our image checks: `EncodedImage -> pixel_values [3, H, W]`."""

    def __init__(self, config: ModelConfig | None, limits: ImageLimits = ImageLimits(), image_processor=None):
        """The processor of `config`'s checkpoint, or the `image_processor` given (the retrieval stage's)."""
        if image_processor is None:
            processor = load_processor(config)
            image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        self.image_processor = image_processor
        self.limits = limits
        settings = json.dumps(self.image_processor.to_dict(), sort_keys=True, default=str)
        self._settings = hashlib.sha256(settings.encode()).digest()

    def __call__(self, image: EncodedImage) -> torch.Tensor:
        """Decode and resize/normalise one image (float32). Raises InvalidInput."""
        return self.with_key(image)[0]

    def with_key(self, image: EncodedImage) -> tuple[torch.Tensor, str]:
        """`pixel_values [3, H, W]`, and a key of the decoded pixels and the processor's settings (for caches)."""
        rgb = decode_image(image, self.limits)
        key = hashlib.sha256(self._settings + f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
        return self.image_processor(rgb, return_tensors="pt")["pixel_values"][0], key


class VisionBackend(Protocol):
    """Runs vision tower + Q-Former + projection: `pixel_values [B,3,H,W] -> image_embeds [B,Q,llm_hidden]`."""

    name: str

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


class TorchVisionBackend:
    """The transformers modules, on the device and in the dtype of the model config."""

    name = "torch"

    def __init__(self, config: ModelConfig):
        self.model, self.device, self.dtype = load_vision(config)
        self.compiled = torch.compile(self.model, dynamic=False) if config.compile_vision else None

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.device, self.dtype)
        if self.compiled is None:
            return self.model(pixel_values)
        # one compiled shape per power of two; each image is computed on its own, the padding rows (copies of the last)
        # mix with none of the real ones
        count = pixel_values.shape[0]
        bucket = 1 << (count - 1).bit_length()
        padded = torch.cat([pixel_values, pixel_values[-1:].expand(bucket - count, -1, -1, -1)])
        return self.compiled(padded)[:count]


def make_vision_backend(config: ModelConfig, backend: VisionBackendConfig) -> VisionBackend:
    if backend.backend == "onnxruntime":
        from blip2_serve.deployments.vision_onnx import OnnxVisionBackend

        return OnnxVisionBackend(backend.onnx_path, backend.onnx_providers)
    return TorchVisionBackend(config)


class VisionEncoder:
    """Preprocessing and a backend: what a vision stage runs, whatever serves it."""

    def __init__(
        self,
        config: ModelConfig,
        limits: ImageLimits = ImageLimits(),
        backend: VisionBackendConfig = VisionBackendConfig(),
    ):
        self.preprocess = ImagePreprocessor(config, limits)
        self.backend = make_vision_backend(config, backend)

    def encode(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """One forward pass for the batch; returns `[num_query_tokens, llm_hidden]` per image, on CPU."""
        image_embeds = self.backend.encode(torch.stack(pixel_values))  # [B, num_query_tokens, llm_hidden]
        # clone: a row view would pickle its whole batch's storage when it crosses to the LLM stage
        return [row.to("cpu").clone() for row in image_embeds]
