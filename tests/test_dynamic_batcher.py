"""The replicas' dynamic batcher (deployments/batching.py): what arrives while the model is busy runs as one batch."""

from __future__ import annotations

import asyncio

import pytest
from blip2_serve.deployments.batching import DynamicBatcher
from blip2_serve.deployments.config import BatchConfig


class Model:
    """Records the batches it runs; each takes `seconds`; an item "bad" fails alone."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds
        self.batches: list[list] = []

    async def run(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        return [ValueError(f"bad item {i}") if i == "bad" else i * 2 for i in items]


def test_requests_arriving_while_the_model_runs_form_one_batch():
    async def main():
        model = Model(seconds=0.2)
        batcher = DynamicBatcher(model.run, BatchConfig(max_batch_size=8))
        first = asyncio.create_task(batcher(0))
        later = []
        for i in range(1, 6):  # arrive 10 ms apart while the first batch runs
            await asyncio.sleep(0.01)
            later.append(asyncio.create_task(batcher(i)))
        assert await asyncio.gather(first, *later) == [0, 2, 4, 6, 8, 10]
        return model.batches

    assert asyncio.run(main()) == [[0], [1, 2, 3, 4, 5]]


def test_batches_stop_at_max_batch_size_and_keep_order():
    async def main():
        model = Model()
        batcher = DynamicBatcher(model.run, BatchConfig(max_batch_size=3))
        results = await asyncio.gather(*(batcher(i) for i in range(7)))
        return results, model.batches

    results, batches = asyncio.run(main())
    assert results == [2 * i for i in range(7)]
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_bad_item_fails_alone():
    async def main():
        batcher = DynamicBatcher(Model().run, BatchConfig(max_batch_size=8))
        return await asyncio.gather(batcher(1), batcher("bad"), batcher(3), return_exceptions=True)

    good, bad, other = asyncio.run(main())
    assert (good, other) == (2, 6)
    assert isinstance(bad, ValueError) and "bad item" in str(bad)


def test_a_caller_that_went_away_is_not_run():
    async def main():
        model = Model(seconds=0.1)
        batcher = DynamicBatcher(model.run, BatchConfig(max_batch_size=8))
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher(2))
        kept = asyncio.create_task(batcher(3))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert await first == 2 and await kept == 6
        with pytest.raises(asyncio.CancelledError):
            await gone
        return model.batches

    assert asyncio.run(main()) == [[1], [3]]


def test_wait_timeout_gathers_the_first_arrivals_of_an_idle_model():
    async def main():
        model = Model(seconds=0.01)
        batcher = DynamicBatcher(model.run, BatchConfig(max_batch_size=8, wait_timeout_s=0.1))
        tasks = [asyncio.create_task(batcher(0))]
        await asyncio.sleep(0.02)
        tasks.append(asyncio.create_task(batcher(1)))
        await asyncio.gather(*tasks)
        return model.batches

    assert asyncio.run(main()) == [[0, 1]]


def test_interactive_items_go_first_and_never_share_a_batch_with_background_ones():
    """Batch API lines (BACKGROUND) wait while interactive items do, and run in batches of their own."""
    from blip2_serve.deployments.types import BACKGROUND

    async def main():
        model = Model(seconds=0.1)
        batcher = DynamicBatcher(model.run, BatchConfig(max_batch_size=4))
        calls = [asyncio.create_task(batcher(0, BACKGROUND))]  # runs alone: the model was idle
        await asyncio.sleep(0.02)
        calls += [asyncio.create_task(batcher(i, BACKGROUND)) for i in (1, 2, 3)]  # queued first ...
        calls += [asyncio.create_task(batcher(i)) for i in (10, 11)]  # ... but these run first
        await asyncio.sleep(0.02)
        calls.append(asyncio.create_task(batcher(12)))
        calls.append(asyncio.create_task(batcher(4, BACKGROUND)))
        await asyncio.gather(*calls)
        return model.batches

    assert asyncio.run(main()) == [[0], [10, 11, 12], [1, 2, 3, 4]]
