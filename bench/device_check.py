"""`python -m bench.device_check`: one run on a GPU at the published shapes of blip2-opt-2.7b and blip2-flan-t5-xl.

GPU time is scarce (a lent machine, minutes at a time), so everything a GPU should tell us comes from one script, in
one process, without Ray or a network (the GPU machine has torch and transformers but not Ray): for each language
model it builds a random-weight checkpoint at the full published shapes (exporters/tiny.py, size "full", written in
the run's dtype), then runs the vision stage (deployments/vision_encoder.py) and the LLM engine
(deployments/engine.py) in-process and writes one JSON + Markdown:
- vision images/s by batch, against the compute floor (bench/flops.py's FLOPs at the device's measured matmul rate);
  and with `compile_vision` (torch.compile) at the largest batch: compile seconds, speed-up, difference from eager;
- the decode step with the running KV cache as DynamicCache and compiled (`compile_decode`) at the largest batch;
- decode step ms by running batch, against the memory floor (the language model's weight bytes at the device's
  measured copy bandwidth), and prefill ms;
- parity: the engine's greedy answers against transformers' `generate` in the same dtype on the same device, over 8
  images (an agreement rate: fp16 kernels need not be bitwise equal across batch shapes);
- int8 / int4 (bitsandbytes, where installed): memory, and parity with transformers under the same BitsAndBytesConfig;
- peak device memory.

    python -m bench.device_check                 # on a GPU: full shapes, fp16 (must end within ~8 minutes on an H200)
    python -m bench.device_check --compile       # and the compiled vision stage and decode step (minutes more)
    python -m bench.device_check --dry-run       # the same code at tiny shapes on CPU, fp32 (CI runs it)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from bench import QUESTIONS

logger = logging.getLogger(__name__)

VISION_BATCHES = (1, 8, 32)
DECODE_BATCHES = (1, 8, 32, 64)
PARITY_IMAGES = 8
NEW_TOKENS = 20
E2E_IMAGES = 16  # the bench's 16 concurrent clients (bench/run.py), here as one group in one process
LONE_REPEATS = 5


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_rates(device: str, dtype) -> dict:
    """The device's own ceilings, measured here: copy bandwidth (GB/s, bytes read + written) and matmul TFLOP/s."""
    import torch

    n = (1 << 28) if device.startswith("cuda") else (1 << 22)  # 1 GiB / 16 MiB of fp32
    source = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    target.copy_(source)
    _sync(device)
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        target.copy_(source)
    _sync(device)
    bandwidth = 2 * source.numel() * 4 * repeats / (time.perf_counter() - started) / 1e9
    size = 8192 if device.startswith("cuda") else 256
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    tflops = 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12
    del source, target, a, b
    return {"copy_gb_s": float(f"{bandwidth:.4g}"), "matmul_tflop_s": float(f"{tflops:.4g}")}  # never rounded to 0


def _images(count: int, size: int) -> list:
    """`count` distinct synthetic pictures as the vision stage receives them (EncodedImage)."""
    from blip2_serve.deployments.images import check_image
    from blip2_serve.exporters.int8_report import sample_images

    return [check_image(data) for data in sample_images(count, size=size)]


def _timed(call, device: str) -> tuple[float, Any]:
    """(seconds, result) of one call of `call`, the device synchronised around it."""
    _sync(device)
    started = time.perf_counter()
    result = call()
    _sync(device)
    return time.perf_counter() - started, result


def _best_of_3(call, device: str) -> float:
    """Seconds of the fastest of three calls of `call`, the device synchronised around each."""
    return min(_timed(call, device)[0] for _ in range(3))


def vision_rows(encoder, images: list, device: str, gflop_per_image: float, tflops: float) -> list[dict]:
    """images/s of the vision stage (tower + Q-Former + projection) at each batch size, best of 3."""
    pixels = [encoder.preprocess(image) for image in images]
    rows = []
    for batch in VISION_BATCHES:
        chunk = (pixels * (batch // len(pixels) + 1))[:batch]
        encoder.encode(chunk)  # warm-up (kernel selection, allocator)
        best = _best_of_3(lambda: encoder.encode(chunk), device)
        floor_s = batch * gflop_per_image / (tflops * 1e3)
        rows.append(
            {
                "batch": batch,
                "ms": round(1000 * best, 2),
                "images_per_s": round(batch / best, 1),
                "compute_floor_ms": round(1000 * floor_s, 2),
                "of_floor": float(f"{floor_s / best:.3g}"),  # significant digits: tiny shapes are far off
            }
        )
    return rows


def compiled_vision_row(eager, model, images: list, device: str, batch: int, eager_ms: float) -> dict:
    """The vision stage with `compile_vision` (torch.compile, inductor) at one batch size: the first call's seconds
    (compiling that shape), then ms best of 3 against eager's (the `eager` encoder's), and the largest difference
    from eager's embeddings."""
    from blip2_serve.deployments.vision_encoder import VisionEncoder

    compiled = VisionEncoder(model.model_copy(update={"compile_vision": True}))
    pixels = [eager.preprocess(image) for image in images]
    chunk = (pixels * (batch // len(pixels) + 1))[:batch]
    started = time.perf_counter()
    embeds = compiled.encode(chunk)
    _sync(device)
    compile_s = time.perf_counter() - started
    best = _best_of_3(lambda: compiled.encode(chunk), device)
    reference = eager.encode(chunk)
    difference = max(float((a.float() - b.float()).abs().max()) for a, b in zip(embeds, reference))
    return {
        "batch": batch,
        "compile_s": round(compile_s, 1),
        "ms": round(1000 * best, 2),
        "eager_ms": eager_ms,
        "speedup": round(eager_ms / (1000 * best), 3),
        "max_abs_diff": float(f"{difference:.3g}"),
    }


def _run_engine(engine, generator, embeds: list, max_new_tokens: int, prompts: list[str] | None = None) -> list:
    """Submit one sequence per embedding at once; the results in order."""
    from blip2_serve.deployments.engine import Sequence
    from blip2_serve.deployments.types import GenerateRequest, GenerationParams

    futures, sequences = [], []
    for index, embedding in enumerate(embeds):
        prompt = prompts[index] if prompts else ""
        request = GenerateRequest(f"d{index}", None, prompt, GenerationParams(max_new_tokens=max_new_tokens))
        future: Future = Future()
        futures.append(future)
        sequences.append(Sequence(generator.prepare(request, embedding), on_done=future.set_result))
    engine.submit_many(sequences)
    results = [future.result(timeout=600) for future in futures]
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def decode_rows(
    engine, generator, embedding, device: str, weight_bytes: int, bandwidth_gb_s: float, batches=DECODE_BATCHES
) -> list[dict]:
    """Decode step ms and prefill ms, by running batch: after an untimed run at that batch, a run of one token (the
    prefill) and one of NEW_TOKENS, each timed whole with the device synchronised, the difference over the decode
    steps taken (the engine's own step timer stops before a step's tokens are read, so on a GPU it would time the
    kernel launches only)."""
    steps: list[tuple[int, float]] = []
    engine.on_step = lambda running, seconds: steps.append((running, seconds))
    _run_engine(engine, generator, [embedding] * 2, 4)  # warm-up
    rows = []
    floor_ms = 1000 * weight_bytes / (bandwidth_gb_s / 2 * 1e9)  # a step reads every weight once (copy: read+write)
    for batch in batches:
        # the first run at a batch size pays for its shapes once (kernel selection for each sequence length): untimed
        _run_engine(engine, generator, [embedding] * batch, NEW_TOKENS)
        _sync(device)
        started = time.perf_counter()
        _run_engine(engine, generator, [embedding] * batch, 1)
        _sync(device)
        prefill_ms = 1000 * (time.perf_counter() - started)
        steps.clear()
        started = time.perf_counter()
        _run_engine(engine, generator, [embedding] * batch, NEW_TOKENS)
        _sync(device)
        whole_ms = 1000 * (time.perf_counter() - started)
        full = [seconds for running, seconds in steps if running == batch]
        step_ms = (whole_ms - prefill_ms) / len(full) if full else None
        rows.append(
            {
                "running": batch,
                "prefill_ms": round(prefill_ms, 2),
                "step_ms": round(step_ms, 3) if step_ms is not None else None,
                "memory_floor_ms": round(floor_ms, 3),
                "of_floor": float(f"{floor_ms / step_ms:.3g}") if step_ms else None,
                "tokens_per_s": round(batch / step_ms * 1000, 1) if step_ms else None,
            }
        )
    engine.on_step = None
    return rows


def bitsandbytes_config(quantization: str, dtype):
    """The BitsAndBytesConfig that loads transformers' whole model as the LLM stage quantizes its language model:
    the vision tower, Q-Former, projection and output projection left as they are (tests/test_precision.py)."""
    from transformers import BitsAndBytesConfig

    skip = ["vision_model", "qformer", "language_projection", "lm_head"]
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip
    )


def load_reference(checkpoint: Path, device: str, dtype, quantization: str | None = None):
    """transformers' Blip2Processor and Blip2ForConditionalGeneration in `dtype` on `device` (quantized by
    bitsandbytes where `quantization` says), as the model card loads them."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    processor = Blip2Processor.from_pretrained(checkpoint)
    if quantization is None:
        model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).eval().to(device)
    else:
        model = Blip2ForConditionalGeneration.from_pretrained(
            checkpoint,
            dtype=dtype,
            quantization_config=bitsandbytes_config(quantization, dtype),
            device_map={"": device},
        ).eval()
    return processor, model


def generate_answers(processor, model, images: list, device: str, dtype, prompt: str = "") -> list[str]:
    """transformers' Blip2ForConditionalGeneration.generate over the images as one batch, greedy, NEW_TOKENS, the
    model card's way (a caption: T5 takes text="", OPT no text; else `prompt` for every image)."""
    import torch
    from PIL import Image

    pictures = [Image.open(io.BytesIO(image.data)).convert("RGB") for image in images]
    decoder_only = bool(model.config.use_decoder_only_language_model)
    if decoder_only and not prompt:
        inputs = processor(images=pictures, return_tensors="pt")
    else:
        inputs = processor(images=pictures, text=[prompt] * len(pictures), return_tensors="pt")
    start = 0
    if decoder_only:
        start = inputs["input_ids"].shape[1] if "input_ids" in inputs else model.config.num_query_tokens + 1
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    return [text.strip() for text in processor.batch_decode(output[:, start:], skip_special_tokens=True)]


def reference_answers(checkpoint: Path, images: list, device: str, dtype, quantization: str | None = None) -> list[str]:
    """generate_answers with a model loaded for the purpose (load_reference), let go after."""
    processor, model = load_reference(checkpoint, device, dtype, quantization)
    answers = generate_answers(processor, model, images, device, dtype)
    del model
    return answers


def end_to_end(processor, model, encoder, engine, generator, images: list, device: str, dtype) -> dict:
    """The bench's captioning workloads (bench/run.py) in one process on this device, without Ray or HTTP (Ray is
    not on the GPU machine): 16 captions as the model card's loop (one generate per image), as one batched
    `generate` (what the LitServe peer runs once its 16 requests are in its window) and as this project's stages
    (one vision batch, then the continuous engine with all 16 running); one caption alone (p50 of LONE_REPEATS,
    loop against stages); five questions about one image (five loop calls against one vision pass and five
    sequences in the engine, as ask_many). Each workload's first call (new shapes) is timed apart, before the rows
    (first_call_s). Answers are compared with the loop's (an agreement count: fp16 kernels
    differ by batch shape)."""

    def stages(group: list, prompts: list[str]) -> list[str]:
        pixels = [encoder.preprocess(image) for image in group]
        embeds = encoder.encode(pixels)
        if len(embeds) == 1 and len(prompts) > 1:
            embeds = list(embeds) * len(prompts)
        return [r.text for r in _run_engine(engine, generator, list(embeds), NEW_TOKENS, prompts)]

    def loop(image, prompt: str = "") -> str:
        return generate_answers(processor, model, [image], device, dtype, prompt)[0]

    prompts = [f"Question: {q} Answer:" for q in QUESTIONS]
    workloads = {
        "batched_generate": lambda: generate_answers(processor, model, images, device, dtype),
        "stages": lambda: stages(images, [""] * len(images)),
        "five_questions_loop": lambda: [loop(images[0], prompt) for prompt in prompts],
        "five_questions_stages": lambda: stages(images[:1], prompts),
    }
    # warm-up of every path (cuBLAS handles, allocator, the engine's buffers)
    loop(images[0])
    stages(images[:1], [""])
    # the first call of each workload pays for its shapes (a new batch size, a new prompt length): timed apart
    first_s = {name: _timed(call, device)[0] for name, call in workloads.items()}
    loop_times, loop_answers = [], []
    for image in images:
        seconds, answer = _timed(lambda image=image: loop(image), device)
        loop_times.append(seconds)
        loop_answers.append(answer)
    batched_s, batched_answers = _timed(workloads["batched_generate"], device)
    stages_s, stage_answers = _timed(workloads["stages"], device)
    lone_loop, lone_stages = [], []
    for image in images[:LONE_REPEATS]:  # in turn, so that a drift falls on both
        lone_loop.append(_timed(lambda image=image: loop(image), device)[0])
        lone_stages.append(_timed(lambda image=image: stages([image], [""]), device)[0])
    five_loop_s, five_loop = _timed(workloads["five_questions_loop"], device)
    five_stages_s, five_stages = _timed(workloads["five_questions_stages"], device)
    loop_s = sum(loop_times)
    p50 = statistics.median
    return {
        "images": len(images),
        "loop_s": round(loop_s, 3),
        "batched_generate_s": round(batched_s, 3),
        "stages_s": round(stages_s, 3),
        "stages_vs_batched_generate": round(batched_s / stages_s, 3),  # throughput ratio
        "stages_vs_loop": round(loop_s / stages_s, 3),
        "batched_generate_vs_loop": round(loop_s / batched_s, 3),
        "lone_p50_ms": {"loop": round(1000 * p50(lone_loop), 2), "stages": round(1000 * p50(lone_stages), 2)},
        "lone_stages_over_loop": round(p50(lone_stages) / p50(lone_loop), 3),
        "five_questions": {
            "loop_s": round(five_loop_s, 3),
            "stages_s": round(five_stages_s, 3),
            "speedup": round(five_loop_s / five_stages_s, 2),
            "answers_equal": sum(a == b for a, b in zip(five_stages, five_loop)),
        },
        "first_call_s": {name: round(seconds, 3) for name, seconds in first_s.items()},
        "answers_equal_to_loop": {
            "batched_generate": sum(a == b for a, b in zip(batched_answers, loop_answers)),
            "stages": sum(a == b for a, b in zip(stage_answers, loop_answers)),
        },
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _versions() -> dict:
    import importlib.metadata as metadata

    versions = {}
    for name in ("torch", "transformers", "bitsandbytes", "onnxruntime"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # torch's names, looked up once torch is in


def check(
    llm: str, dry_run: bool, work: Path, rates: dict, compiled_rows: bool = False, dtype_name: str = "fp32"
) -> dict:
    """Everything for one language model: its checkpoint, vision, decode, parity, quantization; where
    `compiled_rows`, the vision stage and the decode step compiled (torch.compile) at the largest batch. In
    `dtype_name` (main's: fp16 or bf16 on a GPU, fp32 for the dry run on CPU)."""
    import torch
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.engine import ContinuousBatcher
    from blip2_serve.deployments.generator import LanguageGenerator
    from blip2_serve.deployments.vision_encoder import VisionEncoder
    from blip2_serve.exporters.tiny import make_tiny_checkpoint

    from bench.flops import caption_flops

    device = "cpu" if dry_run else "cuda"
    dtype = getattr(torch, DTYPES[dtype_name])
    size = "tiny" if dry_run else "full"
    started = time.perf_counter()
    checkpoint = make_tiny_checkpoint(work / f"{size}-{llm}", llm, size=size, dtype=dtype_name, device=device)
    built_s = time.perf_counter() - started
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = ModelConfig(checkpoint=str(checkpoint), device=device, dtype=dtype_name)
    encoder = VisionEncoder(model)
    picture_size = 224 if not dry_run else 32
    images = _images(PARITY_IMAGES, picture_size)
    flops = caption_flops(size, llm, NEW_TOKENS)  # GFLOP per image of each part
    vision = vision_rows(encoder, images, device, flops["vision"] + flops["qformer"], rates["matmul_tflop_s"])
    compiled = None
    if compiled_rows:  # one shape (the largest batch): compiling ViT-g takes minutes of a scarce GPU's time
        eager_ms = vision[-1]["ms"]
        compiled = compiled_vision_row(encoder, model, images, device, VISION_BATCHES[-1], eager_ms)
    embeds = encoder.encode([encoder.preprocess(image) for image in images])
    generator = LanguageGenerator(model)
    engine = ContinuousBatcher(generator, max_running=max(DECODE_BATCHES))
    weight_bytes = _weight_bytes(generator.model.language_model)
    decode = decode_rows(engine, generator, embeds[0], device, weight_bytes, rates["copy_gb_s"])
    # the running KV cache as transformers' DynamicCache (concatenated at every step and join) at the largest batch,
    # against the default preallocated one (deployments/kvcache.py) above
    dynamic = ContinuousBatcher(generator, max_running=max(DECODE_BATCHES))
    dynamic.slab = False
    (kv_dynamic,) = decode_rows(
        dynamic, generator, embeds[0], device, weight_bytes, rates["copy_gb_s"], DECODE_BATCHES[-1:]
    )
    served = [r.text for r in _run_engine(engine, generator, embeds, NEW_TOKENS)]
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    # transformers' whole model beside the stages (a GPU holds both): the end-to-end rows, then the parity answers
    processor, reference = load_reference(checkpoint, device, dtype)
    e2e = end_to_end(processor, reference, encoder, engine, generator, _images(E2E_IMAGES, picture_size), device, dtype)
    logger.info("%s end to end: %s", llm, e2e)
    expected = generate_answers(processor, reference, images, device, dtype)
    del reference, engine, dynamic, generator, encoder  # before another copy of the language model is loaded
    compiled_decode = None
    if compiled_rows:  # the decode step compiled (ModelConfig.compile_decode) at the largest batch
        compiled_generator = LanguageGenerator(model.model_copy(update={"compile_decode": True}))
        compiled_engine = ContinuousBatcher(compiled_generator, max_running=max(DECODE_BATCHES))
        started_compile = time.perf_counter()
        _run_engine(compiled_engine, compiled_generator, [embeds[0]] * 2, 4)  # compiles (dynamic shapes)
        _sync(device)
        compile_s = time.perf_counter() - started_compile
        (compiled_decode,) = decode_rows(
            compiled_engine,
            compiled_generator,
            embeds[0],
            device,
            weight_bytes,
            rates["copy_gb_s"],
            DECODE_BATCHES[-1:],
        )
        compiled_decode["compile_s"] = round(compile_s, 1)
        compiled_answers = [r.text for r in _run_engine(compiled_engine, compiled_generator, embeds, NEW_TOKENS)]
        compiled_decode["answers_equal_to_eager"] = sum(a == b for a, b in zip(compiled_answers, served))
        del compiled_engine, compiled_generator
    parity = {
        "dtype": dtype_name,
        "images": len(images),
        "equal": sum(a == b for a, b in zip(served, expected)),
        "served": served,
        "transformers": expected,
    }
    return {
        "llm": llm,
        "size": size,
        "checkpoint_built_s": round(built_s, 1),
        "vision": vision,
        "vision_compiled": compiled,
        "decode": decode,
        "decode_dynamic_cache": kv_dynamic,
        "decode_compiled": compiled_decode,
        "parity": parity,
        "end_to_end": e2e,
        "quantized": {},  # quantized_rows, after every language model's other rows
        "peak_device_bytes": peak,
        "seconds": round(time.perf_counter() - started, 1),
        "_then": (checkpoint, images, embeds, served),  # for quantized_rows; not written out
    }


def quantized_rows(part: dict, device: str, dtype) -> dict:
    """int8 / int4 (bitsandbytes) for one language model's check (`part`, from check): the LLM stage's answers
    against transformers' loaded with the same BitsAndBytesConfig and against the unquantized answers, and memory.
    Run after every language model's other rows: on a GPU whose time is short, these come last."""
    import torch
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.engine import ContinuousBatcher
    from blip2_serve.deployments.generator import LanguageGenerator

    checkpoint, images, embeds, served = part["_then"]
    dtype_name = part["parity"]["dtype"]
    quantized: dict = {}
    for quantization in ("int8", "int4"):  # on CPU in a dry run too: bitsandbytes' CPU backend runs the same code
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            quantized[quantization] = {"skipped": "bitsandbytes is not installed on this machine"}
            continue
        q_model = ModelConfig(checkpoint=str(checkpoint), device=device, dtype=dtype_name, quantization=quantization)
        q_generator = LanguageGenerator(q_model)
        q_bytes = torch.cuda.memory_allocated() if device.startswith("cuda") else None
        q_engine = ContinuousBatcher(q_generator, max_running=PARITY_IMAGES)
        answers = [r.text for r in _run_engine(q_engine, q_generator, embeds, NEW_TOKENS)]
        q_weight_bytes = _weight_bytes(q_generator.model.language_model)
        del q_engine, q_generator
        q_expected = reference_answers(checkpoint, images, device, dtype, quantization)
        quantized[quantization] = {
            "llm_weight_bytes": q_weight_bytes,
            "allocated_bytes": q_bytes,
            "equal_to_transformers": sum(a == b for a, b in zip(answers, q_expected)),
            "equal_to_unquantized": sum(a == b for a, b in zip(answers, served)),
            "images": len(answers),
        }
    return quantized


def markdown(document: dict) -> str:
    lines = [
        f"# device check ({document['measured_at']}, commit {document['commit'][:10]})",
        "",
        f"Device: {document['device']}; machine: {document['machine']}. Measured ceilings: copy "
        f"{document['rates']['copy_gb_s']} GB/s, matmul {document['rates']['matmul_tflop_s']} TFLOP/s "
        f"({document['dtype']}). Whole run {document['seconds']} s.",
    ]
    for part in document["checks"]:
        lines += [
            "",
            f"## {part['llm']} ({part['size']} shapes; checkpoint built in {part['checkpoint_built_s']} s)",
            "",
            "| vision batch | ms | images/s | compute floor ms | of floor |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['batch']} | {r['ms']} | {r['images_per_s']} | {r['compute_floor_ms']} | {r['of_floor']} |"
            for r in part["vision"]
        ]
        if part.get("vision_compiled"):
            c = part["vision_compiled"]
            lines += [
                "",
                f"Vision with `compile_vision` (torch.compile) at batch {c['batch']}: {c['ms']} ms against eager's "
                f"{c['eager_ms']} ({c['speedup']}x), after {c['compile_s']} s compiling that shape; largest "
                f"difference from eager's embeddings {c['max_abs_diff']}.",
            ]
        lines += [
            "",
            "| running | prefill ms | decode step ms | memory floor ms | of floor | tokens/s |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['running']} | {r['prefill_ms']} | {r['step_ms']} | {r['memory_floor_ms']} | {r['of_floor']} | "
            f"{r['tokens_per_s']} |"
            for r in part["decode"]
        ]
        if part.get("decode_dynamic_cache"):
            d = part["decode_dynamic_cache"]
            lines += [
                "",
                f"KV cache at {d['running']} running: decode step {d['step_ms']} ms with transformers' DynamicCache "
                f"(`kv_cache: dynamic`) against the preallocated default's above.",
            ]
        if part.get("decode_compiled"):
            c = part["decode_compiled"]
            lines += [
                "",
                f"Decode compiled (`compile_decode`, torch.compile, dynamic shapes) at {c['running']} running: step "
                f"{c['step_ms']} ms, after {c['compile_s']} s compiling; {c['answers_equal_to_eager']} of "
                f"{PARITY_IMAGES} answers equal to the eager engine's.",
            ]
        e2e = part.get("end_to_end")
        if e2e:
            lone, five, same = e2e["lone_p50_ms"], e2e["five_questions"], e2e["answers_equal_to_loop"]
            lines += [
                "",
                f"End to end in one process, no Ray and no HTTP ({e2e['images']} captions, {NEW_TOKENS} tokens):",
                "",
                "| workload | model card loop | transformers' batched generate (the peer's work) | this project's "
                "stages | stages / batched generate | stages / loop |",
                "|---|---|---|---|---|---|",
                f"| {e2e['images']} captions, s | {e2e['loop_s']} | {e2e['batched_generate_s']} | {e2e['stages_s']} | "
                f"{e2e['stages_vs_batched_generate']}x | {e2e['stages_vs_loop']}x |",
                f"| one caption alone, p50 ms | {lone['loop']} | | {lone['stages']} | | "
                f"{e2e['lone_stages_over_loop']} of the loop's time |",
                f"| five questions about one image, s | {five['loop_s']} | | {five['stages_s']} | | "
                f"{five['speedup']}x |",
                "",
                f"Answers equal to the loop's: batched generate {same['batched_generate']}/{e2e['images']}, stages "
                f"{same['stages']}/{e2e['images']}, five questions {five['answers_equal']}/{len(QUESTIONS)}.",
            ]
        parity = part["parity"]
        lines += [
            "",
            f"Parity ({parity['dtype']}): {parity['equal']}/{parity['images']} answers equal to transformers' "
            f"`generate` in the same dtype on the same device. Peak device memory: {part['peak_device_bytes']}.",
        ]
        for name, q in part["quantized"].items():
            if "skipped" in q:
                lines.append(f"- {name}: skipped ({q['skipped']})")
            else:
                lines.append(
                    f"- {name}: LLM weights {q['llm_weight_bytes']} bytes; {q['equal_to_transformers']}/{q['images']} "
                    f"answers equal to transformers' with the same BitsAndBytesConfig, {q['equal_to_unquantized']}/"
                    f"{q['images']} to the unquantized ones"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU in fp32 (what CI runs)")
    parser.add_argument("--llm", default="opt,t5", help="comma-separated: opt, t5")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--commit", default=None, help="the commit measured (where the tree travels without .git)")
    parser.add_argument("--work", default=None, help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="on the GPU (the dry run: fp32)")
    parser.add_argument("--no-quantized", action="store_true", help="leave out the int8 / int4 rows (bitsandbytes)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile of the vision stage and of the decode step, with the first LLM (minutes of "
        "compiling: left out by default so that the run fits its 8 minutes)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU, or pass --dry-run")
    device = "cpu" if args.dry_run else "cuda"
    dtype_name = "fp32" if args.dry_run else args.dtype
    dtype = getattr(torch, DTYPES[dtype_name])
    started = time.perf_counter()
    rates = device_rates(device, dtype)
    logger.info("device ceilings: %s", rates)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # fp16 (the default) keeps the committed name; another dtype's run, or one with the compiled rows, is a file of
    # its own beside it
    stem = "device-check-dry-run" if args.dry_run else "device-check"
    if not args.dry_run:
        stem += ("" if dtype_name == "fp16" else f"-{dtype_name}") + ("-compiled" if args.compile else "")
    document = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "commit": args.commit or _commit(),
        "versions": _versions(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "dtype": dtype_name,
        "rates": rates,
        "checks": [],
        "complete": False,
        "seconds": None,
    }

    def write() -> None:
        public = {
            **document,
            "checks": [{k: v for k, v in c.items() if not k.startswith("_")} for c in document["checks"]],
        }
        (out / f"{stem}.json").write_text(json.dumps(public, indent=2))

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for index, llm in enumerate(name for name in args.llm.split(",") if name):
            # compiled rows with the first LLM only: the vision half is the same ViT-g + Q-Former for both
            compiled = index == 0 and (args.compile or args.dry_run)  # the dry run always: CI tests that code
            document["checks"].append(check(llm, args.dry_run, Path(work), rates, compiled, dtype_name))
            document["seconds"] = round(time.perf_counter() - started, 1)
            logger.info("%s done after %.0f s", llm, document["seconds"])
            # written after each step, so that a run cut short by its machine's time keeps what it did
            write()
        for part in document["checks"] if not args.no_quantized else []:
            part["quantized"] = quantized_rows(part, device, dtype)
            document["seconds"] = round(time.perf_counter() - started, 1)
            logger.info("%s quantized rows done after %.0f s", part["llm"], document["seconds"])
            write()
    document["complete"] = True
    write()
    (out / f"{stem}.md").write_text(markdown(document))
    print(markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
