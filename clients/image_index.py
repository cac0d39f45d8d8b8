"""Image search over a folder: the server's image embeddings in a usearch index on disk.

Why usearch: one small wheel per platform (no compiler, no BLAS stack; faiss-cpu is 18 MB, hnswlib ships only
sources), cosine metric built in, one file that saves and restores, adds one batch at a time (so indexing resumes),
and both HNSW (approximate, for millions of images) and exact search (used below up to `EXACT_UP_TO` vectors, where
it costs nothing, so small folders get the true top-k).

On disk: INDEX (the usearch file) and INDEX.json (dimension, and the path of each key, in key order). Keys are
appended as batches are embedded and both files are rewritten after each batch, so an interrupted `index` run
resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXACT_UP_TO = 100_000


@dataclass
class Match:
    path: str
    score: float  # cosine similarity


class ImageIndex:
    def __init__(self, path: str | Path, dimension: int | None = None):
        from usearch.index import Index

        self.path = Path(path)
        self.meta_path = self.path.with_name(self.path.name + ".json")
        if self.path.exists() and self.meta_path.exists():
            meta = json.loads(self.meta_path.read_text())
            self.dimension, self.paths = meta["dimension"], meta["paths"]
            self._index = Index.restore(str(self.path))
            if len(self._index) != len(self.paths):  # cut between the two writes: keep what both have
                self.paths = self.paths[: len(self._index)]
        else:
            if dimension is None:
                raise FileNotFoundError(f"no index at {self.path}")
            self.dimension, self.paths = dimension, []
            self._index = Index(ndim=dimension, metric="cos", dtype="f32")

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, paths: list[str], embeddings: np.ndarray) -> None:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(paths), self.dimension):
            raise ValueError(f"expected {len(paths)} x {self.dimension} embeddings, got {embeddings.shape}")
        keys = np.arange(len(self.paths), len(self.paths) + len(paths), dtype=np.uint64)
        self._index.add(keys, embeddings)
        self.paths.extend(paths)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._index.save(str(self.path))
        self.meta_path.write_text(json.dumps({"dimension": self.dimension, "paths": self.paths}))

    def search(self, query: np.ndarray, k: int = 5) -> list[Match]:
        """The `k` images most similar (cosine) to one query embedding, best first."""
        if not self.paths:
            return []
        found = self._index.search(
            np.asarray(query, dtype=np.float32), min(k, len(self.paths)), exact=len(self) <= EXACT_UP_TO
        )
        return [
            Match(self.paths[int(key)], 1.0 - float(distance)) for key, distance in zip(found.keys, found.distances)
        ]
