"""The image-embedding cache of the vision stage: repeated images skip the vision model.

Keyed by a hash of the decoded pixels and the image processor's settings (so the same picture sent as PNG or
BMP, or by another client, is one entry); bounded in bytes, least recently used out first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EmbeddingCache:
    """LRU of `image_embeds [num_query_tokens, llm_hidden]` tensors, at most `max_bytes` of them."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        embeds = self._entries.get(key)
        if embeds is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return embeds

    def put(self, key: str, embeds: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        while self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = embeds
        self.bytes += size

    def __len__(self) -> int:
        return len(self._entries)
