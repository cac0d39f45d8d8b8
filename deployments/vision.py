"""The vision stage: decoded image -> vision tower + Q-Former + language projection -> ImageEmbeds, batched."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import torch
from ray import serve

from deployments.batching import ModelWorker, configure_batching, run_isolated, set_torch_threads, unwrap
from deployments.config import BatchConfig, ModelConfig
from deployments.images import ImageLimits, decode_image
from deployments.loading import load_processor, load_vision
from deployments.types import EncodedImage, ImageEmbeds

logger = logging.getLogger(__name__)


class VisionEncoder:
    """The vision half of a checkpoint with its image processor; no Ray, so other backends can reuse it."""

    def __init__(self, config: ModelConfig, limits: ImageLimits = ImageLimits()):
        self.image_processor = load_processor(config).image_processor
        self.model, self.device, self.dtype = load_vision(config)
        self.limits = limits

    def preprocess(self, image: EncodedImage) -> torch.Tensor:
        """Decode and resize/normalise one image: `pixel_values [3, H, W]` float32. Raises InvalidInput."""
        rgb = decode_image(image, self.limits)
        return self.image_processor(rgb, return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def encode(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """One forward pass for the batch; returns `[num_query_tokens, llm_hidden]` per image, on CPU."""
        batch = torch.stack(pixel_values).to(self.device, self.dtype)  # [B, 3, H, W]
        image_embeds = self.model(batch)  # [B, num_query_tokens, llm_hidden]
        # clone: a row view would pickle its whole batch's storage when it crosses to the LLM stage
        return [row.to("cpu").clone() for row in image_embeds]


@serve.deployment(name="Vision")
class VisionDeployment:
    """Ray Serve replica of the vision stage; `embed` is called once per image and batched."""

    def __init__(
        self,
        model: ModelConfig,
        batch: BatchConfig = BatchConfig(),
        limits: ImageLimits = ImageLimits(),
        torch_threads: int | None = None,
    ):
        set_torch_threads(torch_threads)
        self._encoder = VisionEncoder(model, limits)
        self._worker = ModelWorker("vision")
        configure_batching(self._embed_batch, batch)
        logger.info("vision stage ready on %s (%s)", self._encoder.device, self._encoder.dtype)

    async def embed(self, image: EncodedImage) -> ImageEmbeds:
        """ImageEmbeds for one image; a bad image fails here, before it can join a batch."""
        pixel_values = await asyncio.to_thread(self._encoder.preprocess, image)
        return ImageEmbeds(unwrap(await self._embed_batch(pixel_values)), image.digest)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, pixel_values: list[torch.Tensor]) -> list:
        return await self._worker.run(partial(run_isolated, self._encoder.encode), pixel_values)

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict:
        """What this replica's model saw, for tests and operators."""
        return self._worker.stats()
