"""What the batched stages share: batch settings from config, per-item failure, and a record of batch sizes."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

from deployments.config import BatchConfig
from deployments.cores import CoreTurns

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def configure_batching(batch_method, config: BatchConfig) -> None:
    """Apply `config` to a `@serve.batch` method bound to a replica."""
    batch_method.set_max_batch_size(config.max_batch_size)
    batch_method.set_batch_wait_timeout_s(config.wait_timeout_s)


def run_isolated(fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R | BaseException]:
    """`fn(items)`, one result per item; if the batch raises, each item runs alone so only its culprit fails."""
    try:
        return list(fn(items))
    except Exception as exc:
        if len(items) == 1:
            logger.exception("item failed")
            return [exc]
        logger.warning("batch of %d failed (%s); running its items one by one", len(items), exc)
    results: list[R | BaseException] = []
    for item in items:
        results.extend(run_isolated(fn, [item]))
    return results


def unwrap(result: R | BaseException) -> R:
    """Raise a per-item error returned by a batch method in the caller's request, or return the result."""
    if isinstance(result, BaseException):
        raise result
    return result


class ModelWorker:
    """One thread that owns the model: batches run one at a time, off the replica's event loop.

    The event loop stays free to accept and queue the next batch's requests while a batch runs.
    """

    def __init__(self, name: str, history: int = 4096, turns: CoreTurns | None = None):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.batch_sizes: deque[int] = deque(maxlen=history)
        self.turns = turns  # on a CPU node: each batch waits for its turn at all of the node's cores

    async def run(self, fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R]:
        """Record the batch size, then run `fn(items)` on the worker thread."""
        self.batch_sizes.append(len(items))
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._in_turn, fn, items)

    def submit(self, fn: Callable[..., R], *args) -> "Future[R]":
        """Run `fn(*args)` on the model thread, after the batches already queued there."""
        return self._executor.submit(self._in_turn, fn, *args)

    def _in_turn(self, fn: Callable[..., R], *args) -> R:
        if self.turns is None:
            return fn(*args)
        with self.turns.turn():
            return fn(*args)

    def stats(self) -> dict:
        """Batch sizes this replica's model saw: the histogram and the largest; its turns at the cores."""
        sizes: Sequence[int] = list(self.batch_sizes)
        return {
            "batches": len(sizes),
            "max_batch_size_seen": max(sizes, default=0),
            "histogram": dict(Counter(sizes)),
            "cores": self.turns.stats() if self.turns is not None else None,
        }
