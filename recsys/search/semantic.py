"""Semantic side of search: query text to the frozen sentence-transformer's vector, cached.

The model is called once per batch of new queries (:meth:`QueryEncoder.encode_many`, which
``Search.step`` calls with every query of an engine batch before ranking any): on the busy
2-core box one MiniLM call costs ~20 ms for one short query and ~60 ms for ten
(``benchmarks/search_speed.py``). A vector encoded in a batch equals the one encoded alone to
float32 rounding (padding changes the matrix shapes; max difference ~2e-7, pinned by
``tests/test_search.py``).
"""

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
        if uncached[0]._model is None:
            # one model in memory: the item embedder's (loaded for new catalog items, or here)
            uncached[0]._model = embedder._load()
        return uncached[0].embed(texts)

    return embed


class QueryEncoder:
    """Query text -> frozen sentence-transformer vector, with an LRU cache of ``capacity``.

    ``stats``: ``hits``, ``misses`` (texts encoded), ``calls`` (model calls) and ``encode_s``
    (seconds spent encoding misses).
    """

    def __init__(self, embed: Callable[[list[str]], np.ndarray], capacity: int = 10_000) -> None:
        self._embed = embed
        self.capacity = capacity
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.stats = {"hits": 0, "misses": 0, "calls": 0, "encode_s": 0.0}

    def warm_up(self) -> None:
        """Load the model now (a first query would otherwise pay the import and the load, seconds)."""
        self._embed(["warm up"])

    def encode_many(self, texts: list[str]) -> None:
        """Encode the texts not cached yet in one model call, and cache them (LRU order: ``texts``')."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if not missing:
            return
        start = time.perf_counter()
        vecs = np.asarray(self._embed(missing), dtype=np.float32)
        self.stats["encode_s"] += time.perf_counter() - start
        self.stats["calls"] += 1
        for text, vec in zip(missing, vecs):
            self._put(text, vec.copy())

    def _put(self, text: str, vec: np.ndarray) -> None:
        self.stats["misses"] += 1
        self._cache[text] = vec
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)

    def __call__(self, text: str) -> np.ndarray:
        vec = self._cache.get(text)
        if vec is not None:
            self._cache.move_to_end(text)
            self.stats["hits"] += 1
            return vec
        start = time.perf_counter()
        vec = np.asarray(self._embed([text])[0], dtype=np.float32)
        self.stats["encode_s"] += time.perf_counter() - start
        self.stats["calls"] += 1
        self._put(text, vec)
        return vec
