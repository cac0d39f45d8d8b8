"""Per-request deadlines: Triton's `timeout` request parameter (microseconds, what tritonclient's `timeout=` sends,
over HTTP and gRPC) and the HTTP header `X-Request-Timeout-Ms`; the earlier one wins. When it passes, the request
is cancelled in both stages (the LLM engine drops the sequence at its next step) and the client gets 504 /
DEADLINE_EXCEEDED."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Mapping, TypeVar

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
    if seconds is None:
        return await work
    try:
        return await asyncio.wait_for(work, seconds)
    except TimeoutError:
        raise DeadlineExceeded(f"the request's deadline of {seconds * 1e3:.0f} ms passed") from None
