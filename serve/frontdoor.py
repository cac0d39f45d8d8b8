"""The front door: the one typed object every protocol adapter receives and calls (the role KServe's DataPlane plays).

An adapter (serve/http.py, serve/openai.py, serve/grpc.py) parses its protocol into internal types with a codec
(deployments/kserve.py, serve/openai_codec.py, serve/retrieval.py), calls one method here, and renders the answer:

- generation: `generate`, `generate_many`, `stream` take GenerateRequests and go image -> vision stage ->
  ImageEmbeds -> LLM stage (deployments/vision.py, deployments/llm.py) through Ray Serve handles;
- retrieval: `retrieve` takes a RetrievalRequest (the Retrieval stage, deployments/retrieval_stage.py), and
  `embed_texts` OpenAI's embeddings;
- the server's state: `check_model`, `not_ready`, `repository_index`, `model_metadata`, `model_config`,
  `statistics`, `metrics_text`, and admission (`admitted`, `draining`, the API key) for the edge.

Requests are counted in the served model's metrics here (`counted`), whatever protocol brought them.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Iterator, TypeVar

import numpy as np
from blip2_serve.clients.contract import (
    EMBED_IMAGE_MODEL,
    EMBED_TEXT_MODEL,
    EMBEDDING,
    ITC_SCORE,
    ITM_SCORE,
    LLM_MODEL,
    MODEL_VERSION,
    RETRIEVAL_MODELS,
    RETRIEVAL_STAGE_MODEL,
    VISION_MODEL,
)
from blip2_serve.deployments.errors import Blip2ServeError, ModelNotFound, NotFound, Unavailable, status_of
from blip2_serve.deployments.metrics import MetricsRecorder
from blip2_serve.deployments.metrics import render as render_metrics
from blip2_serve.deployments.metrics import totals as metric_totals
from blip2_serve.deployments.types import EncodedImage, GenerateChunk, GenerateRequest, GenerateResult
from blip2_serve.serve import metadata
from blip2_serve.serve.auth import ApiKey
from blip2_serve.serve.config import AppConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponse

logger = logging.getLogger(__name__)
T = TypeVar("T")

STAGE_MODELS = {"vision": VISION_MODEL, "llm": LLM_MODEL, "retrieval": RETRIEVAL_STAGE_MODEL}


@dataclass(frozen=True)
class RetrievalRequest:
    """One request to a retrieval model, checked: `images` for blip2_embed_image, `texts` for blip2_embed_text,
    both (row for row) for blip2_itm."""

    model: str
    images: list[EncodedImage] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return max(len(self.images), len(self.texts))


def _as_ours(exc: Exception) -> Exception:
    """Ray's overload and lost-replica errors as Unavailable (503 with Retry-After, UNAVAILABLE), so that every
    protocol renders them itself; anything else as it is."""
    if isinstance(exc, Blip2ServeError):
        return exc
    status, _, message = status_of(exc)
    return Unavailable(message) if status == Unavailable.http_status else exc


async def _retriable(work: Awaitable[T]) -> T:
    """Await a stage call, its errors as _as_ours says."""
    try:
        return await work
    except Exception as exc:
        mapped = _as_ours(exc)
        if mapped is exc:
            raise
        raise mapped from exc


def by_value(handle: DeploymentHandle | None) -> DeploymentHandle | None:
    """`handle` sending its calls and their results by value, over the gRPC server every Serve replica runs, instead
    of as Ray actor tasks whose arguments and results are objects in Ray's object store (`_by_reference`, an option
    of DeploymentHandle.options). Same routing, queue limits, autoscaling and cancellation; fewer hops. Measured on 2
    cores, a lone tiny caption's three stage hops (timestamps in each process, p50 of 60): the call to the vision
    stage 3.5 -> 2.1 ms, its result and the call to the LLM stage 5.3 -> 3.8 ms, the LLM's result 1.9 -> 1.5 ms. The
    price: an image's embeddings pass through the ingress (32 query tokens x the LLM's width in fp32: 330 KB for
    OPT-2.7B) instead of going from the vision replica to the LLM replica."""
    return handle.options(_by_reference=False) if handle is not None else None


class FrontDoor:
    """One BLIP-2 application's entry: the stages' handles, the server's settings, its metrics and admission."""

    def __init__(
        self,
        vision: DeploymentHandle,
        llm: DeploymentHandle,
        config: AppConfig,
        retrieval: DeploymentHandle | None = None,
        metrics_directory: str | None = None,
        batches: DeploymentHandle | None = None,
    ):
        self._vision = by_value(vision)
        self._llm = by_value(llm)
        self._retrieval = by_value(retrieval)  # the Retrieval stage, when the config names a retrieval checkpoint
        self._batches = batches  # the Batch API's replica (serve/batch_jobs.py), unless server.batch_dir is None
        self.config = config
        self.server = config.server
        self._limits = config.server.generation_limits()
        self.metrics_directory = metrics_directory  # the application's series on this node, rendered at /metrics
        self._metrics = {config.server.model_name: MetricsRecorder(config.server.model_name, metrics_directory)}
        self.api_key = ApiKey.from_env(config.server.api_key_env) if config.server.api_key_env else None
        # Graceful shutdown: requests held now, and whether new ones are refused (503) because the server is going
        self.in_flight = 0
        self.draining = False

    # --- admission and accounting -------------------------------------------------------------------------------

    @contextmanager
    def admitted(self, pending: bool = True) -> Iterator[None]:
        """Hold one request: refused (retriable) while draining, counted in flight until answered (and in the
        served model's pending gauge where `pending`)."""
        if self.draining:
            raise Unavailable("the server is shutting down; retry (another replica or server takes it)")
        self.in_flight += 1
        try:
            with self.metrics_for(self.server.model_name).pending() if pending else nullcontext():
                yield
        finally:
            self.in_flight -= 1

    def metrics_for(self, model_name: str) -> MetricsRecorder:
        """The request counters of one model served here (the retrieval models count apart from blip2)."""
        if model_name not in self._metrics:
            self._metrics[model_name] = MetricsRecorder(model_name, self.metrics_directory)
        return self._metrics[model_name]

    def counted(self, model_name: str | None = None):
        """A context counting one request to `model_name` (default: the BLIP-2 model) in its success/failure,
        duration and row counts; set `["rows"]` on what it yields for a request of several rows."""
        return self.metrics_for(model_name or self.server.model_name).request()

    # --- models ---------------------------------------------------------------------------------------------------

    def serves_retrieval(self, model_name: str) -> bool:
        return self._retrieval is not None and model_name in RETRIEVAL_MODELS

    def check_model(self, model_name: str, version: str = "") -> None:
        """Raise ModelNotFound unless the request names a model served here (and version 1 or none)."""
        if model_name != self.server.model_name and not self.serves_retrieval(model_name):
            raise ModelNotFound(f"Request for unknown model: '{model_name}' is not found")
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(f"Request for unknown model: '{model_name}' version {version} is not found")

    def models(self) -> list[str]:
        """The models served here: the BLIP-2 model, then the retrieval models where configured."""
        return [self.server.model_name] + (sorted(RETRIEVAL_MODELS) if self._retrieval is not None else [])

    def model_metadata(self, model_name: str, version: str = "") -> dict[str, Any]:
        """KServe v2 model metadata of a model served here (ModelNotFound otherwise)."""
        self.check_model(model_name, version)
        return metadata.model_metadata(self.config, model_name)

    def model_config(self, model_name: str, version: str = "") -> dict[str, Any]:
        """Triton's model configuration (JSON form) of a model served here (ModelNotFound otherwise)."""
        self.check_model(model_name, version)
        return metadata.model_config(self.config, model_name)

    # --- generation -----------------------------------------------------------------------------------------------

    def _embed(self, request: GenerateRequest) -> DeploymentResponse:
        """The vision stage's ImageEmbeds for the request's image, as a response to hand to the LLM stage: Ray
        sends the LLM call as soon as the embeddings are here, with them (a vision error fails the LLM call with
        it, before it is sent)."""
        if request.image is None:
            raise ValueError("GenerateRequest without an image reached the front door")
        self._limits.check(request.params)
        return self._vision.embed.remote(request.image, request.priority)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Run one request through both stages; the stages batch it with concurrent requests."""
        return await _retriable(self._llm.generate.remote(request.without_image(), self._embed(request)))

    async def generate_many(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Run requests concurrently (so they share batches). Each distinct image goes through the vision stage
        once, and its prompts to the LLM stage in one call; the first error fails the call, after all finish."""
        by_image: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            if request.image is None:
                raise ValueError("GenerateRequest without an image reached the front door")
            self._limits.check(request.params)  # all rows before any work
            by_image.setdefault(request.image.digest, []).append(index)

        async def one_image(indices: list[int]) -> list[GenerateResult]:
            embeds = self._embed(requests[indices[0]])
            if len(indices) == 1:
                return [await _retriable(self._llm.generate.remote(requests[indices[0]].without_image(), embeds))]
            many = [requests[i].without_image() for i in indices]
            return await _retriable(self._llm.generate_many.remote(many, embeds))

        groups = list(by_image.values())
        outcomes = await asyncio.gather(*(one_image(g) for g in groups), return_exceptions=True)
        results: list[GenerateResult] = [None] * len(requests)  # type: ignore[list-item]
        for indices, outcome in zip(groups, outcomes):
            if isinstance(outcome, BaseException):
                raise outcome
            for index, result in zip(indices, outcome):
                results[index] = result
        return results

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Run one request, yielding text as the LLM stage produces it; closing this generator stops it there."""
        chunks = self._llm.options(stream=True).generate_stream.remote(request.without_image(), self._embed(request))
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:
            mapped = _as_ours(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            chunks.cancel()  # a no-op once finished; stops the LLM stage when our caller went away

    # --- retrieval ------------------------------------------------------------------------------------------------

    def _retrieval_stage(self, model_name: str) -> DeploymentHandle:
        if self._retrieval is None:
            raise ModelNotFound(f"Request for unknown model: '{model_name}' is not found (no retrieval: configured)")
        return self._retrieval

    async def retrieve(self, request: RetrievalRequest) -> dict[str, np.ndarray]:
        """A retrieval model's outputs by tensor name: one stage call per row, sent together (the stage batches
        them with other requests' rows)."""
        stage = self._retrieval_stage(request.model)
        if request.model == EMBED_IMAGE_MODEL:
            vectors = await _retriable(asyncio.gather(*(stage.embed_image.remote(i) for i in request.images)))
            return {EMBEDDING.name: np.stack(vectors)}
        if request.model == EMBED_TEXT_MODEL:
            return {EMBEDDING.name: await self.embed_texts(request.texts)}
        calls = (stage.match.remote(i, t) for i, t in zip(request.images, request.texts))
        scores = await _retriable(asyncio.gather(*calls))
        array = np.asarray(scores, dtype=np.float32).reshape(request.rows, 2)
        return {ITM_SCORE.name: array[:, :1], ITC_SCORE.name: array[:, 1:]}

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings, one row per text."""
        stage = self._retrieval_stage(EMBED_TEXT_MODEL)
        return np.stack(await _retriable(asyncio.gather(*(stage.embed_text.remote(t) for t in texts))))

    async def token_counts(self, texts: list[str]) -> list[int]:
        """How many tokens the retrieval model's tokenizer makes of each text (OpenAI's usage)."""
        return await _retriable(self._retrieval_stage(EMBED_TEXT_MODEL).token_counts.remote(texts))

    # --- OpenAI's Batch API ---------------------------------------------------------------------------------------

    async def batch_api(self, method: str, *args: Any) -> Any:
        """Call the Batches replica (serve/batch_jobs.BatchJobs): files, batches; NotFound where the API is off."""
        if self._batches is None:
            raise NotFound("the Batch API is off on this server (server.batch_dir is null)")
        return await _retriable(getattr(self._batches, method).remote(*args))

    # --- state ----------------------------------------------------------------------------------------------------

    def _stages_for(self, model_name: str | None) -> set[str]:
        """The stages a model needs (None: the server, all of them)."""
        stages = {"vision", "llm"} if model_name is None or not self.serves_retrieval(model_name) else set()
        if self._retrieval is not None and (model_name is None or self.serves_retrieval(model_name)):
            stages.add("retrieval")
        return stages

    async def not_ready(self, model_name: str | None = None, timeout_s: float = 5.0) -> list[str]:
        """The stages that do not answer ready within `timeout_s`, among those `model_name` needs (the server: all
        of them); ["draining"] while shutting down. A replica Ray cannot place yet never answers, so a stage still
        pending keeps the server unready, by name, instead of the check waiting with it. Each stage is asked once."""
        if self.draining:
            return ["draining"]
        handles = {"vision": self._vision, "llm": self._llm, "retrieval": self._retrieval}
        checks = {
            name: handles[name].ready.remote()
            for name in ("vision", "llm", "retrieval")
            if name in self._stages_for(model_name)
        }

        async def answered(response) -> bool:
            try:
                return bool(await asyncio.wait_for(response, timeout_s))
            except Exception:  # a timeout, a dead replica: not ready
                return False

        outcomes = await asyncio.gather(*(answered(r) for r in checks.values()))
        pending = [name for name, ok in zip(checks, outcomes) if not ok]
        if pending:
            logger.info("not ready: %s", ", ".join(pending))
        return pending

    async def repository_index(self) -> list[dict[str, str]]:
        """Triton's repository index: every model served here, READY or UNAVAILABLE with the reason (the stages are
        asked once, for all the models)."""
        pending_everywhere = await self.not_ready()
        index = []
        for name in self.models():
            pending = [s for s in pending_everywhere if s == "draining" or s in self._stages_for(name)]
            entry = {"name": name, "version": MODEL_VERSION, "state": "UNAVAILABLE" if pending else "READY"}
            if pending:
                entry["reason"] = f"waiting for: {', '.join(pending)}"
            index.append(entry)
        return index

    async def statistics(self, model_name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's statistics: the models served here and the stages behind them, or the one named."""
        stages = [STAGE_MODELS[s] for s in ("vision", "llm", "retrieval") if s in self._stages_for(None)]
        if model_name and model_name not in stages:
            self.check_model(model_name, version)
        totals = await asyncio.to_thread(metric_totals, self.metrics_directory)
        return metadata.model_statistics(totals, [model_name] if model_name else self.models() + stages)

    async def metrics_text(self) -> tuple[str, str]:
        """Prometheus text (and its content type): the application's series on this node, summed over replicas."""
        return await asyncio.to_thread(render_metrics, self.metrics_directory)

    async def stage_stats(self) -> dict:
        """Batch sizes seen by one replica of each stage."""
        vision, llm = await asyncio.gather(self._vision.stats.remote(), self._llm.stats.remote())
        return {"vision": vision, "llm": llm}
