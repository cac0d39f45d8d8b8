"""Batching is real: concurrent requests reach the model stages in batches, with unchanged results."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
import tritonclient.http.aio as aioclient
from blip2_serve.deployments.images import check_image
from blip2_serve.deployments.types import GenerateRequest, GenerationParams

from tests.helpers import image_bytes

pytestmark = pytest.mark.serve


def _batches(stats: dict) -> Counter:
    return Counter({int(size): count for size, count in stats["histogram"].items()})


def _stage_stats(app) -> dict:
    vision = app.deployment("Vision").stats.remote().result(timeout_s=30)
    llm = app.deployment("LLM").stats.remote().result(timeout_s=30)
    return {"vision": _batches(vision), "llm_engine": llm["engine"]}


async def _infer_concurrently(url: str, images: list[bytes], prompts: list[str]) -> list[str]:
    client = aioclient.InferenceServerClient(url)
    try:

        async def one(image: bytes, prompt: str) -> str:
            image_input = aioclient.InferInput("IMAGE", [1, 1], "BYTES")
            image_input.set_data_from_numpy(np.array([[image]], dtype=np.object_))
            prompt_input = aioclient.InferInput("PROMPT", [1, 1], "BYTES")
            prompt_input.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
            result = await client.infer("blip2", [image_input, prompt_input], parameters={"max_new_tokens": 8})
            return result.as_numpy("TEXT")[0, 0].decode()

        return await asyncio.gather(*(one(i, p) for i, p in zip(images, prompts)))
    finally:
        await client.close()


def test_sixteen_concurrent_requests_are_batched(app, references):
    images = [image_bytes(5100 + i) for i in range(16)]  # seeds no other test sends: no embedding-cache hits
    prompts = ["a photo of" if i % 2 else "Question: what is this? Answer:" for i in range(16)]
    reference = references[app.llm]
    alone = [reference.text(reference.generate([i], [p], max_new_tokens=8)[0]) for i, p in zip(images, prompts)]

    before = _stage_stats(app)
    together = asyncio.run(_infer_concurrently(app.url, images, prompts))
    after = _stage_stats(app)

    assert together == alone
    new_batches = after["vision"] - before["vision"]
    assert sum(size * n for size, n in new_batches.items()) == 16, new_batches
    assert max(new_batches) > 1, f"the vision stage saw only batches of one: {dict(new_batches)}"
    # The LLM stage decodes them together: in this test its steps ran two sequences or more each, on average.
    steps = after["llm_engine"]["steps"] - before["llm_engine"]["steps"]
    stepped = after["llm_engine"]["stepped"] - before["llm_engine"]["stepped"]
    assert steps > 0 and stepped >= 2 * steps, (steps, stepped)


def test_mixed_parameters_share_batches_only_where_results_are_unchanged(app):
    """Greedy with different lengths, beam search and seeded sampling sent together give their solo results."""
    image = check_image(image_bytes(42))
    variants = [
        GenerationParams(max_new_tokens=4),
        GenerationParams(max_new_tokens=10),
        GenerationParams(max_new_tokens=10, num_beams=3),
        GenerationParams(max_new_tokens=10, repetition_penalty=1.5),
        GenerationParams(max_new_tokens=10, do_sample=True, seed=7, top_k=20),
        GenerationParams(max_new_tokens=10, do_sample=True, seed=8, temperature=0.7),
    ]
    requests = [GenerateRequest(f"mixed-{i}", image, "a", params) for i, params in enumerate(variants)]
    handle = app.handle()
    alone = [handle.generate.remote(r).result(timeout_s=60).token_ids for r in requests]
    together = [r.token_ids for r in handle.generate_many.remote(requests).result(timeout_s=60)]

    assert together == alone
    assert alone[0] == alone[1][: len(alone[0])]  # greedy: the shorter request is a prefix of the longer
    again = handle.generate.remote(requests[4]).result(timeout_s=60).token_ids
    assert again == alone[4], "a seeded sampling request is reproducible"
