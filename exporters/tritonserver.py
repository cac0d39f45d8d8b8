"""`blip2-serve triton --repo REPO`: the real `tritonserver` from the `nvidia-pytriton` wheel, on 127.0.0.1.

The wheel ships Triton 2.51 with the Python backend (no onnxruntime or pytorch backend). Its Python backend
stub for the running Python is copied into the backend directory once, and the wheel's libraries go on
LD_LIBRARY_PATH. On a GPU host, NVIDIA's container serves the same repository (see the README).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def _pytriton() -> Path:
    """The wheel's tritonserver directory, found without importing pytriton (installed without its deps)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "tritonserver comes in the nvidia-pytriton wheel: pip install --no-deps nvidia-pytriton==0.7.0"
        )
    return Path(spec.submodule_search_locations[0]) / "tritonserver"


def tritonserver_command(repo: str | Path, ports: TritonPorts = TritonPorts(), host: str = "127.0.0.1") -> list[str]:
    """The command line, after making sure the Python backend has a stub for this Python."""
    root = _pytriton()
    stub = root / "backends" / "python" / "triton_python_backend_stub"
    if not stub.exists():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy2(root / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
    return [
        str(root / "bin" / "tritonserver"),
        f"--model-repository={Path(repo).resolve()}",
        f"--backend-directory={root / 'backends'}",
        f"--http-address={host}",
        f"--grpc-address={host}",
        f"--metrics-address={host}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--allow-metrics=true",
        "--log-verbose=0",
    ]


def tritonserver_env() -> dict[str, str]:
    """The wheel's libraries, and this interpreter's own libpython first: the stub links libpython3.X
    dynamically, and with another patch release's (the system's) the venv's stdlib extensions fail to load."""
    libraries = [str(_pytriton().parent.parent / "nvidia_pytriton.libs")]
    libpython_dir = sysconfig.get_config_var("LIBDIR")
    if libpython_dir and (Path(libpython_dir) / sysconfig.get_config_var("INSTSONAME")).exists():
        libraries.insert(0, libpython_dir)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (*libraries, env.get("LD_LIBRARY_PATH")) if p)
    return env


def start_tritonserver(repo: str | Path, ports: TritonPorts = TritonPorts(), **popen) -> subprocess.Popen:
    """Start tritonserver in the background (the caller waits for readiness and stops it)."""
    return subprocess.Popen(tritonserver_command(repo, ports), env=tritonserver_env(), **popen)


def run_tritonserver(repo: str | Path, ports: TritonPorts = TritonPorts()) -> int:
    """Run tritonserver in the foreground until it exits. Ctrl-C or SIGTERM stops it (and its Python backend
    stubs) before this process exits: nothing is left behind."""
    import signal

    def stop(*_) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    process = start_tritonserver(repo, ports)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()  # tritonserver stops its models' stub processes itself
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
