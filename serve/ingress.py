"""The Ingress deployment: one replica serving KServe v2 HTTP, OpenAI HTTP and KServe v2 gRPC.

The replica holds the application's FrontDoor (serve/frontdoor.py); each protocol is a router of routes or a mixin of
RPC methods that parse, call the front door, and render.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from blip2_serve.deployments.drain import REPORT_S
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
            await asyncio.sleep(REPORT_S)

    # Python callers (other Serve apps, tests) use these through a DeploymentHandle, with no HTTP in between.
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await self.door.generate(request)

    async def generate_many(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        return await self.door.generate_many(requests)

    async def stats(self) -> dict:
        return await self.door.stage_stats()
