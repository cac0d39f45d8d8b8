"""A two-node Ray cluster on this machine (`ray start --head`, and a second node with a custom resource): the LLM
stage is pinned to the second node by that resource; the app goes on with Ray's `serve deploy` (through the
dashboard) and with `blip2-serve run --address`, serves; `blip2-serve batch --address` captions a folder on the same
cluster; the nodes stop with their `ray start` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.helpers import image_bytes

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

PLACEMENT = """
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], log_to_driver=False)
llm = serve.get_deployment_handle("LLM", app_name="blip2").stats.remote().result(timeout_s=60)
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print(json.dumps({"llm_node": llm["node_id"], "nodes": nodes}))
"""


def _ray_start(*args: str) -> subprocess.Popen:
    command = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *args]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output or ""


def _wait_served(port: int, timeout: float = 240) -> str:
    import base64

    image = {"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [base64.b64encode(image_bytes(8)).decode()]}
    body = {"inputs": [image], "parameters": {"max_new_tokens": 4}}
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=30) as http:
        while True:
            try:
                if http.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    response = http.post(f"http://127.0.0.1:{port}/v2/models/blip2/infer", json=body)
                    assert response.status_code == 200, response.text
                    return response.json()["outputs"][0]["data"][0]
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the application did not become ready"
            time.sleep(1)


def _placement(address: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PLACEMENT, address], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_two_node_cluster_with_the_llm_on_the_second_node(tmp_path, checkpoints):
    gcs, dashboard, http_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{gcs}"
    config = tmp_path / "serve.yaml"
    model = ["--model", str(checkpoints["opt"]), "--port", str(http_port), "--grpc-port", "0"]
    subprocess.run([str(BIN / "blip2-serve"), "config", *model, "--out", str(config)], check=True, env=ENV)
    document = yaml.safe_load(config.read_text())
    args = document["applications"][0]["args"]
    args["llm"]["resources"] = {"llm_node": 1}  # only the second node has it
    for stage in ("vision", "llm"):
        args[stage]["num_cpus"] = 0.5
    config.write_text(yaml.safe_dump(document))

    # its own temp dir: no `ray.init()` elsewhere on this machine may find (and join) this cluster
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    head = _ray_start(
        "--head",
        f"--temp-dir={temp_dir}",
        f"--port={gcs}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
    )
    worker = None
    try:
        worker = _ray_start(f"--address={address}", "--num-cpus=1", '--resources={"llm_node": 1}')
        # Ray's own `serve deploy`, through the head's dashboard
        dashboard_url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while True:
            command = [str(BIN / "serve"), "deploy", str(config), "-a", dashboard_url]
            deployed = subprocess.run(command, env=ENV, capture_output=True, text=True)
            if deployed.returncode == 0:
                break
            assert time.monotonic() < deadline, deployed.stderr[-3000:]
            time.sleep(2)  # the dashboard's agent is still starting
        first = _wait_served(http_port)
        placed = _placement(address)
        assert placed["nodes"][placed["llm_node"]].get("llm_node") == 1, placed
        assert len(placed["nodes"]) == 2
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "-a", dashboard_url], env=ENV, check=True)

        # `blip2-serve batch --address`: the offline job's Ray Data pools on the same two nodes
        photos = tmp_path / "photos"
        photos.mkdir()
        for index in range(6):
            (photos / f"photo{index}.png").write_bytes(image_bytes(300 + index))
        out = tmp_path / "captions.jsonl"
        batch = [str(BIN / "blip2-serve"), "batch", "caption", str(photos), "--model", str(checkpoints["opt"])]
        batch += ["--out", str(out), "--address", address, "--max-new-tokens", "4", "--quiet", "--dtype", "fp32"]
        done = subprocess.run(batch, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "6 rows written" in done.stdout, done.stdout + done.stderr[-3000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == sorted(p.name for p in photos.iterdir()), rows
        assert all(r["text"] and r["error"] is None for r in rows), rows

        # `blip2-serve run --address` joins the cluster, serves the same file, and leaves the cluster up on exit
        joined = subprocess.Popen(
            [str(BIN / "blip2-serve"), "run", "--address", address, "--config", str(config)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert _wait_served(http_port) == first
            placed = _placement(address)
            assert placed["nodes"][placed["llm_node"]].get("llm_node") == 1, placed
        finally:
            output = _stop(joined, signal.SIGINT)
        assert joined.returncode == 0, output[-3000:]
        assert head.poll() is None and worker.poll() is None  # the cluster it joined is still up
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
    assert head.returncode is not None and worker.returncode is not None
