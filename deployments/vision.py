"""The vision stage on Ray Serve: image -> ImageEmbeds, batched (deployments/vision_encoder.py does the work)."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import torch
from ray import serve

from deployments.batching import ModelWorker, configure_batching, run_isolated, set_torch_threads, unwrap
from deployments.config import BatchConfig, ModelConfig, VisionBackendConfig
from deployments.images import ImageLimits
from deployments.types import EncodedImage, ImageEmbeds
from deployments.vision_encoder import VisionEncoder

logger = logging.getLogger(__name__)


@serve.deployment(name="Vision")
class VisionDeployment:
    """Ray Serve replica of the vision stage; `embed` is called once per image and batched."""

    def __init__(
        self,
        model: ModelConfig,
        batch: BatchConfig = BatchConfig(),
        limits: ImageLimits = ImageLimits(),
        torch_threads: int | None = None,
        backend: VisionBackendConfig = VisionBackendConfig(),
    ):
        set_torch_threads(torch_threads)
        self._encoder = VisionEncoder(model, limits, backend)
        self._worker = ModelWorker("vision")
        configure_batching(self._embed_batch, batch)
        logger.info("vision stage ready (%s backend)", self._encoder.backend.name)

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
