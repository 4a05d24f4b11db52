"""Compiled loops of :class:`recsys.signals.covisitation.CoVisitation` (issue 12).

Why compiled: once the lists are full (the engine benchmark reaches the 50-neighbour bound by
~100k events), almost every new pair overflows a list and its weakest pair must go; in Python
that was dict and heap work per pair, ~150 CPU-us per event late in the benchmark, and sorting
each changed list again for the ranker another ~100. The lists are rows of flat arrays
(neighbour code, weight, raw count, in insertion order), and the loops below update them in
the order the Python code did, with the same float additions, so every list, its order and
its stored bytes are what the dict version gave (``tests/test_speed_equivalence.py`` runs both
on the same streams).

Ties between weights are broken by the smaller item id, compared as Python compares ``str``:
the ids' UTF-8 bytes (``surrogatepass``), whose bytewise order is code point order, kept in one
flat byte buffer (``names``) with an offset and a length per code.
"""

from __future__ import annotations

import numpy as np
from numba import njit


class IdBytes:
    """Item ids' UTF-8 bytes (``surrogatepass``) one after another in one flat buffer, with an
    offset and a length per code, so compiled loops can break ties by id (:func:`_name_less`):
    bytewise order is code point order, Python's ``str`` order. Codes are given in order by the
    caller (0, 1, 2, ...), one :meth:`add` each."""

    def __init__(self) -> None:
        self.buf = np.zeros(4096, dtype=np.uint8)
        self.end = 0
        self.offset = np.zeros(1024, dtype=np.int64)
        self.length = np.zeros(1024, dtype=np.int64)

    def add(self, code: int, item_id: str) -> None:
        if code >= len(self.offset):  # doubling
            self.offset = np.concatenate([self.offset, np.zeros_like(self.offset)])
            self.length = np.concatenate([self.length, np.zeros_like(self.length)])
        raw = item_id.encode("utf-8", "surrogatepass")
        end = self.end + len(raw)
        if end > len(self.buf):
            grown = np.zeros(max(2 * len(self.buf), end), dtype=np.uint8)
            grown[: self.end] = self.buf[: self.end]
            self.buf = grown
        self.buf[self.end:end] = np.frombuffer(raw, dtype=np.uint8)
        self.offset[code], self.length[code] = self.end, len(raw)
        self.end = end


@njit(cache=True, nogil=True)
def _name_less(names, offset, length, i, j):  # pragma: no cover - compiled
    """Whether the id of code ``i`` sorts before that of code ``j`` (as Python ``str`` does)."""
    oi, oj, li, lj = offset[i], offset[j], length[i], length[j]
    for t in range(min(li, lj)):
        ci, cj = names[oi + t], names[oj + t]
        if ci != cj:
            return ci < cj
    return li < lj


@njit(cache=True, nogil=True)
def _weakest(nb, wt, ln, x, names, offset, length):  # pragma: no cover - compiled
    """Column of row ``x``'s weakest pair: the smallest weight, among equals the smallest id."""
    best = 0
    for j in range(1, ln[x]):
        if wt[x, j] < wt[x, best] or (wt[x, j] == wt[x, best] and _name_less(names, offset, length, nb[x, j], nb[x, best])):
            best = j
    return best


@njit(cache=True, nogil=True)
def _new_is_weakest(nb, wt, ln, x, w, y, names, offset, length):  # pragma: no cover - compiled
    """Whether a new pair ``(w, y)`` would be the weakest of row ``x`` (ties by the smaller id)."""
    k = _weakest(nb, wt, ln, x, names, offset, length)
    return w < wt[x, k] or (w == wt[x, k] and _name_less(names, offset, length, y, nb[x, k]))


@njit(cache=True, nogil=True)
def _find(nb, ln, x, y):  # pragma: no cover - compiled
    for j in range(ln[x]):
        if nb[x, j] == y:
            return j
    return -1


@njit(cache=True, nogil=True)
def _drop(nb, wt, ct, ln, dirty, stale, x, y, directed):  # pragma: no cover - compiled
    """Remove pair ``x``-``y`` (and ``y``-``x`` unless directed); later pairs move up a column,
    as a dict keeps the order of the keys left after a deletion."""
    for side in range(1 if directed else 2):
        p, q = (x, y) if side == 0 else (y, x)
        j = _find(nb, ln, p, q)
        if j < 0:
            continue
        last = ln[p] - 1
        for t in range(j, last):
            nb[p, t] = nb[p, t + 1]
            wt[p, t] = wt[p, t + 1]
            ct[p, t] = ct[p, t + 1]
        nb[p, last] = -1
        wt[p, last] = 0.0
        ct[p, last] = 0
        ln[p] = last
        dirty[p] = True
        stale[p] = True


@njit(cache=True, nogil=True)
def apply_pairs(pa, pb, pw, nb, wt, ct, ln, dirty, stale, names, offset, length, max_neighbours, directed):  # pragma: no cover
    """Add each pair ``pa[i]``-``pb[i]`` with weight ``pw[i]``, in order, as
    ``CoVisitation._add_pair`` of the dict version did: a new pair that its own overflow would
    drop at once is skipped (leaving every list as it was, only the ``[]`` record of a list
    that adding would have made and emptied marked for export); otherwise the pair is added on
    both sides (``0.0 + w`` when new, ``old + w`` when not; one raw count more), and a list
    over ``max_neighbours`` loses its weakest pair on both sides (``a``'s first, then ``b``'s).
    """
    m = max_neighbours
    for i in range(len(pa)):
        a, b, w = pa[i], pb[i], pw[i]
        # a new pair its own overflow would drop at once (CoVisitation._dropped_at_once)
        if _find(nb, ln, a, b) < 0:
            if ln[a] >= m:
                if _new_is_weakest(nb, wt, ln, a, w, b, names, offset, length):
                    if not directed and ln[b] == 0:
                        dirty[b] = True
                    continue
            elif not directed and ln[b] >= m and _find(nb, ln, b, a) < 0:
                if _new_is_weakest(nb, wt, ln, b, w, a, names, offset, length):
                    if ln[a] == 0:
                        dirty[a] = True
                    continue
        for side in range(1 if directed else 2):
            x, y = (a, b) if side == 0 else (b, a)
            j = _find(nb, ln, x, y)
            if j < 0:
                j = ln[x]
                nb[x, j] = y
                wt[x, j] = 0.0 + w
                ct[x, j] = 1
                ln[x] = j + 1
            else:
                wt[x, j] = wt[x, j] + w
                ct[x, j] += 1
            dirty[x] = True
            stale[x] = True
        for side in range(1 if directed else 2):
            x = a if side == 0 else b
            if ln[x] > m:
                _drop(nb, wt, ct, ln, dirty, stale, x, nb[x, _weakest(nb, wt, ln, x, names, offset, length)], directed)


@njit(cache=True, nogil=True)
def ranked_order(nb, wt, ln, x, names, offset, length):  # pragma: no cover - compiled
    """Columns of row ``x`` heaviest first, ties by id (insertion sort: at most a few dozen)."""
    n = ln[x]
    order = np.arange(n)
    for i in range(1, n):
        c = order[i]
        j = i - 1
        while j >= 0:
            o = order[j]
            if wt[x, o] > wt[x, c] or (wt[x, o] == wt[x, c] and _name_less(names, offset, length, nb[x, o], nb[x, c])):
                break
            order[j + 1] = o
            j -= 1
        order[j + 1] = c
    return order


@njit(cache=True, nogil=True)
def top_many(xs, n, nb, wt, ln, names, offset, length):  # pragma: no cover - compiled
    """For each row in ``xs`` (``-1``: no list), its first ``n`` neighbours in
    :func:`ranked_order`: ``(pairs per row, neighbour codes, weights)``, rows one after another."""
    counts = np.zeros(len(xs), dtype=np.int64)
    codes = np.empty(len(xs) * n, dtype=np.int64)
    weights = np.empty(len(xs) * n, dtype=np.float64)
    k = 0
    for i in range(len(xs)):
        x = xs[i]
        if x < 0 or ln[x] == 0:
            continue
        order = ranked_order(nb, wt, ln, x, names, offset, length)
        take = min(n, len(order))
        for t in range(take):
            codes[k] = nb[x, order[t]]
            weights[k] = wt[x, order[t]]
            k += 1
        counts[i] = take
    return counts, codes[:k], weights[:k]


@njit(cache=True, nogil=True)
def pack_rows(rows, nb, wt, ct, ln, names, offset, length):  # pragma: no cover - compiled
    """The stored record of each row in ``rows`` (binary, see
    :func:`recsys.signals.covisitation.decode_record`), one after another in one byte buffer:
    ``(buffer, start, end)`` per row. A record is an 8-byte header (format byte ``1``, three zero
    bytes, the pair count ``n`` as uint32), then ``n`` float64 weights, ``n`` int64 raw counts,
    ``n`` uint32 byte lengths of the neighbour ids and the ids' UTF-8 bytes, all little-endian
    and in insertion order. Records start at multiples of 8, so the numbers are written through
    aligned views of the buffer; rows with no pairs get no record (``start == end``)."""
    starts = np.zeros(len(rows), dtype=np.int64)
    ends = np.zeros(len(rows), dtype=np.int64)
    at = 0
    for i in range(len(rows)):
        x = rows[i]
        n = ln[x]
        starts[i] = at
        if n == 0:
            ends[i] = at
            continue
        size = 8 + 20 * n
        for j in range(n):
            size += length[nb[x, j]]
        ends[i] = at + size
        at += (size + 7) // 8 * 8
    buf = np.zeros(at, dtype=np.uint8)
    as_u32 = buf.view(np.uint32)
    as_f64 = buf.view(np.float64)
    as_i64 = buf.view(np.int64)
    for i in range(len(rows)):
        x = rows[i]
        n = ln[x]
        if n == 0:
            continue
        s = starts[i]
        buf[s] = 1
        as_u32[s // 4 + 1] = n
        for j in range(n):
            as_f64[s // 8 + 1 + j] = wt[x, j]
            as_i64[s // 8 + 1 + n + j] = ct[x, j]
        lens = s + 8 + 16 * n  # a multiple of 4
        p = lens + 4 * n
        for j in range(n):
            y = nb[x, j]
            as_u32[lens // 4 + j] = length[y]
            o = offset[y]
            for t in range(length[y]):
                buf[p + t] = names[o + t]
            p += length[y]
    return buf, starts, ends
