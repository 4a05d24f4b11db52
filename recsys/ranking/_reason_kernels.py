"""Compiled loop of :meth:`recsys.ranking.recommender.Recommender._closest_history_items` (issue 12).

Why compiled: the reason "similar to <item> you viewed (similarity 0.83)" needs, for each shown
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
