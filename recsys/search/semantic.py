"""Semantic side of search: query text to the frozen sentence-transformer's vector, cached.

The model is called once per batch of new queries (:meth:`QueryEncoder.encode_many`, which
``Search.step`` calls with every query of an engine batch before ranking any): on the busy
2-core box one MiniLM call costs ~20 ms for one short query and ~60 ms for ten
(``benchmarks/search_speed.py``). A vector encoded in a batch equals the one encoded alone to
float32 rounding (padding changes the matrix shapes; max difference ~2e-7, pinned by
``tests/test_search.py``).
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from recsys.store.kv import KVStore

#: Query vectors in the shard's store (:meth:`QueryEncoder.export_dirty`): ``b"qv:"`` + slot.
QV_PREFIX = b"qv:"
_QV_HEAD = struct.Struct("<QHI")  # the vector's sequence number, the model tag's and the text's lengths in bytes


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

    **Kept across restarts.** Each vector the model makes is also handed to the shard's store
    once (:meth:`export_dirty`, written with the batch that encoded it) in a ring of
    ``capacity`` slots, the ``n``-th vector in slot ``n % capacity``, so the store holds the
    last ``capacity`` vectors made and never more. :meth:`load` puts them back, oldest first:
    a restarted flow answers the queries it has seen without the model (~6-9 CPU-ms a model
    call on the 2-core box: 144 distinct queries cost the first second of a fresh flow ~0.7 s),
    with the very vectors it used before, where a vector encoded again in another batch of
    queries can differ in its last bits (padding changes the shapes). What the store keeps is
    the order vectors were made in, not the in-memory order of use: after a restart the cache
    holds the last ``capacity`` made, the rest is encoded again when asked. Each record names
    the model that made it (``model``: the item embedder's ``model_id``, its weights'
    fingerprint); a restart with another model (``RECSYS_MODEL_NAME``) reads none of them.

    >>> from recsys.store.kv import MemoryKV
    >>> calls = []
    >>> def embed(texts):
    ...     calls.append(list(texts))
    ...     return np.ones((len(texts), 2), dtype=np.float32)
    >>> enc = QueryEncoder(embed, capacity=2)
    >>> enc.encode_many(["tent", "stove", "mug"])
    >>> kv = MemoryKV(); kv.write(enc.export_dirty())
    >>> again = QueryEncoder(embed, capacity=2); again.load(kv)
    >>> again("mug").tolist(), again("stove").tolist(), len(calls)  # the last two made: no model call
    ([1.0, 1.0], [1.0, 1.0], 1)
    """

    def __init__(self, embed: Callable[[list[str]], np.ndarray], capacity: int = 10_000, *, model: str = "") -> None:
        self._embed = embed
        self.capacity = capacity
        self.model = model
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.stats = {"hits": 0, "misses": 0, "calls": 0, "encode_s": 0.0}
        self._made = 0  # vectors made so far, those loaded included: the next one's sequence number
        self._unsaved: dict[int, tuple[int, str, np.ndarray]] = {}  # slot -> (sequence, text, vector)
        self._slot_text: dict[int, str] = {}  # slot -> the text its record holds (stored or unsaved): for erasures

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

    def __contains__(self, text: str) -> bool:
        """Whether ``text``'s vector is cached (looked up without counting a hit)."""
        return text in self._cache

    def put_many(self, texts: list[str], vectors: np.ndarray) -> None:
        """Vectors the query model made elsewhere for ``texts`` (the embedding worker, in one
        call, as :meth:`encode_many` would here), cached as if made here; a text cached
        meanwhile keeps its vector."""
        self.stats["calls"] += 1
        for text, vec in zip(texts, np.asarray(vectors, dtype=np.float32)):
            if text not in self._cache:
                self._put(text, vec.copy())

    def _put(self, text: str, vec: np.ndarray) -> None:
        self.stats["misses"] += 1
        self._cache[text] = vec
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        if self.capacity > 0:
            slot = self._made % self.capacity
            self._unsaved[slot] = (self._made, text, vec)
            self._slot_text[slot] = text
        self._made += 1

    def forget(self, texts: Iterable[str]) -> list[bytes]:
        """An erasure: these query texts leave the cache and the ring, wherever they are; returns
        the ring records to delete (their slots stay empty until the ring comes round to them)."""
        gone = set(texts)
        for text in gone:
            self._cache.pop(text, None)
        deletes = []
        for slot in [s for s, text in self._slot_text.items() if text in gone]:
            del self._slot_text[slot]
            self._unsaved.pop(slot, None)
            deletes.append(QV_PREFIX + slot.to_bytes(4, "big"))
        return deletes

    def export_dirty(self) -> dict[bytes, bytes]:
        """The vectors made since the last export, each in its slot of the ring (see the class):
        ``b"qv:" + slot`` (4 bytes, big-endian) -> sequence number, the lengths of the model tag
        and the text (``<QHI``), the model tag and the text (UTF-8), the vector (float32); clears them."""
        out = {}
        model = self.model.encode()
        for slot, (made, text, vec) in self._unsaved.items():
            raw = text.encode()
            out[QV_PREFIX + slot.to_bytes(4, "big")] = (_QV_HEAD.pack(made, len(model), len(raw)) + model + raw
                                                        + vec.tobytes())  # float32: as encode_many and __call__ keep them
        self._unsaved.clear()
        return out

    def load(self, kv: KVStore) -> None:
        """Put back the vectors stored by :meth:`export_dirty` by this encoder's model, the last
        ``capacity`` made, oldest first (the least recently used); the count goes on after every
        stored one, so the next vector made overwrites the oldest. A record that cannot be read
        names its key."""
        stored, last = [], -1
        self._slot_text.clear()
        model = self.model.encode()
        for key, value in kv.iter_prefix(QV_PREFIX):
            if len(value) < _QV_HEAD.size:
                raise ValueError(f"stored query vector {key!r}: {len(value)} bytes, too short for its header")
            made, n_model, n_text = _QV_HEAD.unpack_from(value)
            start = _QV_HEAD.size + n_model
            end = start + n_text
            if len(value) < end or (len(value) - end) % 4:
                raise ValueError(f"stored query vector {key!r}: {len(value)} bytes, not a header, a model tag "
                                 f"of {n_model} bytes, a text of {n_text} and float32s")
            last = max(last, made)
            slot = int.from_bytes(key[len(QV_PREFIX):], "big")
            if value[_QV_HEAD.size:start] != model:  # made by another model: never read, overwritten in its turn
                self._slot_text[slot] = value[start:end].decode(errors="replace")  # an erasure still finds it
                continue
            try:
                text = value[start:end].decode()
            except UnicodeDecodeError as exc:
                raise ValueError(f"stored query vector {key!r}: its text is not UTF-8 ({exc})") from None
            self._slot_text[slot] = text
            stored.append((made, text, np.frombuffer(value, dtype=np.float32, offset=end).copy()))
        stored.sort(key=lambda record: record[0])
        for _made, text, vec in stored[max(0, len(stored) - self.capacity):] if self.capacity > 0 else ():
            self._cache[text] = vec
            self._cache.move_to_end(text)
        self._made = last + 1

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
