"""One import namespace: the wheel holds `blip2_serve` only, and its SDK import stays light outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_only_blip2_serve_and_the_sdk_import_is_light(tmp_path):
    dist = tmp_path / "dist"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        str(ROOT),
    ]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("blip2_serve-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"blip2_serve", wheel.name.split("-py")[0] + ".dist-info"}
    for module in ("__init__.py", "serve/app.py", "deployments/engine.py", "exporters/triton_models/llm.py"):
        assert f"blip2_serve/{module}" in names
    assert "blip2_serve/clients/sdk.py" in names
    for asset in ("index.html", "app.js", "style.css"):  # the playground page (package data)
        assert f"blip2_serve/serve/playground/{asset}" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "blip2-serve = blip2_serve.serve.cli:main" in entry_points

    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "import blip2_serve\n"
        "from blip2_serve import AsyncBlip2Client, Blip2Client\n"
        f"assert blip2_serve.__file__.startswith({str(site)!r}), blip2_serve.__file__\n"
        "heavy = [m for m in ('torch', 'ray', 'fastapi', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "for old in ('serve', 'deployments', 'exporters', 'clients', 'bench'):\n"
        "    try:\n"
        "        __import__(old)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    raise AssertionError(f'{old} is importable')\n"
        "import blip2_serve.serve.config\n"
        f"assert blip2_serve.serve.config.__file__.startswith({str(site)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _imports(folder: str) -> dict[str, set[str]]:
    """Every module each .py file under `folder` imports (absolute names)."""
    return {str(path.relative_to(ROOT)): _imports_of(path) for path in (ROOT / folder).rglob("*.py")}


def _imports_of(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_layers_import_downwards_only():
    """exporters/ imports nothing from serve/ (the server's edge); clients/ nothing from serve/ or deployments/."""
    rules = {"exporters": ("blip2_serve.serve",), "clients": ("blip2_serve.serve", "blip2_serve.deployments")}
    for folder, forbidden in rules.items():
        imports = _imports(folder)
        assert imports, folder
        for path, names in imports.items():
            bad = sorted(n for n in names if n.startswith(forbidden))
            assert not bad, (path, bad)


# A request's path: adapter (+ its codec) -> front door -> stage. Only the front door holds the stages' handles.
ADAPTERS = ("serve/http.py", "serve/openai.py", "serve/openai_batch.py", "serve/grpc.py")
CODECS = ("deployments/kserve.py", "serve/openai_codec.py", "serve/retrieval.py")


def test_protocol_adapters_reach_the_stages_only_through_the_front_door():
    """No adapter or codec calls a Ray handle or reaches into the replica: they parse, call FrontDoor, render."""
    import ast

    for relative in ADAPTERS + CODECS:
        tree = ast.parse((ROOT / relative).read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        reached = sorted(names & {"remote", "servable_object", "get_replica_context", "DeploymentHandle", "options"})
        assert not reached, (relative, reached)
        assert not [n for n in _imports_of(ROOT / relative) if n == "ray" or n.startswith("ray.")], relative


def test_every_route_and_rpc_receives_the_typed_front_door():
    """Each HTTP route that touches the server takes `door: FrontDoor` from serve/asgi.front_door; the gRPC methods
    use the Ingress's `door`, and no route depends on anything else of the replica. The routes and the dependency
    are coroutines: FastAPI runs a plain function on its thread pool, a hop to another thread for every request."""
    import inspect

    from blip2_serve.serve import asgi, grpc, http, openai, openai_batch, playground
    from blip2_serve.serve.frontdoor import FrontDoor

    routers = (http.router, openai.router, openai_batch.router, playground.router)
    routes = [r for router in routers for r in router.routes]
    assert len(routes) > 20
    with_door = 0
    assert inspect.iscoroutinefunction(asgi.front_door)
    for route in routes:
        assert inspect.iscoroutinefunction(route.endpoint), route.path
        for parameter in inspect.signature(route.endpoint).parameters.values():
            dependency = getattr(parameter.default, "dependency", None)
            if dependency is not None:
                assert dependency is asgi.front_door and parameter.annotation is FrontDoor, (route.path, parameter)
                with_door += 1
    assert with_door >= len(routes) - 9  # the unimplemented Triton extensions, liveness, the page's files: nothing
    assert grpc.TritonGrpcMethods.__annotations__["door"] in (FrontDoor, "FrontDoor")
    source = inspect.getsource(grpc.TritonGrpcMethods)
    assert "self.door." in source and "self.pipeline" not in source and "self.server" not in source


def test_one_tensor_renderer_for_the_server_and_the_triton_repository():
    """/v2/models/blip2/config's tensors are the Triton repository's blip2 config.pbtxt tensors, field for field."""
    from blip2_serve.clients.contract import INPUTS, OUTPUTS, RETRIEVAL_MODELS
    from blip2_serve.exporters.triton_repo import model_config as repository_config
    from blip2_serve.serve import metadata
    from blip2_serve.serve.config import AppConfig
    from google.protobuf import json_format

    config = AppConfig(model={"checkpoint": "unused"})
    served = metadata.model_config(config, "blip2")
    written = repository_config("blip2", "python", 8, list(INPUTS), list(OUTPUTS), 1, 0, {})
    as_dict = json_format.MessageToDict(written, preserving_proto_field_name=True)
    for tensors in (as_dict["input"], as_dict["output"]):
        for tensor in tensors:
            tensor["dims"] = [int(d) for d in tensor["dims"]]
    assert (served["input"], served["output"]) == (as_dict["input"], as_dict["output"])
    assert any(t.get("optional") for t in served["input"])  # PROMPT: the field that once differed
    for name, (inputs, outputs) in RETRIEVAL_MODELS.items():
        described = metadata.model_metadata(config, name)
        assert [t["name"] for t in described["inputs"]] == [s.name for s in inputs]
        assert [t["shape"] for t in described["outputs"]] == [[-1, *s.dims] for s in outputs]


def test_building_the_application_imports_no_model_code(checkpoints):
    """`blip2-serve run`'s driver (and Serve's build task for a config file) builds the whole application, retrieval
    included, without importing torch or transformers: deployments/stages.py declares the model stages by import
    path, and each path names a plain class that its replica imports (about 6 s of every start on 2 cores)."""
    import importlib
    import inspect

    from blip2_serve.deployments import stages
    from ray.serve import Deployment

    document = {"model": {"checkpoint": str(checkpoints["opt"])}, "retrieval": {"model": {"checkpoint": "any"}}}
    code = (
        "import sys\n"
        "from blip2_serve.serve import cli\n"
        "from blip2_serve.serve.app import build_app\n"
        "from blip2_serve.serve.config import AppConfig\n"
        f"app = build_app(AppConfig.model_validate({document!r}))\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in (stages.Vision, stages.LLM, stages.Retrieval):
        module, name = stage.func_or_class.rsplit(".", 1)
        target = getattr(importlib.import_module(module), name)
        assert inspect.isclass(target) and not isinstance(target, Deployment), stage.name
