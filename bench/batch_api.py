"""`python -m bench.batch_api`: what OpenAI's Batch API on the server costs the interactive users beside it.

One served graph (`blip2-serve run`'s default configuration), one run, distinct images everywhere (the embedding
cache never answers):
1. idle: one user asks for captions one after another (OpenAI chat, concurrency 1): the idle p50;
2. Batch API: the same user while a batch of LINES caption lines runs (uploaded with the openai package): its p50,
   target <= 2x idle; the batch's lines/s;
3. peer: the same user while the same number of captions is sent as ordinary requests by `batch_concurrency`
   client threads (what a user without a Batch API does): its p50 and that load's lines/s.
Batch answers are checked against the same request sent alone. Writes bench/results/batch-api-<size>-<llm>.{json,md}.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.report import write_table
from bench.run import _checkpoint, _start_serve


def _body(image: bytes, max_new_tokens: int) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}]
    return {"model": "blip2", "messages": [{"role": "user", "content": content}], "max_tokens": max_new_tokens}


def _probe(client, images: list[bytes], max_new_tokens: int) -> list[float]:
    """Seconds per request of one user asking one caption after another."""
    seconds = []
    for image in images:
        started = time.perf_counter()
        client.chat.completions.create(**_body(image, max_new_tokens))
        seconds.append(time.perf_counter() - started)
    return seconds


def _p50_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "realistic", "medium"], default="realistic")
    parser.add_argument("--llm", choices=["opt", "t5"], default="opt")
    parser.add_argument("--lines", type=int, default=100)
    parser.add_argument("--probes", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--cache", default="bench/.cache")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    import openai
    import ray
    from blip2_serve.exporters.int8_report import sample_images
    from blip2_serve.serve.config import ServerConfig

    concurrency = ServerConfig().batch_concurrency
    checkpoint = _checkpoint(Path(args.cache), args.size, args.llm)
    count = 2 * args.lines + 3 * args.probes + 1
    images = sample_images(count, size=96 if args.size == "tiny" else 224)
    batch_images, load_images = images[: args.lines], images[args.lines : 2 * args.lines]
    probes = [images[2 * args.lines + i * args.probes : 2 * args.lines + (i + 1) * args.probes] for i in range(3)]
    port = _start_serve(checkpoint, static=False, server={"batch_dir": tempfile.mkdtemp(prefix="bench-batch-api-")})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/c/v1", api_key="unused", max_retries=0, timeout=600)
    client.chat.completions.create(**_body(images[-1], args.max_new_tokens))  # warm

    idle = _probe(client, probes[0], args.max_new_tokens)

    lines = [
        {"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions", "body": _body(d, args.max_new_tokens)}
        for i, d in enumerate(batch_images)
    ]
    path = Path(tempfile.mkdtemp()) / "input.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with path.open("rb") as stream:
        file = client.files.create(file=stream, purpose="batch")
    started = time.perf_counter()
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    during_batch = _probe(client, probes[1], args.max_new_tokens)
    after_probe = client.batches.retrieve(batch.id).request_counts.completed
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.2)
    batch_s = time.perf_counter() - started
    outputs = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    answers = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in outputs}
    checked = lines[:: max(1, args.lines // 10)]
    same = sum(
        answers.get(line["custom_id"]) == client.chat.completions.create(**line["body"]).choices[0].message.content
        for line in checked
    )

    pending = list(load_images)
    lock = threading.Lock()

    def sender():
        sender_client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/c/v1", api_key="unused", timeout=600)
        while True:
            with lock:
                if not pending:
                    return
                image = pending.pop()
            sender_client.chat.completions.create(**_body(image, args.max_new_tokens))

    threads = [threading.Thread(target=sender) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    during_load = _probe(client, probes[2], args.max_new_tokens)
    after_load_probe = args.lines - len(pending)
    for thread in threads:
        thread.join()
    load_s = time.perf_counter() - started
    ray.shutdown()

    idle_p50 = _p50_ms(idle)
    rows = [
        {"scenario": "idle", "user_p50_ms": idle_p50, "over_idle": 1.0, "lines_per_s": None},
        {
            "scenario": f"during a Batch API batch of {args.lines} lines",
            "user_p50_ms": _p50_ms(during_batch),
            "over_idle": round(_p50_ms(during_batch) / idle_p50, 2),
            "lines_per_s": round(args.lines / batch_s, 3),
        },
        {
            "scenario": f"during {args.lines} ordinary requests from {concurrency} clients",
            "user_p50_ms": _p50_ms(during_load),
            "over_idle": round(_p50_ms(during_load) / idle_p50, 2),
            "lines_per_s": round(args.lines / load_s, 3),
        },
    ]
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True).stdout.strip()
    document = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "commit": commit,
        "checkpoint": str(checkpoint),
        "lines": args.lines,
        "probes": args.probes,
        "max_new_tokens": args.max_new_tokens,
        "batch_concurrency": concurrency,
        "batch_lines_done_when_probe_ended": after_probe,
        "load_requests_sent_when_probe_ended": after_load_probe,
        "batch_answers_equal_alone": f"{same}/{len(checked)}",
        "rows": rows,
    }
    text = [
        f"Machine: {document['machine']}. Default configuration (batch_concurrency {concurrency}); "
        f"{args.probes} sequential captions per row, max_new_tokens {args.max_new_tokens}, distinct images.",
        "",
        "| while | user p50 ms | / idle | background lines/s |",
        "|---|---|---|---|",
    ]
    text += [f"| {r['scenario']} | {r['user_p50_ms']} | {r['over_idle']}x | {r['lines_per_s'] or ''} |" for r in rows]
    text += [
        "",
        f"The batch had {after_probe}/{args.lines} lines done when the user's {args.probes} captions ended (the "
        f"ordinary load: {after_load_probe}/{args.lines} sent); batch answers equal to the same request alone: "
        f"{document['batch_answers_equal_alone']}.",
    ]
    title = f"one interactive user beside OpenAI's Batch API, {args.size} {args.llm}"
    write_table(args.out, f"batch-api-{args.size}-{args.llm}", title, document, text)


if __name__ == "__main__":
    main()
