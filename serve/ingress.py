"""The Ingress deployment: one replica serving KServe v2 HTTP, OpenAI HTTP and KServe v2 gRPC.

The replica holds the application's FrontDoor (serve/frontdoor.py); each protocol is a router of routes or a mixin of
RPC methods that parse, call the front door, and render.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from blip2_serve.deployments import drain as drain_deployment
from blip2_serve.deployments.types import GenerateRequest, GenerateResult
from blip2_serve.serve import http, openai, openai_batch, playground
from blip2_serve.serve.asgi import app
from blip2_serve.serve.frontdoor import FrontDoor
from blip2_serve.serve.grpc import TritonGrpcMethods
from ray import serve
from ray.serve.handle import DeploymentHandle

logger = logging.getLogger(__name__)

app.include_router(http.router)
app.include_router(openai.router)
app.include_router(openai_batch.router)
app.include_router(playground.router)


class QuietDrainProbes(logging.Filter):
    """Drops Ray Serve's router warning about the Drain coordinator's queue-length probe, and only that one.

    Before each call the router asks the replica how many requests it holds, warns when the answer takes over 0.1 s,
    and asks again. The drain report is the first call an ingress replica makes, while the model stages still import
    torch on every core: on 2 cores one start in several printed two "Failed to get queue length from Replica(...,
    deployment='Drain', ...)" warnings on the console. The report is bookkeeping, resent every REPORT_S, so a slow
    probe of it is not a problem to show; the model stages' probes still warn."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)  # Ray formats this warning itself (an f-string, no arguments)
        return not (
            message.startswith("Failed to get queue length from") and f"deployment='{drain_deployment.NAME}'" in message
        )


QUIET_DRAIN_PROBES = QuietDrainProbes()


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress(TritonGrpcMethods):
    """The public edge of one BLIP-2 application: its FrontDoor, and the drain reports for graceful shutdown.

    HTTP routes (serve/http.py, serve/openai.py) receive `door` through serve/asgi.front_door; Ray's gRPC proxy
    calls the TritonGrpcMethods by name, which use `self.door`.
    """

    def __init__(self, drain: DeploymentHandle | None = None, **door: Any):
        """`door`: FrontDoor's arguments (the stages' handles, the AppConfig, the metrics directory)."""
        self.door = FrontDoor(**door)
        self._drain = drain
        if drain is not None:
            logging.getLogger("ray.serve").addFilter(QUIET_DRAIN_PROBES)  # Ray Serve's router logs there
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _report_forever(self) -> None:
        """Tell the Drain deployment what this replica holds; its answer says when to start draining."""
        replica = serve.get_replica_context().replica_id.unique_id
        door = self.door
        while True:
            try:
                # always report: once draining, the coordinator waits to hear so from every replica
                drain = await self._drain.report.remote(replica, door.in_flight, door.draining)
                door.draining = door.draining or drain
            except Exception as exc:  # never fails serving
                logger.debug("drain report failed: %s", exc)
            await asyncio.sleep(drain_deployment.REPORT_S)

    # Python callers (other Serve apps, tests) use these through a DeploymentHandle, with no HTTP in between.
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await self.door.generate(request)

    async def generate_many(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        return await self.door.generate_many(requests)

    async def stats(self) -> dict:
        return await self.door.stage_stats()
