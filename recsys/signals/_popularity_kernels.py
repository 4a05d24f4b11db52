"""Compiled loop of :meth:`recsys.signals.popularity.Popularity.scores` (issue 13: search's cost).

A search scores the popularity of every candidate (~1,000 on the benchmark's catalog), each
decayed to the search's time by ``0.5 ** (dt / half_life)``. The scores must be the floats
:meth:`~recsys.signals.popularity.Popularity.score` gives item by item (rankings are compared
bit for bit across trees), and numpy's vectorised ``power`` differs from the C library's
``pow`` in the last bit for ~5% of inputs, so the decay was one Python ``**`` per candidate:
~0.2 CPU-ms a search, a fifth of it. This loop calls the C library's ``pow`` per candidate,
as Python's ``**`` does (``tests/test_signals.py`` compares them on a million random times).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def decayed_scores(score, ref, rows, now_ts, half_life_ms, base):  # pragma: no cover - compiled
    """``score[r] * base ** (max(now_ts - ref[r], 0) / half_life_ms)`` for each ``r`` in
    ``rows`` (0.0 where ``r`` is -1). ``base`` (0.5) is an argument, not a constant, so the
    compiler calls ``pow`` as written instead of rewriting it."""
    out = np.zeros(rows.shape[0], dtype=np.float64)
    for j in range(rows.shape[0]):
        r = rows[j]
        if r >= 0:
            dt = np.float64(now_ts - ref[r])
            if dt < 0.0:
                dt = 0.0
            out[j] = score[r] * base ** (dt / half_life_ms)
    return out
