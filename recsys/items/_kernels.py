"""Compiled loop of :func:`recsys.items.catalog._ivf_search_by_products` (issue 12).

An inverted-file search over a batch of queries computes, for each probed cell, one matrix
product of the queries that probe it with the cell's vectors (BLAS). This loop keeps, for each
query, the ``wide`` best of those products in a bounded heap: ~900 products a query at the
benchmark's 10k items, most of them rejected by one comparison with the heap's smallest.
"""

from __future__ import annotations

from numba import njit


@njit(cache=True, nogil=True)
def push_products(products, owners, labels, heap_s, heap_i):  # pragma: no cover - compiled
    """Offer ``products[r, j]`` (label ``labels[j]``) to query ``owners[r]``'s heap.

    ``heap_s[q]`` is a min-heap of query q's best scores so far (its smallest at 0; start it at
    -inf), ``heap_i[q]`` their labels. A score equal to the smallest kept is not taken: the
    caller checks its answer against a margin, so which of two equal scores is kept does not
    matter.
    """
    wide = heap_s.shape[1]
    for r in range(products.shape[0]):
        q = owners[r]
        for j in range(products.shape[1]):
            v = products[r, j]
            if v <= heap_s[q, 0]:
                continue
            i = 0  # replace the smallest and sift it down
            while True:
                c = 2 * i + 1
                if c >= wide:
                    break
                if c + 1 < wide and heap_s[q, c + 1] < heap_s[q, c]:
                    c += 1
                if heap_s[q, c] >= v:
                    break
                heap_s[q, i] = heap_s[q, c]
                heap_i[q, i] = heap_i[q, c]
                i = c
            heap_s[q, i] = v
            heap_i[q, i] = labels[j]
