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
from blip2_serve.clients.contract import RETRIEVAL_STAGE_MODEL
from blip2_serve.deployments.batching import DynamicBatcher, ModelWorker, run_isolated
from blip2_serve.deployments.cache import EmbeddingCache
from blip2_serve.deployments.config import BatchConfig, ModelConfig
from blip2_serve.deployments.cores import cpu_turns as cpu_turns_for
from blip2_serve.deployments.cores import load_threads
from blip2_serve.deployments.errors import InvalidInput
from blip2_serve.deployments.images import ImageLimits
from blip2_serve.deployments.metrics import MetricsRecorder
from blip2_serve.deployments.retrieval_model import RetrievalModel
from blip2_serve.deployments.types import EncodedImage
from blip2_serve.deployments.vision_encoder import ImagePreprocessor

logger = logging.getLogger(__name__)


class RetrievalDeployment:
    def __init__(
        self,
        model: ModelConfig,
        batch: BatchConfig = BatchConfig(),
        limits: ImageLimits = ImageLimits(),
        torch_threads: int | None = None,
        metrics_directory: str | None = None,
        cache_bytes: int = 0,
        cpu_turns: bool = True,
    ):
        with load_threads(cpu_turns, torch_threads):
            self._model = RetrievalModel.load(model)
        turns = cpu_turns_for(str(self._model.device), cpu_turns, torch_threads)
        self._preprocess = ImagePreprocessor(None, limits, image_processor=self._model.processor.image_processor)
        self._worker = ModelWorker("retrieval", turns=turns)
        self._metrics = MetricsRecorder(RETRIEVAL_STAGE_MODEL, metrics_directory)
        # The vision stage's cache, for this stage's vision tower: an image embedded, then matched against texts
        # (or indexed again) runs the tower once.
        self._cache = EmbeddingCache(cache_bytes) if cache_bytes else None
        self._vision_batcher = DynamicBatcher(self._vision_batch, batch)
        self._image_batcher = DynamicBatcher(self._image_batch, batch)
        self._text_batcher = DynamicBatcher(self._text_batch, batch)
        self._match_batcher = DynamicBatcher(self._match_batch, batch)
        logger.info("retrieval stage ready (%d-dimensional embeddings)", self._model.dimension)

    async def _features(self, image: EncodedImage) -> torch.Tensor:
        """The vision tower's output for one image, from the cache where it is there."""
        pixels, key = await asyncio.to_thread(self._preprocess.with_key, image)  # the vision stage's cache key
        cached = self._cache.get(key) if self._cache is not None else None
        if self._cache is not None:
            self._metrics.add("blip2_embedding_cache_hits" if cached is not None else "blip2_embedding_cache_misses")
        if cached is not None:
            return cached
        features = await self._vision_batcher(pixels)
        if self._cache is not None:
            self._cache.put(key, features)
        return features

    async def _run(self, method, items: list) -> list:
        started = time.perf_counter()
        results = await self._worker.run(partial(run_isolated, method), items)
        self._metrics.execution(len(items), 0.0, time.perf_counter() - started)
        return results

    # ---- one row each; a bad row fails before it joins a batch
    async def embed_image(self, image: EncodedImage) -> np.ndarray:
        with self._metrics.request():
            return await self._image_batcher(await self._features(image))

    async def embed_text(self, text: str) -> np.ndarray:
        with self._metrics.request():
            if not isinstance(text, str) or not text.strip():
                raise InvalidInput("TEXT must be non-empty text")
            return await self._text_batcher(text)

    async def match(self, image: EncodedImage, text: str) -> tuple[float, float]:
        with self._metrics.request():
            if not isinstance(text, str) or not text.strip():
                raise InvalidInput("TEXT must be non-empty text")
            return await self._match_batcher((await self._features(image), text))

    # ---- batches
    async def _vision_batch(self, items: list[torch.Tensor]) -> list:
        model = self._model
        return await self._run(
            lambda batch: list(model.vision_features(torch.stack(batch).to(model.device, model.dtype))), items
        )

    async def _image_batch(self, items: list[torch.Tensor]) -> list:
        return await self._run(lambda batch: list(self._model.embed_images(None, torch.stack(batch))), items)

    async def _text_batch(self, items: list[str]) -> list:
        return await self._run(lambda batch: list(self._model.embed_texts(batch)), items)

    async def _match_batch(self, items: list[tuple[torch.Tensor, str]]) -> list:
        def scores(batch):
            itm, itc = self._model.match(None, [t for _, t in batch], vision=torch.stack([f for f, _ in batch]))
            return list(zip(itm.tolist(), itc.tolist()))

        return await self._run(scores, items)

    async def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text as the model reads it (OpenAI's `usage`)."""
        ids = self._model.processor.tokenizer(list(texts), truncation=True, max_length=self._model.max_text_tokens)
        return [len(row) for row in ids["input_ids"]]

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict:
        cache = {"entries": len(self._cache), "hits": self._cache.hits} if self._cache is not None else None
        return {**self._worker.stats(), "dimension": self._model.dimension, "cache": cache, "pid": os.getpid()}
