"""Graceful shutdown across ingress replicas: one small deployment that knows when to drain and who still holds work.

`blip2-serve run` on SIGINT/SIGTERM calls `begin_drain`, then polls `drained` until every running ingress replica
says it refuses new requests and holds none (serve/cli.py). Each ingress replica reports every `REPORT_S`; the
answer to its report tells it to start draining.
"""

from __future__ import annotations

import time
from typing import Any

from blip2_serve.deployments.metrics import INTERNAL_LOGGING
from ray import serve

REPORT_S = 1.0  # how often each ingress replica reports what it holds
FRESH_S = 10.0  # a replica not heard from for this long is gone
NAME = "Drain"  # the deployment's name


@serve.deployment(
    name=NAME,
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    logging_config=INTERNAL_LOGGING,
)
class DrainCoordinator:
    def __init__(self):
        self._edges: dict[str, tuple[int, bool, float]] = {}  # replica -> (in flight, draining, heard at)
        self._draining = False

    async def report(self, replica: str, in_flight: int, draining: bool) -> bool:
        """An ingress replica's report; the answer says whether to drain (refuse new requests)."""
        self._edges[replica] = (in_flight, draining, time.monotonic())
        return self._draining

    async def begin_drain(self) -> None:
        self._draining = True

    async def drained(self) -> dict[str, Any]:
        """Ingress replicas heard from lately, how many of them drain, and the requests they still hold."""
        fresh = [e for e in self._edges.values() if time.monotonic() - e[2] < FRESH_S]
        return {
            "replicas": len(fresh),
            "draining": sum(1 for e in fresh if e[1]),
            "in_flight": sum(e[0] for e in fresh),
        }
