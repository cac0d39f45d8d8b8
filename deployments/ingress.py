"""The composition of the two model stages through Ray Serve DeploymentHandles.

Every protocol's ingress holds one Blip2Pipeline and calls it with GenerateRequests; it never sees tensors.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, TypeVar

from blip2_serve.deployments.errors import Blip2ServeError, Unavailable, status_of
from blip2_serve.deployments.types import GenerateChunk, GenerateRequest, GenerateResult, GenerationLimits
from ray.serve.handle import DeploymentHandle, DeploymentResponse

logger = logging.getLogger(__name__)
T = TypeVar("T")


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


class Blip2Pipeline:
    """image -> vision stage -> ImageEmbeds -> LLM stage -> GenerateResult, one request at a time or many."""

    def __init__(self, vision: DeploymentHandle, llm: DeploymentHandle, limits: GenerationLimits | None = None):
        self._vision = vision
        self._llm = llm
        self._limits = limits or GenerationLimits()

    def _embed(self, request: GenerateRequest) -> DeploymentResponse:
        """The vision stage's ImageEmbeds for the request's image, as a response to hand to the LLM stage: Ray
        passes the embeddings from the vision replica to the LLM replica directly, and sends the LLM call as soon
        as they exist, without a round trip through this process (a vision error fails the LLM call with it)."""
        if request.image is None:
            raise ValueError("GenerateRequest without an image reached the pipeline")
        self._limits.check(request.params)
        return self._vision.embed.remote(request.image)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Run one request through both stages; the stages batch it with concurrent requests."""
        return await _retriable(self._llm.generate.remote(request.without_image(), self._embed(request)))

    async def generate_all(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Run requests concurrently (so they share batches). Each distinct image goes through the vision stage
        once, and its prompts to the LLM stage in one call; the first error fails the call, after all finish."""
        by_image: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            if request.image is None:
                raise ValueError("GenerateRequest without an image reached the pipeline")
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

    def ready_checks(self) -> dict[str, DeploymentResponse]:
        """A readiness call to each stage, by name (the ingress awaits them with a deadline)."""
        return {"vision": self._vision.ready.remote(), "llm": self._llm.ready.remote()}

    async def stats(self) -> dict:
        """Batch sizes seen by one replica of each stage."""
        vision, llm = await asyncio.gather(self._vision.stats.remote(), self._llm.stats.remote())
        return {"vision": vision, "llm": llm}
