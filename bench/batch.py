"""`python -m bench.batch`: `blip2-serve batch caption` (Ray Data, embedded local Ray) against, in the same run on the
same image files: the model card's loop (one image at a time), the hand-written offline peer a user would write
first (transformers' batched `generate` over batches of 16 in one process), and the served graph (`blip2-serve
run`'s default configuration, 16 concurrent stock tritonclient clients, as `blip2-serve caption` would send them).
Every caption is checked against the loop's. The batch job's time includes starting its actors and loading the model
in them (what a user waits for); the others load their model before the clock starts.
Writes bench/results/batch-<size>-<llm>.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from bench.report import write_table
from bench.run import _checkpoint
from bench.scenarios import Baseline

PEER_BATCH = 16


def peer(baseline: Baseline, images: list[bytes], max_new_tokens: int) -> tuple[float, list[str]]:
    """transformers' batched generate, PEER_BATCH images a call, in this process."""
    from PIL import Image

    started, answers = time.perf_counter(), []
    for first in range(0, len(images), PEER_BATCH):
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images[first : first + PEER_BATCH]]
        if baseline.decoder_only:
            inputs = baseline.processor(images=pictures, return_tensors="pt")
        else:
            inputs = baseline.processor(images=pictures, text=[""] * len(pictures), return_tensors="pt")
        with baseline.torch.inference_mode():
            output = baseline.model.generate(**inputs, max_new_tokens=max_new_tokens)
        if baseline.decoder_only:
            output = output[:, baseline.model.config.num_query_tokens + 1 :]
        answers += [a.strip() for a in baseline.processor.batch_decode(output, skip_special_tokens=True)]
    return time.perf_counter() - started, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "realistic", "medium"], default="realistic")
    parser.add_argument("--llm", choices=["opt", "t5"], default="opt")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--cache", default="bench/.cache")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    import ray
    from blip2_serve.exporters.int8_report import sample_images
    from blip2_serve.serve.app import prepare_local_ray
    from blip2_serve.serve.batch import BatchJob, run_batch

    checkpoint = _checkpoint(Path(args.cache), args.size, args.llm)
    images = sample_images(args.images, size=96 if args.size == "tiny" else 224)
    folder = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    for index, data in enumerate(images):
        (folder / f"img{index:04d}.png").write_bytes(data)

    baseline = Baseline(str(checkpoint))
    started = time.perf_counter()
    expected = [baseline.answer(data, "", args.max_new_tokens) for data in images]
    loop_s = time.perf_counter() - started
    peer_s, peer_answers = peer(baseline, images, args.max_new_tokens)
    del baseline

    prepare_local_ray()
    ray.init(include_dashboard=False, log_to_driver=False)
    out = folder / "captions.jsonl"
    job = BatchJob("caption", str(folder), str(checkpoint), str(out), max_new_tokens=args.max_new_tokens)
    job = BatchJob(**{**job.__dict__, "device": "cpu", "dtype": "fp32"})
    summary = run_batch(job, progress=False)
    ray.shutdown()
    rows = {json.loads(line)["id"]: json.loads(line)["text"] for line in out.read_text().splitlines()}
    batch_answers = [rows.get(f"img{index:04d}.png") for index in range(len(images))]

    from bench.run import _start_serve
    from bench.scenarios import kserve_load

    port = _start_serve(checkpoint, static=False)
    url = f"127.0.0.1:{port}/c"
    warmup = sample_images(len(images) + 1, size=96 if args.size == "tiny" else 224)[-1]
    parameters = {"max_new_tokens": args.max_new_tokens}
    _, served_s, served_answers = kserve_load(url, [(d, "") for d in images], 16, parameters, warmup=warmup)
    ray.shutdown()

    def entry(name: str, seconds: float, answers: list[str]) -> dict:
        same = sum(a == b for a, b in zip(answers, expected))
        return {
            "scenario": name,
            "seconds": round(seconds, 2),
            "images_per_s": round(len(images) / seconds, 3),
            "over_loop": round(loop_s / seconds, 2),
            "answers_equal": f"{same}/{len(expected)}",
        }

    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True).stdout.strip()
    document = {
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "commit": commit,
        "checkpoint": str(checkpoint),
        "images": len(images),
        "max_new_tokens": args.max_new_tokens,
        "rows": [
            entry("model card loop", loop_s, expected),
            entry(f"transformers batched generate ({PEER_BATCH} a call)", peer_s, peer_answers),
            entry("served graph, 16 concurrent clients (model loaded before)", served_s, served_answers),
            entry("blip2-serve batch (Ray Data, local, actors started in the time)", summary.seconds, batch_answers),
        ],
    }
    lines = [
        f"Machine: {document['machine']}. {len(images)} images, greedy, max_new_tokens {args.max_new_tokens}.",
        "",
        "| scenario | seconds | images/s | images/s per core | / loop | answers = loop |",
        "|---|---|---|---|---|---|",
    ]
    cores = document["machine"]["cpus"] or 1
    lines += [
        f"| {r['scenario']} | {r['seconds']} | {r['images_per_s']} | {round(r['images_per_s'] / cores, 3)} | "
        f"{r['over_loop']}x | {r['answers_equal']} |"
        for r in document["rows"]
    ]
    lines += [
        "",
        f"blip2-serve batch: its first {summary.first_rows} rows were on disk after {summary.first_s:.1f} s (actors "
        "started, models loaded, the pipeline filled), the rest after it.",
    ]
    write_table(
        args.out, f"batch-{args.size}-{args.llm}", f"blip2-serve batch, {args.size} {args.llm}", document, lines
    )


if __name__ == "__main__":
    main()
