"""Semantic side of search: query text to the frozen sentence-transformer's vector, cached."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np


def query_embedder(embedder: Any) -> Callable[[list[str]], np.ndarray]:
    """The item embedder's model without its disk cache: queries are arbitrary text, so they
    must not grow the item cache without bound, and an item cache held by another process (a
    replay, the demo) must not make a search wait. The model loads on the first query."""
    from recsys.items.embeddings import Embedder

    if not isinstance(embedder, Embedder):
        return embedder.embed  # any TextEmbedder (tests): its own embed
    uncached: list[Embedder] = []

    def embed(texts: list[str]) -> np.ndarray:
        if not uncached:
            uncached.append(Embedder(embedder.model_name, None, batch_size=embedder.batch_size, device=embedder.device,
                                     num_threads=embedder.num_threads))
        return uncached[0].embed(texts)

    return embed


class QueryEncoder:
    """Query text -> frozen sentence-transformer vector, with an LRU cache of ``capacity``.

    ``stats``: ``hits``, ``misses`` and ``encode_s`` (seconds spent encoding misses).
    """

    def __init__(self, embed: Callable[[list[str]], np.ndarray], capacity: int = 10_000) -> None:
        self._embed = embed
        self.capacity = capacity
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.stats = {"hits": 0, "misses": 0, "encode_s": 0.0}

    def __call__(self, text: str) -> np.ndarray:
        vec = self._cache.get(text)
        if vec is not None:
            self._cache.move_to_end(text)
            self.stats["hits"] += 1
            return vec
        start = time.perf_counter()
        vec = np.asarray(self._embed([text])[0], dtype=np.float32)
        self.stats["encode_s"] += time.perf_counter() - start
        self.stats["misses"] += 1
        self._cache[text] = vec
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return vec
