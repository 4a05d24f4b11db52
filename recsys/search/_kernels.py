"""Compiled loop of :meth:`recsys.search.service.Search._personal` (issue 13: search's cost).

The price signal of each candidate, ``exp(-|log(price / median)|)`` against the median price
of the shopper's history, was one Python expression per candidate reading the candidate's
catalog entry (~260 candidates a search on the benchmark's catalog, most of a search's
personal signals). The prices now come as an array kept with the query's candidates, and this
loop calls the C library's ``log`` and ``exp`` per candidate, as Python's ``math`` does, so
the floats are the same (``tests/test_search.py`` compares them).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def price_closeness(prices, median):  # pragma: no cover - compiled
    """``exp(-abs(log(p / median)))`` for each price ``p`` (0.0 where ``p`` is 0: no price)."""
    out = np.zeros(prices.shape[0], dtype=np.float64)
    for j in range(prices.shape[0]):
        p = prices[j]
        if p != 0.0:
            out[j] = math.exp(-abs(math.log(p / median)))
    return out
