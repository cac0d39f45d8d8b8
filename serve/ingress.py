"""The Ingress deployment: one replica class serving KServe v2 HTTP, OpenAI HTTP and KServe v2 gRPC.

Each protocol is a mixin of routes or RPC methods that parse, call the Blip2Pipeline, and render.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

from blip2_serve.clients.contract import MODEL_VERSION, RETRIEVAL_MODELS
from blip2_serve.deployments.drain import REPORT_S
from blip2_serve.deployments.errors import ModelNotFound, Unavailable
from blip2_serve.deployments.ingress import Blip2Pipeline
from blip2_serve.deployments.metrics import MetricsRecorder
from blip2_serve.deployments.metrics import totals as metric_totals
from blip2_serve.deployments.types import GenerateRequest, GenerateResult
from blip2_serve.serve import http, metadata, openai
from blip2_serve.serve.asgi import app
from blip2_serve.serve.auth import ApiKey
from blip2_serve.serve.config import AppConfig
from blip2_serve.serve.grpc import TritonGrpcMethods
from ray import serve
from ray.serve.handle import DeploymentHandle

logger = logging.getLogger(__name__)

app.include_router(http.router)
app.include_router(openai.router)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress(TritonGrpcMethods):
    """The public edge of one BLIP-2 application; holds the handles of the two model stages.

    HTTP routes (serve/http.py, serve/openai.py) reach this instance through serve/asgi.current_ingress; Ray's
    gRPC proxy calls the TritonGrpcMethods by name.
    """

    def __init__(
        self,
        vision: DeploymentHandle,
        llm: DeploymentHandle,
        config: AppConfig,
        drain: DeploymentHandle | None = None,
        retrieval: DeploymentHandle | None = None,
        metrics_directory: str | None = None,
    ):
        self.pipeline = Blip2Pipeline(vision, llm, config.server.generation_limits())
        self.retrieval = retrieval  # the Retrieval stage, when the config names a retrieval checkpoint
        self.config = config
        self.server = config.server
        self.metrics_directory = metrics_directory  # the application's series on this node, rendered at /metrics
        self.metrics = MetricsRecorder(config.server.model_name, metrics_directory)
        self._model_metrics: dict[str, MetricsRecorder] = {}
        self._drain = drain
        self.api_key = ApiKey.from_env(config.server.api_key_env) if config.server.api_key_env else None
        # Graceful shutdown: requests held now, and whether new ones are refused (503) because the server is going
        self.in_flight = 0
        self.draining = False
        if drain is not None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _report_forever(self) -> None:
        """Tell the Drain deployment what this replica holds; its answer says when to start draining."""
        replica = serve.get_replica_context().replica_id.unique_id
        while True:
            try:
                # always report: once draining, the coordinator waits to hear so from every replica
                drain = await self._drain.report.remote(replica, self.in_flight, self.draining)
                self.draining = self.draining or drain
            except Exception as exc:  # never fails serving
                logger.debug("drain report failed: %s", exc)
            await asyncio.sleep(REPORT_S)

    @contextmanager
    def admitted(self, pending: bool = True) -> Iterator[None]:
        """Hold one request: refused (retriable) while draining, counted in flight until answered (and in the
        pending gauge where `pending`)."""
        if self.draining:
            raise Unavailable("the server is shutting down; retry (another replica or server takes it)")
        self.in_flight += 1
        try:
            with self.metrics.pending() if pending else nullcontext():
                yield
        finally:
            self.in_flight -= 1

    def _stages_for(self, model_name: str | None) -> set[str]:
        """The stages a model needs (None: the server, all of them)."""
        stages = {"vision", "llm"} if model_name is None or not self.serves_retrieval(model_name) else set()
        if self.retrieval is not None and (model_name is None or self.serves_retrieval(model_name)):
            stages.add("retrieval")
        return stages

    async def not_ready(self, model_name: str | None = None, timeout_s: float = 5.0) -> list[str]:
        """The stages that do not answer ready within `timeout_s`, among those `model_name` needs (the server: all
        of them); ["draining"] while shutting down. A replica Ray cannot place yet never answers, so a stage still
        pending keeps the server unready, by name, instead of the check waiting with it. Each stage is asked once."""
        if self.draining:
            return ["draining"]
        stages = self._stages_for(model_name)
        checks: dict[str, Any] = self.pipeline.ready_checks() if "vision" in stages else {}  # vision and LLM together
        if "retrieval" in stages:
            checks["retrieval"] = self.retrieval.ready.remote()

        async def answered(response) -> bool:
            try:
                return bool(await asyncio.wait_for(response, timeout_s))
            except Exception:  # a timeout, a dead replica: not ready
                return False

        outcomes = await asyncio.gather(*(answered(r) for r in checks.values()))
        pending = [name for name, ok in zip(checks, outcomes) if not ok]
        if pending:
            logger.info("not ready: %s", ", ".join(pending))
        return pending

    async def repository_index(self) -> list[dict[str, str]]:
        """Triton's repository index: every model served here, READY or UNAVAILABLE with the reason (the stages are
        asked once, for all the models)."""
        names = [self.server.model_name] + (sorted(RETRIEVAL_MODELS) if self.retrieval is not None else [])
        pending_everywhere = await self.not_ready()
        index = []
        for name in names:
            pending = [s for s in pending_everywhere if s == "draining" or s in self._stages_for(name)]
            entry = {"name": name, "version": MODEL_VERSION, "state": "UNAVAILABLE" if pending else "READY"}
            if pending:
                entry["reason"] = f"waiting for: {', '.join(pending)}"
            index.append(entry)
        return index

    def metrics_for(self, model_name: str) -> MetricsRecorder:
        """The request counters of one model served here (the retrieval models count apart from blip2)."""
        if model_name == self.server.model_name:
            return self.metrics
        if model_name not in self._model_metrics:
            self._model_metrics[model_name] = MetricsRecorder(model_name, self.metrics_directory)
        return self._model_metrics[model_name]

    async def model_statistics(self, model_name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's statistics: the models served here and the stages behind them, or the one named."""
        stages = ["blip2_vision", "blip2_llm"] + (["blip2_retrieval"] if self.retrieval is not None else [])
        models = [self.server.model_name] + (sorted(RETRIEVAL_MODELS) if self.retrieval is not None else [])
        if model_name and model_name not in stages:
            self.check_model(model_name, version)
        totals = await asyncio.to_thread(metric_totals, self.metrics_directory)
        return metadata.model_statistics(totals, [model_name] if model_name else models + stages)

    def serves_retrieval(self, model_name: str) -> bool:
        return self.retrieval is not None and model_name in RETRIEVAL_MODELS

    def check_model(self, model_name: str, version: str = "") -> None:
        """Raise ModelNotFound unless the request names a model served here (and version 1 or none)."""
        if model_name != self.server.model_name and not self.serves_retrieval(model_name):
            raise ModelNotFound(f"Request for unknown model: '{model_name}' is not found")
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(f"Request for unknown model: '{model_name}' version {version} is not found")

    # Python callers (other Serve apps, tests) use these through a DeploymentHandle, with no HTTP in between.
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await self.pipeline.generate(request)

    async def generate_all(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        return await self.pipeline.generate_all(requests)

    async def stats(self) -> dict:
        return await self.pipeline.stats()
