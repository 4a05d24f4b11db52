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
def _accumulate(scratch, touched, n_touched, key, w):  # pragma: no cover - compiled
    """``scratch[key] += w``, noting ``key`` in ``touched`` the first time this query meets it;
    returns the new count of keys touched. ``scratch`` is 0.0 wherever no key of this query has
    been added yet (:func:`_emit` puts it back), and every weight is positive, so a key is new
    exactly when its sum is still 0.0. Without a branch on that: the key is written at the end
    of ``touched`` every time (``touched`` holds one slot more than there are keys), and the
    count moves on only for a new key. A branch per vote was mispredicted about as often as it
    was taken (votes name items at random): 47 -> 13 ms for 2.2M votes alone."""
    touched[n_touched] = key
    n_touched += scratch[key] == 0.0
    scratch[key] += w
    return n_touched


@njit(cache=True, nogil=True, inline="always")
def _emit(query, scratch, touched, n_touched, out_q, out_k, out_v, n_out):  # pragma: no cover
    """Append the query's sums, keys in the order first touched, and put their ``scratch``
    back to 0.0; returns the new output length."""
    for t in range(n_touched):
        key = touched[t]
        out_q[n_out] = query
        out_k[n_out] = key
        out_v[n_out] = scratch[key]
        scratch[key] = 0.0
        n_out += 1
    return n_out


@njit(cache=True, nogil=True)
def session_dots(slots, sizes, m, n_slots):  # pragma: no cover - compiled (tested through ranked_votes)
    """Per query ``q`` (its ``m[q]`` items, oldest first, each with ``sizes`` posting entries in
    ``slots``), the dot product of its position-weighted binary vector (item ``j`` from 1 weighs
    ``j / m[q]``) with every session posted under its items. Returns ``(query, slot, dot)``
    grouped by query in order, each query's sessions in the order first met."""
    scratch = np.zeros(n_slots)
    touched = np.empty(n_slots + 1, dtype=np.int64)  # one slot more: see _accumulate
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
                n_touched = _accumulate(scratch, touched, n_touched, slots[e], w)
            entry += sizes[item]
            item += 1
        n_out = _emit(qi, scratch, touched, n_touched, out_q, out_s, out_d, n_out)
    return out_q[:n_out], out_s[:n_out], out_d[:n_out]


@njit(cache=True, nogil=True, inline="always")
def _run_end(q, lo):  # pragma: no cover - compiled
    """The end of the run of equal values of ``q`` that starts at ``lo`` (one query's entries)."""
    hi = lo
    while hi < len(q) and q[hi] == q[lo]:
        hi += 1
    return hi


@njit(cache=True, nogil=True)
def most_active_per_query(q, active, sample_size):  # pragma: no cover - compiled
    """Indices, ascending, of each query's ``sample_size`` most recently active sessions (all of
    them when it has no more), for ``q`` grouped (ascending): the first ``sample_size`` entries
    of each query in the order of ``np.lexsort((-active, q))``, ties in ``active`` to the
    earlier entry as that stable sort gives them, then sorted. Per query, the cut's value
    comes from one pass with a min-heap, instead of a sort of every (query, session) pair of the
    batch (~22 ms of a late 1,000-user batch on the benchmark's visits workload)."""
    out = np.empty(len(q), dtype=np.int64)
    heap = np.empty(max(sample_size, 1), dtype=active.dtype)
    n_out = 0
    lo = 0
    while lo < len(q):
        hi = _run_end(q, lo)
        if hi - lo <= sample_size:
            for i in range(lo, hi):
                out[n_out] = i
                n_out += 1
        else:
            cut = _nth_largest(active[lo:hi], sample_size, heap)
            room = sample_size
            for i in range(lo, hi):
                room -= active[i] > cut
            for i in range(lo, hi):  # above the cut, and the first `room` at it
                if active[i] > cut or (active[i] == cut and room > 0):
                    if active[i] == cut:
                        room -= 1
                    out[n_out] = i
                    n_out += 1
        lo = hi
    return out[:n_out]


@njit(cache=True, nogil=True)
def top_sessions(q, sids, sims, k):  # pragma: no cover - compiled
    """Indices of each query's ``k`` most similar sessions, most similar first, ties by slot:
    ``np.lexsort((sids, -sims, q))`` cut at ``k`` per query, for ``q`` grouped (ascending).
    Only a query's ``k`` best (and whatever ties the ``k``-th) are sorted."""
    out = np.empty(len(q), dtype=np.int64)
    n_out = 0
    lo = 0
    while lo < len(q):
        hi = _run_end(q, lo)
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


@njit(cache=True, nogil=True, inline="always")
def _nth_largest(values, n, heap):  # pragma: no cover - compiled
    """The ``n``-th largest of ``values`` (duplicates counted), as ``-np.partition(-values, n -
    1)[n - 1]`` gives it, for ``len(values) >= n``: the ``n`` largest kept in the min-heap
    ``heap[:n]``, its root the answer. One pass, no copy of the values; past the first few, a
    value rarely enters the heap, so the loop's branch is predicted well."""
    for t in range(n):  # the first n, then heapified
        heap[t] = values[t]
    for start in range(n // 2 - 1, -1, -1):
        _sift_down(heap, start, n)
    for t in range(n, len(values)):
        if values[t] > heap[0]:
            heap[0] = values[t]
            _sift_down(heap, 0, n)
    return heap[0]


@njit(cache=True, nogil=True, inline="always")
def _sift_down(heap, i, n):  # pragma: no cover - compiled
    """Restore the min-heap order below position ``i`` of ``heap[:n]``."""
    while True:
        smallest, left, right = i, 2 * i + 1, 2 * i + 2
        if left < n and heap[left] < heap[smallest]:
            smallest = left
        if right < n and heap[right] < heap[smallest]:
            smallest = right
        if smallest == i:
            return
        heap[i], heap[smallest] = heap[smallest], heap[i]
        i = smallest


@njit(cache=True, nogil=True)
def top_session_votes(q, sids, sims, held, lengths, first_col, n_codes, n, names, offset, length):  # pragma: no cover
    """:func:`session_votes` then :func:`best_per_query`, in one pass: each query's votes are
    summed in a scratch array indexed by item code, and only its ``n`` best leave it. Returns
    ``(query, code, votes)``: per query (grouped, in order), its ``n`` best items, largest
    votes first, ties by item id. The same sums in the same order, the same selection and the
    same tie order as the two loops (``tests/test_speed_equivalence.py``), without writing
    every (query, item) sum out and reading it back: late in the engine benchmark a 1,000-user
    batch has ~2.5M of them, ~60 MB of fresh arrays per batch."""
    scratch = np.zeros(n_codes)
    touched = np.empty(n_codes + 1, dtype=np.int64)  # one slot more: see _accumulate
    heap = np.empty(max(n, 1))
    sums = np.empty(n_codes)
    cand = np.empty(n_codes, dtype=np.int64)
    groups = 0
    for i in range(len(q)):
        if i == 0 or q[i] != q[i - 1]:
            groups += 1
    out_q = np.empty(groups * max(n, 0), dtype=np.int64)
    out_c = np.empty(groups * max(n, 0), dtype=np.int64)
    out_v = np.empty(groups * max(n, 0))
    n_out = 0
    lo = 0
    while lo < len(q):
        hi = lo
        n_touched = 0
        while hi < len(q) and q[hi] == q[lo]:
            row = held[sids[hi]]
            w = sims[hi]
            for c in range(first_col[hi], int(lengths[sids[hi]])):
                n_touched = _accumulate(scratch, touched, n_touched, row[c], w)
            hi += 1
        # the n best of the touched codes (best_per_query's selection, on the codes directly)
        n_cand = n_touched
        for t in range(n_touched):
            cand[t] = touched[t]
        if n_touched > n:
            for t in range(n_touched):
                sums[t] = scratch[touched[t]]
            nth = -_nth_largest(sums[:n_touched], n, heap)
            n_cand = 0
            for t in range(n_touched):
                if -sums[t] <= nth:
                    cand[n_cand] = touched[t]
                    n_cand += 1
        for i in range(1, n_cand):  # by votes, then by id
            c = cand[i]
            j = i - 1
            while j >= 0:
                o = cand[j]
                if scratch[o] > scratch[c] or (scratch[o] == scratch[c] and _name_less(names, offset, length, o, c)):
                    break
                cand[j + 1] = o
                j -= 1
            cand[j + 1] = c
        for t in range(min(n, n_cand)):
            out_q[n_out] = q[lo]
            out_c[n_out] = cand[t]
            out_v[n_out] = scratch[cand[t]]
            n_out += 1
        for t in range(n_touched):
            scratch[touched[t]] = 0.0
        lo = hi
    return out_q[:n_out], out_c[:n_out], out_v[:n_out]
