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


@njit(cache=True, nogil=True)
def closest_rows(cand, cand_rows, hist, hist_rows, pick_lo, pick_hi, hist_lo, hist_hi):  # pragma: no cover
    """For each group ``g`` (a user): each candidate vector ``cand[p]`` for ``p`` in
    ``[pick_lo[g], pick_hi[g])`` against the history vectors ``hist[h]`` for ``h`` in
    ``[hist_lo[g], hist_hi[g])`` (at least one, most recent first). Returns, per candidate, the
    index into ``hist`` of its most similar history item and that similarity; ties go to the
    candidate itself (the same index row, ``cand_rows[p] == hist_rows[h]``), else to the first."""
    best = np.empty(len(cand), dtype=np.int64)
    sims = np.empty(len(cand), dtype=np.float64)
    dim = cand.shape[1]
    for g in range(len(pick_lo)):
        for p in range(pick_lo[g], pick_hi[g]):
            top = -np.inf
            at = hist_lo[g]
            for h in range(hist_lo[g], hist_hi[g]):
                s = 0.0
                for d in range(dim):
                    s += np.float64(cand[p, d]) * np.float64(hist[h, d])
                if s > top or (s == top and hist_rows[h] == cand_rows[p]):
                    top = s
                    at = h
            best[p] = at
            sims[p] = top
    return best, sims
