"""Compiled loops of :meth:`recsys.signals.sessions.SessionNeighbours.ranked_votes` (issue 12).

Why compiled: session-kNN sums weights per (query, session) and per (query, item), and keeps
each query's ``k`` most similar sessions. In numpy each of those is a sort of the whole batch's
entries (``np.unique`` to group, ``np.lexsort`` to rank): late in the engine benchmark a batch of
1,000 users has ~190k (query, session) pairs and ~2.5M (neighbour, item) votes, and those sorts
were ~100 of the ~115 ms the batch's votes took. A dense numpy alternative (one ``bincount``
over query x item) was measured slower (benchmarks/README.md). A loop per query with a
scratch array indexed by session or item code needs no sort at all; Python cannot run it, so
numba compiles it (``cache=True``: compiled once per machine, kept in ``__pycache__``).

Every sum adds the same floats in the same order as the numpy code it replaces (entry order:
query position, then posting order; neighbour order, then the neighbour's columns), starting
from ``0.0`` as ``np.bincount`` does, so results are bit-identical
(``tests/test_speed_equivalence.py`` pins them against the per-user reference).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from recsys.signals._covisit_kernels import _name_less


@njit(cache=True, nogil=True, inline="always")
def _accumulate(scratch, mark, touched, n_touched, key, w):  # pragma: no cover - compiled
    """``scratch[key] += w``, starting from 0.0 the first time ``key`` is met in this query
    (noted in ``touched``); returns the new count of keys touched."""
    if not mark[key]:
        mark[key] = True
        scratch[key] = 0.0
        touched[n_touched] = key
        n_touched += 1
    scratch[key] += w
    return n_touched


@njit(cache=True, nogil=True, inline="always")
def _emit(query, scratch, mark, touched, n_touched, out_q, out_k, out_v, n_out):  # pragma: no cover
    """Append the query's sums, keys in the order first touched, and clear their marks;
    returns the new output length."""
    for t in range(n_touched):
        key = touched[t]
        out_q[n_out] = query
        out_k[n_out] = key
        out_v[n_out] = scratch[key]
        mark[key] = False
        n_out += 1
    return n_out


@njit(cache=True, nogil=True)
def session_dots(slots, sizes, m, n_slots):  # pragma: no cover - compiled (tested through ranked_votes)
    """Per query ``q`` (its ``m[q]`` items, oldest first, each with ``sizes`` posting entries in
    ``slots``), the dot product of its position-weighted binary vector (item ``j`` from 1 weighs
    ``j / m[q]``) with every session posted under its items. Returns ``(query, slot, dot)``
    grouped by query in order, each query's sessions in the order first met."""
    scratch = np.zeros(n_slots)
    mark = np.zeros(n_slots, dtype=np.bool_)
    touched = np.empty(n_slots, dtype=np.int64)
    out_q = np.empty(len(slots), dtype=np.int64)
    out_s = np.empty(len(slots), dtype=np.int64)
    out_d = np.empty(len(slots))
    n_out = 0
    item = 0
    entry = 0
    for qi in range(len(m)):
        mq = m[qi]
        n_touched = 0
        for j in range(mq):
            w = (j + 1) / mq  # as numpy's float64 (position / m)
            for e in range(entry, entry + sizes[item]):
                n_touched = _accumulate(scratch, mark, touched, n_touched, slots[e], w)
            entry += sizes[item]
            item += 1
        n_out = _emit(qi, scratch, mark, touched, n_touched, out_q, out_s, out_d, n_out)
    return out_q[:n_out], out_s[:n_out], out_d[:n_out]


@njit(cache=True, nogil=True)
def top_sessions(q, sids, sims, k):  # pragma: no cover - compiled
    """Indices of each query's ``k`` most similar sessions, most similar first, ties by slot:
    ``np.lexsort((sids, -sims, q))`` cut at ``k`` per query, for ``q`` grouped (ascending).
    Only a query's ``k`` best (and whatever ties the ``k``-th) are sorted."""
    out = np.empty(len(q), dtype=np.int64)
    n_out = 0
    lo = 0
    while lo < len(q):
        hi = lo
        while hi < len(q) and q[hi] == q[lo]:
            hi += 1
        neg = -sims[lo:hi]
        cand = np.arange(lo, hi)
        if hi - lo > k:
            kth = np.partition(neg, k - 1)[k - 1]
            cand = cand[neg <= kth]
        by_slot = cand[np.argsort(sids[cand], kind="mergesort")]
        ranked = by_slot[np.argsort(-sims[by_slot], kind="mergesort")]
        take = min(k, len(ranked))
        out[n_out:n_out + take] = ranked[:take]
        n_out += take
        lo = hi
    return out[:n_out]


@njit(cache=True, nogil=True)
def session_votes(q, sids, sims, held, lengths, first_col, n_codes):  # pragma: no cover - compiled
    """Every neighbour (``q`` grouped, in neighbour order) votes its similarity for each item
    code of its ``held`` row from column ``first_col`` up to its length (``lengths``: a row
    holds its codes first, then ``-1`` padding, so the padding is never read). Returns
    ``(query, code, votes)``: the sum per (query, item), grouped by query in order, codes in
    the order first voted."""
    scratch = np.zeros(n_codes)
    mark = np.zeros(n_codes, dtype=np.bool_)
    touched = np.empty(n_codes, dtype=np.int64)
    total = 0
    for i in range(len(sids)):
        total += max(int(lengths[sids[i]]) - first_col[i], 0)
    out_q = np.empty(total, dtype=np.int64)
    out_c = np.empty(total, dtype=np.int64)
    out_v = np.empty(total)
    n_out = 0
    lo = 0
    while lo < len(q):
        hi = lo
        n_touched = 0
        while hi < len(q) and q[hi] == q[lo]:
            row = held[sids[hi]]
            w = sims[hi]
            for c in range(first_col[hi], int(lengths[sids[hi]])):
                n_touched = _accumulate(scratch, mark, touched, n_touched, row[c], w)
            hi += 1
        n_out = _emit(q[lo], scratch, mark, touched, n_touched, out_q, out_c, out_v, n_out)
        lo = hi
    return out_q[:n_out], out_c[:n_out], out_v[:n_out]


@njit(cache=True, nogil=True)
def best_per_query(q, codes, values, n, names, offset, length):  # pragma: no cover - compiled
    """Indices of each query's ``n`` best entries, largest ``values`` first, ties by item id
    (the codes' ids compared on their UTF-8 bytes, as Python compares ``str``), for ``q``
    grouped: the order of ``np.lexsort((ids, -values, q))`` cut at ``n`` per query. Only a
    query's ``n`` largest values (and everything tied with its ``n``-th) are sorted (an
    insertion sort: a few dozen each)."""
    out = np.empty(len(q), dtype=np.int64)
    n_out = 0
    lo = 0
    while lo < len(q):
        hi = lo
        while hi < len(q) and q[hi] == q[lo]:
            hi += 1
        cand = np.arange(lo, hi)
        if hi - lo > n:
            neg = -values[lo:hi]
            nth = np.partition(neg, n - 1)[n - 1]  # a partitioned copy
            cand = cand[neg <= nth]
        for i in range(1, len(cand)):  # by value, then by id
            c = cand[i]
            j = i - 1
            while j >= 0:
                o = cand[j]
                if values[o] > values[c] or (values[o] == values[c] and _name_less(names, offset, length, codes[o], codes[c])):
                    break
                cand[j + 1] = o
                j -= 1
            cand[j + 1] = c
        take = min(n, len(cand))
        out[n_out:n_out + take] = cand[:take]
        n_out += take
        lo = hi
    return out[:n_out]
