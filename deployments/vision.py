"""The vision stage on Ray Serve: image -> ImageEmbeds, batched (deployments/vision_encoder.py does the work)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import nullcontext
from functools import partial

import torch
from blip2_serve.clients.contract import VISION_MODEL
from blip2_serve.deployments.batching import DynamicBatcher, ModelWorker, run_isolated
from blip2_serve.deployments.cache import EmbeddingCache
from blip2_serve.deployments.config import BatchConfig, ModelConfig, VisionBackendConfig
from blip2_serve.deployments.cores import cpu_turns as cpu_turns_for
from blip2_serve.deployments.cores import load_threads, vision_signal
from blip2_serve.deployments.images import ImageLimits
from blip2_serve.deployments.loading import stage_threads
from blip2_serve.deployments.metrics import MetricsRecorder
from blip2_serve.deployments.types import INTERACTIVE, EncodedImage, ImageEmbeds
from blip2_serve.deployments.vision_encoder import VisionEncoder

logger = logging.getLogger(__name__)


class VisionDeployment:
    """Ray Serve replica of the vision stage; `embed` is called once per image and batched."""

    def __init__(
        self,
        model: ModelConfig,
        batch: BatchConfig = BatchConfig(),
        limits: ImageLimits = ImageLimits(),
        torch_threads: int | None = None,
        backend: VisionBackendConfig = VisionBackendConfig(),
        cache_bytes: int = 0,
        metrics_directory: str | None = None,
        cpu_turns: bool = True,
    ):
        with load_threads(cpu_turns, torch_threads):
            self._encoder = VisionEncoder(model, limits, backend)
        torch_threads = stage_threads(getattr(self._encoder.backend, "model", None), torch_threads)  # ONNX: None
        turns = cpu_turns_for(str(self._encoder.backend.device), cpu_turns, torch_threads)
        self._threads = torch.get_num_threads()  # what its model computes on
        self._worker = ModelWorker("vision", turns=turns)
        self._busy = vision_signal() if turns is not None else None  # this application's LLM stage reads it
        self._cache = EmbeddingCache(cache_bytes) if cache_bytes else None
        self._metrics = MetricsRecorder(VISION_MODEL, metrics_directory)
        self._batcher = DynamicBatcher(self._embed_batch, batch)
        logger.info("vision stage ready (%s backend)", self._encoder.backend.name)

    async def embed(self, image: EncodedImage, priority: int = INTERACTIVE) -> ImageEmbeds:
        """ImageEmbeds for one image; a bad image fails here, before it can join a batch. An image seen before
        (same decoded pixels) comes from the cache without running the model. A BACKGROUND image (a Batch API
        line) waits until no interactive image does, and does not hold the LLM stage back (`_busy` is for images
        whose requests should join its running batch: interactive ones)."""
        busy = self._busy.busy() if self._busy is not None and priority == INTERACTIVE else nullcontext()
        with self._metrics.request(), busy:
            pixel_values, key = await asyncio.to_thread(self._encoder.preprocess.with_key, image)
            cached = self._cache.get(key) if self._cache is not None else None
            if self._cache is not None:
                self._metrics.add(
                    "blip2_embedding_cache_hits" if cached is not None else "blip2_embedding_cache_misses"
                )
            if cached is not None:
                return ImageEmbeds(cached, image.digest)
            embeds = await self._batcher((pixel_values, time.perf_counter()), priority)
            if self._cache is not None:
                self._cache.put(key, embeds)
            return ImageEmbeds(embeds, image.digest)

    async def _embed_batch(self, items: list[tuple[torch.Tensor, float]]) -> list:
        started = time.perf_counter()
        results = await self._worker.run(partial(run_isolated, self._encoder.encode), [p for p, _ in items])
        self._metrics.execution(
            len(items), sum(started - arrived for _, arrived in items), time.perf_counter() - started
        )
        return results

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict:
        """What this replica's model saw, for tests and operators."""
        cache = {"entries": len(self._cache), "bytes": self._cache.bytes} if self._cache is not None else None
        return {**self._worker.stats(), "cache": cache, "pid": os.getpid()}
