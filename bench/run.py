"""`python -m bench` / `blip2-serve bench`: every scenario against one checkpoint, in one process tree, one run.

Writes bench/results/<size>-<llm>.{json,md,png}: the rows, the ratios against the baseline measured in the same
run, the targets, and the machine, commit, versions and checkpoint shape they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench import QUESTIONS, report
from bench.flops import proportions
from bench.peer import peer_load, start_peer, stop_peer
from bench.scenarios import (
    Baseline,
    LoopProcess,
    alternated_lone,
    ask_many_once,
    kserve_load,
    one_process,
    openai_streams,
    overhead_profile,
    paired_rounds,
    process_tree,
    profile_delta,
    row,
    stage_profile,
    vision_backends,
)

ALL = ("baseline", "peer", "one_process", "served", "streaming", "multi_question", "mixed", "triton", "vision")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _checkpoint(cache: Path, size: str, llm: str) -> Path:
    from blip2_serve.exporters.tiny import make_tiny_checkpoint

    path = cache / f"{size}-{llm}"
    if not (path / "model.safetensors").exists():
        make_tiny_checkpoint(path, llm, size=size)
    return path


def _environment(checkpoint: Path) -> dict:
    import importlib.metadata as metadata

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    text = config.text_config
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    versions = {}
    for name in ("torch", "transformers", "ray", "onnxruntime", "tritonclient", "nvidia-pytriton", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "commit": commit,
        "versions": versions,
        "checkpoint": {
            "path": str(checkpoint),
            "vision": f"{config.vision_config.hidden_size} wide x {config.vision_config.num_hidden_layers} layers, "
            f"image {config.vision_config.image_size}",
            "qformer": f"{config.qformer_config.hidden_size} wide x {config.qformer_config.num_hidden_layers} layers, "
            f"{config.num_query_tokens} queries",
            "llm": f"{text.model_type} {getattr(text, 'hidden_size', getattr(text, 'd_model', None))} wide x "
            f"{getattr(text, 'num_hidden_layers', getattr(text, 'num_layers', None))} layers, vocab {text.vocab_size}",
        },
    }


APP_PORTS: dict[str, int] = {}  # each application's port, as `_start_serve` served it
PROXY: dict[str, int] = {}  # {"port": Ray's HTTP proxy's port} where the ingress replicas serve their own ports


def _start_serve(checkpoint: Path, static: bool, server: dict | None = None):
    """Ray + Serve on 127.0.0.1 with the default configuration (what `blip2-serve run --model` serves) at /c, and
    where `static`, the same with static LLM scheduling at /s; `server`: settings of the server section. Returns /c's
    port. As `blip2-serve run` does, each application's ingress replica serves its port itself (Ray Serve's direct
    ingress, serve/app.prepare_local_ray): /c's port, and /s's the next one (APP_PORTS)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from blip2_serve.serve.app import build_app, prepare_local_ray
    from blip2_serve.serve.config import AppConfig
    from ray import serve

    port = _free_port()
    while static and not _port_free(port + 1):
        port = _free_port()
    configs = [
        AppConfig.model_validate(
            {
                "model": {"checkpoint": str(checkpoint), "device": "cpu"},
                "llm": {"scheduler": scheduler},
                "server": {**(server or {}), "http_port": port + i, "grpc_port": None},
                "app_name": name,
                "route_prefix": f"/{name}",
            }
        )
        for i, (name, scheduler) in enumerate((("c", "continuous"), ("s", "static"))[: 2 if static else 1])
    ]
    threads = os.environ.get("OMP_NUM_THREADS")
    options = prepare_local_ray(configs[0])  # as `blip2-serve run` starts its Ray
    if options is not None:  # a port range of one per application, in the order they are deployed
        os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + len(configs))
    # Logical CPUs: room for the second application's replicas (each model stage asks for one by default); the cores
    # they compute on are the machine's, shared in turns (deployments/cores.py).
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    if threads is None:  # Ray's processes have it; the loop, the peer and one_process started later do not
        os.environ.pop("OMP_NUM_THREADS", None)
    serve.start(**(options or {"http_options": {"host": "127.0.0.1", "port": port}}))
    if options is not None:
        PROXY["port"] = options["http_options"]["port"]
    for config in configs:  # one after the other: /c's replica takes the first port
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        APP_PORTS[config.app_name] = config.server.http_port if options is not None else port
    return port


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _start_triton(checkpoint: Path, cache: Path):
    from blip2_serve.exporters.triton_repo import write_triton_repo
    from blip2_serve.exporters.tritonserver import TritonPorts, start_tritonserver

    repo = write_triton_repo(str(checkpoint), cache / f"repo-{checkpoint.name}", max_batch=16, device="cpu")
    ports = TritonPorts(_free_port(), _free_port(), _free_port())
    process = start_tritonserver(repo, ports, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(f"127.0.0.1:{ports.http}") as client:  # closed on this thread (gevent)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if client.is_server_ready():
                    return process, f"127.0.0.1:{ports.http}"
            except Exception:
                time.sleep(1)
    process.terminate()
    raise RuntimeError("tritonserver did not become ready")


def peer_rows(
    checkpoint: str,
    sets: dict,
    max_new_tokens: int,
    expected: dict,
    warmup: bytes,
    burst: list[tuple[bytes, str]],
    when: str = "",
) -> list[dict]:
    """The LitServe peer (bench/peer.py) alone on the machine: each concurrency's jobs, as the served rows get, the
    16-client load after an untimed `burst` of 16 other images (see `run`). `when`: "" before the served rows,
    "after" when run again after them (the variant says so)."""
    port = _free_port()
    process = start_peer(checkpoint, port)
    rows = []
    try:
        for concurrency, jobs in sets.items():
            if concurrency > 1:
                peer_load(f"http://127.0.0.1:{port}", burst, concurrency, max_new_tokens)
            latencies, wall, answers = peer_load(
                f"http://127.0.0.1:{port}", jobs, concurrency, max_new_tokens, warmup=warmup
            )
            rows.append(
                row(
                    "peer",
                    "litserve, batched generate" + (f", {when}" if when else ""),
                    latencies,
                    wall,
                    answers,
                    expected[concurrency],
                    concurrency,
                )
            )
    finally:
        stop_peer(process)
    return rows


PAIRS = ("peer", "served")
PAIRED_ORDER = ("peer", "served", "served", "peer", "peer", "served")  # ABBA AB: pairs (0, 0), (1, 1), (2, 2)


def paired_rows(
    checkpoint: str, url: str, pair_sets: list, max_new_tokens: int, parameters: dict, warmup: bytes
) -> tuple[list[dict], list[tuple[bytes, str]]]:
    """The 16-client load on the peer and on the served application in rounds taken in turn (PAIRED_ORDER), each
    with every process of the other server stopped (scenarios.frozen), one set of images a pair: both servers get
    the same images, each image once (the served one has not seen them: no cache hit). The loop and the peer before
    and after the served rows (`served_ratios`) put the served rows between two other periods of a machine whose
    speed drifts by tens of percent over minutes; here every served round has a peer round next to it.
    Returns the rows (answers not yet judged: see `judge_paired`) and every job, in the rows' order."""
    import psutil

    ray_side = psutil.Process().children(recursive=True)  # Ray's processes, all of them (the peer is not up yet)
    port = _free_port()
    process = start_peer(checkpoint, port)
    peer_url = f"http://127.0.0.1:{port}"
    profiles: list[dict] = []

    def peer(jobs):
        return peer_load(peer_url, jobs, 16, max_new_tokens)

    def served(jobs):
        before = stage_profile("c")
        outcome = kserve_load(url, jobs, 16, parameters)
        profiles.append(profile_delta(before, stage_profile("c")))
        return outcome

    try:
        # Its warm-up: one lone request and one batch of 16, as the served one had its 16-client row before these
        # rounds (a first batch of 16 in a fresh process is slow: its memory is not yet mapped).
        peer_load(peer_url, [(warmup, "")] * 16, 16, max_new_tokens)
        rounds = [(side, pair_sets[i // 2]) for i, side in enumerate(PAIRED_ORDER)]
        out = paired_rounds(rounds, {"peer": (peer, process_tree(process.pid)), "served": (served, ray_side)})
    finally:
        stop_peer(process)
    rows, jobs = [], []
    for side in ("peer", "served"):
        sets = [pair_sets[i // 2] for i, name in enumerate(PAIRED_ORDER) if name == side]
        for k, ((latencies, wall, answers), images) in enumerate(zip(out[side], sets)):
            extra = profiles[k] if side == "served" else {}
            variant = ("litserve, batched generate" if side == "peer" else "blip2-serve, kserve http") + (
                f", paired round {k + 1} (the other server stopped)"
            )
            rows.append({"_answers": answers, **row(side, variant, latencies, wall, answers, answers, 16, **extra)})
            jobs.append(images)
    return rows, jobs


def judge_paired(rows: list[dict], jobs: list, expected: dict[bytes, str]) -> list[dict]:
    """The paired rows with their answers judged against the loop's (`expected`: image -> the loop's answer)."""
    judged = []
    for r, images in zip(rows, jobs):
        answers = r.pop("_answers")
        want = [expected[image] for image, _ in images]
        same = sum(a == b for a, b in zip(answers, want))
        judged.append({**r, "answers_equal": f"{same}/{len(want)}", "valid": same == len(want) == len(answers)})
    return judged


def one_process_row(
    checkpoint: str, jobs: list, max_new_tokens: int, expected: list, burst: list, when: str = ""
) -> dict:
    """The 16-client row's work in one process with no serving (bench/scenarios.one_process), alone on the machine,
    after an untimed batch of the `burst` images."""
    latencies, wall, answers = one_process(checkpoint, jobs, max_new_tokens, warm=burst)
    variant = "stage code, one vision batch, one decode batch, no serving" + (f", {when}" if when else "")
    return row("one_process", variant, latencies, wall, answers, expected, 16)


def served_ratios(results: list[dict]) -> dict:
    """The served rows against the loop's and the peer's, each the mean of its run before and after the served
    rows (`*_drift`: after / before, how much the machine's speed moved meanwhile)."""
    baseline = [r for r in results if r["scenario"] == "baseline"]
    served = {r["concurrency"]: r for r in results if r["scenario"] == "served" and "paired" not in r["variant"]}
    base_rps = sum(r["throughput_rps"] for r in baseline) / len(baseline)
    base_p50 = sum(r["p50_ms"] for r in baseline) / len(baseline)
    # the serving overhead against the loop's calls taken in turn with the lone served requests (the same rounds, the
    # same images: run() takes them with every c=1 row); against the loop alone before and after as a diagnostic
    direct_p50 = next(r["p50_ms"] for r in results if r["scenario"] == "loop_in_turn")
    ratios = {
        "captioning_throughput_c16_over_baseline": round(served[16]["throughput_rps"] / base_rps, 2),
        "serving_overhead_c1_p50_ms": round(served[1]["p50_ms"] - direct_p50, 2),
        "serving_overhead_c1_p50_ms_loop_alone": round(served[1]["p50_ms"] - base_p50, 2),
        "c1_p50_over_baseline": round(served[1]["p50_ms"] / base_p50, 3),
        "baseline_drift": round(baseline[-1]["p50_ms"] / baseline[0]["p50_ms"], 3),
    }
    for r in results:
        if r["scenario"] == "via_proxy":  # diagnostic: what direct ingress took off a lone request
            ratios["serving_overhead_c1_p50_ms_via_proxy"] = round(r["p50_ms"] - direct_p50, 2)
    alone = [r for r in results if r["scenario"] == "one_process"]
    if alone:  # the most a server could do with these kernels here, and how much of it the served row reached
        alone_rps = sum(r["throughput_rps"] for r in alone) / len(alone)
        ratios["one_process_c16_over_baseline"] = round(alone_rps / base_rps, 2)
        ratios["served_c16_over_one_process"] = round(served[16]["throughput_rps"] / alone_rps, 2)
    peer: dict[int, list[dict]] = {}
    for r in results:
        if r["scenario"] == "peer" and "paired" not in r["variant"]:
            peer.setdefault(r["concurrency"], []).append(r)
    paired = {side: [r for r in results if r["scenario"] == side and "paired" in r["variant"]] for side in PAIRS}
    if all(paired.values()):  # throughput over all rounds of each side, and each pair's ratio
        rps = {side: sum(r["requests"] for r in rs) / sum(r["seconds"] for r in rs) for side, rs in paired.items()}
        ratios["captioning_throughput_c16_over_peer_paired"] = round(rps["served"] / rps["peer"], 2)
        ratios["paired_round_ratios"] = [
            round(p["seconds"] / s["seconds"], 3) for p, s in zip(paired["peer"], paired["served"])
        ]
    if peer:
        peer_rps = sum(r["throughput_rps"] for r in peer[16]) / len(peer[16])
        peer_p50 = sum(r["p50_ms"] for r in peer[1]) / len(peer[1])
        ratios["captioning_throughput_c16_over_peer"] = round(served[16]["throughput_rps"] / peer_rps, 2)
        ratios["c1_p50_over_peer"] = round(served[1]["p50_ms"] / peer_p50, 3)
        ratios["peer_drift"] = round(peer[16][-1]["seconds"] / peer[16][0]["seconds"], 3)
    return ratios


def run(
    size: str, llm: str, scenarios: tuple[str, ...], images: int, max_new_tokens: int, out: Path, cache: Path
) -> dict:
    from blip2_serve.exporters.int8_report import sample_images

    checkpoint = _checkpoint(cache, size, llm)
    # Every timed load gets images the server has not seen (the embedding cache would otherwise answer the vision
    # stage's part): one set per concurrency, one for streaming, one for the mixed load, one for the five questions.
    pictures = sample_images(8 * images + 6, size=96 if size == "tiny" else 224)
    # Every 16-client row (the peer's before and after, the served one, one_process) follows an untimed burst of 16
    # other images on the same server or process: the row is the steady state, as the paired rounds are, not a process's
    # first batch of 16. A first batch at new shapes is slower (memory not yet mapped, buffers grown; realistic OPT at
    # 8142353: the peer's first batch of 16 in a fresh process took 16.0 s and 23.1 s in two rows, its warm ones in the
    # paired rounds 15.6 and 16.3 s), and on either side it fell on one row by chance.
    burst = [(p, "") for p in pictures[7 * images + 6 :]]
    pictures, paired_pictures = pictures[: 4 * images + 6], pictures[4 * images + 6 : 7 * images + 6]
    pair_sets = [[(p, "") for p in paired_pictures[i * images : (i + 1) * images]] for i in range(3)]
    warmup, question_image = pictures[-1], pictures[-2]
    sets = {c: [(p, "") for p in pictures[i * images : (i + 1) * images]] for i, c in enumerate((1, 16))}
    streamed = [(p, "") for p in pictures[2 * images : 2 * images + 4]]
    mixed_jobs = [(p, "") for p in pictures[2 * images + 4 : 3 * images + 4]]
    via_proxy = [(p, "") for p in pictures[3 * images + 4 : 4 * images + 4]]
    parameters = {"max_new_tokens": max_new_tokens}
    results: list[dict] = []
    summary: dict = {}

    baseline = Baseline(str(checkpoint))
    latencies, wall, answers = baseline.run(sets[1] + sets[16], max_new_tokens)
    expected = {1: answers[:images], 16: answers[images:]}
    results.append(row("baseline", "model card loop", latencies, wall, answers, answers))

    if "peer" in scenarios:
        results += peer_rows(str(checkpoint), sets, max_new_tokens, expected, warmup, burst)
    if "one_process" in scenarios:
        results.append(one_process_row(str(checkpoint), sets[16], max_new_tokens, expected[16], burst))

    port = (
        _start_serve(checkpoint, static="mixed" in scenarios)
        if set(scenarios) & {"served", "streaming", "multi_question", "mixed"}
        else None
    )
    url = f"127.0.0.1:{port}/c"
    if port is not None:  # warm-up, outside the profiles: whichever scenario comes first is not a cold start
        kserve_load(url, [(warmup, "")], 1, parameters)
    if "served" in scenarios:
        proxied = looped = None
        for concurrency, jobs in sets.items():
            if concurrency == 1:
                before = stage_profile("c")
                # Lone requests taken in turn with the loop's own call on the same image (the server idle meanwhile)
                # and, where the server has direct ingress, with the same server's lone requests through Ray's proxy
                # (fresh images; the profile counts both): the machine's drift falls on all alike, so the serving
                # overhead is the served p50 minus the loop's p50 of the same rounds, and the proxy row shows what
                # direct ingress takes off a lone request.
                urls, lists = [url], [jobs]
                if "port" in PROXY:
                    urls, lists = [url, f"127.0.0.1:{PROXY['port']}/c"], [jobs, via_proxy]
                loop = LoopProcess(str(checkpoint), max_new_tokens)
                try:
                    *served_rows, looped = alternated_lone(urls, lists, parameters, loop=(loop.answer, jobs))
                finally:
                    loop.close()
                (latencies, wall, answers), *proxy_rows = served_rows
                proxied = proxy_rows[0] if proxy_rows else None
            else:
                kserve_load(url, burst, concurrency, parameters)  # untimed, outside the profile (`burst` above)
                before = stage_profile("c")
                latencies, wall, answers = kserve_load(url, jobs, concurrency, parameters)
            profile = profile_delta(before, stage_profile("c"))
            results.append(
                row(
                    "served",
                    "blip2-serve, kserve http",
                    latencies,
                    wall,
                    answers,
                    expected[concurrency],
                    concurrency,
                    **profile,
                )
            )
        if proxied is not None:
            proxy_expected = [baseline.answer(image, "", max_new_tokens) for image, _ in via_proxy]
            variant = "the same server through Ray's HTTP proxy, in turn with the c=1 row"
            results.append(row("via_proxy", variant, *proxied, proxy_expected, 1))
        if looped is not None:
            variant = "model card loop, in turn with the c=1 row (the server idle meanwhile)"
            results.append(row("loop_in_turn", variant, *looped, expected[1], 1))
        summary["overhead_profile"] = overhead_profile(f"http://{url}", "c", warmup)
        if "peer" in scenarios:
            paired, paired_jobs = paired_rows(str(checkpoint), url, pair_sets, max_new_tokens, parameters, warmup)
    if "streaming" in scenarios:
        latencies, wall, answers, extra = openai_streams(f"http://127.0.0.1:{port}/c", streamed, max_new_tokens)
        streamed_expected = [baseline.answer(image, "", max_new_tokens) for image, _ in streamed]
        results.append(row("streaming", "openai sse", latencies, wall, answers, streamed_expected, **extra))
    if "multi_question" in scenarios:
        prompts = [f"Question: {q} Answer:" for q in QUESTIONS]
        five = [(question_image, p) for p in prompts]
        latencies, wall, expected_five = baseline.run(five, max_new_tokens)
        results.append(row("multi_question", "5 baseline calls", latencies, wall, expected_five, expected_five))
        baseline_wall = wall
        latencies, wall, answers = ask_many_once(url, question_image, prompts, parameters)
        results.append(row("multi_question", "ask_many (one request)", latencies, wall, answers, expected_five))
        summary["five_questions_speedup"] = round(baseline_wall / wall, 2)
    if "mixed" in scenarios:
        lengths = [4 if i % 2 else 64 for i in range(len(mixed_jobs))]
        mixed_expected = [baseline.answer(p, "", n, n) for (p, _), n in zip(mixed_jobs, lengths)]
        throughput = {}
        for name, variant in (("c", "continuous"), ("s", "static")):
            latencies, wall, answers = kserve_load(
                f"127.0.0.1:{APP_PORTS[name]}/{name}",
                mixed_jobs,
                16,
                parameters,
                per_job=[{"max_new_tokens": n, "min_new_tokens": n} for n in lengths],
            )
            results.append(
                row(
                    "mixed",
                    f"{variant} scheduler",
                    latencies,
                    wall,
                    answers,
                    mixed_expected,
                    16,
                    tokens_per_s=round(sum(lengths) / wall, 2),
                )
            )
            throughput[variant] = sum(lengths) / wall
        summary["mixed_continuous_over_static"] = round(throughput["continuous"] / throughput["static"], 2)
    if port is not None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()  # nothing of Ray's left running beside the rows after this
    if "served" in scenarios:
        # This machine's speed drifts by 10-20% over minutes, and the served rows come after the baseline's and the
        # peer's: the loop and the peer run again now, alone as before, and each ratio is against the mean of both.
        latencies, wall, answers = baseline.run(sets[1] + sets[16], max_new_tokens)
        results.append(row("baseline", "model card loop, after", latencies, wall, answers, expected[1] + expected[16]))
        if "peer" in scenarios:
            results += peer_rows(str(checkpoint), sets, max_new_tokens, expected, warmup, burst, when="after")
        if "one_process" in scenarios:
            after = one_process_row(str(checkpoint), sets[16], max_new_tokens, expected[16], burst, when="after")
            results.append(after)
        if "peer" in scenarios:  # the paired rounds' answers against the loop's, untimed
            paired_images = [image for jobs in pair_sets for image, _ in jobs]
            loop_answers = baseline.run([(image, "") for image in paired_images], max_new_tokens)[2]
            results += judge_paired(paired, paired_jobs, dict(zip(paired_images, loop_answers)))
        summary.update(served_ratios(results))
    if "triton" in scenarios:
        process, triton_url = _start_triton(checkpoint, cache)
        try:
            for concurrency, jobs in sets.items():
                latencies, wall, answers = kserve_load(triton_url, jobs, concurrency, parameters, warmup=warmup)
                results.append(
                    row(
                        "triton",
                        "tritonserver, kserve http",
                        latencies,
                        wall,
                        answers,
                        expected[concurrency],
                        concurrency,
                    )
                )
        finally:
            process.terminate()
            process.wait(timeout=60)
    if "vision" in scenarios:
        from blip2_serve.exporters.int8_report import write_int8_report
        from blip2_serve.exporters.onnx_export import export_vision_onnx, quantize_int8

        onnx_dir = cache / f"onnx-{checkpoint.name}"
        if not (onnx_dir / "vision_int8.onnx").exists():
            export_vision_onnx(str(checkpoint), onnx_dir)
            quantize_int8(onnx_dir)
            write_int8_report(str(checkpoint), onnx_dir, images=pictures[:8], max_new_tokens=max_new_tokens)
        results += vision_backends(str(checkpoint), onnx_dir, pictures[:8])
        summary["int8_report"] = json.loads((onnx_dir / "int8_report.json").read_text())

    document = {
        "size": size,
        "llm": llm,
        "images": images,
        "max_new_tokens": max_new_tokens,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **_environment(checkpoint),
        "flops_per_caption": proportions(size, llm, new_tokens=max_new_tokens) if size != "tiny" else None,
        "summary": summary,
        "targets": report.targets(summary, size),
        "results": results,
    }
    report.write(document, out / f"{size}-{llm}")
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--size", choices=["tiny", "realistic", "medium"], default="tiny")
    parser.add_argument("--llm", choices=["opt", "t5"], default="opt")
    parser.add_argument("--scenarios", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--cache", default=str(Path(__file__).parent / ".cache"), help="checkpoints and exports")
    args = parser.parse_args(argv)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    unknown = set(scenarios) - set(ALL)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    document = run(args.size, args.llm, scenarios, args.images, args.max_new_tokens, Path(args.out), Path(args.cache))
    print(report.markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
