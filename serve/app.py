"""`build_app(config)`: the typed config becomes a bound Ray Serve application (ingress -> vision, LLM).

`app_builder` is the same thing for `serve run blip2_serve.serve.app:app_builder model.checkpoint=...` and for a Serve
config file (KubeRay RayService, `serve deploy`): Ray validates the arguments into AppConfig.
"""

from __future__ import annotations

import logging
import os

from blip2_serve.deployments import stages
from blip2_serve.deployments.drain import DrainCoordinator
from blip2_serve.deployments.metrics import new_directory
from blip2_serve.serve.config import AppConfig, StageConfig
from blip2_serve.serve.ingress import Ingress
from ray.serve import Application

logger = logging.getLogger(__name__)


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _gpus_for(stage: StageConfig, config: AppConfig) -> float:
    """A model stage takes one GPU where the cluster has GPUs and the model is not pinned to the CPU."""
    if stage.num_gpus != "auto":
        return float(stage.num_gpus)
    if config.model.device == "cpu":
        return 0.0
    return 1.0 if config.model.device == "cuda" or _cluster_has_gpus() else 0.0


def deployed_gpus(config: AppConfig) -> dict[str, float]:
    """GPUs per replica of each stage, by config section, as deployed here: build_app and the placement check
    (serve/placement.py) read this one answer."""
    gpus = {
        "ingress": 0.0 if config.ingress.num_gpus == "auto" else float(config.ingress.num_gpus),
        "vision": _gpus_for(config.vision, config),
        "llm": _gpus_for(config.llm, config),
    }
    if config.retrieval is not None:
        gpus["retrieval"] = _gpus_for(config.retrieval, config.model_copy(update={"model": config.retrieval.model}))
    return gpus


def build_app(config: AppConfig) -> Application:
    """The BLIP-2 graph: Ingress holding handles to the Vision and LLM stages (and the Retrieval stage, and BatchJobs
    for OpenAI's Batch API; deployments/stages.py declares the stages by import path, so building imports no torch);
    every replica records its metrics in this build's directory on its node, which the ingress renders at /metrics;
    a DrainCoordinator tells the ingress replicas when to drain."""
    metrics = new_directory(config.app_name)
    gpus = deployed_gpus(config)

    def options(name: str, stage: StageConfig) -> dict:
        return stage.deployment_options(gpus[name], config.model_stage_env(), config.cpu_turns)

    vision = stages.Vision.options(**options("vision", config.vision)).bind(
        config.model,
        config.vision.batch,
        config.server.image_limits(),
        config.vision.torch_threads,
        config.vision_backend,
        config.embedding_cache.max_bytes,
        metrics_directory=metrics,
        cpu_turns=config.cpu_turns,
    )
    llm = stages.LLM.options(**options("llm", config.llm)).bind(
        config.model,
        config.llm.batch,
        config.server.max_prompt_tokens,
        config.llm.torch_threads,
        metrics,
        config.llm.scheduler,
        cpu_turns=config.cpu_turns,
    )
    retrieval = None
    if config.retrieval is not None:
        stage = config.retrieval
        retrieval = stages.Retrieval.options(**options("retrieval", stage)).bind(
            stage.model,
            stage.batch,
            config.server.image_limits(),
            stage.torch_threads,
            metrics,
            config.embedding_cache.max_bytes,
            cpu_turns=config.cpu_turns,
        )
    options = config.ingress.deployment_options(gpus["ingress"], cpu_turns=config.cpu_turns)
    # the ingress's access lines (one per client request) at this process's level, whatever Ray's own is
    # (blip2-serve's --log-level, which the CLI sets on the "blip2_serve" logger; INFO under another driver)
    chosen = logging.getLogger("blip2_serve").level or logging.INFO
    options["logging_config"] = {"log_level": logging.getLevelName(chosen)}
    ingress = Ingress.options(**options)
    door = {"vision": vision, "llm": llm, "config": config, "retrieval": retrieval, "metrics_directory": metrics}
    if config.server.batch_dir is not None:  # OpenAI's Batch API: one replica keeps the files and runs the batches
        from blip2_serve.serve.batch_jobs import BatchJobs

        door["batches"] = BatchJobs.bind(**door)
    return ingress.bind(DrainCoordinator.bind(), **door)


# The embedded (single-node) Ray's serving machinery wakes less often than Ray's defaults (a 10 Hz controller loop,
# metrics exported every 100 ms by every replica): on a small node each wake-up is taken from the model stages'
# cores. Measured on 2 cores, 16 concurrent captions on the realistic checkpoint: 0.80 -> 0.90 requests/s. Autoscaling
# decisions are made over seconds anyway; a deployment's start is seen up to a second later.
LOCAL_RAY_ENVIRONMENT = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}


def prepare_local_ray() -> None:
    """Before `ray.init()` starts an embedded Ray: its processes inherit LOCAL_RAY_ENVIRONMENT (what is set wins)."""
    for key, value in LOCAL_RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def serve_options(config: AppConfig) -> dict:
    """Keyword arguments for `serve.start`: the HTTP proxy, and the gRPC proxy unless turned off."""
    options: dict = {"http_options": {"host": config.server.host, "port": config.server.http_port}}
    if config.server.grpc_port is not None:
        from blip2_serve.serve.grpc import SERVICER_FUNCTION

        options["grpc_options"] = {"port": config.server.grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}
    return options


def _nested(args: dict) -> dict:
    """`serve run blip2_serve.serve.app:app_builder model.checkpoint=DIR` passes {"model.checkpoint": "DIR"}: nest
    dotted keys."""
    out: dict = {}
    for key, value in args.items():
        *parents, leaf = key.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return out


def app_builder(args: dict) -> Application:
    """Entry point for Ray Serve config files and `serve run`: `args` (the application's `args:`) is an AppConfig."""
    return build_app(args if isinstance(args, AppConfig) else AppConfig.model_validate(_nested(args)))
