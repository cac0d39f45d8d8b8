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

# What Ray Serve's direct ingress says at INFO as the replica opens its ports (serve/app.direct_ingress): `blip2-serve
# run` says where it serves once the application runs.
DIRECT_INGRESS_NOTICES = (
    "Allocated port ",
    "Successfully started RequestProtocol.",
    "Enabled gRPC server reflection",
    "Started HTTP server on port ",
)


class QuietPorts(logging.Filter):
    """Drops Ray Serve's INFO lines about the ingress replica's own ports (DIRECT_INGRESS_NOTICES), and only those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and record.getMessage().startswith(DIRECT_INGRESS_NOTICES))


QUIET_PORTS = QuietPorts()


def bind_as_rays_proxy_does() -> None:
    """Ray Serve's direct ingress (serve/app.direct_ingress) binds the replica's HTTP port without SO_REUSEPORT (Ray
    2.60's replica.py passes enable_so_reuseport=False), where its proxy sets it. Seen: after a server on a port had
    served requests, their connections' TIME_WAIT kept `blip2-serve run` started again at once (Ctrl-C, run) from
    binding that port for a minute. In this replica its server binds as the proxy does (a second server on a port one
    holds is refused by `blip2-serve run`'s port check before Ray starts, as before). Must run before the replica
    opens its ports, i.e. in the constructor."""
    from ray.serve._private import replica

    start = getattr(replica, "start_asgi_http_server", None)
    if start is None or getattr(start, "binds_with_reuseport", False):
        return

    def start_with_reuseport(*args: Any, **kwargs: Any):
        kwargs["enable_so_reuseport"] = True
        return start(*args, **kwargs)

    start_with_reuseport.binds_with_reuseport = True  # type: ignore[attr-defined]
    replica.start_asgi_http_server = start_with_reuseport


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
        logging.getLogger("ray.serve").addFilter(QUIET_PORTS)
        bind_as_rays_proxy_does()
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
