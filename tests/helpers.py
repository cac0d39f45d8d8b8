"""Test images and the reference: transformers' own BLIP-2 generate on the same checkpoint."""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import threading
import weakref
import zlib
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image


def stacks_of(pid: int) -> str:
    """What a hung process is doing: py-spy's dump of its Python threads (empty where py-spy cannot attach)."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(no stack dump: {exc})"
    return dump.stdout + dump.stderr


def kill_tree(process: subprocess.Popen) -> str:
    """SIGKILL a server started in its own session and everything it started: its process group and every
    descendant, found before the kill (its own Ray's gcs_server, raylet and workers, which a later test's `serve run`
    would otherwise join). Never `ray stop --force`: that ends every Ray on the machine, the suite's own. Returns the
    server's stacks, taken before the kill, for the failure message."""
    import psutil

    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    stacks = stacks_of(process.pid) if process.poll() is None else ""
    for victim in (process.pid, *(child.pid for child in descendants)):
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    psutil.wait_procs(descendants, timeout=30)
    return stacks


def image_bytes(index: int, size: tuple[int, int] = (48, 64), fmt: str = "PNG") -> bytes:
    """A distinct synthetic image per index: a background colour and a coloured block in a moving place."""
    rng = np.random.default_rng(index + 1)
    height, width = size
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[...] = rng.integers(0, 255, 3)
    top, left = (index * 5) % max(1, height - 16), (index * 11) % max(1, width - 20)
    pixels[top : top + 16, left : left + 20] = rng.integers(0, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG claiming width x height whose pixel data is a few bytes: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def truncated_png(index: int = 0) -> bytes:
    """A real PNG cut inside its pixel data: the header reads, the pixels do not."""
    pixels = np.random.default_rng(index).integers(0, 255, (96, 96, 3), dtype=np.uint8)  # noise: a long IDAT
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def new_tokens(output_row: list[int], input_length: int, decoder_only: bool, eos_ids: set[int]) -> list[int]:
    """The generated part of one `generate` row: after the prompt (OPT) or decoder start (T5), up to EOS."""
    tokens = output_row[input_length:] if decoder_only else output_row[1:]
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: position + 1]
    return tokens


class Reference:
    """Blip2ForConditionalGeneration.generate exactly as the model card runs it."""

    def __init__(self, checkpoint: Path, dtype=None, quantization=None):
        self.checkpoint = checkpoint
        self.dtype = dtype  # a torch dtype to load in (the model card's `torch_dtype`), else the checkpoint's fp32
        self.quantization = quantization  # a BitsAndBytesConfig, loaded on CPU

    @cached_property
    def processor(self):
        from transformers import Blip2Processor

        return Blip2Processor.from_pretrained(self.checkpoint)

    @cached_property
    def model(self):
        from transformers import Blip2ForConditionalGeneration

        extra = {"dtype": self.dtype} if self.dtype is not None else {}
        if self.quantization is not None:
            extra.update(quantization_config=self.quantization, device_map={"": "cpu"})
        return Blip2ForConditionalGeneration.from_pretrained(self.checkpoint, **extra).eval()

    @property
    def decoder_only(self) -> bool:
        return bool(self.model.config.use_decoder_only_language_model)

    def generate(self, images: list[bytes], prompts: list[str] | None, **kwargs) -> list[list[int]]:
        """New token ids per image; `prompts=None` is captioning (T5 needs text="": see NOTES-models.md)."""
        return [tokens for tokens, _ in self.scored(images, prompts, False, **kwargs)]

    def logprobs(self, images: list[bytes], prompts: list[str] | None, **kwargs) -> list[tuple[list[int], list[float]]]:
        """(new token ids, each one's log-probability) per image: transformers' compute_transition_scores over the
        raw logits of every step (output_logits), normalized."""
        return self.scored(images, prompts, True, **kwargs)

    def scored(self, images, prompts, with_logprobs: bool, **kwargs) -> list[tuple[list[int], list[float] | None]]:
        import torch

        pil = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        self.processor.tokenizer.padding_side = "left" if self.decoder_only else "right"
        if prompts is None and self.decoder_only:
            inputs = self.processor(images=pil, return_tensors="pt")
            input_length = self.model.config.num_query_tokens + 1  # image tokens + BOS, built by generate
        else:
            text = prompts if prompts is not None else [""] * len(pil)
            inputs = self.processor(images=pil, text=text, padding=True, return_tensors="pt")
            input_length = inputs["input_ids"].shape[1]
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)  # as the model card: inputs.to(dtype)
        if with_logprobs:
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        sequences = output.sequences if with_logprobs else output
        eos = self.model.language_model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos)
        rows = [new_tokens(row.tolist(), input_length, self.decoder_only, eos_ids) for row in sequences]
        if not with_logprobs:
            return [(row, None) for row in rows]
        scores = self.model.compute_transition_scores(sequences, output.logits, normalize_logits=True)
        return [(row, scores[index, : len(row)].tolist()) for index, row in enumerate(rows)]

    def text(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


_GEVENT_CLIENTS: weakref.WeakSet = weakref.WeakSet()


def keep_gevent_clients_on_the_main_thread() -> None:
    """tritonclient.http's sync client runs on gevent. Closing one (its `__del__` does) asks gevent for the current
    thread's hub and makes one where there was none. Ray's core worker threads run Python callbacks under a
    temporary thread state (PyGILState_Ensure/Release); when the cyclic GC fires in one of them and finalizes a
    client, a hub is made in that temporary state, and clearing it at PyGILState_Release deallocates gevent's libev
    loop with no thread state: a segmentation fault of the whole process. Seen twice in this suite (CI on 201d0f2,
    in test_cores; a clean clone here, in the Ctrl-C test; the core's stack: Ray's async_callback ->
    PyGILState_Release -> PyThreadState_Clear -> Hub dealloc -> corecext loop dealloc -> _PyErr_Restore(NULL)).

    So every client is remembered when made and closed on the main thread after each test (conftest's autouse
    fixture, close_gevent_clients), and one finalized on any other thread is not closed there (its sockets close
    when they are freed). tests/test_suite_safety.py reproduces the fault with a native thread (red without this)."""
    from tritonclient.http import InferenceServerClient

    if getattr(InferenceServerClient, "_kept_on_the_main_thread", False):
        return
    made, close = InferenceServerClient.__init__, InferenceServerClient.close

    def __init__(self, *args, **kwargs):
        made(self, *args, **kwargs)
        _GEVENT_CLIENTS.add(self)

    def __del__(self):
        if threading.current_thread() is threading.main_thread():
            close(self)

    InferenceServerClient.__init__, InferenceServerClient.__del__ = __init__, __del__
    InferenceServerClient._kept_on_the_main_thread = True


def close_gevent_clients() -> None:
    """Close, on this (the main) thread, every tritonclient.http client made so far."""
    for client in list(_GEVENT_CLIENTS):
        client.close()
