"""BM25's costs (``recsys/search/lexical.py``) beside a ``bm25s`` build of the same items.

    .venv/bin/python benchmarks/lexical_speed.py [--items 10000 30000] [--queries 300] [--upserts 200]

Per synthetic catalog size (load test only): indexing every item from empty, and ``bm25s``
building its index over the same tokens; one item upserted in place (median); a two-word
query's scores (median) against ``bm25s``'s precomputed ones; and a query right after an upsert
that touched its terms (their postings are turned into arrays again). Prints microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bm25s
import numpy as np

from recsys.events import CatalogItem
from recsys.search.lexical import LexicalIndex
from recsys.search.text import tokenize
from recsys.synthetic import generate_catalog


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, nargs="+", default=[10_000, 30_000])
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--upserts", type=int, default=200)
    args = p.parse_args()
    for n in args.items:
        catalog = generate_catalog(n, seed=0)
        lex = LexicalIndex()
        start = time.perf_counter()
        lex.upsert(catalog)
        index_s = time.perf_counter() - start
        ids = [i for i, tokens in lex.docs.items() if tokens]
        start = time.perf_counter()
        ref = bm25s.BM25(k1=lex.k1, b=lex.b)
        ref.index([lex.docs[i] for i in ids], show_progress=False)
        ref_s = time.perf_counter() - start
        rng = np.random.default_rng(0)
        words = sorted({w for c in catalog[:500] for w in tokenize(c.title)})
        ours, theirs = [], []
        for _ in range(args.queries):
            known = lex.known(list(rng.choice(words, size=2)))
            if known:
                start = time.perf_counter()
                lex.scores(known)
                ours.append(time.perf_counter() - start)
                start = time.perf_counter()
                ref.get_scores(known)
                theirs.append(time.perf_counter() - start)
        upserts, after = [], []
        for i in range(args.upserts):
            item = CatalogItem(f"new{i}", " ".join(rng.choice(words, size=4)), category=catalog[i].category,
                               brand=catalog[i].brand)
            start = time.perf_counter()
            lex.upsert([item])
            upserts.append(time.perf_counter() - start)
            known = lex.known(tokenize(item.title)[:2])
            start = time.perf_counter()
            lex.scores(known)
            after.append(time.perf_counter() - start)
        us = 1e6
        print(f"{n} items: index from empty {index_s * 1e3:.0f} ms (bm25s build {ref_s * 1e3:.0f} ms); "
              f"one item upserted {statistics.median(upserts) * us:.0f} µs; a query's scores "
              f"{statistics.median(ours) * us:.0f} µs (bm25s, precomputed: {statistics.median(theirs) * us:.0f} µs); "
              f"right after an upsert touching its terms {statistics.median(after) * us:.0f} µs", flush=True)


if __name__ == "__main__":
    main()
