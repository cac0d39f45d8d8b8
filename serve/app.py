"""`build_app(config)`: the typed config becomes a bound Ray Serve application (ingress -> vision, LLM).

`app_builder` is the same thing for `serve run blip2_serve.serve.app:app_builder model.checkpoint=...` and for a Serve
config file (KubeRay RayService, `serve deploy`): Ray validates the arguments into AppConfig.
"""

from __future__ import annotations

import logging
import os

from blip2_serve.deployments import stages
from blip2_serve.deployments.cores import node_cores
from blip2_serve.deployments.drain import DrainCoordinator
from blip2_serve.deployments.metrics import new_directory
from blip2_serve.serve.config import REQUEST_PATH_ENVIRONMENT, AppConfig, StageConfig
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

    def env(model_stage: bool) -> dict[str, str]:
        # what this process's environment already holds (`blip2-serve run`'s embedded Ray: its workers inherit it)
        # needs no runtime_env; a replica with none starts in a worker Ray keeps ready instead of a new one
        return {k: v for k, v in config.replica_env(model_stage).items() if os.environ.get(k) != v}

    def options(name: str, stage: StageConfig) -> dict:
        return stage.deployment_options(gpus[name], env(model_stage=True), config.cpu_turns)

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
    options = config.ingress.deployment_options(gpus["ingress"], env(model_stage=False), config.cpu_turns)
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
# decisions are made over seconds anyway; a deployment's start is seen up to a second later. Every process of it also
# gets REQUEST_PATH_ENVIRONMENT (serve/config.py); elsewhere it reaches the request path's replicas by runtime_env.
LOCAL_RAY_ENVIRONMENT = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    **REQUEST_PATH_ENVIRONMENT,
}


def prepare_local_ray(config: AppConfig | None = None, document: dict | None = None) -> dict | None:
    """Before `ray.init()` starts an embedded Ray: its processes inherit LOCAL_RAY_ENVIRONMENT (what is set wins).

    With `config`, and where `direct_ingress(config)`, the application's ingress replica will itself listen on the
    config's HTTP and gRPC ports (Ray Serve's direct ingress), a request no longer passing through Ray's proxy on its
    way in and out: returns `serve.start`'s options for that, Ray's proxies moved to free ports (Ray starts them
    whatever it serves). None where the proxies serve the config's ports (`serve_options(config)`)."""
    for key, value in LOCAL_RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    # Every process starts with OpenMP's thread count at the node's cores rather than the 1 Ray gives a worker of
    # num_cpus 1: a thread OpenMP has not seen takes the count the process started with, and a model stage's threads
    # compute on every core in turns (deployments/cores.py). Measured on 2 cores, a realistic Flan-T5 stage in a Ray
    # actor, a lone caption: started at 1 and set to 2 by torch, its second OpenMP thread did 0.26-0.29 CPU-s of the
    # 20 tokens (0.52-0.56 with the model loaded on 2 threads); started at 2, 0.80-0.97, as in one process.
    os.environ.setdefault("OMP_NUM_THREADS", str(node_cores()))
    if config is None or not direct_ingress(config, document):
        return None
    server = config.server
    environment = {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        # one port a protocol, the config's: the one ingress replica takes it (a range of one)
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(server.http_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(server.http_port + 1),
        # `blip2-serve run` drains the ingress itself before Ray goes (serve/cli._drain); Ray's own hold for load
        # balancers to notice (30 s) would only delay Ctrl-C
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        # a replica that replaces a lost one takes the port at once (Ray holds a freed port back for HAProxy)
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }
    if server.grpc_port is not None:
        environment["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] = str(server.grpc_port)
        environment["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"] = str(server.grpc_port + 1)
    os.environ.update(environment)
    # Ray's replica serves on its proxy's host (server.host): the proxy keeps it, on a port nobody is told of
    options = serve_options(config)
    options["http_options"] = {**options["http_options"], "port": _free_port(server.host)}
    if "grpc_options" in options:
        options["grpc_options"] = {**options["grpc_options"], "port": _free_port("")}
    return options


def direct_ingress(config: AppConfig, document: dict | None = None) -> bool:
    """Whether an embedded Ray serves `config`'s ports from its ingress replica (Ray Serve's direct ingress): where
    the ingress is one replica (the default), the ports are fixed, and RAY_SERVE_ENABLE_DIRECT_INGRESS is not "0" nor
    Ray's HAProxy mode chosen. Measured (2026-12-02, lone tiny captions, served p50 over a one-thread loop's): 11-12 ms
    over the loop this way, 24-29 ms through Ray's proxy (the request body fetched from the proxy, the response
    streamed back through it). More ingress replicas (or a Serve config file's other applications) would need a port
    each: Ray's proxy balances them instead."""
    ingress, server = config.ingress, config.server
    if document is not None:  # one application, whose `deployments:` leave the ingress one replica
        applications = document.get("applications") or []
        overrides = [d for a in applications for d in a.get("deployments") or [] if d.get("name") == Ingress.name]
        scaled = any(d.get("num_replicas", 1) != 1 or d.get("autoscaling_config") for d in overrides)
        if len(applications) != 1 or scaled:
            return False
    return (
        os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1") == "1"
        and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") != "1"
        and ingress.autoscaling is None
        and ingress.num_replicas == 1
        and server.http_port > 0
        and (server.grpc_port is None or server.grpc_port > 0)
    )


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


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
