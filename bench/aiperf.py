"""`python -m bench.aiperf`: NVIDIA's AIPerf (genai-perf's successor) against blip2-serve's OpenAI endpoint, with
images, and its numbers in this project's results table.

AIPerf brings heavy dependencies of its own (pandas, plotly, datasets, textual, ...), so it runs from a virtual
environment of its own (`--aiperf PATH`; bench/aiperf.md has the commands). The server is `blip2-serve run`'s
default configuration on one checkpoint; AIPerf sends synthetic PNG images with short synthetic questions through
/v1/chat/completions, streamed, at a fixed concurrency, and writes its export; this module reads AIPerf's
profile_export_aiperf.json (`read_export`) and writes bench/results/aiperf-<size>-<llm>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

from bench.report import write_table
from bench.run import _checkpoint, _start_serve

# AIPerf's metrics this table keeps: (its tag, our label, unit)
METRICS = (
    ("request_latency", "request latency", "ms"),
    ("time_to_first_token", "time to first token", "ms"),
    ("inter_token_latency", "inter-token latency", "ms"),
    ("request_throughput", "requests/s", "requests/sec"),
    ("output_token_throughput", "output tokens/s", "tokens/sec"),
    ("image_throughput", "images/s per request", "images/sec"),
)


def command(
    aiperf: str,
    url: str,
    tokenizer: Path,
    out: Path,
    requests: int,
    concurrency: int,
    output_tokens: int,
    image_size: int = 224,
    workers: int = 1,
) -> list[str]:
    """The `aiperf profile` command line: synthetic PNG images with synthetic questions of ~8 tokens, streamed.
    One worker and one record processor: AIPerf's defaults spawn more processes than a 2-core machine has cores,
    and every core they take is one the server does not get (measured: `client_cpu_s` in the results)."""
    return [
        aiperf,
        "profile",
        "--model",
        "blip2",
        "--url",
        url,
        "--endpoint-type",
        "chat",
        "--streaming",
        "--tokenizer",
        str(tokenizer),
        "--image-width-mean",
        str(image_size),
        "--image-height-mean",
        str(image_size),
        "--image-batch-size",
        "1",
        "--image-format",
        "png",
        "--prompt-input-tokens-mean",
        "8",
        "--prompt-output-tokens-mean",
        str(output_tokens),
        "--concurrency",
        str(concurrency),
        "--request-count",
        str(requests),
        "--warmup-request-count",
        str(min(2, requests)),
        "--random-seed",
        "1",
        "--output-artifact-dir",
        str(out),
        "--ui-type",
        "none",
        "--no-server-metrics",
        "--no-gpu-telemetry",
        "--workers-max",
        str(workers),
        "--record-processors",
        "1",
    ]


def environment() -> dict[str, str]:
    """AIPerf's environment: this one without HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE. AIPerf 0.13 in offline mode
    looks every tokenizer up as a hub snapshot, so a local checkpoint directory fails ("Repo id must be in the form
    ..."); online, it loads a local path directly and asks the hub nothing (the tokenizer here is a local path)."""
    return {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}


def read_export(out: Path) -> dict:
    """AIPerf's summary export (`out`/profile_export_aiperf.json; phases/ holds the warm-up's and the profiling
    phase's own): {tag: {"avg", "p50", "p99", "unit"}} of the metrics in METRICS, the request and error counts."""
    path = out / "profile_export_aiperf.json"
    export = json.loads(path.read_text())
    metrics = {}
    for tag, _, _ in METRICS:
        entry = export.get(tag)
        if isinstance(entry, dict):
            metrics[tag] = {key: entry.get(key) for key in ("avg", "p50", "p99", "unit")}
    errors = export.get("error_summary") or []
    return {
        "metrics": metrics,
        "requests": int(export["request_count"]["avg"]),
        "errors": sum(int(e.get("count", 0)) for e in errors),
        "complete": bool(export.get("is_complete")),
        "export": str(path),
    }


def run(
    aiperf: str,
    size: str,
    llm: str,
    cache: Path,
    out_dir: Path,
    requests: int,
    concurrency: int,
    output_tokens: int,
) -> dict:
    from ray import serve

    checkpoint = _checkpoint(cache, size, llm)
    port = _start_serve(checkpoint, static=False)
    artifacts = out_dir / f"aiperf-{size}-{llm}-artifacts"
    try:
        started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        cmd = command(aiperf, f"http://127.0.0.1:{port}/c", checkpoint, artifacts, requests, concurrency, output_tokens)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=environment())
        elapsed = time.perf_counter() - started
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu_s = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
        if done.returncode != 0:
            raise RuntimeError(f"aiperf exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        summary = read_export(artifacts)
    finally:
        serve.shutdown()
    rows = [
        {
            "metric": label,
            "avg": summary["metrics"][tag]["avg"],
            "p50": summary["metrics"][tag]["p50"],
            "p99": summary["metrics"][tag]["p99"],
            "unit": summary["metrics"][tag]["unit"] or unit,
        }
        for tag, label, unit in METRICS
        if tag in summary["metrics"]
    ]
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "checkpoint": f"{size}-{llm}",
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "aiperf": {
            "command": " ".join(cmd[1:]),
            "requests": summary["requests"],
            "errors": summary["errors"],
            "client_cpu_s": round(client_cpu_s, 1),
        },
        "rows": rows,
        "wall_s": round(elapsed, 1),
    }


def lines(result: dict) -> list[str]:
    """The markdown table of a result."""
    text = [
        f"`aiperf {result['aiperf']['command']}` against `blip2-serve run`'s default configuration on the "
        f"{result['checkpoint']} checkpoint ({result['machine']}): {result['aiperf']['requests']} requests, "
        f"{result['aiperf']['errors']} errors, {result['wall_s']} s in all. AIPerf itself used "
        f"{result['aiperf']['client_cpu_s']} CPU-seconds of this machine in that time "
        f"({result['aiperf']['client_cpu_s'] / result['wall_s']:.2f} cores on average), which the server did not get.",
        "",
        "| metric | avg | p50 | p99 | unit |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = [f"{row[k]:.2f}" if isinstance(row[k], (int, float)) else "-" for k in ("avg", "p50", "p99")]
        text.append(f"| {row['metric']} | {' | '.join(cells)} | {row['unit']} |")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aiperf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--aiperf", default="aiperf", help="the aiperf executable (its own venv: bench/aiperf.md)")
    parser.add_argument("--size", default="realistic")
    parser.add_argument("--llm", default="opt", choices=["opt", "t5"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output-tokens", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    result = run(
        args.aiperf, args.size, args.llm, args.cache, args.out, args.requests, args.concurrency, args.output_tokens
    )
    title = f"AIPerf against blip2-serve ({result['checkpoint']})"
    write_table(str(args.out), f"aiperf-{args.size}-{args.llm}", title, result, lines(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
