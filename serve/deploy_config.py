"""A Ray Serve config file (what `serve run`, `serve deploy` and KubeRay's `serveConfigV2` read) of an AppConfig.

The application's `args` are the whole AppConfig (validated by `blip2_serve.serve.app:app_builder`); its `deployments:`
section states each deployment's replicas or autoscaling, actor resources and queue bounds, as Ray Serve operators edit
them. Ray applies that section over what the builder set, so it wins where the two differ. `blip2-serve run --config`
reads the same file through the same path (`deploy_apps`), so all three commands deploy the same thing.
"""

from __future__ import annotations

from typing import Any

from blip2_serve.serve.config import AppConfig, StageConfig

IMPORT_PATH = "blip2_serve.serve.app:app_builder"
# Ray Serve's gRPC proxy calls this to register the service (grpc_options.grpc_servicer_functions), written once
SERVICER_FUNCTION = "blip2_serve.serve.grpc_protos.add_servicer"
SERVICER_FUNCTIONS = [SERVICER_FUNCTION]


def stage_gpus(stage: StageConfig, config: AppConfig) -> float | None:
    """GPUs per replica as written to a file, or None where they are decided on the cluster: `num_gpus: auto` with
    `device: auto` takes a GPU only where the cluster has one, which only the builder, running there, can see."""
    if stage.num_gpus != "auto":
        return float(stage.num_gpus)
    if config.model.device == "auto":
        return None
    return 1.0 if config.model.device == "cuda" else 0.0


def _deployment(name: str, stage: StageConfig, gpus: float | None, config: AppConfig, model_stage: bool = True) -> dict:
    options = stage.deployment_options(gpus or 0.0, config.replica_env(model_stage), config.cpu_turns)
    if gpus is None:  # Ray replaces the builder's ray_actor_options wholesale with the file's: leave them out
        del options["ray_actor_options"]
    return {"name": name, **options}


def serve_config(config: AppConfig) -> dict[str, Any]:
    """The Ray Serve config (ServeDeploySchema) for one BLIP-2 application."""
    ingress_gpus = 0.0 if config.ingress.num_gpus == "auto" else float(config.ingress.num_gpus)
    application = {
        "name": config.app_name,
        "route_prefix": config.route_prefix,
        "import_path": IMPORT_PATH,
        "args": config.model_dump(mode="json"),
        "deployments": [
            _deployment("Ingress", config.ingress, ingress_gpus, config, model_stage=False),
            _deployment("Vision", config.vision, stage_gpus(config.vision, config), config),
            _deployment("LLM", config.llm, stage_gpus(config.llm, config), config),
        ],
    }
    if config.retrieval is not None:
        retrieval_gpus = stage_gpus(config.retrieval, config.model_copy(update={"model": config.retrieval.model}))
        application["deployments"].append(_deployment("Retrieval", config.retrieval, retrieval_gpus, config))
    document: dict[str, Any] = {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.server.host, "port": config.server.http_port},
        "applications": [application],
    }
    if config.server.grpc_port is not None:
        document["grpc_options"] = {"port": config.server.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS}
    return document


def is_serve_config(document: Any) -> bool:
    """A Ray Serve config file (rather than a bare AppConfig)."""
    return isinstance(document, dict) and "applications" in document


def app_config_of(document: dict[str, Any], name: str | None = None) -> AppConfig:
    """The AppConfig in a Serve config's blip2 application (the one named `name`, or the only one)."""
    applications = [a for a in document["applications"] if a.get("import_path") == IMPORT_PATH]
    if name is not None:
        applications = [a for a in applications if a.get("name") == name]
    if len(applications) != 1:
        raise ValueError(f"expected one application with import_path {IMPORT_PATH}, found {len(applications)}")
    application = applications[0]
    args = dict(application.get("args") or {})
    args["app_name"] = application.get("name", "default")  # the file's name and prefix are the ones Ray uses
    args["route_prefix"] = application.get("route_prefix", "/")
    server = dict(args.get("server") or {})  # the proxies listen where the file's http_options/grpc_options say
    http = document.get("http_options") or {}
    server["host"] = http.get("host", "127.0.0.1")  # Ray's own default is also loopback
    server["http_port"] = http.get("port", 8000)
    grpc = document.get("grpc_options") or {}
    server["grpc_port"] = grpc.get("port", 9000) if grpc.get("grpc_servicer_functions") else None
    args["server"] = server
    return AppConfig.model_validate(args)


def with_app_config(document: dict[str, Any], config: AppConfig) -> dict[str, Any]:
    """The document with its blip2 application's args, name, prefix and the proxies' addresses taken from `config`
    (its `deployments:` section as it was)."""
    out = {**document, "applications": []}
    for application in document["applications"]:
        if application.get("import_path") == IMPORT_PATH:
            application = {
                **application,
                "name": config.app_name,
                "route_prefix": config.route_prefix,
                "args": config.model_dump(mode="json"),
            }
        out["applications"].append(application)
    out["http_options"] = {
        **document.get("http_options", {}),
        "host": config.server.host,
        "port": config.server.http_port,
    }
    if config.server.grpc_port is None:
        out.pop("grpc_options", None)
    else:
        out["grpc_options"] = {
            **document.get("grpc_options", {}),
            "port": config.server.grpc_port,
            "grpc_servicer_functions": SERVICER_FUNCTIONS,
        }
    return out
