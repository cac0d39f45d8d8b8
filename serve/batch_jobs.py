"""OpenAI's Batch API on the server: the Batches deployment (one replica) keeps uploaded files and batches in
`server.batch_dir` (serve/batch_store.py) and runs each batch's lines through the served graph at BACKGROUND
priority, so that the vision and LLM stages serve interactive requests first (deployments/batching.py,
deployments/engine.py). The routes are serve/openai_batch.py's; they call this replica through the front door.

A batch moves as OpenAI's do: validating -> in_progress -> finalizing -> completed, or failed (the input cannot be
run: the reason in `errors`), cancelling -> cancelled, expired (past its completion window). Finished lines are kept
in parts every FLUSH_S; a replica that starts (after a crash, a redeploy, a server restart with the same batch_dir)
takes up every batch that was not finished: kept lines are not run again, the rest are. At the end the results are
an output file (lines that got a 200) and an error file (every other line: the request's own 4xx or 5xx, or a line
that is not a request at all), in OpenAI's output format, in input order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from typing import Any

from blip2_serve.clients.contract import EMBED_TEXT_MODEL
from blip2_serve.deployments import jsonbody
from blip2_serve.deployments.errors import InvalidInput, status_of
from blip2_serve.deployments.metrics import INTERNAL_LOGGING
from blip2_serve.deployments.types import BACKGROUND
from blip2_serve.serve import openai_codec as codec
from blip2_serve.serve.batch_store import BatchStore, new_id
from blip2_serve.serve.config import AppConfig
from blip2_serve.serve.frontdoor import FrontDoor
from ray import serve

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
WINDOW_S = {"24h": 24 * 3600}
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
FLUSH_S = 0.5  # finished lines are kept at least this often
RETRIES = 5  # a line that meets a retriable error (overload, a replica lost) is tried this many times


def _new_batch(body: dict[str, Any], now: int) -> dict[str, Any]:
    """The Batch object of a checked create request."""
    return {
        "id": new_id("batch_"),
        "object": "batch",
        "endpoint": body["endpoint"],
        "errors": None,
        "input_file_id": body["input_file_id"],
        "completion_window": body["completion_window"],
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + WINDOW_S[body["completion_window"]],
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": body.get("metadata"),
    }


def check_create(body: Any) -> dict[str, Any]:
    """A `POST /v1/batches` body, checked (InvalidInput says what is wrong)."""
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    unknown = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"}
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
    if not isinstance(body.get("input_file_id"), str):
        raise InvalidInput("'input_file_id' must be the id of a file uploaded with purpose 'batch'")
    if body.get("endpoint") not in ENDPOINTS:
        raise InvalidInput(f"'endpoint' must be one of {', '.join(ENDPOINTS)}")
    if body.get("completion_window") not in WINDOW_S:
        raise InvalidInput("'completion_window' must be '24h'")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(isinstance(k, str) and len(k) <= 64 for k in metadata)
        and all(isinstance(v, str) and len(v) <= 512 for v in metadata.values())
    ):
        raise InvalidInput("'metadata' must map at most 16 strings (keys up to 64 characters) to strings (up to 512)")
    return body


def _line_error(line: int, custom_id: Any, code: str, message: str) -> dict[str, Any]:
    """A kept line for an input line that is not a request this batch can run."""
    output = {
        "id": new_id("batch_req_"),
        "custom_id": custom_id if isinstance(custom_id, str) and custom_id else None,
        "response": None,
        "error": {"code": code, "message": f"line {line + 1}: {message}"},
    }
    return {"line": line, "ok": False, "output": output}


def parse_lines(data: bytes, endpoint: str, max_requests: int) -> tuple[list[tuple[int, str, dict]], list[dict]]:
    """The input file's requests `(line, custom_id, body)` and the kept error lines of those that are not requests.
    Raises InvalidInput for a file that cannot be a batch at all (OpenAI fails such a batch in validation)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the input file is not UTF-8 text: {exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise InvalidInput("the input file has no requests")
    if len(lines) > max_requests:
        raise InvalidInput(f"the input file has {len(lines)} requests; a batch takes at most {max_requests}")
    requests, errors, seen = [], [], {}
    for number, line in lines:
        try:
            item = jsonbody.loads(line, "the line")
        except InvalidInput as exc:
            errors.append(_line_error(number, None, "invalid_json", exc.message))
            continue
        if not isinstance(item, dict):
            errors.append(_line_error(number, None, "invalid_request", "a line must be a JSON object"))
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            problem = "'custom_id' must be a non-empty string"
        elif custom_id in seen:
            raise InvalidInput(f"line {number + 1}: custom_id {custom_id!r} is also on line {seen[custom_id] + 1}")
        elif item.get("method") != "POST":
            problem = "'method' must be POST"
        elif item.get("url") != endpoint:
            problem = f"'url' must be the batch's endpoint, {endpoint}"
        elif not isinstance(item.get("body"), dict):
            problem = "'body' must be a JSON object (the request)"
        else:
            problem = None
        if isinstance(custom_id, str) and custom_id:
            seen[custom_id] = number
        if problem:
            errors.append(_line_error(number, custom_id, "invalid_request", problem))
        else:
            requests.append((number, custom_id, item["body"]))
    return requests, errors


def _output_line(line: int, custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """A kept line for a request that was run: its response in OpenAI's output format."""
    output = {
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": new_id("req_"), "body": body},
        "error": None,
    }
    return {"line": line, "ok": status == 200, "output": output}


class _Job:
    """A running batch: its cancel switch and the lines finished but not yet kept."""

    def __init__(self) -> None:
        self.cancel = asyncio.Event()
        self.unkept: list[dict[str, Any]] = []


@serve.deployment(
    name="Batches",
    num_replicas=1,
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0},
    # Ray's own INFO lines of this replica (its handles' router start) are noise on the console
    logging_config={**INTERNAL_LOGGING, "log_level": "WARNING"},
)
class BatchJobs:
    """Files and batches (OpenAI's objects), and the batches' runner."""

    def __init__(self, config: AppConfig, **door: Any):
        """`door`: the rest of FrontDoor's arguments (the stages' handles, the metrics directory)."""
        server = config.server.model_copy(update={"api_key_env": None})  # the edge checks keys; lines come from it
        self.door = FrontDoor(config=config.model_copy(update={"server": server}), **door)
        self.server = config.server
        self.store = BatchStore(config.batch_location())
        self._lines = asyncio.Semaphore(config.server.batch_concurrency)  # over every batch
        self._live: dict[str, dict[str, Any]] = {}  # the Batch objects of running batches (kept: on each flush)
        self._jobs: dict[str, _Job] = {}
        self._tasks: set[asyncio.Task] = set()
        self._start(self._resume())

    def _start(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume(self) -> None:
        """Take up every unfinished batch in the store (this replica is new: whatever ran them is gone)."""
        for batch in await asyncio.to_thread(self.store.batches):
            if batch["status"] in UNFINISHED and batch["id"] not in self._jobs:
                logger.info("taking up batch %s (%s)", batch["id"], batch["status"])
                self._launch(batch)

    def _launch(self, batch: dict[str, Any]) -> None:
        self._live[batch["id"]] = batch
        self._jobs[batch["id"]] = job = _Job()
        if batch["status"] == "cancelling":  # cancelled before a restart: finish cancelling
            job.cancel.set()
        self._start(self._run(batch))

    # --- files ----------------------------------------------------------------------------------------------------

    async def add_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        if purpose != "batch":
            raise InvalidInput(f"'purpose' must be 'batch' (files here are for the Batch API), not {purpose!r}")
        return await asyncio.to_thread(self.store.add_file, filename, purpose, data)

    async def file(self, file_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.store.file, file_id)

    async def files(self, purpose: str | None = None) -> dict[str, Any]:
        data = await asyncio.to_thread(self.store.files, purpose)
        return {"object": "list", "data": data, "has_more": False}

    async def content(self, file_id: str) -> bytes:
        return await asyncio.to_thread(self.store.content, file_id)

    async def delete_file(self, file_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.store.delete_file, file_id)

    # --- batches --------------------------------------------------------------------------------------------------

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        body = check_create(body)
        file = await self.file(body["input_file_id"])
        if file["purpose"] != "batch":
            raise InvalidInput(f"file {file['id']} was uploaded with purpose {file['purpose']!r}, not 'batch'")
        batch = _new_batch(body, int(time.time()))
        await asyncio.to_thread(self.store.save, batch)
        self._launch(batch)
        return dict(batch)

    async def batch(self, batch_id: str) -> dict[str, Any]:
        if batch_id in self._live:
            return json.loads(json.dumps(self._live[batch_id]))
        return await asyncio.to_thread(self.store.batch, batch_id)

    async def batches(self, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        """A page of batches, newest first (OpenAI's cursor: `after` the last id of the previous page)."""
        if not 1 <= limit <= 100:
            raise InvalidInput("'limit' must be between 1 and 100")
        every = [self._live.get(b["id"], b) for b in await asyncio.to_thread(self.store.batches)]
        start = next((i + 1 for i, b in enumerate(every) if b["id"] == after), 0) if after else 0
        page = every[start : start + limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + limit < len(every),
        }

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = await self.batch(batch_id)
        if batch["status"] in ("cancelling", "cancelled"):
            return batch
        if batch["status"] not in UNFINISHED or batch_id not in self._jobs:
            raise InvalidInput(f"Cannot cancel a batch with status '{batch['status']}'")
        live = self._live[batch_id]
        live.update(status="cancelling", cancelling_at=int(time.time()))
        await asyncio.to_thread(self.store.save, live)
        self._jobs[batch_id].cancel.set()
        return dict(live)

    async def ready(self) -> bool:
        return True

    # --- the runner -----------------------------------------------------------------------------------------------

    async def _run(self, batch: dict[str, Any]) -> None:
        job = self._jobs[batch["id"]]
        try:
            await self._work(batch, job)
        except Exception as exc:  # what the batch's input or this server could not do: the batch fails, saying why
            status, _, message = status_of(exc)
            if status >= 500:
                logger.exception("batch %s failed", batch["id"])
            code = "invalid_file" if status < 500 else "server_error"
            batch.update(status="failed", failed_at=int(time.time()))
            error = {"code": code, "message": message, "param": None, "line": None}
            batch["errors"] = {"object": "list", "data": [error]}
            await asyncio.to_thread(self.store.save, batch)
        finally:
            self._live.pop(batch["id"], None)
            self._jobs.pop(batch["id"], None)

    async def _work(self, batch: dict[str, Any], job: _Job) -> None:
        data = await asyncio.to_thread(self.store.content, batch["input_file_id"])
        requests, not_requests = parse_lines(data, batch["endpoint"], self.server.batch_max_requests)
        kept = await asyncio.to_thread(self.store.finished, batch["id"])
        done = {line["line"] for line in kept}
        job.unkept = [line for line in not_requests if line["line"] not in done]
        counts = batch["request_counts"]
        counts["total"] = len(requests) + len(not_requests)
        counts["completed"] = sum(1 for line in kept if line["ok"])
        counts["failed"] = len(kept) - counts["completed"] + len(job.unkept)
        if batch["status"] == "validating":
            batch.update(status="in_progress", in_progress_at=int(time.time()))
        await self._keep(batch, job)

        todo = [r for r in requests if r[0] not in done] if not job.cancel.is_set() else []
        lines = [asyncio.ensure_future(self._line(batch, job, *request)) for request in todo]
        flusher = asyncio.ensure_future(self._flush_every(batch, job))
        stopped = asyncio.ensure_future(job.cancel.wait())
        expiry = max(0.0, batch["expires_at"] - time.time())
        every_line = asyncio.gather(*lines)
        try:
            if lines:
                await asyncio.wait([every_line, stopped], timeout=expiry, return_when="FIRST_COMPLETED")
        finally:
            for task in [*lines, every_line, flusher, stopped]:
                task.cancel()
            await asyncio.gather(*lines, every_line, flusher, stopped, return_exceptions=True)
        await self._keep(batch, job)
        if job.cancel.is_set() or batch["status"] == "cancelling":
            ending = {"status": "cancelled", "cancelled_at": int(time.time())}
        elif time.time() >= batch["expires_at"] and any(not t.done() or t.cancelled() for t in lines):
            ending = {"status": "expired", "expired_at": int(time.time())}
        else:
            ending = {"status": "completed", "completed_at": int(time.time())}
        if ending["status"] == "completed":
            batch.update(status="finalizing", finalizing_at=int(time.time()))
            await asyncio.to_thread(self.store.save, batch)
        await self._finalize(batch)
        batch.update(ending)
        await asyncio.to_thread(self.store.save, batch)
        logger.info("batch %s %s: %s", batch["id"], batch["status"], batch["request_counts"])

    async def _line(self, batch: dict[str, Any], job: _Job, line: int, custom_id: str, body: dict) -> None:
        async with self._lines:
            status, answer = await self._answer(batch["endpoint"], body)
        job.unkept.append(_output_line(line, custom_id, status, answer))
        batch["request_counts"]["completed" if status == 200 else "failed"] += 1

    async def _answer(self, endpoint: str, body: dict) -> tuple[int, dict[str, Any]]:
        """The status and body an interactive request with this body would get (retriable errors are retried)."""
        raw = json.dumps(body).encode()
        for attempt in range(RETRIES):
            try:
                if len(raw) > self.server.max_request_bytes:
                    raise InvalidInput(f"the request body is over the limit of {self.server.max_request_bytes} bytes")
                if endpoint == "/v1/embeddings":
                    return 200, await self._embeddings(raw)
                return 200, await self._chat(raw)
            except Exception as exc:
                status, _, message = status_of(exc)
                if status == 503 and attempt + 1 < RETRIES:
                    await asyncio.sleep(0.5 * 2**attempt)
                    continue
                if status >= 500:
                    logger.warning("a batch line failed: %s", exc)
                return status, codec.openai_error(status, message, getattr(exc, "code", None))
        raise AssertionError("unreachable")

    async def _chat(self, raw: bytes) -> dict[str, Any]:
        server, door = self.server, self.door
        with door.counted():
            chat, generate = await codec.parse_chat(raw, server)
            if chat.stream:
                raise InvalidInput("'stream' is not supported in a batch")
            results = await codec.choices(door, chat, replace(generate, priority=BACKGROUND))
        return codec.completion(server.model_name, results, generate.request_id, bool(chat.logprobs))

    async def _embeddings(self, raw: bytes) -> dict[str, Any]:
        door = self.door
        model, texts, encoding = codec.embeddings_request(
            raw, door.serves_retrieval(EMBED_TEXT_MODEL), self.server.max_images_per_request
        )
        vectors, counts = await asyncio.gather(door.embed_texts(texts), door.token_counts(texts))
        return codec.embeddings(model, vectors, counts, encoding)

    async def _flush_every(self, batch: dict[str, Any], job: _Job) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self._keep(batch, job)

    async def _keep(self, batch: dict[str, Any], job: _Job) -> None:
        """Keep the lines finished since the last call, then the Batch object (its counts include them)."""
        lines, job.unkept = job.unkept, []
        if lines:
            await asyncio.to_thread(self.store.add_part, batch["id"], lines)
        await asyncio.to_thread(self.store.save, batch)

    async def _finalize(self, batch: dict[str, Any]) -> None:
        """The output and error files of what was kept, in input order."""
        kept = sorted(await asyncio.to_thread(self.store.finished, batch["id"]), key=lambda line: line["line"])
        for ok, field, suffix in ((True, "output_file_id", "output"), (False, "error_file_id", "error")):
            chosen = [json.dumps(line["output"]) + "\n" for line in kept if line["ok"] is ok]
            if chosen:
                name = f"{batch['id']}_{suffix}.jsonl"
                file = await asyncio.to_thread(self.store.add_file, name, f"batch_{suffix}", "".join(chosen).encode())
                batch[field] = file["id"]
