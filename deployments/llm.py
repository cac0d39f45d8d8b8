"""The LLM stage on Ray Serve: ImageEmbeds + prompt -> text, batched (deployments/generator.py does the work)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from contextlib import ExitStack
from typing import AsyncIterator

import torch
from blip2_serve.clients.contract import LLM_MODEL, MAX_PROMPT_TOKENS
from blip2_serve.deployments.batching import DynamicBatcher, ModelWorker
from blip2_serve.deployments.config import BatchConfig, ModelConfig
from blip2_serve.deployments.cores import cpu_turns as cpu_turns_for
from blip2_serve.deployments.cores import load_threads, vision_signal
from blip2_serve.deployments.engine import ContinuousBatcher, Sequence
from blip2_serve.deployments.errors import InvalidInput
from blip2_serve.deployments.generator import LanguageGenerator, PreparedRequest
from blip2_serve.deployments.loading import stage_threads
from blip2_serve.deployments.metrics import MetricsRecorder
from blip2_serve.deployments.text import TextAssembler
from blip2_serve.deployments.types import GenerateChunk, GenerateRequest, GenerateResult, ImageEmbeds

logger = logging.getLogger(__name__)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _settle(future: asyncio.Future, outcome) -> None:
    if not future.done():
        future.set_exception(outcome) if isinstance(outcome, BaseException) else future.set_result(outcome)


class LLMDeployment:
    """Ray Serve replica of the LLM stage; `generate` is called once per image and prompt.

    scheduler "continuous" (default): greedy and sampled requests join a running decode batch between steps
    (deployments/engine.py); beam searches run as whole `generate` batches between steps. "static": every request
    goes through the dynamic batcher and `generate`, a batch running until its longest member ends.
    """

    def __init__(
        self,
        model: ModelConfig,
        batch: BatchConfig = BatchConfig(),
        max_prompt_tokens: int = MAX_PROMPT_TOKENS,
        torch_threads: int | None = None,
        metrics_directory: str | None = None,
        scheduler: str = "continuous",
        cpu_turns: bool = True,
    ):
        with load_threads(cpu_turns, torch_threads):
            self._generator = LanguageGenerator(model, max_prompt_tokens)
        torch_threads = stage_threads(self._generator.model.language_model, torch_threads)
        turns = cpu_turns_for(str(self._generator.device), cpu_turns, torch_threads)
        self._threads = torch.get_num_threads()  # what its model computes on (the engine's thread takes the same)
        vision = vision_signal() if turns is not None else None  # the stage that feeds this one, on this node
        self._metrics = MetricsRecorder(LLM_MODEL, metrics_directory)
        self._engine = (
            ContinuousBatcher(
                self._generator, batch.max_batch_size, turns=turns, upstream=vision, on_step=self._record_step
            )
            if scheduler == "continuous"
            else None
        )
        self._worker = ModelWorker("llm", turns=turns)
        self._streams = {"active": 0, "finished": 0, "cancelled": 0}
        self._batcher = DynamicBatcher(self._generate_batch, batch)
        logger.info(
            "LLM stage ready on %s (%s), %s scheduler", self._generator.device, self._generator.dtype, scheduler
        )

    async def generate(self, request: GenerateRequest, embeds: ImageEmbeds) -> GenerateResult:
        """Generate for one request; a prompt the model cannot take fails here, before it joins a batch."""
        with self._metrics.request():
            await self._check_guided(request)
            prepared = self._generator.prepare(request, embeds.embeds)
            if self._engine is not None and request.params.num_beams == 1:
                result = await self._in_engine(prepared)
            else:
                result = await self._batcher((prepared, time.perf_counter()), request.priority)
            self._metrics.add("blip2_generated_tokens", len(result.token_ids))
            return result

    async def generate_many(self, requests: list[GenerateRequest], embeds: ImageEmbeds) -> list[GenerateResult]:
        """Several prompts about one image in one call (ask_many): the engine admits them together (one prefill,
        OPT's image prefix once), and the image embeddings cross from the vision stage once. Fails as a whole on
        any error; a prompt the model cannot take fails it before any work."""
        if self._engine is None or any(r.params.num_beams != 1 for r in requests):
            outcomes = await asyncio.gather(*(self.generate(r, embeds) for r in requests), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            return list(outcomes)
        with ExitStack() as counted:
            for _ in requests:
                counted.enter_context(self._metrics.request())
            for request in requests:
                await self._check_guided(request)
            prepared = [self._generator.prepare(r, embeds.embeds) for r in requests]
            cancelled = [threading.Event() for _ in prepared]
            futures = self._submit_all(prepared, [None] * len(prepared), cancelled)
            try:
                results = await asyncio.shield(asyncio.gather(*futures))
            except asyncio.CancelledError:
                for event in cancelled:
                    event.set()
                raise
            for result in results:
                self._metrics.add("blip2_generated_tokens", len(result.token_ids))
            return list(results)

    async def _check_guided(self, request: GenerateRequest) -> None:
        """Guided decoding runs in the continuous-batching engine only (the static scheduler's generate has no
        guide). A format's first request compiles its index off the event loop (json_object: about 6 s for OPT's
        vocabulary on 2 cores; a small schema: tens of ms), so that other requests go on meanwhile."""
        if request.grammar is None:
            return
        if self._engine is None:
            raise InvalidInput("a response format (guided decoding) needs the continuous scheduler (llm.scheduler)")
        await asyncio.to_thread(self._generator.grammars.check, request.grammar)

    def _submit(
        self, prepared: PreparedRequest, on_tokens=None, cancelled: threading.Event | None = None
    ) -> asyncio.Future:
        """Hand a request to the engine; the future resolves on this event loop when it finishes."""
        return self._submit_all([prepared], [on_tokens], [cancelled or threading.Event()])[0]

    def _submit_all(self, prepared: list[PreparedRequest], on_tokens: list, cancelled: list) -> list[asyncio.Future]:
        """Hand requests to the engine at once (admitted together); a future per request, on this event loop."""
        loop = asyncio.get_running_loop()
        sequences, futures = [], []
        for item, tokens, event in zip(prepared, on_tokens, cancelled):
            done = loop.create_future()
            sequence = Sequence(
                item,
                on_done=lambda outcome, done=done: loop.call_soon_threadsafe(_settle, done, outcome),
                on_tokens=tokens,
                cancelled=event,
            )
            done.add_done_callback(
                lambda _, s=sequence: self._metrics.add("nv_inference_queue_duration_us", s.queued_s * 1e6)
            )
            sequences.append(sequence)
            futures.append(done)
        self._engine.submit_many(sequences)
        return futures

    async def _in_engine(self, prepared: PreparedRequest) -> GenerateResult:
        cancelled = threading.Event()
        try:
            return await asyncio.shield(self._submit(prepared, cancelled=cancelled))
        except asyncio.CancelledError:
            cancelled.set()  # the caller went away: the engine drops the sequence at its next step
            raise

    def _record_step(self, running: int, seconds: float) -> None:  # on the engine's thread
        self._metrics.execution(running, 0.0, seconds)

    async def _generate_batch(self, items: list[tuple[PreparedRequest, float]]) -> list:
        started = time.perf_counter()
        batch = [prepared for prepared, _ in items]
        if self._engine is not None:  # the engine thread owns the model: run between two of its steps
            self._worker.batch_sizes.append(len(batch))
            results = await asyncio.wrap_future(self._engine.run_exclusive(self._generator.run, batch))
        else:
            results = await self._worker.run(self._generator.run, batch)
        self._metrics.execution(
            len(items), sum(started - arrived for _, arrived in items), time.perf_counter() - started
        )
        return results

    async def generate_stream(self, request: GenerateRequest, embeds: ImageEmbeds) -> AsyncIterator[GenerateChunk]:
        """Stream one request's text as the model produces it. When the caller goes away (Ray cancels this
        generator), the model stops generating for it at the next token."""
        arrived = time.perf_counter()
        with self._metrics.request():  # counted when the stream is set up; its tokens as they come
            await self._check_guided(request)
            prepared = self._generator.prepare(request, embeds.embeds, streaming=True)
        loop = asyncio.get_running_loop()
        arrivals: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def on_tokens(tokens: list[int]) -> None:  # on the model thread
            loop.call_soon_threadsafe(arrivals.put_nowait, tokens)

        if self._engine is not None:
            completion = self._submit(prepared, on_tokens, cancelled)
        else:
            completion = asyncio.wrap_future(
                self._worker.submit(self._generator.stream, prepared, on_tokens, cancelled)
            )
        completion.add_done_callback(lambda _: arrivals.put_nowait(done))
        assembler = TextAssembler(self._generator.text_decoder(request), request.params.stop)
        prompt_tokens, generated = self._generator.prompt_tokens(prepared), 0
        self._streams["active"] += 1
        try:
            while (tokens := await arrivals.get()) is not done:
                if not generated:
                    self._metrics.observe("blip2_time_to_first_token_seconds", time.perf_counter() - arrived)
                generated += len(tokens)
                self._metrics.add("blip2_generated_tokens", len(tokens))
                text = assembler.update(tokens)
                if assembler.stopped:
                    cancelled.set()  # the rest would be cut anyway
                if text:
                    if request.grammar is not None:
                        tokens = [self._generator.grammars.model_token(token) for token in tokens]
                    yield GenerateChunk(request.request_id, text, tuple(tokens), prompt_tokens, generated)
            result = completion.result()
            yield GenerateChunk(
                request.request_id, assembler.finish(), (), prompt_tokens, len(result.token_ids), result.finish_reason
            )
            self._streams["finished"] += 1
        finally:
            self._streams["active"] -= 1
            if not completion.done():
                cancelled.set()
                self._streams["cancelled"] += 1
                logger.info("stream %s cancelled by its caller after %d tokens", request.request_id, generated)

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict:
        """What this replica's model saw, for tests and operators: whole batches (static path and beam search)
        and, with the continuous scheduler, how many sequences each decode step ran."""
        engine = None
        if self._engine is not None:
            engine = {
                "steps": self._engine.steps,
                "stepped": self._engine.stepped,
                "busy_s": round(self._engine.busy_s, 3),
                "deferred_s": round(self._engine.deferred_s, 3),
                "max_running_seen": self._engine.max_running_seen,
                "split_prefills": self._engine.split_prefills,
                # greedy rows through the bf16 screen of the output projection, and the candidate tokens recounted
                "head_rows": self._engine.head.rows if self._engine.head is not None else None,
                "head_candidates": self._engine.head.checked if self._engine.head is not None else None,
                "running": self._engine.running,
            }
        where = {"pid": os.getpid(), "node_id": _node_id(), "torch_threads": self._threads}
        return {
            **self._worker.stats(),
            "split_batches": self._generator.split_batches,
            "streams": dict(self._streams),
            "engine": engine,
            **where,
        }
