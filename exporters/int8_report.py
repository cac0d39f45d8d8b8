"""The measured effect of the int8 ONNX graph, written beside it: a benchmark run at export, not a test.

On a set of images: the share of greedy answers (captions and a question) identical to the fp32 graph's, and the
vision stage's speed ratio (fp32 time / int8 time, same batch, same provider, medians of repeated runs).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from blip2_serve.deployments.config import ModelConfig
from blip2_serve.deployments.generator import LanguageGenerator
from blip2_serve.deployments.images import check_image
from blip2_serve.deployments.types import GenerateRequest, GenerationParams
from blip2_serve.deployments.vision_encoder import ImagePreprocessor
from blip2_serve.deployments.vision_onnx import OnnxVisionBackend
from blip2_serve.exporters.onnx_export import GRAPH, INT8_GRAPH

REPORT = "int8_report.json"
PROMPTS = ("", "Question: what is in the picture? Answer:")


def sample_images(count: int, size: int = 96) -> list[bytes]:
    """Deterministic, distinct synthetic PNGs (a background and two blocks), for when no image folder is given."""
    import io

    from PIL import Image

    rng = np.random.default_rng(1234)
    images = []
    for _ in range(count):
        pixels = np.empty((size, size, 3), np.uint8)
        pixels[...] = rng.integers(0, 255, 3)
        for _ in range(2):
            top, left = rng.integers(0, size // 2, 2)
            pixels[top : top + size // 3, left : left + size // 3] = rng.integers(0, 255, 3)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def _median_ms(backend: OnnxVisionBackend, pixel_values: torch.Tensor, repeats: int) -> float:
    backend.encode(pixel_values)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        backend.encode(pixel_values)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def write_int8_report(
    checkpoint: str, out: str | Path, images: list[bytes] | None = None, max_new_tokens: int = 20, repeats: int = 20
) -> dict:
    """Measure and write out/int8_report.json; returns the report."""
    out = Path(out)
    model = ModelConfig(checkpoint=checkpoint, device="cpu", dtype="fp32")
    images = images or sample_images(16)
    preprocess = ImagePreprocessor(model)
    pixel_values = torch.stack([preprocess(check_image(data)) for data in images])
    fp32, int8 = (
        OnnxVisionBackend(str(out / GRAPH), ["CPUExecutionProvider"]),
        OnnxVisionBackend(str(out / INT8_GRAPH), ["CPUExecutionProvider"]),
    )
    generator = LanguageGenerator(model)
    params = GenerationParams(max_new_tokens=max_new_tokens)

    def answers(embeds: torch.Tensor) -> list[tuple[int, ...]]:
        prepared = [
            generator.prepare(GenerateRequest(f"{i}/{p}", None, prompt, params), row)
            for i, row in enumerate(embeds)
            for p, prompt in enumerate(PROMPTS)
        ]
        return [result.token_ids for result in generator.run(prepared)]

    reference, quantized = answers(fp32.encode(pixel_values)), answers(int8.encode(pixel_values))
    same = sum(a == b for a, b in zip(reference, quantized))
    batch = pixel_values[: min(8, len(pixel_values))]
    fp32_ms, int8_ms = _median_ms(fp32, batch, repeats), _median_ms(int8, batch, repeats)
    report = {
        "graph": str(out / INT8_GRAPH),
        "answers": len(reference),
        "identical_greedy_answers": same,
        "identical_share": same / len(reference),
        "max_new_tokens": max_new_tokens,
        "vision_batch": len(batch),
        "vision_median_ms": {"fp32": round(fp32_ms, 3), "int8": round(int8_ms, 3)},
        "speed_ratio_fp32_over_int8": round(fp32_ms / int8_ms, 3),
        "provider": "CPUExecutionProvider",
        "note": "measured by `blip2-serve export onnx --int8` on the exporting machine; a benchmark, not a test",
    }
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
