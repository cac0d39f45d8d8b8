"""The bench scenarios. Each returns rows of one shape (see `row`) and the answers it got, so that validity
(greedy answers equal to the baseline's) is judged the same way everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import statistics
import time
from typing import Any

from blip2_serve.clients.contract import STAGE_BATCH_SIZE
from blip2_serve.clients.transports import bytes_inputs


def row(
    scenario: str,
    variant: str,
    latencies: list[float],
    wall: float,
    answers: list[str],
    expected: list[str],
    concurrency: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    """One result row: throughput, latency percentiles, and whether the answers match the baseline's."""
    ordered = sorted(latencies)
    same = sum(a == b for a, b in zip(answers, expected))
    return {
        "scenario": scenario,
        "variant": variant,
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": round(wall, 4),
        "throughput_rps": round(len(latencies) / wall, 3) if wall else None,
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 2) if ordered else None,
        "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2) if ordered else None,
        "answers_equal": f"{same}/{len(expected)}",
        "valid": same == len(expected) == len(answers),
        **extra,
    }


class Baseline:
    """The model card's quick start, one image at a time: Blip2Processor + Blip2ForConditionalGeneration.generate."""

    def __init__(self, checkpoint: str):
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        self.torch = torch
        self.processor = Blip2Processor.from_pretrained(checkpoint)
        self.model = Blip2ForConditionalGeneration.from_pretrained(checkpoint).eval()
        self.decoder_only = bool(self.model.config.use_decoder_only_language_model)

    def answer(self, image: bytes, prompt: str, max_new_tokens: int, min_new_tokens: int = 0) -> str:
        from PIL import Image

        picture = Image.open(io.BytesIO(image)).convert("RGB")
        if prompt or not self.decoder_only:
            inputs = self.processor(images=picture, text=prompt, return_tensors="pt")
        else:
            inputs = self.processor(images=picture, return_tensors="pt")
        with self.torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        if self.decoder_only:
            start = inputs["input_ids"].shape[1] if "input_ids" in inputs else self.model.config.num_query_tokens + 1
            output = output[:, start:]
        return self.processor.batch_decode(output, skip_special_tokens=True)[0].strip()

    def run(self, jobs: list[tuple[bytes, str]], max_new_tokens: int, min_new_tokens: int = 0):
        latencies, answers = [], []
        started = time.perf_counter()
        for image, prompt in jobs:
            begin = time.perf_counter()
            answers.append(self.answer(image, prompt, max_new_tokens, min_new_tokens))
            latencies.append(time.perf_counter() - begin)
        return latencies, time.perf_counter() - started, answers


def _loop_worker(checkpoint: str, connection) -> None:
    """Answer as the model card's loop does, in a process of its own: (image, prompt, max_new_tokens) in, (text,
    seconds the call took) out, until None."""
    baseline = Baseline(checkpoint)
    connection.send("ready")
    while (job := connection.recv()) is not None:
        image, prompt, max_new_tokens = job
        begin = time.perf_counter()
        text = baseline.answer(image, prompt, max_new_tokens)
        connection.send((text, time.perf_counter() - begin))


class LoopProcess:
    """The model card's loop in a process of its own (no Ray, no event loop, no client beside it), for calls taken in
    turn with a server's (alternated_lone): while a server runs, the bench's own process is Ray's driver and the
    clients' event loop, whose threads a loop call made there would share. `answer(image, prompt)` returns the text
    and the seconds the call took in that process."""

    def __init__(self, checkpoint: str, max_new_tokens: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.max_new_tokens = max_new_tokens
        self._connection, theirs = context.Pipe()
        self._process = context.Process(target=_loop_worker, args=(checkpoint, theirs), daemon=True)
        self._process.start()
        if not self._connection.poll(600) or self._connection.recv() != "ready":
            self.close()
            raise RuntimeError("the loop's process did not start")

    def answer(self, image: bytes, prompt: str) -> tuple[str, float]:
        self._connection.send((image, prompt, self.max_new_tokens))
        return self._connection.recv()

    def close(self) -> None:
        if self._process.is_alive():
            self._connection.send(None)
            self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _one_process(
    checkpoint: str,
    jobs: list[tuple[bytes, str]],
    max_new_tokens: int,
    batch: int,
    warm: list[tuple[bytes, str]] | None = None,
):
    """What `one_process` runs, in a process of its own."""
    from concurrent.futures import Future

    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.engine import ContinuousBatcher, Sequence
    from blip2_serve.deployments.generator import LanguageGenerator
    from blip2_serve.deployments.images import check_image
    from blip2_serve.deployments.types import GenerateRequest, GenerationParams
    from blip2_serve.deployments.vision_encoder import VisionEncoder

    model = ModelConfig(checkpoint=checkpoint, device="cpu")
    encoder, generator = VisionEncoder(model), LanguageGenerator(model)
    engine = ContinuousBatcher(generator, max_running=batch)

    def settle(future: Future, outcome) -> None:
        future.set_exception(outcome) if isinstance(outcome, BaseException) else future.set_result(outcome)

    def caption(group: list[tuple[bytes, str]]) -> list[str]:
        embeds = encoder.encode([encoder.preprocess(check_image(image)) for image, _ in group])
        futures, sequences = [], []
        for index, ((_, prompt), row) in enumerate(zip(group, embeds)):
            future: Future = Future()
            request = GenerateRequest(f"one-{index}", None, prompt, GenerationParams(max_new_tokens=max_new_tokens))
            sequences.append(Sequence(generator.prepare(request, row), on_done=lambda o, f=future: settle(f, o)))
            futures.append(future)
        engine.submit_many(sequences)
        return [future.result().text for future in futures]

    caption(jobs[:1])  # warm-up, as every server gets
    if warm:  # an untimed batch of other images first, as the served and the peer's 16-client rows get
        caption(warm[:batch])
    started = time.perf_counter()
    answers = [text for i in range(0, len(jobs), batch) for text in caption(jobs[i : i + batch])]
    wall = time.perf_counter() - started
    return [wall] * len(jobs), wall, answers


def one_process(
    checkpoint: str,
    jobs: list[tuple[bytes, str]],
    max_new_tokens: int,
    batch: int = STAGE_BATCH_SIZE,
    warm: list[tuple[bytes, str]] | None = None,
):
    """The 16-client row's work with no serving at all: this project's own stage code (VisionEncoder, the continuous
    engine) in one process of its own, on both cores, with every image of a group in one vision batch and every
    sequence in one decode batch from the first step. Not a server (no request arrives, joins or leaves): the most
    any server built on these kernels could do here, to read the served row against. Returns (latencies, wall,
    answers) like the other loads; each latency is the whole group's time. `warm`: images captioned first, untimed."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_one_process, checkpoint, jobs, max_new_tokens, batch, warm).result()


def kserve_load(
    url: str,
    jobs: list[tuple[bytes, str]],
    concurrency: int,
    parameters: dict,
    protocol: str = "http",
    per_job: list[dict] | None = None,
    warmup: bytes | None = None,
):
    """`concurrency` stock tritonclient aio clients, each sending one job at a time until all are done;
    `per_job` parameters, where given, replace `parameters` job by job. `warmup`: an image (not among the jobs',
    so that no timed request hits the embedding cache) sent once, untimed, first."""
    if protocol == "http":
        import tritonclient.http.aio as client_module
    else:
        import tritonclient.grpc.aio as client_module

    async def main():
        pending = list(enumerate(jobs))
        answers: list[str | None] = [None] * len(jobs)
        latencies: list[float] = []

        async def worker(client):
            while pending:
                index, (image, prompt) = pending.pop(0)
                begin = time.perf_counter()
                sent = per_job[index] if per_job else parameters
                result = await client.infer("blip2", bytes_inputs(client_module, [image], [prompt]), parameters=sent)
                latencies.append(time.perf_counter() - begin)
                answers[index] = result.as_numpy("TEXT")[0, 0].decode()

        if warmup is not None:
            warm = client_module.InferenceServerClient(url)
            try:
                await warm.infer("blip2", bytes_inputs(client_module, [warmup], [""]), parameters=parameters)
            finally:
                await warm.close()
        # every client made before the clock and before any sends, as bench.peer.peer_load's are
        clients = [client_module.InferenceServerClient(url) for _ in range(concurrency)]
        try:
            started = time.perf_counter()
            await asyncio.gather(*(worker(client) for client in clients))
            return latencies, time.perf_counter() - started, answers
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(main())


def alternated_lone(
    urls: list[str], job_lists: list[list[tuple[bytes, str]]], parameters: dict, loop=None, pause_s: float = 0.2
):
    """Lone requests to several servers (or one server's several ports) taken in turn, request i of each list before
    request i + 1 of any: the machine's drift falls on every url alike. Each url's (latencies, wall, answers).
    `loop`: (answer, jobs), a direct call `answer(image, prompt) -> (text, seconds)` (LoopProcess.answer) taken in
    each round after the urls, nothing in flight meanwhile; its (latencies, wall, answers) come last. Each call
    starts `pause_s` after the one before ended, as a lone user's do: what a call leaves running after it returns (a
    server's bookkeeping after its response, the loop's OpenMP threads spinning down) does not fall into the next
    one's time."""
    import tritonclient.http.aio as client_module

    lists = job_lists + ([loop[1]] if loop is not None else [])

    async def main():
        clients = [client_module.InferenceServerClient(url) for url in urls]
        out = [([], 0.0, []) for _ in lists]
        try:
            for i in range(len(lists[0])):
                for k in range(len(lists)):
                    image, prompt = lists[k][i]
                    await asyncio.sleep(pause_s)
                    begin = time.perf_counter()
                    if k < len(clients):
                        result = await clients[k].infer(
                            "blip2", bytes_inputs(client_module, [image], [prompt]), parameters=parameters
                        )
                        took = time.perf_counter() - begin
                        answer = result.as_numpy("TEXT")[0, 0].decode()
                    else:  # the loop's own time, in its process
                        answer, took = loop[0](image, prompt)
                    latencies, wall, answers = out[k]
                    latencies.append(took)
                    answers.append(answer)
                    out[k] = (latencies, wall + took, answers)
        finally:
            for client in clients:
                await client.close()
        return out

    return asyncio.run(main())


def process_tree(pid: int) -> list:
    """The process `pid` and every process it started, as psutil.Process objects (each tied to its start time, so
    that a pid reused later is not signalled)."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@contextlib.contextmanager
def frozen(processes: list, settle_s: float = 1.0):
    """SIGSTOP `processes` for the block, then SIGCONT them and wait `settle_s`: while one server's round runs, the
    other server on the machine takes no CPU at all (an idle Ray takes about 5% of two cores: its controller, proxy,
    raylet and replicas' timers), and what the stopped one does on waking (timers that came due) falls before its own
    next round, not into the other's."""
    import psutil

    stopped = []
    try:
        for process in processes:
            try:
                process.suspend()
                stopped.append(process)
            except psutil.NoSuchProcess:
                pass
        yield
    finally:
        for process in stopped:
            try:
                process.resume()
            except psutil.NoSuchProcess:
                pass
        time.sleep(settle_s)


def paired_rounds(rounds: list[tuple[str, Any]], sides: dict[str, tuple[Any, list]]) -> dict[str, list]:
    """Rounds of two servers' loads in the given order (an ABBA order, so that a steady drift of the machine's speed
    falls on both alike), each with every process of the other side frozen (`frozen`). `rounds`: (side, jobs);
    `sides`: side -> (load(jobs) -> (latencies, wall, answers), the processes to freeze while the other side runs).
    Returns side -> [(latencies, wall, answers) of each of its rounds, in order]."""
    out: dict[str, list] = {side: [] for side in sides}
    for side, jobs in rounds:
        others = [p for name, (_, processes) in sides.items() if name != side for p in processes]
        with frozen(others):
            out[side].append(sides[side][0](jobs))
    return out


def ask_many_once(url: str, image: bytes, prompts: list[str], parameters: dict):
    """One request: IMAGE once, PROMPT with a row per question."""
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(url) as client:  # closed on this thread (gevent: see tests/helpers.py)
        begin = time.perf_counter()
        result = client.infer("blip2", bytes_inputs(httpclient, [image], prompts), parameters=parameters)
        elapsed = time.perf_counter() - begin
    return [elapsed], elapsed, [t.decode() for t in result.as_numpy("TEXT").reshape(-1)]


def openai_streams(base_url: str, jobs: list[tuple[bytes, str]], max_tokens: int):
    """Streams one at a time through /v1/chat/completions: time to first text and the gaps between chunks."""
    import base64

    import httpx

    ttft, gaps, latencies, answers = [], [], [], []
    started = time.perf_counter()
    for image, question in jobs:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}] + (
            [{"type": "text", "text": question}] if question else []
        )
        body = {
            "model": "blip2",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "stream": True,
        }
        begin, arrivals, pieces = time.perf_counter(), [], []
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        if choice["delta"].get("content"):
                            arrivals.append(time.perf_counter())
                            pieces.append(choice["delta"]["content"])
        latencies.append(time.perf_counter() - begin)
        answers.append("".join(pieces))
        if arrivals:
            ttft.append(arrivals[0] - begin)
            gaps += [b - a for a, b in zip(arrivals, arrivals[1:])]
    extra = {
        "ttft_p50_ms": round(1000 * statistics.median(ttft), 2) if ttft else None,
        "inter_token_p50_ms": round(1000 * statistics.median(gaps), 2) if gaps else None,
    }
    return latencies, time.perf_counter() - started, answers, extra


def vision_backends(checkpoint: str, onnx_dir, images: list[bytes], batch_sizes=(1, 4, 8), repeats: int = 3):
    """Images/s of the vision stage alone: torch, ONNX Runtime fp32 and int8, by batch size."""
    import torch
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.images import check_image
    from blip2_serve.deployments.vision_encoder import ImagePreprocessor, TorchVisionBackend
    from blip2_serve.deployments.vision_onnx import OnnxVisionBackend

    model = ModelConfig(checkpoint=checkpoint, device="cpu", dtype="fp32")
    preprocess = ImagePreprocessor(model)
    pixel_values = torch.stack([preprocess(check_image(data)) for data in images])
    backends = {
        "torch": TorchVisionBackend(model),
        "onnxruntime-fp32": OnnxVisionBackend(str(onnx_dir / "vision.onnx"), ["CPUExecutionProvider"]),
        "onnxruntime-int8": OnnxVisionBackend(str(onnx_dir / "vision_int8.onnx"), ["CPUExecutionProvider"]),
    }
    reference = backends["torch"].encode(pixel_values[:4]).float()
    rows = []
    for name, backend in backends.items():
        diff = float((backend.encode(pixel_values[:4]).float() - reference).abs().max())
        for batch in batch_sizes:
            chunk = pixel_values[:batch]
            backend.encode(chunk)  # warm-up
            times = []
            for _ in range(repeats):
                begin = time.perf_counter()
                backend.encode(chunk)
                times.append(time.perf_counter() - begin)
            best = statistics.median(times)
            rows.append(
                {
                    "scenario": "vision",
                    "variant": name,
                    "batch": batch,
                    "images_per_s": round(batch / best, 2),
                    "max_abs_diff_vs_torch": round(diff, 6),
                    "valid": name.endswith("int8") or diff <= 1e-4,
                }
            )
    return rows


def overhead_profile(http_url: str, app_name: str, image: bytes, repeats: int = 30) -> dict[str, float]:
    """Where served latency goes when the model is idle: p50 ms of each hop, measured with no model work
    (HTTP proxy -> ingress and back; a DeploymentHandle round trip; the vision stage answering from its cache)."""
    import httpx
    from blip2_serve.deployments.images import check_image
    from ray import serve

    def p50(call) -> float:
        call()
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            call()
            times.append(time.perf_counter() - begin)
        return round(1000 * statistics.median(times), 2)

    llm = serve.get_deployment_handle("LLM", app_name)
    vision = serve.get_deployment_handle("Vision", app_name)
    encoded = check_image(image)
    with httpx.Client() as client:
        return {
            "http_proxy_round_trip_ms": p50(lambda: client.get(f"{http_url}/v2/health/live")),
            "handle_round_trip_ms": p50(lambda: llm.ready.remote().result()),
            "vision_cached_embed_ms": p50(lambda: vision.embed.remote(encoded).result()),
        }


def stage_profile(app_name: str) -> dict:
    """What one replica of each model stage has seen so far (batches, decode steps, turns at the cores)."""
    from ray import serve

    return serve.get_deployment_handle("Ingress", app_name).stats.remote().result()


def profile_delta(before: dict, after: dict) -> dict[str, Any]:
    """Where a load's time went, from two `stage_profile`s: the vision stage's executions and mean batch, the LLM
    stage's decode steps and mean running batch, and how long each waited for the other's turn at the cores."""

    def images(stats: dict) -> int:
        return sum(int(size) * count for size, count in stats["histogram"].items())

    def waited(stats: dict) -> float:
        return stats["cores"]["waited_s"] if stats.get("cores") else 0.0

    vision_runs = after["vision"]["batches"] - before["vision"]["batches"]
    vision_images = images(after["vision"]) - images(before["vision"])
    out: dict[str, Any] = {
        "vision_executions": vision_runs,
        "vision_mean_batch": round(vision_images / vision_runs, 2) if vision_runs else None,
        "vision_busy_s": round(after["vision"]["busy_s"] - before["vision"]["busy_s"], 2),
        "vision_waited_s": round(waited(after["vision"]) - waited(before["vision"]), 2),
        "llm_waited_s": round(waited(after["llm"]) - waited(before["llm"]), 2),
    }
    engine_before, engine_after = before["llm"].get("engine"), after["llm"].get("engine")
    if engine_after:
        steps = engine_after["steps"] - engine_before["steps"]
        out["llm_busy_s"] = round(engine_after["busy_s"] - engine_before["busy_s"], 2)
        out["llm_steps"] = steps
        out["llm_mean_running"] = (
            round((engine_after["stepped"] - engine_before["stepped"]) / steps, 2) if steps else None
        )
    return out
