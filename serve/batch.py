"""`blip2-serve batch`: caption, question or embed a whole image collection offline, on Ray Data, with the server's
model code (the same vision stage and language generator, so a batch caption equals a served one).

    listing (driver)  a folder (recursive), a glob, or a manifest (.jsonl / .csv / .parquet with an `image` column,
                      optional `id` and `prompt`); rows whose (id, prompt) OUT already holds are dropped (resume)
    -> decode          Ray tasks: read the bytes through pyarrow's filesystems (local paths, s3://, gs://, ...),
                      check them as the server does (size, pixels, format), preprocess to pixel values
    -> vision          an actor pool: vision tower + Q-Former + projection, batched
    -> LLM             another actor pool: the language model, batched generate (its own replicas and GPUs)
    -> writer (driver) Parquet part files or JSONL lines; each batch is complete on disk before the next is taken

Ray Data executes it streaming: blocks flow through the stages with backpressure, no stage holds the dataset, and the
driver holds only the listing. An image that cannot be read or decoded is a row with `error` set, never a failed job;
a kill loses at most the batches not yet written, and rerunning with the same OUT does only what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import glob as globbing
import json
import logging
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from blip2_serve.clients.cli import IMAGE_SUFFIXES  # what `blip2-serve caption DIR` counts as an image
from blip2_serve.clients.contract import DEFAULT_MAX_NEW_TOKENS, STAGE_BATCH_SIZE
from blip2_serve.deployments import faults
from blip2_serve.deployments.config import ModelConfig
from blip2_serve.deployments.images import ImageLimits

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
BATCH_ROWS = STAGE_BATCH_SIZE  # rows per vision batch and per generate call, as the served stages batch


@dataclass(frozen=True)
class BatchJob:
    """One `blip2-serve batch` run: what to read, which model, what to generate, where to write."""

    task: str  # "caption" (prompts and questions included) or "embed"
    source: str
    checkpoint: str
    out: str
    prompts: tuple[str, ...] = ("",)  # every input is run once per prompt ("" = plain captioning)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    num_beams: int = 1
    device: str = "auto"
    dtype: str = "auto"
    vision_replicas: int = 1
    llm_replicas: int = 1
    num_gpus_per_replica: float = 0.0
    batch_rows: int = BATCH_ROWS
    limits: ImageLimits = field(default_factory=ImageLimits)
    # Restart a model actor that died (a preempted node on a cluster). On one machine a death is a crash or an OOM
    # that a restart repeats, and Ray prints an error line at every restartable actor's start: off for local runs.
    restart_actors: bool = True

    @property
    def format(self) -> str:
        return "jsonl" if self.out.endswith(".jsonl") else "parquet"

    def model_config(self) -> ModelConfig:
        return ModelConfig(checkpoint=self.checkpoint, device=self.device, dtype=self.dtype)

    def parameters(self) -> dict[str, int]:
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams} if self.task == "caption" else {}


# ---- listing ------------------------------------------------------------------------------------------------------


def _filesystem(location: str):
    """(pyarrow filesystem, path in it) of a local path or a URI (s3://, gs://, file://, ...)."""
    from pyarrow import fs

    if "://" in location:
        return fs.FileSystem.from_uri(location)
    return fs.LocalFileSystem(), os.path.abspath(location)


def _read_manifest(location: str) -> list[dict[str, str]]:
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    filesystem, path = _filesystem(location)
    with filesystem.open_input_file(path) as handle:
        if location.endswith(".parquet"):
            table = pyarrow.parquet.read_table(handle)
        elif location.endswith(".csv"):
            table = pyarrow.csv.read_csv(handle)
        else:
            table = pyarrow.json.read_json(handle)
    if "image" not in table.column_names:
        raise ValueError(f"the manifest {location} has no 'image' column (it has {table.column_names})")
    rows = []
    for record in table.to_pylist():
        image = str(record["image"])
        rows.append({"id": str(record.get("id") or image), "image": image, "prompt": record.get("prompt")})
    return rows


def list_inputs(source: str) -> list[dict[str, str]]:
    """The rows a source names: {id, image, prompt (None: the job's prompts)}. A folder is read recursively (image
    suffixes only; id: the path below the folder), a glob gives its matching files (id: the path), a manifest its
    rows (id: its `id` column, else the image)."""
    if source.endswith(MANIFEST_SUFFIXES):
        return _read_manifest(source)
    from pyarrow import fs

    if any(ch in source for ch in "*?["):
        paths = sorted(p for p in globbing.glob(source, recursive=True) if os.path.isfile(p))
        return [{"id": p, "image": p, "prompt": None} for p in paths if Path(p).suffix.lower() in IMAGE_SUFFIXES]
    filesystem, root = _filesystem(source)
    info = filesystem.get_file_info(root)
    if info.type == fs.FileType.NotFound:
        raise ValueError(f"{source}: no such folder, file or manifest")
    if info.type == fs.FileType.File:
        return [{"id": source, "image": source, "prompt": None}]
    prefix = source.split("://")[0] + "://" if "://" in source else ""
    rows = []
    for entry in filesystem.get_file_info(fs.FileSelector(root, recursive=True)):
        if entry.type == fs.FileType.File and Path(entry.path).suffix.lower() in IMAGE_SUFFIXES:
            relative = os.path.relpath(entry.path, root)
            rows.append({"id": relative, "image": prefix + entry.path if prefix else entry.path, "prompt": None})
    return sorted(rows, key=lambda row: row["id"])


def expand_prompts(rows: list[dict[str, str]], prompts: tuple[str, ...]) -> list[dict[str, str]]:
    """One row per input and prompt: a manifest row's own prompt, else each of the job's."""
    out = []
    for row in rows:
        for prompt in (row["prompt"],) if row["prompt"] is not None else prompts:
            out.append({"id": row["id"], "image": row["image"], "prompt": prompt})
    return out


# ---- the stages (run in Ray workers) ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _preprocessor(checkpoint: str, limits: ImageLimits):
    """The checkpoint's image processor behind the server's image checks, once per worker process."""
    from blip2_serve.deployments.loading import _from_pretrained
    from blip2_serve.deployments.vision_encoder import ImagePreprocessor
    from transformers import AutoImageProcessor

    processor = _from_pretrained(AutoImageProcessor, ModelConfig(checkpoint=checkpoint))
    return ImagePreprocessor(None, limits, image_processor=processor)


def _read_image(location: str, limit: int) -> bytes:
    filesystem, path = _filesystem(location)
    size = filesystem.get_file_info(path).size
    if size is None:
        raise FileNotFoundError(f"{location}: no such file")
    if size > limit:
        raise ValueError(f"image file of {size} bytes is over the limit of {limit}")
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _failed(error: Any) -> bool:
    """Whether a row's `error` column says it failed. Between stages "" means no error: a column of None only can
    come back from Arrow as NaN, so the stages never put None in one."""
    return isinstance(error, str) and bool(error)


def decode(batch: dict[str, np.ndarray], checkpoint: str, limits: ImageLimits) -> dict[str, np.ndarray]:
    """Read, check and preprocess each row's image; a row that fails keeps zero pixels and says why in `error`."""
    from blip2_serve.deployments.images import check_image

    preprocess = _preprocessor(checkpoint, limits)
    pixels, errors = [], []
    for location in batch["image"]:
        try:
            pixels.append(preprocess(check_image(_read_image(str(location), limits.max_bytes), limits)).numpy())
            errors.append("")
        except Exception as exc:  # one row's failure is that row's answer
            pixels.append(None)
            errors.append(_describe(exc))
    size = preprocess.image_processor.size  # every row the same shape, failed ones included (blocks concatenate)
    shape = next((p.shape for p in pixels if p is not None), (3, size["height"], size["width"]))
    stacked = np.stack([p if p is not None else np.zeros(shape, np.float32) for p in pixels]).astype(np.float32)
    return {**batch, "pixel_values": stacked, "error": np.array(errors, dtype=object)}


def _describe(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return message.splitlines()[0][:500]


class _Worker:
    """A Ray Data actor of one model stage. `bound` makes the class that carries the job: Ray Data would put
    constructor arguments in the object store, from where a restarted actor may not get them back."""

    job: BatchJob
    num_cpus: float

    @classmethod
    def bound(cls, job: BatchJob, num_cpus: float) -> type:
        return type(cls.__name__, (cls,), {"job": job, "num_cpus": num_cpus})

    def _compute_setup(self, device: str) -> None:
        """As the server's stages: on a CPU node every core of the node, in turns with the other stages there
        (deployments/cores.py), so that the vision and LLM actors do not each compute on one core of two; on a GPU
        the actor's CPUs and no turns."""
        from blip2_serve.deployments.cores import cpu_turns

        on_cpu = str(device).startswith("cpu")
        self.turns = cpu_turns(str(device), on_cpu, None if on_cpu else max(1, int(self.num_cpus)))

    @contextlib.contextmanager
    def computing(self):
        """One model call: this thread's OpenMP thread count set (Ray Data may call from another thread), in turn."""
        from blip2_serve.deployments.cores import threads_here, turn_of

        threads_here()
        with turn_of(self.turns):
            yield


class VisionWorker(_Worker):
    """Vision tower + Q-Former + projection for a batch of preprocessed rows (Ray Data actor)."""

    def __init__(self):
        job = self.job
        from blip2_serve.deployments.loading import load_blip2_config
        from blip2_serve.deployments.vision_encoder import TorchVisionBackend

        self.backend = TorchVisionBackend(job.model_config())
        self._compute_setup(self.backend.device)
        blip2 = load_blip2_config(job.model_config())
        self.shape = (blip2.num_query_tokens, blip2.text_config.hidden_size)  # of every row, failed ones included

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        good = np.array([not _failed(e) for e in batch["error"]], dtype=bool)
        pixels = batch.pop("pixel_values")
        embeds = np.zeros((len(good), *self.shape), np.float32)
        if good.any():
            with self.computing():
                embeds[good] = self.backend.encode(torch.from_numpy(np.ascontiguousarray(pixels[good]))).float().cpu()
        batch["embeds"] = embeds
        return batch


class LanguageWorker(_Worker):
    """The language model for a batch of image embeddings and prompts (Ray Data actor): `LanguageGenerator.run`,
    transformers' generate in batches, one failed row failing only itself."""

    def __init__(self):
        job = self.job
        from blip2_serve.deployments.generator import LanguageGenerator
        from blip2_serve.deployments.types import GenerationParams

        self.generator = LanguageGenerator(job.model_config())
        self._compute_setup(self.generator.device)
        self.params = GenerationParams.from_mapping(job.parameters())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from blip2_serve.deployments.types import GenerateRequest

        errors = ["" if not _failed(e) else str(e) for e in batch["error"]]
        texts = [""] * len(errors)
        prepared, rows = [], []
        for row, error in enumerate(errors):
            if error:
                continue
            request = GenerateRequest(str(batch["id"][row]), None, str(batch["prompt"][row]), self.params)
            try:
                prepared.append(self.generator.prepare(request, torch.from_numpy(batch["embeds"][row].copy())))
                rows.append(row)
            except Exception as exc:
                errors[row] = _describe(exc)
        with self.computing():
            results = self.generator.run(prepared) if prepared else []
        for row, result in zip(rows, results):
            if isinstance(result, BaseException):
                errors[row] = _describe(result)
            else:
                texts[row] = result.text
        del batch["embeds"]
        return {**batch, "text": np.array(texts, dtype=object), "error": np.array(errors, dtype=object)}  # "": none


class EmbedWorker(_Worker):
    """L2-normalised image embeddings (blip2_embed_image's) for a batch of preprocessed rows (Ray Data actor)."""

    def __init__(self):
        job = self.job
        from blip2_serve.deployments.retrieval_model import RetrievalModel

        self.model = RetrievalModel.load(job.model_config())
        self._compute_setup(self.model.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        good = np.array([not _failed(e) for e in batch["error"]], dtype=bool)
        pixels = batch.pop("pixel_values")
        vectors = np.zeros((len(good), self.model.dimension), np.float32)  # failed rows: zeros, written as null
        if good.any():
            with self.computing():
                vectors[good] = self.model.embed_images(torch.from_numpy(np.ascontiguousarray(pixels[good])))
        return {**batch, "embedding": vectors}


# ---- the writer ---------------------------------------------------------------------------------------------------


class Writer:
    """OUT as Parquet part files in a folder (each written whole, then renamed in) or as one JSONL file (each batch's
    lines appended and synced); `done` is the (id, prompt) keys OUT already holds."""

    def __init__(self, out: str, fmt: str, task: str = "caption"):
        self.out, self.format = Path(out), fmt
        self.done: set[tuple[str, str]] = set()
        self._run = uuid.uuid4().hex[:8]
        self._parts = 0
        self._schema = self._schema_of(task)
        if fmt == "parquet":
            self.out.mkdir(parents=True, exist_ok=True)
            self._read_parquet()
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._read_jsonl()

    def _read_parquet(self) -> None:
        import pyarrow.parquet

        for part in sorted(self.out.glob("part-*.parquet")):
            table = pyarrow.parquet.read_table(part, columns=["id", "prompt"])
            self.done.update(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist()))

    def _read_jsonl(self) -> None:
        if not self.out.exists():
            return
        data = self.out.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a kill mid-line leaves a partial last line: dropped
        if len(complete) != len(data):
            with open(self.out, "r+b") as handle:
                handle.truncate(len(complete))
        for line in complete.splitlines():
            if line.strip():
                record = json.loads(line)
                self.done.add((record["id"], record.get("prompt")))

    @staticmethod
    def _schema_of(task: str):
        """One schema for every part, whatever a batch holds (a batch of errors only has no text to type its
        column), so that the folder reads as one table."""
        import pyarrow as pa

        common = [("id", pa.string()), ("image", pa.string()), ("prompt", pa.string())]
        if task == "embed":
            return pa.schema([*common, ("embedding", pa.list_(pa.float32())), ("error", pa.string())])
        parameters = [("max_new_tokens", pa.int64()), ("num_beams", pa.int64())]
        return pa.schema([*common, ("text", pa.string()), ("error", pa.string()), *parameters])

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.format == "jsonl":
            with open(self.out, "a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
                handle.flush()
                os.fsync(handle.fileno())
            return
        import pyarrow
        import pyarrow.parquet

        self._parts += 1
        final = self.out / f"part-{self._run}-{self._parts:05d}.parquet"
        partial = final.with_suffix(".parquet.partial")
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows, schema=self._schema), partial)
        os.replace(partial, final)


# ---- the run ------------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    listed: int = 0
    skipped: int = 0
    written: int = 0
    errors: int = 0
    seconds: float = 0.0
    first_rows: int = 0  # the first batch written, and when (the models' start and the pipeline's fill before it)
    first_s: float = 0.0

    def line(self, out: str) -> str:
        rate = self.written / self.seconds if self.seconds else 0.0
        return (
            f"blip2-serve batch: {self.written} rows written to {out} ({self.written - self.errors} done, "
            f"{self.errors} with an error) in {self.seconds:.1f} s, {rate:.2f} rows/s; "
            f"{self.skipped} of {self.listed} were already there"
        )


def _stage_cpus(job: BatchJob) -> tuple[float, float]:
    """(CPUs of each model actor, CPUs of each decode task). Actors hold their CPUs for the whole job, so on a small
    machine they must leave room for the decode tasks or the pipeline would wait forever for a CPU."""
    import ray

    cores = float(ray.cluster_resources().get("CPU", 1.0))
    actors = job.vision_replicas + (job.llm_replicas if job.task == "caption" else 0)
    decode = min(1.0, max(0.25, cores / 8))
    per_actor = max(0.25, min(float(os.cpu_count() or 1), (cores - decode) / actors))
    return (min(per_actor, cores), decode)


def _rows_of(batch: dict[str, np.ndarray], job: BatchJob) -> Iterator[dict[str, Any]]:
    parameters = job.parameters()
    for index in range(len(batch["id"])):
        error = batch["error"][index]
        failed = _failed(error)
        row: dict[str, Any] = {"id": str(batch["id"][index]), "image": str(batch["image"][index])}
        if job.task == "caption":
            row["prompt"] = str(batch["prompt"][index])
            row["text"] = None if failed else str(batch["text"][index])
        else:
            row["prompt"] = None
            row["embedding"] = None if failed else [float(x) for x in batch["embedding"][index]]
        row["error"] = str(error) if failed else None
        row.update(parameters)
        yield row


def _model_stage(dataset, worker: type, replicas: int, job: BatchJob, actor_cpus: float):
    import ray

    gpus = job.num_gpus_per_replica
    return dataset.map_batches(
        worker.bound(job, actor_cpus),
        batch_size=job.batch_rows,
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=actor_cpus if not gpus else 0,
        num_gpus=gpus,
        # Ray Data's own advice for no restarts; it warns that such extra arguments are deprecated, with no named
        # parameter for it yet (the caller silences that warning)
        **({} if job.restart_actors else {"max_restarts": 0}),
    )


def run_batch(job: BatchJob, progress: bool = True) -> Summary:
    """Run `job` on the Ray this process is connected to (ray.init first); returns what it did."""
    import ray

    started = time.perf_counter()
    writer = Writer(job.out, job.format, job.task)
    listed = list_inputs(job.source)
    rows = expand_prompts(listed, job.prompts) if job.task == "caption" else [{**r, "prompt": None} for r in listed]
    todo = [r for r in rows if (r["id"], r["prompt"]) not in writer.done]
    summary = Summary(listed=len(rows), skipped=len(rows) - len(todo))
    if not todo:
        summary.seconds = time.perf_counter() - started
        return summary

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours below: rows, rows/s, errors
    context.print_on_execution_start = False
    # Ray Data's advice to declare each actor's memory is for clusters it packs; it repeats every 30 s on a laptop
    context.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    _quiet_ray_data()
    actor_cpus, decode_cpus = _stage_cpus(job)
    for row in todo:
        row["prompt"] = "" if row["prompt"] is None else row["prompt"]
    blocks = max(1, min(-(-len(todo) // job.batch_rows), 2000))  # one batch a block: rows reach OUT as they are done
    dataset = ray.data.from_items(todo, override_num_blocks=blocks)
    dataset = dataset.map_batches(
        decode,
        fn_kwargs={"checkpoint": job.checkpoint, "limits": job.limits},
        batch_size=job.batch_rows,
        num_cpus=decode_cpus,
    )
    model_stages: list[tuple[type, int]] = [(EmbedWorker, job.vision_replicas)]
    if job.task == "caption":
        model_stages = [(VisionWorker, job.vision_replicas), (LanguageWorker, job.llm_replicas)]
    for worker, replicas in model_stages:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            dataset = _model_stage(dataset, worker, replicas, job, actor_cpus)

    bar = _progress(len(todo), progress)
    batches = 0
    for batch in dataset.iter_batches(batch_size=job.batch_rows, batch_format="numpy", prefetch_batches=1):
        written = list(_rows_of(batch, job))
        writer.write(written)
        if not summary.written:
            summary.first_rows, summary.first_s = len(written), time.perf_counter() - started
        summary.written += len(written)
        batches += 1
        faults.die_after(batches)  # a test's kill at a known point (deployments/faults.py); unset, nothing
        summary.errors += sum(row["error"] is not None for row in written)
        bar.update(len(written))
        bar.set_postfix(errors=summary.errors)
    bar.close()
    summary.seconds = time.perf_counter() - started
    return summary


class _DropProgressNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def _quiet_ray_data() -> None:
    """Ray Data's own lines at this command's level (WARNING unless DEBUG), without the notice that its bars are
    off (ours is on)."""
    data = logging.getLogger("ray.data")
    data.setLevel(max(logging.getLogger("blip2_serve").getEffectiveLevel(), logging.WARNING))
    if not any(isinstance(f, _DropProgressNotice) for f in data.filters):
        data.addFilter(_DropProgressNotice())
    for handler in data.handlers:
        if not any(isinstance(f, _DropProgressNotice) for f in handler.filters):
            handler.addFilter(_DropProgressNotice())


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", desc="blip2-serve batch", disable=not enabled, file=sys.stderr)
