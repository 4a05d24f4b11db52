"""Compiled loops of :class:`recsys.ranking.recommender.Recommender` (issue 12).

**Grouping the batch's candidates** (:func:`group_entries`, for ``_Entries.group``): every
candidate entry of a batch (~170k late in the engine benchmark: user, item row, source, value)
becomes one row of the feature matrix per distinct (user, item), with the values summed per
source column, scaled per user, and the anchor that explains it. In numpy that was ~25 array
passes over all entries (a mask, a gather and a ``bincount`` per source, a ``lexsort`` for the
anchors): ~45 ms per 1,000-user batch. After the one sort, a single pass does it; every sum adds
the same float64 values in the same order as ``np.bincount`` did, and the scaling divides the
same float32 values, so the matrix is bit-identical (``tests/test_recommender.py``,
``benchmarks/output_digest.py``).

**The reasons' closest history items** (:func:`closest_rows`): the reason "similar to <item> you viewed (similarity 0.83)" needs, for each shown
item that content retrieval brought, the user's recent item whose vector is closest. That is a
product of a few shown vectors with a few recent ones per user (10 x 10 at most, 384 dims):
as one small BLAS call per user it cost ~20-50 CPU-us per user late in the engine benchmark, the
calls' overhead, not the arithmetic. One loop over the whole batch does the same ~40k dot
products in a few milliseconds.

Each similarity is the dot product of the two stored float32 vectors summed in float64, in
dimension order: every product of two float32 values is exact in float64, so the sum is the
exact cosine to ~1e-16 and the same on every machine (BLAS sums in an order that depends on
the CPU's kernels and the operands' shapes). The closest recent item is the one with the
largest similarity; on an exact tie the shown item itself when it is among them (items with the
same text have the same vector: "you viewed this recently" is then the true reason, where the
float32 products picked by their last bit), else the most recent.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _dot(a, b, dim):  # pragma: no cover - compiled
    """``a . b`` in float64: eight running sums over the dimensions ``d = j (mod 8)``, then
    added pairwise in a fixed order (independent sums: the CPU overlaps them; a fixed order:
    the same result on every machine), then the last ``dim % 8`` terms."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    end = dim - dim % 8
    for d in range(0, end, 8):
        s0 += np.float64(a[d]) * np.float64(b[d])
        s1 += np.float64(a[d + 1]) * np.float64(b[d + 1])
        s2 += np.float64(a[d + 2]) * np.float64(b[d + 2])
        s3 += np.float64(a[d + 3]) * np.float64(b[d + 3])
        s4 += np.float64(a[d + 4]) * np.float64(b[d + 4])
        s5 += np.float64(a[d + 5]) * np.float64(b[d + 5])
        s6 += np.float64(a[d + 6]) * np.float64(b[d + 6])
        s7 += np.float64(a[d + 7]) * np.float64(b[d + 7])
    s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for d in range(end, dim):
        s += np.float64(a[d]) * np.float64(b[d])
    return s


@njit(cache=True, nogil=True)
def closest_rows(table, cand_rows, hist_rows, pick_lo, pick_hi, hist_lo, hist_hi):  # pragma: no cover
    """For each group ``g`` (a user): each candidate row ``cand_rows[p]`` for ``p`` in
    ``[pick_lo[g], pick_hi[g])`` against the history rows ``hist_rows[h]`` for ``h`` in
    ``[hist_lo[g], hist_hi[g])`` (at least one, most recent first), their vectors read from
    ``table``. Returns, per candidate, the index into ``hist_rows`` of its most similar history
    item and that similarity; ties go to the candidate itself (the same row), else to the first."""
    best = np.empty(len(cand_rows), dtype=np.int64)
    sims = np.empty(len(cand_rows), dtype=np.float64)
    dim = table.shape[1]
    for g in range(len(pick_lo)):
        for p in range(pick_lo[g], pick_hi[g]):
            c = cand_rows[p]
            top = -np.inf
            at = hist_lo[g]
            for h in range(hist_lo[g], hist_hi[g]):
                s = _dot(table[c], table[hist_rows[h]], dim)
                if s > top or (s == top and hist_rows[h] == c):
                    top = s
                    at = h
            best[p] = at
            sims[p] = top
    return best, sims


@njit(cache=True, nogil=True)
def group_entries(order, src, user, row, val, anchor, seq, attach, key, excluded, columns, scaled, n_features,
                  covisit, nxt):  # pragma: no cover - compiled
    """The entries taken in ``order`` (sorted by key: each distinct (user, item) one run), less
    those whose key is in ``excluded`` (sorted ascending; read alongside, as a merge), one
    group per run: ``(key, user, row, features, first seq, co-visitation anchor, transition
    anchor, real, present)``.

    - features: per source ``s`` (column ``columns[s]``, ``-1``: none), the float64 sum of its
      entries' values in order, as float32; for a source with ``scaled[s]``, then divided
      (float32) by the user's largest value in that column (at least 1e-12);
    - co-visitation anchor: the anchor of the group's largest co-visitation value, the smallest
      ``seq`` on ties; transition anchor: that of its first transition entry (``-1``: none);
    - real: whether a non-attach-only entry names the group; present: which sources had entries.
    """
    kept = np.empty(len(order), dtype=np.int64)
    m = 0
    x = 0
    for i in range(len(order)):
        k = key[order[i]]
        while x < len(excluded) and excluded[x] < k:
            x += 1
        if x < len(excluded) and excluded[x] == k:
            continue
        kept[m] = order[i]
        m += 1
    order = kept[:m]
    n = 0
    for i in range(m):
        if i == 0 or key[order[i]] != key[order[i - 1]]:
            n += 1
    g_key = np.empty(n, dtype=np.int64)
    g_user = np.empty(n, dtype=np.int64)
    g_row = np.empty(n, dtype=np.int64)
    g_seq = np.empty(n, dtype=np.int64)
    cov = np.full(n, -1, dtype=np.int64)
    nx = np.full(n, -1, dtype=np.int64)
    cov_v = np.zeros(n, dtype=np.float32)
    cov_q = np.zeros(n, dtype=np.int64)
    has_cov = np.zeros(n, dtype=np.bool_)
    has_nx = np.zeros(n, dtype=np.bool_)
    real = np.zeros(n, dtype=np.bool_)
    present = np.zeros(len(columns), dtype=np.bool_)
    acc = np.zeros((n, n_features))
    g = -1
    for i in range(m):
        e = order[i]
        if i == 0 or key[e] != key[order[i - 1]]:
            g += 1
            g_key[g] = key[e]
            g_user[g] = user[e]
            g_row[g] = row[e]
            g_seq[g] = seq[e]
        s = src[e]
        present[s] = True
        if columns[s] >= 0:
            acc[g, columns[s]] += np.float64(val[e])
        if not attach[e]:
            real[g] = True
        if s == covisit:
            if not has_cov[g] or val[e] > cov_v[g] or (val[e] == cov_v[g] and seq[e] < cov_q[g]):
                has_cov[g] = True
                cov[g] = anchor[e]
                cov_v[g] = val[e]
                cov_q[g] = seq[e]
        elif s == nxt and not has_nx[g]:
            has_nx[g] = True
            nx[g] = anchor[e]
    features = np.zeros((n, n_features), dtype=np.float32)
    for g in range(n):
        for c in range(n_features):
            features[g, c] = np.float32(acc[g, c])
    n_users = 0
    for g in range(n):
        n_users = max(n_users, g_user[g] + 1)
    top = np.zeros(n_users, dtype=np.float32)
    for s in range(len(columns)):
        c = columns[s]
        if c < 0 or not scaled[s] or not present[s]:
            continue
        top[:] = 0.0
        for g in range(n):
            top[g_user[g]] = max(top[g_user[g]], features[g, c])
        for g in range(n):
            features[g, c] = features[g, c] / max(top[g_user[g]], np.float32(1e-12))
    return g_key, g_user, g_row, features, g_seq, cov, nx, real, present
