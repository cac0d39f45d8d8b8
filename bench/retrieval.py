"""`python -m bench.retrieval`: embedding throughput, served (Ray Serve, stock tritonclient over HTTP, N concurrent
clients, one image or text per request) against a sequential transformers loop (Blip2VisionModelWithProjection /
Blip2TextModelWithProjection, one input at a time), both measured in this run on the same checkpoint. Every served
embedding is checked against the loop's (<= 1e-5). Writes bench/results/retrieval.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.run import _free_port

TEXTS = [f"a photo of {w} number {i}" for i, w in enumerate(["a dog", "a cat", "the sea", "a red block"] * 16)]


def _checkpoint(cache: Path, size: str = "tiny") -> Path:
    from blip2_serve.exporters.tiny import make_tiny_itm_checkpoint

    path = cache / f"{size}-itm"
    if not (path / "model.safetensors").exists():
        make_tiny_itm_checkpoint(path, size=size)
    return path


def baseline(checkpoint: Path, images: list[bytes], texts: list[str]) -> dict:
    import torch
    from PIL import Image
    from transformers import Blip2Processor, Blip2TextModelWithProjection, Blip2VisionModelWithProjection

    processor = Blip2Processor.from_pretrained(checkpoint)
    vision = Blip2VisionModelWithProjection.from_pretrained(checkpoint).eval()
    text = Blip2TextModelWithProjection.from_pretrained(checkpoint).eval()
    image_out, text_out = [], []
    with torch.inference_mode():
        started = time.perf_counter()
        for data in images:
            pixels = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
            tokens = vision(pixel_values=pixels["pixel_values"]).image_embeds
            image_out.append(torch.nn.functional.normalize(tokens.mean(dim=1), dim=-1)[0].numpy())
        image_s = time.perf_counter() - started
        started = time.perf_counter()
        for sentence in texts:
            encoded = processor.tokenizer([sentence], return_tensors="pt")
            text_out.append(text(**encoded).text_embeds[0, 0].numpy())
        text_s = time.perf_counter() - started
    return {
        "images_per_s": len(images) / image_s,
        "texts_per_s": len(texts) / text_s,
        "image": np.stack(image_out),
        "text": np.stack(text_out),
    }


def served(checkpoint: Path, images: list[bytes], texts: list[str], concurrency: int) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import tritonclient.http as httpclient
    from blip2_serve.exporters.tiny import make_tiny_checkpoint
    from blip2_serve.serve.app import build_app
    from blip2_serve.serve.config import AppConfig
    from ray import serve

    captioner = Path(__file__).parent / ".cache" / "tiny-opt"
    if not (captioner / "model.safetensors").exists():
        make_tiny_checkpoint(captioner, "opt")
    port = _free_port()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    stage = {"num_cpus": 0, "torch_threads": os.cpu_count() or 1, "batch": {"max_batch_size": 16}}
    config = AppConfig.model_validate(
        {
            "model": {"checkpoint": str(captioner), "device": "cpu"},
            "retrieval": {**stage, "model": {"checkpoint": str(checkpoint), "device": "cpu"}},
            "server": {"max_images_per_request": 16},
            "app_name": "retrieval",
        }
    )
    serve.run(build_app(config), name="retrieval", route_prefix="/")

    def one(model: str, name: str, value: bytes) -> np.ndarray:
        # closed here, on the thread that made it (tests/helpers.keep_gevent_clients_on_the_main_thread says why)
        with httpclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
            tensor = httpclient.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
            return client.infer(model, [tensor]).as_numpy("EMBEDDING")[0]

    try:
        one("blip2_embed_image", "IMAGE", images[0])  # warm
        with ThreadPoolExecutor(concurrency) as pool:
            started = time.perf_counter()
            image_out = list(pool.map(lambda d: one("blip2_embed_image", "IMAGE", d), images))
            image_s = time.perf_counter() - started
            started = time.perf_counter()
            text_out = list(pool.map(lambda t: one("blip2_embed_text", "TEXT", t.encode()), texts))
            text_s = time.perf_counter() - started
        stats = serve.get_deployment_handle("Retrieval", app_name="retrieval").stats.remote().result()
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "images_per_s": len(images) / image_s,
        "texts_per_s": len(texts) / text_s,
        "image": np.stack(image_out),
        "text": np.stack(text_out),
        "max_batch_size_seen": stats["max_batch_size_seen"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retrieval", description=__doc__)
    parser.add_argument("--size", choices=["tiny", "medium"], default="medium")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", help="default: bench/results/retrieval-<size>")
    args = parser.parse_args(argv)
    from blip2_serve.exporters.int8_report import sample_images

    checkpoint = _checkpoint(Path(__file__).parent / ".cache", args.size)
    args.out = args.out or str(Path(__file__).parent / "results" / f"retrieval-{args.size}")
    images, texts = sample_images(args.images), TEXTS[: args.images]
    loop = baseline(checkpoint, images, texts)
    server = served(checkpoint, images, texts, args.concurrency)
    image_diff = float(np.abs(server["image"] - loop["image"]).max())
    text_diff = float(np.abs(server["text"] - loop["text"]).max())
    document = {
        "environment": {**_environment_light(checkpoint), "commit": _commit()},
        "settings": {"images": len(images), "texts": len(texts), "concurrency": args.concurrency},
        "baseline_loop": {"images_per_s": round(loop["images_per_s"], 1), "texts_per_s": round(loop["texts_per_s"], 1)},
        "served": {
            "images_per_s": round(server["images_per_s"], 1),
            "texts_per_s": round(server["texts_per_s"], 1),
            "max_batch_size_seen": server["max_batch_size_seen"],
        },
        "ratio_served_over_loop": {
            "images": round(server["images_per_s"] / loop["images_per_s"], 2),
            "texts": round(server["texts_per_s"] / loop["texts_per_s"], 2),
        },
        "max_abs_diff": {"image": image_diff, "text": text_diff},
        "valid": image_diff <= 1e-5 and text_diff <= 1e-5,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    lines = [
        f"# Retrieval embeddings ({args.size} ITM checkpoint, commit {document['environment']['commit'][:10]})",
        "",
        f"{len(images)} images and {len(texts)} texts; served: {args.concurrency} concurrent stock tritonclient HTTP "
        "clients, one input per request; baseline: a sequential transformers loop, one input at a time.",
        "",
        "| | baseline loop /s | served /s | served / loop | max abs diff |",
        "|---|---|---|---|---|",
        f"| images | {document['baseline_loop']['images_per_s']} | {document['served']['images_per_s']} | "
        f"{document['ratio_served_over_loop']['images']} | {image_diff:.1e} |",
        f"| texts | {document['baseline_loop']['texts_per_s']} | {document['served']['texts_per_s']} | "
        f"{document['ratio_served_over_loop']['texts']} | {text_diff:.1e} |",
        "",
        f"Largest batch the retrieval stage ran: {server['max_batch_size_seen']}. Valid: {document['valid']}.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if document["valid"] else 1


def _commit() -> str:
    import subprocess

    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def _environment_light(checkpoint: Path) -> dict:
    import platform

    return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "checkpoint": str(checkpoint)}


if __name__ == "__main__":
    raise SystemExit(main())
