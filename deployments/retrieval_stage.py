"""The retrieval stage on Ray Serve: image embeddings, text embeddings and (image, text) scores, each batched across
requests (one call per row; rows of concurrent requests share model executions). See deployments/retrieval_model.py
for what the numbers are."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from functools import partial

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.batching import ModelWorker, configure_batching, run_isolated, set_torch_threads, unwrap
from deployments.config import BatchConfig, ModelConfig
from deployments.errors import InvalidInput
from deployments.images import ImageLimits, decode_image
from deployments.metrics import MetricsRecorder
from deployments.retrieval_model import RetrievalModel
from deployments.types import EncodedImage

logger = logging.getLogger(__name__)


@serve.deployment(name="Retrieval")
class RetrievalDeployment:
    def __init__(
        self,
        model: ModelConfig,
        batch: BatchConfig = BatchConfig(),
        limits: ImageLimits = ImageLimits(),
        torch_threads: int | None = None,
        metrics: DeploymentHandle | None = None,
    ):
        set_torch_threads(torch_threads)
        self._model = RetrievalModel.load(model)
        self._limits = limits
        self._worker = ModelWorker("retrieval")
        self._metrics = MetricsRecorder(metrics, "blip2_retrieval")
        for method in (self._image_batch, self._text_batch, self._match_batch):
            configure_batching(method, batch)
        logger.info("retrieval stage ready (%d-dimensional embeddings)", self._model.dimension)

    def _pixels(self, image: EncodedImage) -> torch.Tensor:
        return self._model.pixel_values([decode_image(image, self._limits)])[0]

    async def _run(self, method, items: list) -> list:
        started = time.perf_counter()
        results = await self._worker.run(partial(run_isolated, method), items)
        self._metrics.execution(len(items), 0.0, time.perf_counter() - started)
        return results

    # ---- one row each; a bad row fails before it joins a batch
    async def embed_image(self, image: EncodedImage) -> np.ndarray:
        with self._metrics.request():
            pixels = await asyncio.to_thread(self._pixels, image)
            return unwrap(await self._image_batch(pixels))

    async def embed_text(self, text: str) -> np.ndarray:
        with self._metrics.request():
            if not isinstance(text, str) or not text.strip():
                raise InvalidInput("TEXT must be non-empty text")
            return unwrap(await self._text_batch(text))

    async def match(self, image: EncodedImage, text: str) -> tuple[float, float]:
        with self._metrics.request():
            if not isinstance(text, str) or not text.strip():
                raise InvalidInput("TEXT must be non-empty text")
            pixels = await asyncio.to_thread(self._pixels, image)
            return unwrap(await self._match_batch((pixels, text)))

    # ---- batches
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _image_batch(self, items: list[torch.Tensor]) -> list:
        return await self._run(lambda batch: list(self._model.embed_images(torch.stack(batch))), items)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _text_batch(self, items: list[str]) -> list:
        return await self._run(lambda batch: list(self._model.embed_texts(batch)), items)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _match_batch(self, items: list[tuple[torch.Tensor, str]]) -> list:
        def scores(batch):
            itm, itc = self._model.match(torch.stack([p for p, _ in batch]), [t for _, t in batch])
            return list(zip(itm.tolist(), itc.tolist()))

        return await self._run(scores, items)

    async def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text as the model reads it (OpenAI's `usage`)."""
        ids = self._model.processor.tokenizer(list(texts), truncation=True, max_length=self._model.max_text_tokens)
        return [len(row) for row in ids["input_ids"]]

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict:
        return {**self._worker.stats(), "dimension": self._model.dimension, "pid": os.getpid()}
