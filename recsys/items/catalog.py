"""The catalog, its item vectors, and exact nearest-neighbour search over them (faiss).

- :class:`VectorIndex`: string item ids to L2-normalised vectors; batched inner-product search.
- :class:`Catalog`: the latest :class:`~recsys.events.CatalogItem` per id.
- :class:`ItemSpace`: both together, embedding only new or changed item text through an
  :class:`~recsys.items.embeddings.Embedder` (or anything with ``dim`` and ``embed(texts, progress)``).

>>> import numpy as np
>>> index = VectorIndex(dim=2)
>>> index.upsert(["north", "east", "south"], np.array([[0, 1], [1, 0], [0, -1]], dtype=np.float32))
>>> index.search(np.array([[0.5, 1.0]], dtype=np.float32), k=2)
[[('north', 1.0), ('east', 0.5)]]
>>> index.search(np.array([[0.5, 1.0]], dtype=np.float32), k=2, exclude=[{"north"}])
[[('east', 0.5), ('south', -1.0)]]
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import faiss
import numpy as np

from recsys.events import CatalogItem, DecodeError, decode_catalog_item
from recsys.files import open_input

#: How many versions back :meth:`Catalog.changed_since` and :meth:`VectorIndex.changed_since` can
#: always answer (they keep between this many and twice as many).
JOURNAL_VERSIONS = 4096


class _Journal:
    """The ids each version of a container changed (version ``start + 1`` first), for callers
    that cache what they read and catch up instead of starting over; bounded by
    :data:`JOURNAL_VERSIONS`."""

    def __init__(self, start: int = 0) -> None:
        self._entries: list[Sequence[str]] = []
        self._start = start

    def add(self, item_ids: Sequence[str]) -> None:
        """Record the next version's changed ids."""
        self._entries.append(item_ids)
        if len(self._entries) > 2 * JOURNAL_VERSIONS:
            del self._entries[:JOURNAL_VERSIONS]
            self._start += JOURNAL_VERSIONS

    def since(self, version: int, current: int) -> set[str] | None:
        """The ids changed after ``version`` up to ``current``; None when not remembered."""
        at = version - self._start
        if at < 0 or version > current:
            return None
        return {item_id for ids in self._entries[at:] for item_id in ids}


def _faiss_search(
    index: faiss.Index, q: np.ndarray, k: int, vectors: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search``, single-threaded for batches below faiss's BLAS threshold
    (``distance_compute_blas_threshold``: 20 queries in older faiss, 128,000 in 1.15, so in
    practice always); an inverted file searched cell by cell (:func:`_ivf_search_by_cell`), and,
    given ``vectors`` (every label's vector, by label) and at least
    :data:`IVF_PRODUCT_MIN_QUERIES` queries, with one matrix product per cell
    (:func:`_ivf_search_by_products`). Each gives faiss's own answer bit for bit.

    Below the threshold faiss scans query by query, on one thread here: on the 2-core target a
    second OpenMP thread halves a 1,000-query batch when the other core is idle (107.6 -> 54.0
    ms, 2026-12-05), but makes a query 2-20x slower when the cores are busy (the threads wait on
    each other), as they are in a flow (the head's step, Kafka's network thread), and issue 12
    measures the engine per core. ``omp_set_num_threads`` only affects parallel regions started
    by the calling thread.
    """
    search = index.search
    if isinstance(index, faiss.IndexIVF) and len(q) > 1:
        search = functools.partial(_ivf_search_by_cell, index)
        if vectors is not None and len(q) >= IVF_PRODUCT_MIN_QUERIES and _products_apply(index):
            search = functools.partial(_ivf_search_by_products, index, vectors)
    if len(q) >= faiss.cvar.distance_compute_blas_threshold:
        return search(q, k)
    return _one_thread(search, q, k)


def _one_thread(fn, *args):
    return _with_threads(1, fn, *args)


def _with_threads(n: int, fn, *args):
    """``fn(*args)`` with faiss's OpenMP parallel regions on ``n`` threads (this thread's
    setting, put back after)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        return fn(*args)
    finally:
        faiss.omp_set_num_threads(threads)


#: OpenMP threads the inverted file is trained with, whatever the machine has. faiss's k-means
#: gives other cells with another thread count: on clustered vectors 4 threads gave other
#: centroids than 1, 2, 3 or 8, and the REES46 replay's recommendations differed between 1 and 2
#: (``benchmarks/output_digest.py`` with ``OMP_NUM_THREADS=1``), so a backtest or a shard gave
#: other answers on a machine with another number of cores. A fixed count gives the same cells
#: for the same catalog everywhere; 2 is the count of the 2-core machine every figure in the
#: README was measured on (its default), so they stay reproducible. Changing it changes every
#: result made with an inverted file (catalogs past ``ivf_threshold``).
IVF_TRAIN_THREADS = 2


def _ivf_search_by_cell(index: faiss.IndexIVF, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(q, k)`` with the queries scanned in the order of the cells they probe.

    An inverted-file search is bound by reading the probed cells' vectors (16 cells of ~50
    vectors x 1.5 KB per query at 10k items), not by arithmetic. Queries that probe the same
    cells one after the other find them still in the CPU's caches. Measured on the loaded
    2-core target, 1,000 queries over the benchmark's 10k items on one thread (as the engine
    searches; medians of 8 interleaved rounds): 96 CPU-ms and 670 ms wall this way, 133 CPU-ms
    and 872 ms wall for ``index.search``.

    The answers are bit-identical to ``index.search``: the coarse assignment is computed by the
    same quantizer call on the same slices of the batch that ``IndexIVF::search`` makes (one
    slice per OpenMP thread, each on one thread as inside faiss's parallel loop), and each
    query's scan (its cells in assignment order into its own heap) does not depend on which
    queries are scanned before it or on which thread; only the order of the scans changes
    (``tests/test_speed_equivalence.py``). ``parallel_mode`` 3 is faiss's loop over queries
    with the threads started inside ``search_preassigned`` (mode 0 starts them one level up,
    in ``search``).
    """
    coarse_s, coarse_i = _coarse_assignment(index, q)
    order = np.lexsort(coarse_i[:, ::-1].T)  # by nearest cell, then the next ones
    scores, ints = _search_preassigned(index, np.ascontiguousarray(q[order]), k, coarse_s[order], coarse_i[order])
    out_s, out_i = np.empty_like(scores), np.empty_like(ints)
    out_s[order], out_i[order] = scores, ints
    return out_s, out_i


def _search_preassigned(
    index: faiss.IndexIVF, q: np.ndarray, k: int, coarse_s: np.ndarray, coarse_i: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search_preassigned`` in faiss's loop over queries (``parallel_mode`` 3, the threads
    started inside it; put back after)."""
    mode, index.parallel_mode = index.parallel_mode, 3
    try:
        return index.search_preassigned(q, k, coarse_i, coarse_s)
    finally:
        index.parallel_mode = mode


def _coarse_assignment(index: faiss.IndexIVF, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cells each query probes and their scores, ``(n, nprobe)`` each, as ``IndexIVF::search``
    computes them: one quantizer call per OpenMP thread's slice of the batch, each on one thread."""
    n, nprobe = len(q), min(index.nprobe, index.nlist)
    slices = min(faiss.omp_get_max_threads(), n)
    coarse_s = np.empty((n, nprobe), dtype=np.float32)
    coarse_i = np.empty((n, nprobe), dtype=np.int64)
    for s in range(slices):  # as IndexIVF::search slices the batch
        lo, hi = n * s // slices, n * (s + 1) // slices
        if hi > lo:
            coarse_s[lo:hi], coarse_i[lo:hi] = _one_thread(index.quantizer.search, q[lo:hi], nprobe)
    return coarse_s, coarse_i


#: Batches of at least this many queries take :func:`_ivf_search_by_products` (given the
#: vectors). Measured at 10k items x 384 dims on one thread: 16 queries 1.0 ms by cell against
#: 1.8 ms by products, 64 queries 3.2 against 2.9 ms, 1,000 queries 44-53 against 21-25 ms.
IVF_PRODUCT_MIN_QUERIES = 64

#: How many more than ``k`` candidates each query keeps from the products, so that a
#: near-tie at its k-th place can still be settled by faiss's own scores.
_PRODUCT_SPARE = 8


def _products_apply(index: faiss.IndexIVF) -> bool:
    """Whether :func:`_ivf_search_by_products` can read this index: an ``IndexIVFFlat`` over
    inner products whose lists are faiss's in-memory arrays."""
    return (
        isinstance(index, faiss.IndexIVFFlat)
        and index.metric_type == faiss.METRIC_INNER_PRODUCT
        and isinstance(faiss.downcast_InvertedLists(index.invlists), faiss.ArrayInvertedLists)
    )


def _ivf_search_by_products(
    index: faiss.IndexIVFFlat, vectors: np.ndarray, q: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(q, k)`` for a batch of queries, with one matrix product per probed cell.

    faiss scans query by query: each of the ~900 vectors a query probes at 10k items is read and
    multiplied on its own (~40 µs a query here, 8 GFLOP/s). Grouped by cell, the queries that
    probe a cell are multiplied with its vectors in one BLAS product that reads each vector once
    for all of them; a compiled loop (:func:`recsys.items._kernels.push_products`) keeps each
    query's ``k`` + :data:`_PRODUCT_SPARE` best. 1,000 queries: 21-25 ms against 44-53 ms by cell
    (:data:`IVF_PRODUCT_MIN_QUERIES`).

    The answer is faiss's own, bit for bit (``tests/test_speed_equivalence.py``). A product
    rounds differently from faiss's dot product, by at most ``d * 2**-24 * |q|`` each for unit
    vectors, so the kept candidates are scored again with faiss's routine
    (``fvec_inner_products_by_idx``, whose scores equal its scan's bit for bit: the test checks
    it), ``vectors[label]`` being the vector stored under each label. A query's answer is taken from them when (a) its k-th exact
    score beats every candidate not kept by more than both roundings together, so none of them
    can belong to the top k, and (b) its k-th and (k+1)-th exact scores differ: faiss keeps the
    first of two equal scores it scans at the k-th place, so that tie depends on the order of
    its scan. Equal scores inside the top k come in faiss's heap order, the larger label first.
    Any other query, and one whose cells hold fewer than the candidates kept, is searched by
    faiss (:func:`_ivf_search_by_cell`'s way, with the cells already assigned).
    """
    from recsys.items._kernels import push_products

    n, d = len(q), index.d
    coarse_s, coarse_i = _coarse_assignment(index, q)
    nprobe = coarse_i.shape[1]
    wide = k + _PRODUCT_SPARE
    heap_s = np.full((n, wide), -np.inf, dtype=np.float32)
    heap_i = np.full((n, wide), -1, dtype=np.int64)
    probes = coarse_i.ravel()
    by_cell = np.argsort(probes, kind="stable")
    cells = probes[by_cell]
    starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
    invlists = index.invlists
    for lo, hi in zip(starts.tolist(), np.r_[starts[1:], len(cells)].tolist()):
        cell = int(cells[lo])
        size = invlists.list_size(cell) if cell >= 0 else 0
        if size == 0:
            continue
        # views of faiss's own arrays (ArrayInvertedLists: no copy), read before anything changes them
        cell_vectors = faiss.rev_swig_ptr(invlists.get_codes(cell), size * d * 4).view(np.float32).reshape(size, d)
        labels = faiss.rev_swig_ptr(invlists.get_ids(cell), size)
        owners = by_cell[lo:hi] // nprobe
        push_products(q[owners] @ cell_vectors.T, owners, labels, heap_s, heap_i)
    kept = np.maximum(heap_i, 0)
    exact = np.empty((n, wide), dtype=np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(exact), faiss.swig_ptr(q), faiss.swig_ptr(vectors), faiss.swig_ptr(kept), d, n, wide
    )
    best = np.lexsort((-heap_i, -exact))  # per query: by score, equal scores by label, as faiss's heap orders them
    exact_sorted = np.take_along_axis(exact, best, axis=1)
    labels_sorted = np.take_along_axis(heap_i, best, axis=1)
    # both roundings together, for vectors of norm <= 1 (normalised on the way in), with room to spare
    margin = 2.5 * d * 2.0**-24 * np.linalg.norm(q, axis=1)
    settled = (
        (heap_i[:, 0] >= 0)  # the heap filled: every query has its wide candidates
        & (exact_sorted[:, k - 1] > heap_s[:, 0] + margin)
        & (exact_sorted[:, k - 1] != exact_sorted[:, k])
    )
    out_s, out_i = exact_sorted[:, :k].copy(), labels_sorted[:, :k].copy()
    rest = np.flatnonzero(~settled)
    if len(rest):
        out_s[rest], out_i[rest] = _search_preassigned(index, np.ascontiguousarray(q[rest]), k, coarse_s[rest], coarse_i[rest])
    return out_s, out_i


class TextEmbedder(Protocol):
    """What :class:`ItemSpace` needs from an embedder (:class:`recsys.items.embeddings.Embedder`)."""

    @property
    def dim(self) -> int: ...

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray: ...


class VectorIndex:
    """Exact inner-product search over L2-normalised item vectors, addressed by string ids.

    Vectors are normalised on the way in, so scores are cosine similarities times the query's
    norm. Exact search (``IndexIDMap(IndexFlatIP)``) up to ``ivf_threshold`` items (5k: exact costs
    ~0.1 ms per query per 10k items here); past it the
    index is rebuilt once as an inverted file (``IndexIVFFlat``, ``nlist`` ~ 2*sqrt(n) cells,
    ``nprobe`` of them searched: ``RECSYS_IVF_NPROBE``, 16 by default), which supports removal
    and re-adding like the flat index but scans only a fraction of the catalog: measured here at
    68k items x 384 dims, exact search costs ~5 ms per query. The vectors themselves are kept in
    a numpy array (by internal id), so reading them never depends on the index type.
    """

    def __init__(self, dim: int, *, ivf_threshold: int = 5_000, nprobe: int = 16) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be > 0, got {dim}")
        if nprobe <= 0:
            raise ValueError(f"nprobe must be > 0, got {nprobe}")
        self.dim = dim
        self.ivf_threshold = ivf_threshold
        self.nprobe = nprobe
        self._index: faiss.Index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        self._approximate = False
        self._version = 0
        #: the ids each version changed (:meth:`changed_since`); restarted when the index is
        #: rebuilt as an inverted file
        self._journal = _Journal()
        self._to_int: dict[str, int] = {}
        self._to_str: dict[int, str] = {}
        self._next_id = 0
        self._store = np.zeros((1024, dim), dtype=np.float32)  # row = internal id
        self._names = np.empty(1024, dtype=object)  # internal id -> item id, for vectorised lookups

    @property
    def approximate(self) -> bool:
        """True once the index switched to the inverted file (approximate search)."""
        return self._approximate

    def _switch_to_ivf(self) -> None:
        ints = np.fromiter(self._to_str, dtype=np.int64, count=len(self._to_str))
        vecs = self._store[ints]
        nlist = int(min(4096, max(64, 2 * np.sqrt(len(ints)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # faiss only prints a warning below 39 points a cell (catalogs of 5,000 to ~7,600 items
        # here, ~35 a cell at 5,000): it changes no cell, and on an operator's stderr it is noise
        index.cp.min_points_per_centroid = 1
        sample = vecs[np.linspace(0, len(vecs) - 1, num=min(len(vecs), 64 * nlist)).astype(np.int64)]
        # faiss k-means has a fixed seed and a fixed thread count here: same catalog, same cells
        _with_threads(IVF_TRAIN_THREADS, index.train, sample)
        index.nprobe = self.nprobe
        index.add_with_ids(vecs, ints)
        self._index, self._approximate = index, True
        # every answer may change (approximate now): nothing before this point can be caught up with
        self._journal = _Journal(self._version)

    def __len__(self) -> int:
        return len(self._to_int)

    @property
    def version(self) -> int:
        """Changes whenever an answer of :meth:`search` could: every upsert and removal (for
        callers that cache answers, such as search's per-query retrieval)."""
        return self._version

    def changed_since(self, version: int) -> set[str] | None:
        """The ids upserted or removed after :attr:`version` was ``version``: an answer of
        :meth:`search` read then differs now only through them. None when that is further back
        than the index remembers (the last :data:`JOURNAL_VERSIONS` versions, never across its
        switch to the inverted file)."""
        return self._journal.since(version, self._version)

    def _journal_add(self, item_ids: list[str]) -> None:
        self._version += 1
        self._journal.add(item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._to_int

    def ids(self) -> list[str]:
        return list(self._to_int)

    def _as_matrix(self, x: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{what}: expected shape (n, {self.dim}), got {np.shape(x)}")
        return np.ascontiguousarray(arr)

    def upsert(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add or replace ``item_ids[i]``'s vector with row i of ``vectors`` (n, dim)."""
        vecs = self._as_matrix(vectors, "vectors").copy()
        if len(item_ids) != len(vecs):
            raise ValueError(f"{len(item_ids)} item ids for {len(vecs)} vectors")
        if not np.isfinite(vecs).all():
            raise ValueError("vectors contain NaN or infinity")
        # The last row wins for an id given twice in one call.
        last = {item_id: i for i, item_id in enumerate(item_ids)}
        if len(last) != len(item_ids):
            rows = np.fromiter(last.values(), dtype=np.int64, count=len(last))
            item_ids, vecs = list(last), vecs[rows]
        self.remove([i for i in item_ids if i in self._to_int])
        faiss.normalize_L2(vecs)
        ints = np.arange(self._next_id, self._next_id + len(item_ids), dtype=np.int64)
        self._next_id += len(item_ids)
        if self._next_id > len(self._store):
            grown = np.zeros((max(self._next_id, 2 * len(self._store)), self.dim), dtype=np.float32)
            grown[: len(self._store)] = self._store
            self._store = grown
            names = np.empty(len(grown), dtype=object)
            names[: len(self._names)] = self._names
            self._names = names
        self._store[ints] = vecs
        self._names[ints] = list(item_ids)
        for item_id, n in zip(item_ids, ints.tolist()):
            self._to_int[item_id] = n
            self._to_str[n] = item_id
        if len(ints):
            self._index.add_with_ids(vecs, ints)
            self._journal_add(list(item_ids))
        if not self._approximate and len(self._to_int) >= self.ivf_threshold:
            self._switch_to_ivf()

    def remove(self, item_ids: Iterable[str]) -> int:
        """Drop these ids (unknown ones are ignored); returns how many were removed."""
        gone = [i for i in dict.fromkeys(item_ids) if i in self._to_int]
        if not gone:
            return 0
        ints = [self._to_int.pop(i) for i in gone]
        for n in ints:
            del self._to_str[n]
        # One call: each remove_ids compacts the whole flat array.
        self._index.remove_ids(np.asarray(ints, dtype=np.int64))
        self._journal_add(gone)
        return len(ints)

    def vector(self, item_id: str) -> np.ndarray | None:
        """The stored (normalised) vector, or None for an unknown id."""
        n = self._to_int.get(item_id)
        return None if n is None else self._store[n].copy()

    def vectors_or_zero(self, item_ids: Sequence[str]) -> np.ndarray:
        """Like :meth:`vectors`, with a zero row for ids not (or no longer) in the index."""
        return self.vectors_of_rows_or_zero(self.rows(item_ids))

    def vectors_of_rows_or_zero(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of ``rows`` (:meth:`rows`), a zero row where the row is -1."""
        out = self._store[np.maximum(rows, 0)]
        out[rows < 0] = 0.0
        return out

    def vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        """``(len(item_ids), dim)`` stored vectors; KeyError names the first unknown id."""
        missing = [i for i in item_ids if i not in self._to_int]
        if missing:
            raise KeyError(f"item not in index: {missing[0]!r}")
        if not item_ids:
            return np.empty((0, self.dim), dtype=np.float32)
        ints = np.fromiter((self._to_int[i] for i in item_ids), dtype=np.int64, count=len(item_ids))
        return self._store[ints]

    # Rows: the internal integer id of each indexed item. The ranker works on rows so that a
    # whole batch of users is scored with a few numpy operations instead of dicts of strings.
    # A row is stable while its item stays in the index (re-upserting gives a new row).

    @property
    def row_capacity(self) -> int:
        """An upper bound on every row (for keys like ``user * row_capacity + row``)."""
        return len(self._store)

    def row(self, item_id: str) -> int:
        """The item's row, -1 when it is not (or no longer) in the index."""
        return self._to_int.get(item_id, -1)

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """Rows of ``item_ids`` (int64), -1 for ids not in the index."""
        # map() over dict.get runs in C: ~4x faster than a generator for the ranker's ~100k ids a batch
        return np.fromiter(map(self._to_int.get, item_ids, itertools.repeat(-1)), dtype=np.int64, count=len(item_ids))

    def names(self, rows: np.ndarray) -> np.ndarray:
        """Item ids of (valid) rows, as an object array."""
        return self._names[rows]

    def vectors_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of (valid) rows, shape ``rows.shape + (dim,)``."""
        return self._store[rows]

    def vector_table(self) -> np.ndarray:
        """Every row's stored vector, ``(row_capacity, dim)`` float32, for compiled loops that
        read a few rows each (no gather copy). A read-only view: it is replaced, not resized,
        when the index grows, so hold it no longer than one call."""
        view = self._store.view()
        view.flags.writeable = False
        return view

    def search_rows(
        self, queries: np.ndarray, k: int, exclude_rows: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` per query row as ``(scores, rows)``, both ``(m, k)``, best first; rows are
        -1 (score -inf) where fewer than ``k`` qualify. ``exclude_rows[j]``: rows query j must
        not return, honoured exactly (faiss is asked for ``k`` plus the largest number of
        them). Zero-norm or non-finite queries, and an empty index, give all -1 rows.
        """
        q = self._as_matrix(queries, "queries")
        m = len(q)
        if exclude_rows is not None and len(exclude_rows) != m:
            raise ValueError(f"{len(exclude_rows)} exclusion sets for {m} queries")
        k = max(int(k), 0)
        out_s = np.full((m, k), -np.inf, dtype=np.float32)
        out_r = np.full((m, k), -1, dtype=np.int64)
        valid = np.isfinite(q).all(axis=1) & (np.linalg.norm(q, axis=1) > 0) if m else np.zeros(0, bool)
        if m == 0 or k == 0 or not self._to_int or not valid.any():
            return out_s, out_r
        extra = max((len(ex) for ex in exclude_rows), default=0) if exclude_rows is not None else 0
        fetch = min(k + extra, len(self._to_int))
        rows = np.flatnonzero(valid)
        scores, ints = _faiss_search(self._index, np.ascontiguousarray(q[valid]), fetch, self._store)
        drop = ints < 0
        if extra:
            # one vectorised membership test for every (query, excluded row) pair
            owner = np.repeat(np.arange(len(rows)), [len(exclude_rows[r]) for r in rows.tolist()])
            excluded = np.concatenate([np.asarray(exclude_rows[r], dtype=np.int64) for r in rows.tolist()])
            cap = self.row_capacity + 1
            drop |= np.isin(np.arange(len(rows))[:, None] * cap + ints, owner * cap + excluded)
        # keep the first k survivors of each row, in faiss order (a stable sort moves drops last)
        keep = np.argsort(drop, axis=1, kind="stable")[:, :k]
        take = min(k, fetch)
        kept_r = np.take_along_axis(ints, keep, axis=1)
        kept_s = np.take_along_axis(scores, keep, axis=1)
        kept_drop = np.take_along_axis(drop, keep, axis=1)
        kept_r[kept_drop], kept_s[kept_drop] = -1, -np.inf
        out_r[rows, :take], out_s[rows, :take] = kept_r, kept_s
        return out_s, out_r

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[set[str] | frozenset[str]] | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Top ``k`` ``(item_id, inner product)`` per query row, best first, in one faiss call.

        ``queries`` is ``(m, dim)`` (or one ``(dim,)`` vector); ``exclude[j]`` is a set of ids
        query j must not return (see :meth:`search_rows`). Zero-norm or non-finite queries,
        and an empty index, give ``[]``.
        """
        exclude_rows = None
        if exclude is not None:
            exclude_rows = [r[r >= 0] for r in (self.rows(list(ex)) for ex in exclude)]
        scores, rows = self.search_rows(queries, k, exclude_rows)
        out = []
        for s_row, r_row in zip(scores, rows):
            hit = r_row >= 0
            out.append(list(zip(self._names[r_row[hit]].tolist(), s_row[hit].tolist())))
        return out


class Catalog:
    """The latest version of every item ever upserted, by id.

    >>> cat = Catalog()
    >>> [i.item_id for i in cat.upsert([CatalogItem("a", "Red shoe"), CatalogItem("b", "Cake")])]
    ['a', 'b']
    >>> [i.item_id for i in cat.upsert([CatalogItem("a", "Red shoe", price=9.0), CatalogItem("b", "Tart")])]
    ['b']
    >>> cat.upsert([CatalogItem("a", "Red shoe", available=False)]), cat.is_recommendable("a")
    ([], False)
    """

    def __init__(self) -> None:
        self.items: dict[str, CatalogItem] = {}
        #: ids of the items marked ``repeat_purchase`` (latest version), for set arithmetic
        self.repeatable: set[str] = set()
        #: bumped by every :meth:`upsert` that changes an item (any field, availability included;
        #: an item sent again unchanged does not): callers that cache what they read of the
        #: items (search's per-query candidates) catch up through :meth:`changed_since`
        self.version = 0
        self._journal = _Journal()  # the item each version changed (changed_since)

    def changed_since(self, version: int) -> set[str] | None:
        """The ids of the items changed (any field) after :attr:`version` was ``version``, or
        None when that is further back than the catalog remembers (the last
        :data:`JOURNAL_VERSIONS` changes at least).

        >>> cat = Catalog(); _ = cat.upsert([CatalogItem("a", "Red shoe")]); v = cat.version
        >>> _ = cat.upsert([CatalogItem("a", "Red shoe", price=9.0), CatalogItem("b", "Cake")])
        >>> sorted(cat.changed_since(v)), cat.changed_since(cat.version), cat.changed_since(-1)
        (['a', 'b'], set(), None)
        """
        return self._journal.since(version, self.version)

    def upsert(self, items: Iterable[CatalogItem]) -> list[CatalogItem]:
        """Store the items; returns (latest versions of) those new or with changed ``text``."""
        changed: dict[str, CatalogItem] = {}
        for item in items:
            old = self.items.get(item.item_id)
            if old is None or old != item:
                self.version += 1
                self._journal.add((item.item_id,))
            if old is None or old.text != item.text or item.item_id in changed:
                changed[item.item_id] = item
            self.items[item.item_id] = item
            if item.repeat_purchase:
                self.repeatable.add(item.item_id)
            else:
                self.repeatable.discard(item.item_id)
        return list(changed.values())

    def get(self, item_id: str) -> CatalogItem | None:
        return self.items.get(item_id)

    def is_recommendable(self, item_id: str) -> bool:
        """Known and available."""
        item = self.items.get(item_id)
        return item is not None and item.available

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.items


class ItemSpace:
    """Catalog plus the vector index of its available items.

    Unavailable items stay in the catalog but leave the index, so they are never candidates;
    they return (re-embedded only if their text changed meanwhile, and then from the cache
    when possible) once available again.
    """

    def __init__(self, embedder: TextEmbedder, dim: int | None = None, *, nprobe: int = 16) -> None:
        self.embedder = embedder
        self.dim = int(dim if dim is not None else embedder.dim)
        self.catalog = Catalog()
        self.index = VectorIndex(self.dim, nprobe=nprobe)
        self.category_code: dict[str, int] = {}  # item -> small int per distinct category (ranking signal)
        self._codes: dict[str, int] = {}
        self._category_rows = np.full(0, -1, dtype=np.int64)  # index row -> category code

    def upsert(self, items: Iterable[CatalogItem], progress: bool = False,
               vectors: Mapping[str, np.ndarray] | None = None) -> int:
        """Apply catalog updates; returns how many items got a new vector in the index.

        ``vectors``: text -> vector already embedded (by the embedding worker,
        :mod:`recsys.items.worker`), used when it holds every text to index (else all are
        embedded here)."""
        items = list(items)
        changed = {i.item_id for i in self.catalog.upsert(items)}
        latest = {i.item_id: i for i in items}
        for item_id, item in latest.items():
            if item.category:
                self.category_code[item_id] = self._codes.setdefault(item.category, len(self._codes))
            else:
                self.category_code.pop(item_id, None)
        to_remove = [i for i, item in latest.items() if not item.available]
        to_index = [
            item for i, item in latest.items() if item.available and (i in changed or i not in self.index)
        ]
        self.index.remove(to_remove)
        if to_index:
            if vectors is not None and all(item.text in vectors for item in to_index):
                vecs = np.stack([vectors[item.text] for item in to_index])
            else:
                vecs = self.embedder.embed([item.text for item in to_index], progress=progress)
            self.index.upsert([item.item_id for item in to_index], vecs)
        # keep the row -> category array current for just these items (rows of removed or
        # re-embedded items are never candidates again, so their old entries are harmless)
        rows = self.index.rows(list(latest))
        codes = np.fromiter((self.category_code.get(i, -1) for i in latest), dtype=np.int64, count=len(latest))
        self.category_rows()[rows[rows >= 0]] = codes[rows >= 0]
        return len(to_index)

    def needs_vector(self, item: CatalogItem) -> bool:
        """Whether :meth:`upsert` of ``item`` would embed its text: available, and new to the
        index or with a text other than the catalog's."""
        if not item.available:
            return False
        old = self.catalog.get(item.item_id)
        return old is None or old.text != item.text or item.item_id not in self.index

    def recommendable(self, item_id: str) -> bool:
        return self.catalog.is_recommendable(item_id) and item_id in self.index

    def category_rows(self) -> np.ndarray:
        """Category code per index row (-1: none), kept up to date by :meth:`upsert`."""
        if len(self._category_rows) < self.index.row_capacity:  # the index grew
            grown = np.full(self.index.row_capacity, -1, dtype=np.int64)
            grown[: len(self._category_rows)] = self._category_rows
            self._category_rows = grown
        return self._category_rows

    @property
    def n_categories(self) -> int:
        return len(self._codes)

    def vector(self, item_id: str) -> np.ndarray | None:
        return self.index.vector(item_id)

    def vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        return self.index.vectors(item_ids)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[set[str] | frozenset[str]] | None = None,
    ) -> list[list[tuple[str, float]]]:
        """See :meth:`VectorIndex.search`; only available items are ever returned."""
        return self.index.search(queries, k, exclude)

    def __len__(self) -> int:
        return len(self.catalog)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.catalog


class CatalogFileError(DecodeError):
    """A catalog file that cannot be read: missing, not a file, damaged, or with a bad line."""


#: Bad lines of a catalog file named in its refusal (the count says how many more there are).
BAD_LINES_NAMED = 5


def read_catalog_file(path: str | os.PathLike[str]) -> list[CatalogItem]:
    """Catalog items from a JSONL file, one item per line (blank lines skipped); the file may
    be gzip, bzip2 or xz (:func:`recsys.files.open_input`).

    Whatever stops the read raises :class:`CatalogFileError` naming the file, and for bad
    lines the first :data:`BAD_LINES_NAMED` numbers with what is wrong with each, and how many
    there are (until 2026-12-07 the first one only: each fix cost another start and model load).
    """
    items: list[CatalogItem] = []
    bad: list[str] = []
    n_bad = 0
    try:
        with open_input(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    items.append(decode_catalog_item(line))
                except DecodeError as exc:
                    n_bad += 1
                    if len(bad) < BAD_LINES_NAMED:
                        bad.append(f"line {lineno}: {exc}")
    except (OSError, ValueError) as exc:  # missing, a directory, unreadable, damaged, zstd
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CatalogFileError(why if str(path) in why else f"{path}: {why}") from None
    if bad:
        more = f" ({n_bad} bad lines in all)" if n_bad > len(bad) else ""
        raise CatalogFileError(f"{path}, " + "; ".join(bad) + more)
    return items
