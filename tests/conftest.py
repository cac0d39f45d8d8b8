"""Session fixtures: tiny checkpoints built once, one Ray + Serve instance, both graphs (OPT and T5) deployed once.

Ray starts once per session (12-15 s on two cores); every Serve test shares it.
"""

from __future__ import annotations

import os

# Before ray is imported anywhere: no token auth, no usage stats, nothing from the hub.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The API key of the `secured` app, in the environment Ray's workers inherit (as a pod's env reaches them on K8s).
os.environ["BLIP2_TEST_API_KEY"] = "s3cret-test-key"

import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

# Servers under test are stopped with SIGINT, as a terminal's Ctrl-C does. A shell that starts this suite in the
# background (`.ci/run &`, nohup) starts it with SIGINT ignored, and every child inherits that: Ray's `serve run`,
# which relies on Python's KeyboardInterrupt, then never hears Ctrl-C (seen: three clean-clone runs here failed the
# Ctrl-C test so). Children start as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from tests.helpers import Reference, close_gevent_clients, keep_gevent_clients_on_the_main_thread

API_KEY_ENV = "BLIP2_TEST_API_KEY"
API_KEY = os.environ[API_KEY_ENV]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


keep_gevent_clients_on_the_main_thread()


@pytest.fixture(autouse=True)
def _close_gevent_clients():
    yield
    close_gevent_clients()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random BLIP-2 checkpoints written with save_pretrained: {"opt": dir, "t5": dir}."""
    from blip2_serve.exporters.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {llm: make_tiny_checkpoint(root / llm, llm) for llm in ("opt", "t5")}


@pytest.fixture(scope="session")
def references(checkpoints) -> dict[str, Reference]:
    """transformers' own Blip2ForConditionalGeneration + Blip2Processor on each checkpoint."""
    return {llm: Reference(path) for llm, path in checkpoints.items()}


@dataclass(frozen=True)
class ServedApp:
    """One deployed BLIP-2 application on the shared Serve instance."""

    llm: str
    name: str
    port: int
    grpc_port: int
    route_prefix: str

    @property
    def url(self) -> str:
        """host:port/prefix, as tritonclient takes it."""
        return f"127.0.0.1:{self.port}{self.route_prefix}"

    @property
    def http(self) -> str:
        return f"http://{self.url}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def grpc_headers(self) -> dict[str, str]:
        """Ray's gRPC proxy picks the application by this metadata when it serves more than one."""
        return {"application": self.name}

    def handle(self):
        return _handle(self.name, None)

    def deployment(self, name: str):
        return _handle(self.name, name)


_HANDLES: dict[tuple[str, str | None], object] = {}


def _handle(app: str, deployment: str | None):
    """One handle per application (or deployment) for the whole session, as Ray Serve advises: every new handle
    starts a router of its own in this process (long-poll listeners, metrics), and nothing stops one that is
    dropped, so a suite that made a handle per call ran with dozens of them."""
    from ray import serve

    key = (app, deployment)
    if key not in _HANDLES:
        _HANDLES[key] = (
            serve.get_app_handle(app) if deployment is None else serve.get_deployment_handle(deployment, app)
        )
    return _HANDLES[key]


def delete_app(name: str) -> None:
    """serve.delete, and the handles this process kept for the application."""
    from ray import serve

    serve.delete(name)
    for key in [key for key in _HANDLES if key[0] == name]:
        _HANDLES.pop(key).shutdown()


# Small limits so that oversize requests are cheap to send; model stages on no CPU reservation (2-core box).
# No Batch API replica in most shared graphs (retrieval_app has one; the CLI tests run the default configuration).
TEST_SERVER = {
    "max_request_bytes": 2 * 1024 * 1024,
    "max_image_bytes": 1024 * 1024,
    "max_image_pixels": 4_000_000,
    "batch_dir": None,
}
# The suite compares served answers with transformers on the CPU, in fp32: pinned, so that a GPU host runs the
# same comparison (with device "auto" the stages would take the GPU and fp16).
TEST_MODEL = {"device": "cpu", "dtype": "fp32", "greedy_screen": "on"}  # the screen served, as on full-size models
# A prompt holding this fails inside its model batch in the `apps` graphs' LLM stage (deployments/faults.py).
FAULT_MARKER = "zzfaultzz"
TEST_STAGE = {"num_cpus": 0, "torch_threads": 1, "batch": {"max_batch_size": 8, "wait_timeout_s": 0.02}}


@dataclass(frozen=True)
class ServePorts:
    http: int
    grpc: int


@pytest.fixture(scope="session")
def serve_ports() -> ServePorts:
    """Ray (local, loopback) and Serve's HTTP proxy on 127.0.0.1, once per session."""
    import ray
    from blip2_serve.serve.grpc import SERVICER_FUNCTION
    from ray import serve

    # the request path's setting reaches the replicas through their runtime_env, as on a cluster (test_cores.py)
    port, grpc_port = free_port(), free_port()
    ray.init(num_cpus=8, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
    )
    yield ServePorts(port, grpc_port)
    _HANDLES.clear()
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def apps(serve_ports, checkpoints) -> dict[str, ServedApp]:
    """Both graphs, deployed through build_app from an AppConfig, at /opt and /t5."""
    from blip2_serve.serve.app import build_app
    from blip2_serve.serve.config import AppConfig
    from ray import serve

    served = {}
    for llm, path in checkpoints.items():
        config = AppConfig.model_validate(
            {
                "model": {"checkpoint": str(path), **TEST_MODEL},
                "server": TEST_SERVER,
                "vision": TEST_STAGE,
                "llm": {**TEST_STAGE, "env": {"BLIP2_SERVE_INJECT_FAULT": FAULT_MARKER}},
                "app_name": llm,
                "route_prefix": f"/{llm}",
            }
        )
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        served[llm] = ServedApp(llm, config.app_name, serve_ports.http, serve_ports.grpc, config.route_prefix)
    return served


@pytest.fixture(scope="session")
def image_server() -> str:
    """A plain HTTP server on 127.0.0.1 with one PNG at /cat.png: a remote image for the OpenAI allow-list."""
    import http.server
    import threading

    from tests.helpers import image_bytes

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = image_bytes(77)
            self.send_response(200 if self.path == "/cat.png" else 404)
            self.send_header("content-type", "image/png")
            self.end_headers()
            if self.path == "/cat.png":
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="session")
def tight_app(serve_ports, checkpoints, image_server) -> ServedApp:
    """The OPT graph with one-request queues (overload is easy to reach), one allow-listed image host and the
    static (whole-batch) LLM scheduler."""
    from blip2_serve.serve.app import build_app
    from blip2_serve.serve.config import AppConfig
    from ray import serve

    tight = {**TEST_STAGE, "batch": {"max_batch_size": 1}, "max_ongoing_requests": 1, "max_queued_requests": 1}
    config = AppConfig.model_validate(
        {
            "model": {"checkpoint": str(checkpoints["opt"]), **TEST_MODEL},
            "server": {**TEST_SERVER, "image_url_allowlist": [f"{image_server}/"]},
            "vision": tight,
            "llm": {**tight, "scheduler": "static"},  # the whole-batch LLM path stays tested here
            "app_name": "tight",
            "route_prefix": "/tight",
        }
    )
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
    return ServedApp("opt", config.app_name, serve_ports.http, serve_ports.grpc, config.route_prefix)


def deploy_graph(serve_ports: ServePorts, checkpoint, llm: str, name: str, **sections) -> ServedApp:
    """One more graph on the shared Serve instance at /name: the test stage and server settings, with `sections`
    of the AppConfig (server, retrieval, ...) on top."""
    from blip2_serve.serve.app import build_app
    from blip2_serve.serve.config import AppConfig
    from ray import serve

    document = {
        "model": {"checkpoint": str(checkpoint), **TEST_MODEL},
        "server": TEST_SERVER,
        "vision": TEST_STAGE,
        "llm": TEST_STAGE,
        "app_name": name,
        "route_prefix": f"/{name}",
        **sections,
    }
    config = AppConfig.model_validate(document)
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
    return ServedApp(llm, config.app_name, serve_ports.http, serve_ports.grpc, config.route_prefix)


@pytest.fixture(scope="session")
def secured_app(serve_ports, checkpoints) -> ServedApp:
    """The OPT graph with an API key (server.api_key_env) and tighter generation limits."""
    limits = {"max_new_tokens_limit": 16, "max_num_beams": 2, "default_max_new_tokens": 8}
    server = {**TEST_SERVER, "api_key_env": API_KEY_ENV, **limits}
    return deploy_graph(serve_ports, checkpoints["opt"], "opt", "secured", server=server)


@pytest.fixture(params=["opt", "t5"])
def app(request, apps) -> ServedApp:
    return apps[request.param]


@pytest.fixture(scope="session")
def itm_checkpoint(tmp_path_factory):
    """A tiny BLIP-2 image-text retrieval checkpoint (blip2-itm-vit-g's shape)."""
    from blip2_serve.exporters.tiny import make_tiny_itm_checkpoint

    return make_tiny_itm_checkpoint(tmp_path_factory.mktemp("itm") / "itm")


@pytest.fixture(scope="session")
def retrieval_app(serve_ports, checkpoints, itm_checkpoint, tmp_path_factory) -> ServedApp:
    """The OPT graph with the retrieval stage (a tiny ITM checkpoint) and OpenAI's Batch API (its files in a fresh
    directory): every endpoint a batch line may name."""
    retrieval = {**TEST_STAGE, "model": {"checkpoint": str(itm_checkpoint), **TEST_MODEL}}
    server = {**TEST_SERVER, "batch_dir": str(tmp_path_factory.mktemp("batches"))}
    return deploy_graph(serve_ports, checkpoints["opt"], "opt", "retrieval", retrieval=retrieval, server=server)
