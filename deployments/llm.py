"""The LLM stage on Ray Serve: ImageEmbeds + prompt -> text, batched (deployments/generator.py does the work)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.batching import ModelWorker, configure_batching, set_torch_threads, unwrap
from deployments.config import BatchConfig, ModelConfig
from deployments.generator import LanguageGenerator, PreparedRequest
from deployments.metrics import MetricsRecorder
from deployments.text import TextAssembler
from deployments.types import GenerateChunk, GenerateRequest, GenerateResult, ImageEmbeds

logger = logging.getLogger(__name__)


@serve.deployment(name="LLM")
class LLMDeployment:
    """Ray Serve replica of the LLM stage; `generate` is called once per image and prompt, and batched."""

    def __init__(
        self,
        model: ModelConfig,
        batch: BatchConfig = BatchConfig(),
        max_prompt_tokens: int = 512,
        torch_threads: int | None = None,
        metrics: DeploymentHandle | None = None,
    ):
        set_torch_threads(torch_threads)
        self._generator = LanguageGenerator(model, max_prompt_tokens)
        self._worker = ModelWorker("llm")
        self._metrics = MetricsRecorder(metrics, "blip2_llm")
        self._streams = {"active": 0, "finished": 0, "cancelled": 0}
        configure_batching(self._generate_batch, batch)
        logger.info("LLM stage ready on %s (%s)", self._generator.device, self._generator.dtype)

    async def generate(self, request: GenerateRequest, embeds: ImageEmbeds) -> GenerateResult:
        """Generate for one request; a prompt the model cannot take fails here, before it joins a batch."""
        with self._metrics.request():
            prepared = self._generator.prepare(request, embeds.embeds)
            result = unwrap(await self._generate_batch((prepared, time.perf_counter())))
            self._metrics.add("blip2_generated_tokens", len(result.token_ids))
            return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, items: list[tuple[PreparedRequest, float]]) -> list:
        started = time.perf_counter()
        results = await self._worker.run(self._generator.run, [prepared for prepared, _ in items])
        self._metrics.execution(
            len(items), sum(started - arrived for _, arrived in items), time.perf_counter() - started
        )
        return results

    async def generate_stream(self, request: GenerateRequest, embeds: ImageEmbeds) -> AsyncIterator[GenerateChunk]:
        """Stream one request's text as the model produces it. When the caller goes away (Ray cancels this
        generator), the model stops generating for it at the next token."""
        arrived = time.perf_counter()
        with self._metrics.request():  # counted when the stream is set up; its tokens as they come
            prepared = self._generator.prepare(request, embeds.embeds, streaming=True)
        loop = asyncio.get_running_loop()
        arrivals: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def on_tokens(tokens: list[int]) -> None:  # on the model thread
            loop.call_soon_threadsafe(arrivals.put_nowait, tokens)

        future = self._worker.submit(self._generator.stream, prepared, on_tokens, cancelled)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(arrivals.put_nowait, done))
        assembler = TextAssembler(self._generator.tokenizer, request.params.stop)
        prompt_tokens, generated = self._generator.prompt_tokens(prepared), 0
        self._streams["active"] += 1
        try:
            while (tokens := await arrivals.get()) is not done:
                if not generated:
                    self._metrics.observe("blip2_time_to_first_token_seconds", time.perf_counter() - arrived)
                    self._metrics.execution(1, 0.0, 0.0)
                generated += len(tokens)
                self._metrics.add("blip2_generated_tokens", len(tokens))
                text = assembler.update(tokens)
                if assembler.stopped:
                    cancelled.set()  # the rest would be cut anyway
                if text:
                    yield GenerateChunk(request.request_id, text, tuple(tokens), prompt_tokens, generated)
            result = future.result()
            yield GenerateChunk(
                request.request_id, assembler.finish(), (), prompt_tokens, len(result.token_ids), result.finish_reason
            )
            self._streams["finished"] += 1
        finally:
            self._streams["active"] -= 1
            if not future.done():
                cancelled.set()
                self._streams["cancelled"] += 1
                logger.info("stream %s cancelled by its caller after %d tokens", request.request_id, generated)

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict:
        """What this replica's model saw, for tests and operators."""
        return {**self._worker.stats(), "streams": dict(self._streams)}
