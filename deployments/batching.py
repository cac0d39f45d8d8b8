"""What the batched stages share: batch settings from config, per-item failure, and a record of batch sizes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

from blip2_serve.deployments.config import BatchConfig
from blip2_serve.deployments.cores import CoreTurns, threads_here, turn_of
from blip2_serve.deployments.types import BACKGROUND, INTERACTIVE

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class DynamicBatcher(Generic[T, R]):
    """Triton's dynamic batching in a replica: `await batcher(item)`; whenever the model is free, everything waiting
    (up to max_batch_size) runs as one batch of `run`, which returns one result or exception per item.

    Not Ray's `@serve.batch`: that forms the next batch as soon as the previous one starts, from whatever has arrived
    by then, and holds it until the model is free; requests that arrive a few milliseconds apart then run one by
    one behind each other (measured: 16 concurrent captions in 14 vision executions). Here a batch is formed when
    the model can take it, so the requests that arrived while it was busy run together.

    Two priority classes: INTERACTIVE items (a client waits) and BACKGROUND ones (Batch API lines). A batch is formed
    from the interactive items waiting; background items run only in a batch of their own, when no interactive item
    waits, so that an interactive request never computes beside background work nor queues behind more than the one
    background batch already running.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R | BaseException]]], config: BatchConfig):
        self._run = run
        self.max_batch_size = config.max_batch_size
        self.wait_timeout_s = config.wait_timeout_s  # after an idle model's first arrival, wait this long for more
        self._queues: tuple[deque[tuple[T, asyncio.Future]], ...] = (deque(), deque())  # by priority class
        self._full = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues)

    async def __call__(self, item: T, priority: int = INTERACTIVE) -> R:
        """The result for `item`, or its error raised here (one bad item fails alone)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queues[BACKGROUND if priority else INTERACTIVE].append((item, future))
        if self.waiting >= self.max_batch_size:
            self._full.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future  # a caller that goes away cancels its future: its item is dropped if not begun

    async def _drain(self) -> None:
        idle = True
        while self.waiting:
            if idle and self.wait_timeout_s and self.waiting < self.max_batch_size:
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), self.wait_timeout_s)
                except asyncio.TimeoutError:
                    pass
            idle = False
            batch = []
            queue = next(q for q in self._queues if q)  # interactive items first, never mixed with background ones
            while queue and len(batch) < self.max_batch_size:
                item, future = queue.popleft()
                if not future.done():
                    batch.append((item, future))
            if not batch:
                continue
            try:
                results = await self._run([item for item, _ in batch])
            except Exception as exc:  # `run` isolates items itself; this is a bug, reported to every caller
                logger.exception("batch failed")
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def run_isolated(
    fn: Callable[[list[T]], list[R]], items: list[T], on_split: Callable[[], None] | None = None
) -> list[R | BaseException]:
    """`fn(items)`, one result per item; if the batch raises, each item runs alone so only its culprit fails
    (`on_split()` is called when a batch is split)."""
    try:
        return list(fn(items))
    except Exception as exc:
        if len(items) == 1:
            logger.exception("item failed")
            return [exc]
        logger.warning("batch of %d failed (%s); running its items one by one", len(items), exc)
        if on_split is not None:
            on_split()
    results: list[R | BaseException] = []
    for item in items:
        results.extend(run_isolated(fn, [item]))
    return results


class ModelWorker:
    """One thread that owns the model: batches run one at a time, off the replica's event loop.

    The event loop stays free to accept and queue the next batch's requests while a batch runs.
    """

    def __init__(self, name: str, history: int = 4096, turns: CoreTurns | None = None):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=threads_here)
        self.batch_sizes: deque[int] = deque(maxlen=history)
        self.turns = turns  # on a CPU node: each batch waits for its turn at all of the node's cores
        self.busy_s = 0.0  # time spent running batches, turns excluded

    async def run(self, fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R]:
        """Record the batch size, then run `fn(items)` on the worker thread."""
        self.batch_sizes.append(len(items))
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._in_turn, fn, items)

    def submit(self, fn: Callable[..., R], *args) -> "Future[R]":
        """Run `fn(*args)` on the model thread, after the batches already queued there."""
        return self._executor.submit(self._in_turn, fn, *args)

    def _in_turn(self, fn: Callable[..., R], *args) -> R:
        with turn_of(self.turns):
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.busy_s += time.perf_counter() - started

    def stats(self) -> dict:
        """Batch sizes this replica's model saw: the histogram and the largest; its turns at the cores."""
        sizes: Sequence[int] = list(self.batch_sizes)
        return {
            "batches": len(sizes),
            "max_batch_size_seen": max(sizes, default=0),
            "histogram": dict(Counter(sizes)),
            "busy_s": round(self.busy_s, 3),
            "cores": self.turns.stats() if self.turns is not None else None,
        }
