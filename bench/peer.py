"""The bench's peer: the simplest single-process batched BLIP-2 server a user could write, LitServe around
transformers' batched `generate`, so that each bench run can compare our server against it on the same machine.

The server part (`Blip2Peer` and `main`) is kept to what such a user would write: the model card's processor and
model, CPU, fp32, default torch threads, LitServe's dynamic batching (up to 16 requests, 50 ms). Its answers are the
model card's loop's (`bench.scenarios.Baseline`), one generate call per batch instead of one per image.
`start_peer`, `peer_load` and `stop_peer` are for the bench harness.

    python -m bench.peer CHECKPOINT --port 8000
    curl -X POST 127.0.0.1:8000/predict -d '{"image": "<base64 PNG>", "prompt": "", "max_new_tokens": 20}'
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import litserve as ls

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class Blip2Peer(ls.LitAPI):
    """BLIP-2 captioning / VQA with LitServe's dynamic batching: one processor call and one `generate` per batch."""

    def __init__(self, checkpoint: str):
        super().__init__(max_batch_size=16, batch_timeout=0.05)
        self.checkpoint = checkpoint

    def setup(self, device):
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        self.processor = Blip2Processor.from_pretrained(self.checkpoint)
        self.model = Blip2ForConditionalGeneration.from_pretrained(self.checkpoint).eval()
        self.decoder_only = bool(self.model.config.use_decoder_only_language_model)

    def decode_request(self, request):
        from PIL import Image

        image = Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("RGB")
        return image, request.get("prompt", ""), int(request.get("max_new_tokens", 20))

    def predict(self, batch):
        import torch

        # As in the model card: OPT without a prompt gets the images alone. Splitting by that keeps the rows of
        # each generate call alike (the batch is one group unless it mixes empty and non-empty prompts for OPT).
        groups: dict[bool, list[int]] = {}
        for index, (_, prompt, _) in enumerate(batch):
            groups.setdefault(bool(prompt) or not self.decoder_only, []).append(index)
        max_new_tokens = max(tokens for _, _, tokens in batch)
        answers = [""] * len(batch)
        for with_text, rows in groups.items():
            images = [batch[i][0] for i in rows]
            if with_text:
                prompts = [batch[i][1] for i in rows]
                inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
            else:
                inputs = self.processor(images=images, return_tensors="pt")
            with torch.inference_mode():
                output = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
            if self.decoder_only:
                start = inputs["input_ids"].shape[1] if with_text else self.model.config.num_query_tokens + 1
                output = output[:, start:]
            for index, text in zip(rows, self.processor.batch_decode(output, skip_special_tokens=True)):
                answers[index] = text.strip()
        return answers

    def encode_response(self, output):
        return {"text": output}


def main() -> None:
    """`python -m bench.peer CHECKPOINT --port PORT`: serve POST /predict on 127.0.0.1:PORT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a BLIP-2 checkpoint directory or hub id")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = ls.LitServer(Blip2Peer(args.checkpoint), accelerator="cpu", workers_per_device=1, timeout=False)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


def start_peer(checkpoint: str, port: int, timeout_s: float = 300, log_path: str | None = None) -> subprocess.Popen:
    """Start `python -m bench.peer CHECKPOINT --port PORT` (output to `log_path`, or discarded) and wait until its
    GET /health answers 200. Raises RuntimeError if it exits or is not ready within `timeout_s`."""
    import httpx

    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.peer", checkpoint, "--port", str(port)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log_path:
            log.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop_peer(process)
            raise RuntimeError(f"the peer exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                logger.info("peer ready on port %d (pid %d)", port, process.pid)
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_peer(process)
    raise RuntimeError(f"the peer was not ready on port {port} within {timeout_s} s")


def peer_load(
    url: str,
    jobs: list[tuple[bytes, str]],
    concurrency: int,
    max_new_tokens: int,
    warmup: bytes | None = None,
) -> tuple[list[float], float, list[str]]:
    """`concurrency` httpx async clients, each sending one job at a time (POST `url`/predict, `url` like
    http://127.0.0.1:8000) until all are done. Returns the latencies (s), the wall time (s) of the timed part and the
    answers in job order. `warmup`: an image sent once, untimed, first.

    The clients are made before the clock starts: making an httpx client takes about 20 ms of CPU on 2 cores (its
    SSL context), so made inside it, 16 clients added 0.3-0.6 s to the peer's wall time (before 2026-12-04 evening;
    kserve_load's tritonclient clients are made in well under a millisecond for 16)."""
    import httpx

    endpoint = url.rstrip("/") + "/predict"

    def body(image: bytes, prompt: str) -> dict:
        return {"image": base64.b64encode(image).decode(), "prompt": prompt, "max_new_tokens": max_new_tokens}

    async def run():
        pending = list(enumerate(jobs))
        answers: list[str | None] = [None] * len(jobs)
        latencies: list[float] = []

        async def worker(client: httpx.AsyncClient):
            while pending:
                index, (image, prompt) = pending.pop(0)
                begin = time.perf_counter()
                response = await client.post(endpoint, json=body(image, prompt))
                response.raise_for_status()
                latencies.append(time.perf_counter() - begin)
                answers[index] = response.json()["text"]

        clients = [httpx.AsyncClient(timeout=None) for _ in range(concurrency)]
        try:
            if warmup is not None:
                (await clients[0].post(endpoint, json=body(warmup, ""))).raise_for_status()
            started = time.perf_counter()
            await asyncio.gather(*(worker(client) for client in clients))
            return latencies, time.perf_counter() - started, answers
        finally:
            for client in clients:
                await client.aclose()

    return asyncio.run(run())


def stop_peer(process: subprocess.Popen) -> None:
    """Stop a peer from `start_peer`: SIGINT (LitServe's graceful shutdown), wait up to 30 s, then SIGKILL its
    process group, which also ends the worker processes LitServe started."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            logger.warning("peer (pid %d) did not stop within 30 s; killing it", process.pid)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


if __name__ == "__main__":
    main()
