"""`python -m bench.autoscale`: Ray Serve autoscaling of the two model stages, shown on loopback.

The graph runs with min 1 / max 3 replicas per model stage, each stage on its own target of ongoing requests.
A bounded load (N clients, long answers) runs for `--load-s`, then nothing for `--idle-s`; replicas of each
deployment are sampled every half second. Writes bench/results/autoscale.{json,md,png}: the timeline, and when each
stage first scaled up, its peak, and when it was back to one replica.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import threading
import time
from pathlib import Path

from bench.run import _checkpoint, _environment, _free_port

STAGES = ("Vision", "LLM")


def _replicas(app: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    counts = {}
    for name, deployment in status.deployments.items():
        states = {str(state).rsplit(".", 1)[-1]: n for state, n in deployment.replica_states.items()}
        counts[name] = states.get("RUNNING", 0)
        counts[f"{name} wanted"] = counts[name] + states.get("STARTING", 0) + states.get("PENDING_MIGRATION", 0)
    return counts


def run(size: str, llm: str, clients: int, load_s: float, idle_s: float, tokens: int, out: Path) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import httpx
    import ray
    from blip2_serve.exporters.int8_report import sample_images
    from blip2_serve.serve.app import build_app
    from blip2_serve.serve.config import AppConfig
    from ray import serve

    checkpoint = _checkpoint(Path(__file__).parent / ".cache", size, llm)
    environment = _environment(checkpoint)
    port = _free_port()
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    autoscaling = {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 2.0, "downscale_delay_s": 10.0}
    autoscaling |= {"metrics_interval_s": 0.5, "look_back_period_s": 3.0}
    stage = {"num_cpus": 1, "torch_threads": 1, "batch": {"max_batch_size": 4}}
    targets = {"vision": 0.3, "llm": 2.0}  # ongoing requests per replica each stage aims at
    config = AppConfig.model_validate(
        {
            "model": {"checkpoint": str(checkpoint), "device": "cpu"},
            "vision": {**stage, "autoscaling": {**autoscaling, "target_ongoing_requests": targets["vision"]}},
            "llm": {**stage, "autoscaling": {**autoscaling, "target_ongoing_requests": targets["llm"]}},
            "app_name": "autoscale",
        }
    )
    serve.run(build_app(config), name="autoscale", route_prefix="/")

    timeline: list[dict] = []
    answered: list[tuple[float, float, int]] = []  # (sent, seconds, status)
    stop_load = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not sampled_enough.is_set():
            timeline.append({"t": round(time.monotonic() - started, 2), **_replicas("autoscale")})
            time.sleep(0.5)

    images = sample_images(clients)

    def client(index: int) -> None:
        data = base64.b64encode(images[index]).decode()
        body = {
            "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [data]}],
            "parameters": {"max_new_tokens": tokens, "min_new_tokens": tokens},
        }
        with httpx.Client(timeout=120) as http:
            while not stop_load.is_set():
                sent = time.monotonic()
                status = http.post(f"http://127.0.0.1:{port}/v2/models/blip2/infer", json=body).status_code
                answered.append((sent - started, time.monotonic() - sent, status))

    sampled_enough = threading.Event()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(3.0)
    load_start = time.monotonic() - started
    workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for worker in workers:
        worker.start()
    time.sleep(load_s)
    stop_load.set()
    for worker in workers:
        worker.join()
    load_end = time.monotonic() - started
    time.sleep(idle_s)
    sampled_enough.set()
    sampler.join()
    serve.shutdown()
    ray.shutdown()

    summary = {}
    for name in STAGES:
        counts = [(p["t"], p.get(name, 0)) for p in timeline]
        peak = max(n for _, n in counts)
        first_up = next((t for t, n in counts if n > 1), None)
        decided = next((p["t"] for p in timeline if p.get(f"{name} wanted", 0) > 1), None)
        back_to_one = next((t for t, n in counts if t > load_end and n == 1), None)
        summary[name] = {
            "target_ongoing_requests": targets[name.lower()],
            "peak_replicas": peak,
            "scale_up_decided_s_after_load_start": None if decided is None else round(decided - load_start, 1),
            "first_scale_up_s_after_load_start": None if first_up is None else round(first_up - load_start, 1),
            "back_to_1_replica_s_after_load_end": None if back_to_one is None else round(back_to_one - load_end, 1),
        }
    statuses = [s for _, _, s in answered]
    document = {
        "environment": environment,
        "settings": {
            "clients": clients,
            "load_s": load_s,
            "idle_s": idle_s,
            "new_tokens": tokens,
            "autoscaling": autoscaling,
            "targets": targets,
        },
        "load": {"start_s": round(load_start, 2), "end_s": round(load_end, 2)},
        "requests": {"sent": len(statuses), "ok": statuses.count(200), "other": len(statuses) - statuses.count(200)},
        "summary": summary,
        "timeline": timeline,
        "answered": [[round(a, 3), round(b, 3), c] for a, b, c in answered],
    }
    _write(document, out)
    return document


def _write(document: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    figure, (replicas, latency) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name in STAGES:
        replicas.step(
            [p["t"] for p in document["timeline"]], [p.get(name, 0) for p in document["timeline"]], label=name
        )
    for axis in (replicas, latency):
        axis.axvspan(document["load"]["start_s"], document["load"]["end_s"], color="tab:orange", alpha=0.15)
    replicas.set_ylabel("running replicas")
    replicas.set_yticks([0, 1, 2, 3])
    replicas.legend()
    replicas.set_title("Ray Serve autoscaling, min 1 / max 3 per model stage (shaded: load)")
    latency.scatter([a[0] for a in document["answered"]], [a[1] for a in document["answered"]], s=6)
    latency.set_ylabel("request latency, s")
    latency.set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(figure)
    environment = document["environment"]
    lines = [
        f"# Autoscaling ({environment['checkpoint']['llm']}, commit {environment['commit'][:10]})",
        "",
        f"{document['settings']['clients']} clients for {document['settings']['load_s']} s "
        f"({document['settings']['new_tokens']} new tokens each), then {document['settings']['idle_s']} s idle. "
        f"Autoscaling: {document['settings']['autoscaling']}. Requests: {document['requests']}.",
        "",
        "| stage | target ongoing/replica | peak replicas | scale-up decided after load start, s | "
        "first added replica running, s | back to 1 replica after load end, s |",
        "|---|---|---|---|---|---|",
    ]
    for name, figures in document["summary"].items():
        lines.append(
            f"| {name} | {figures['target_ongoing_requests']} | {figures['peak_replicas']} | "
            f"{figures['scale_up_decided_s_after_load_start']} | {figures['first_scale_up_s_after_load_start']} | "
            f"{figures['back_to_1_replica_s_after_load_end']} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.autoscale", description=__doc__)
    parser.add_argument("--size", choices=["tiny", "medium"], default="tiny")
    parser.add_argument("--llm", choices=["opt", "t5"], default="t5")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--load-s", type=float, default=40.0)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "autoscale"))
    args = parser.parse_args(argv)
    document = run(args.size, args.llm, args.clients, args.load_s, args.idle_s, args.tokens, Path(args.out))
    print(json.dumps({"summary": document["summary"], "requests": document["requests"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
