"""`python -m bench.soak`: a bounded soak. Mixed good and bad requests (KServe v2 HTTP and gRPC, OpenAI chat) for
`--minutes`, with the LLM replica killed by its PID at one third and two thirds of the run.

Every request ends as exactly one of: succeeded (200 / OK), refused as intended (a bad request's 4xx /
INVALID_ARGUMENT), failed retriable (503 + Retry-After / UNAVAILABLE / RESOURCE_EXHAUSTED), or lost (anything else:
a 5xx, a hang past the client deadline, a wrong status for its kind). Lost must be 0. Reports p50/p99 latency of the
good requests, and the resident memory of the ingress, vision and LLM replicas over time.
Writes bench/results/soak.{json,md,png}.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

from bench.run import _checkpoint, _environment, _free_port


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(minutes: float, clients: int, out: Path, llm: str = "t5") -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import httpx
    import ray
    import tritonclient.grpc as grpcclient
    from blip2_serve.clients.transports import bytes_inputs
    from blip2_serve.exporters.int8_report import sample_images
    from blip2_serve.serve.app import build_app
    from blip2_serve.serve.config import AppConfig
    from blip2_serve.serve.grpc import SERVICER_FUNCTION
    from ray import serve

    checkpoint = _checkpoint(Path(__file__).parent / ".cache", "tiny", llm)
    environment = _environment(checkpoint)
    port, grpc_port = _free_port(), _free_port()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
    )
    stage = {"num_cpus": 0, "torch_threads": 1, "batch": {"max_batch_size": 8}, "max_queued_requests": 64}
    config = AppConfig.model_validate(
        {"model": {"checkpoint": str(checkpoint), "device": "cpu"}, "vision": stage, "llm": stage, "app_name": "soak"}
    )
    serve.run(build_app(config), name="soak", route_prefix="/")
    vision = serve.get_deployment_handle("Vision", app_name="soak")
    llm_stage = serve.get_deployment_handle("LLM", app_name="soak")

    images = [base64.b64encode(i).decode() for i in sample_images(16)]
    base = f"http://127.0.0.1:{port}"
    outcomes: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    started = time.monotonic()

    def kserve_body(image: str, **parameters) -> dict:
        inputs = [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [image]}]
        return {"inputs": inputs, "parameters": {"max_new_tokens": 20, **parameters}}

    bad_http = [
        ("not an image", lambda: kserve_body(base64.b64encode(b"definitely not a png").decode())),
        ("bad parameter", lambda: kserve_body(images[0], num_beams=1000)),
        ("no IMAGE", lambda: {"inputs": [], "parameters": {}}),
        ("bad datatype", lambda: {"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1], "data": [1.0]}]}),
    ]

    def record(kind: str, sent: float, outcome: str, status: str) -> None:
        with lock:
            outcomes.append(
                {
                    "t": round(sent - started, 3),
                    "s": round(time.monotonic() - sent, 4),
                    "kind": kind,
                    "outcome": outcome,
                }
                | ({"status": status} if outcome == "lost" else {})
            )

    def http_client(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                roll = rng.random()
                try:
                    if roll < 0.2:  # a bad request
                        name, body = rng.choice(bad_http)
                        response = http.post(f"{base}/v2/models/blip2/infer", json=body())
                        kind, good = f"bad: {name}", False
                    elif roll < 0.35:  # OpenAI chat
                        uri = "data:image/png;base64," + rng.choice(images)
                        content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "what?"}]
                        chat = {"model": "blip2", "max_tokens": 20, "messages": [{"role": "user", "content": content}]}
                        response = http.post(f"{base}/v1/chat/completions", json=chat)
                        kind, good = "openai", True
                    else:
                        response = http.post(f"{base}/v2/models/blip2/infer", json=kserve_body(rng.choice(images)))
                        kind, good = "kserve http", True
                    code = response.status_code
                    if code == 200 and good:
                        record(kind, sent, "succeeded", "200")
                    elif 400 <= code < 500 and code != 429 and not good:
                        record(kind, sent, "refused", str(code))
                    elif code in (429, 503) and response.headers.get("retry-after"):
                        record(kind, sent, "retriable", str(code))
                    else:
                        record(kind, sent, "lost", f"{code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    record("http", sent, "lost", repr(exc))

    def grpc_client(index: int) -> None:
        from tritonclient.utils import InferenceServerException

        rng = random.Random(1000 + index)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        raw = [base64.b64decode(i) for i in images]
        while not stop.is_set():
            sent = time.monotonic()
            bad = rng.random() < 0.2
            image = b"garbage" if bad else rng.choice(raw)
            try:
                client.infer(
                    "blip2", bytes_inputs(grpcclient, [image]), parameters={"max_new_tokens": 20}, client_timeout=60
                )
                record("kserve grpc", sent, "succeeded" if not bad else "lost", "OK")
            except InferenceServerException as exc:
                status = exc.status() or ""
                if bad and status == "StatusCode.INVALID_ARGUMENT":
                    record("bad: grpc not an image", sent, "refused", status)
                elif status in ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"):
                    record("kserve grpc", sent, "retriable", status)
                else:
                    record("kserve grpc", sent, "lost", f"{status} {exc.message()[:200]}")

    memory: list[dict] = []
    kills: list[dict] = []

    def pids() -> dict[str, int]:
        return {
            "vision": vision.stats.remote().result(timeout_s=30)["pid"],
            "llm": llm_stage.stats.remote().result(timeout_s=30)["pid"],
        }

    def monitor() -> None:
        while not stop.is_set():
            try:
                current = pids()
            except Exception:  # a replica being replaced
                time.sleep(1)
                continue
            memory.append({"t": round(time.monotonic() - started, 1)} | {k: _rss_mb(p) for k, p in current.items()})
            stop.wait(5)

    workers = [threading.Thread(target=http_client, args=(i,)) for i in range(clients)]
    workers += [threading.Thread(target=grpc_client, args=(i,)) for i in range(max(1, clients // 3))]
    workers.append(threading.Thread(target=monitor))
    for worker in workers:
        worker.start()
    duration = minutes * 60
    for fraction in (1 / 3, 2 / 3):
        time.sleep(max(0.0, started + duration * fraction - time.monotonic()))
        pid = llm_stage.stats.remote().result(timeout_s=60)["pid"]
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while True:  # the replacement answers
            try:
                if llm_stage.stats.remote().result(timeout_s=5)["pid"] != pid:
                    break
            except Exception:
                time.sleep(0.5)
        kills.append(
            {"t": round(killed - started, 1), "pid": pid, "replaced_after_s": round(time.monotonic() - killed, 1)}
        )
    time.sleep(max(0.0, started + duration - time.monotonic()))
    stop.set()
    for worker in workers:
        worker.join(timeout=120)
    serve.shutdown()
    ray.shutdown()

    counts = {k: sum(1 for o in outcomes if o["outcome"] == k) for k in ("succeeded", "refused", "retriable", "lost")}
    good = sorted(o["s"] for o in outcomes if o["outcome"] == "succeeded")

    def percentile(q: float) -> float | None:
        return round(good[min(len(good) - 1, int(q * len(good)))] * 1e3, 1) if good else None

    growth = {}
    for stage_name in ("vision", "llm"):
        series = [m[stage_name] for m in memory if m.get(stage_name)]
        if series:  # after warm-up (first minute), first to last sample; kills reset the LLM's
            growth[stage_name] = {
                "first_mb": round(series[0], 1),
                "last_mb": round(series[-1], 1),
                "max_mb": round(max(series), 1),
            }
    document = {
        "environment": environment,
        "settings": {"minutes": minutes, "http_clients": clients, "grpc_clients": max(1, clients // 3), "llm": llm},
        "sent": len(outcomes),
        **counts,
        "latency_ms": {"p50": percentile(0.5), "p99": percentile(0.99)},
        "kills": kills,
        "memory_mb": growth,
        "lost_examples": [o for o in outcomes if o["outcome"] == "lost"][:20],
        "memory": memory,
        "outcomes": outcomes,
    }
    _write(document, out)
    return document


def _compact(document: dict) -> dict:
    """The JSON to keep: every figure, and the outcomes counted per 10 s instead of one entry per request."""
    buckets: dict[int, dict[str, int]] = {}
    for outcome in document["outcomes"]:
        bucket = buckets.setdefault(int(outcome["t"] // 10) * 10, {})
        bucket[outcome["outcome"]] = bucket.get(outcome["outcome"], 0) + 1
    compact = {k: v for k, v in document.items() if k != "outcomes"}
    compact["outcomes_per_10s"] = [{"t": t, **counts} for t, counts in sorted(buckets.items())]
    return compact


def _write(document: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(_compact(document), indent=1) + "\n")
    figure, (latency, memory) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    colours = {"succeeded": "tab:blue", "refused": "tab:gray", "retriable": "tab:orange", "lost": "tab:red"}
    for outcome, colour in colours.items():
        mine = [o for o in document["outcomes"] if o["outcome"] == outcome]
        latency.scatter(
            [o["t"] for o in mine], [o["s"] for o in mine], s=3, color=colour, label=f"{outcome} ({len(mine)})"
        )
    for kill in document["kills"]:
        for axis in (latency, memory):
            axis.axvline(kill["t"], color="tab:red", linestyle="--")
    latency.set_ylabel("latency, s")
    latency.legend(markerscale=4)
    latency.set_title("soak: mixed good and bad requests, LLM replica killed at the dashed lines")
    for stage_name in ("vision", "llm"):
        memory.plot(
            [m["t"] for m in document["memory"]], [m.get(stage_name) for m in document["memory"]], label=stage_name
        )
    memory.set_ylabel("replica RSS, MB")
    memory.set_xlabel("seconds")
    memory.legend()
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(figure)
    env = document["environment"]
    lines = [
        f"# Soak ({env['checkpoint']['llm']}, commit {env['commit'][:10]})",
        "",
        f"Settings: {document['settings']}. LLM replica kills: {document['kills']}.",
        "",
        "| sent | succeeded | refused (bad input, 4xx) | retriable (503, UNAVAILABLE) | lost | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
        f"| {document['sent']} | {document['succeeded']} | {document['refused']} | {document['retriable']} | "
        f"{document['lost']} | {document['latency_ms']['p50']} | {document['latency_ms']['p99']} |",
        "",
        f"Replica memory (RSS, MB; the LLM's restarts with each kill): {document['memory_mb']}",
    ]
    if document["lost_examples"]:
        lines += ["", "Lost:", *[f"- {o}" for o in document["lost_examples"]]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=6, help="HTTP clients (gRPC clients: a third as many)")
    parser.add_argument("--llm", choices=["opt", "t5"], default="t5")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak"))
    args = parser.parse_args(argv)
    document = run(args.minutes, args.clients, Path(args.out), args.llm)
    keys = ("sent", "succeeded", "refused", "retriable", "lost", "latency_ms", "kills", "memory_mb")
    print(json.dumps({k: document[k] for k in keys}, indent=2))
    return 0 if document["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
