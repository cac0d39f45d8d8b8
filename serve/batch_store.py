"""Where OpenAI's Batch API keeps its state (`server.batch_dir`): uploaded files, batch objects, finished lines.

    files/<file-id>            the file's bytes
    files/<file-id>.json       its OpenAI File object
    batches/<batch-id>.json    the OpenAI Batch object, rewritten as the batch moves on
    batches/<batch-id>/NNNNNN.jsonl   finished lines, in parts written whole: a part on disk is a result kept

A local path, or a URI pyarrow's filesystems open (s3://, gs://, ...) where the Batches replica may restart on
another node. Every write writes a whole object (no appends), which object stores allow; a local write goes to a
temporary name first and is renamed, so that a killed process leaves an object whole or absent.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from blip2_serve.deployments.errors import NotFound


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class _Local:
    def __init__(self, root: str):
        self.root = Path(root).expanduser()

    def read(self, path: str) -> bytes:
        try:
            return (self.root / path).read_bytes()
        except FileNotFoundError:
            raise KeyError(path) from None

    def write(self, path: str, data: bytes) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        temporary.write_bytes(data)
        os.replace(temporary, target)

    def names(self, folder: str) -> list[str]:
        directory = self.root / folder
        return sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) if directory.is_dir() else []

    def delete(self, path: str) -> None:
        (self.root / path).unlink(missing_ok=True)


class _Arrow:
    """A pyarrow filesystem under a URI's path (pyarrow is the `batch` extra's)."""

    def __init__(self, uri: str):
        from pyarrow import fs

        self.fs, self.root = fs.FileSystem.from_uri(uri)
        self._selector = fs.FileSelector
        self._missing = fs.FileType.NotFound

    def read(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(f"{self.root}/{path}") as stream:
                return stream.read()
        except FileNotFoundError:
            raise KeyError(path) from None

    def write(self, path: str, data: bytes) -> None:
        self.fs.create_dir(f"{self.root}/{path}".rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(f"{self.root}/{path}") as stream:
            stream.write(data)

    def names(self, folder: str) -> list[str]:
        if self.fs.get_file_info(f"{self.root}/{folder}").type == self._missing:
            return []
        infos = self.fs.get_file_info(self._selector(f"{self.root}/{folder}"))
        return sorted(i.base_name for i in infos if not i.base_name.startswith("."))

    def delete(self, path: str) -> None:
        try:
            self.fs.delete_file(f"{self.root}/{path}")
        except FileNotFoundError:
            pass


class BatchStore:
    """Files, batches and finished lines under one directory or URI."""

    def __init__(self, location: str):
        self.location = location
        self._fs = _Arrow(location) if "://" in location else _Local(location)

    # --- files --------------------------------------------------------------------------------------------------

    def add_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        """Keep `data` as a new file; its OpenAI File object."""
        file = {
            "id": new_id("file-"),
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self._fs.write(f"files/{file['id']}", data)
        self._fs.write(f"files/{file['id']}.json", json.dumps(file).encode())
        return file

    def file(self, file_id: str) -> dict[str, Any]:
        try:
            return json.loads(self._fs.read(f"files/{_safe(file_id)}.json"))
        except KeyError:
            raise NotFound(f"No such File object: {file_id}") from None

    def content(self, file_id: str) -> bytes:
        self.file(file_id)
        return self._fs.read(f"files/{_safe(file_id)}")

    def files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(self._fs.read(f"files/{n}")) for n in self._fs.names("files") if n.endswith(".json")]
        found = [f for f in found if purpose is None or f["purpose"] == purpose]
        return sorted(found, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def delete_file(self, file_id: str) -> dict[str, Any]:
        self.file(file_id)
        self._fs.delete(f"files/{_safe(file_id)}")
        self._fs.delete(f"files/{_safe(file_id)}.json")
        return {"id": file_id, "object": "file", "deleted": True}

    # --- batches ------------------------------------------------------------------------------------------------

    def save(self, batch: dict[str, Any]) -> None:
        self._fs.write(f"batches/{batch['id']}.json", json.dumps(batch).encode())

    def batch(self, batch_id: str) -> dict[str, Any]:
        try:
            return json.loads(self._fs.read(f"batches/{_safe(batch_id)}.json"))
        except KeyError:
            raise NotFound(f"No such Batch object: {batch_id}") from None

    def batches(self) -> list[dict[str, Any]]:
        found = [json.loads(self._fs.read(f"batches/{n}")) for n in self._fs.names("batches") if n.endswith(".json")]
        return sorted(found, key=lambda b: (b["created_at"], b["id"]), reverse=True)

    def add_part(self, batch_id: str, lines: list[dict[str, Any]]) -> None:
        """Keep finished lines (each with its input `line` number) as the batch's next part."""
        number = len(self._fs.names(f"batches/{batch_id}"))
        body = "".join(json.dumps(line) + "\n" for line in lines)
        self._fs.write(f"batches/{batch_id}/{number:06d}.jsonl", body.encode())

    def finished(self, batch_id: str) -> list[dict[str, Any]]:
        """Every finished line kept for the batch, in the order they were kept."""
        lines = []
        for name in self._fs.names(f"batches/{batch_id}"):
            lines += [json.loads(line) for line in self._fs.read(f"batches/{batch_id}/{name}").splitlines() if line]
        return lines


def _safe(identifier: str) -> str:
    """An id from a URL as a file name: ours are letters, digits, '-' and '_' only."""
    if not identifier or not all(c.isalnum() or c in "-_" for c in identifier):
        raise NotFound(f"No such object: {identifier!r}")
    return identifier
