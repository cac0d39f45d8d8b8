"""Per-request deadlines: Triton's `timeout` request parameter (microseconds, what tritonclient's `timeout=` sends,
over HTTP and gRPC) and the HTTP header `X-Request-Timeout-Ms`; the earlier one wins. When it passes, the request
is cancelled in both stages (the LLM engine drops the sequence at its next step) and the client gets 504 /
DEADLINE_EXCEEDED."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Mapping, TypeVar

from blip2_serve.deployments.errors import DeadlineExceeded, InvalidInput

T = TypeVar("T")

HEADER = "x-request-timeout-ms"


def deadline_s(parameters: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> float | None:
    """Seconds this request may take, or None for no deadline of its own."""
    limits = []
    if "timeout" in parameters:
        value = parameters["timeout"]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidInput(f"parameter 'timeout' must be a positive integer of microseconds, not {value!r}")
        limits.append(value / 1e6)
    header = (headers or {}).get(HEADER)
    if header is not None:
        if not header.strip().isdigit() or int(header) <= 0:
            raise InvalidInput(f"header {HEADER} must be a positive integer of milliseconds, not {header!r}")
        limits.append(int(header) / 1e3)
    return min(limits) if limits else None


async def within(seconds: float | None, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising DeadlineExceeded once `seconds` pass."""
    return await Deadline(seconds).run(work)


class Deadline:
    """One request's deadline, started when the request arrives; streams check it between items."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._at = None if seconds is None else asyncio.get_running_loop().time() + seconds

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        left = self._at - asyncio.get_running_loop().time()
        if left <= 0:
            raise self.exceeded()
        return left

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request's deadline of {self.seconds * 1e3:.0f} ms passed")

    async def run(self, work: Awaitable[T]) -> T:
        """Await `work` within what is left: past it, `work` is cancelled and DeadlineExceeded raised."""
        if self._at is None:
            return await work
        try:
            return await asyncio.wait_for(work, self.remaining())
        except TimeoutError:
            raise self.exceeded() from None

    async def stream(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """Yield `items` while time is left; when it runs out, close them (the LLM stage stops the sequence) and raise
        DeadlineExceeded, which each protocol reports in its stream's own way."""
        try:
            while True:
                try:
                    item = await asyncio.wait_for(anext(items), self.remaining())
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self.exceeded() from None
                yield item
        finally:
            close = getattr(items, "aclose", None)
            if close is not None:
                await close()
