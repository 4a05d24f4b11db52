"""Embedding and vector-search speed on this machine; prints figures, asserts nothing.

    .venv/bin/python benchmarks/embed_speed.py [--texts 2000] [--items 10000]

1. MiniLM texts/s on ~2000 short generated product titles (cold cache: every text embedded).
2. The same texts again from the on-disk cache (no model involved).
3. faiss exact inner-product search, queries/s, over a 10k-item 384-d index, batch 1 and 256.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import numpy as np

from recsys.items.catalog import VectorIndex
from recsys.items.embeddings import Embedder

ADJECTIVES = ["red", "blue", "organic", "wireless", "leather", "stainless", "kids'", "vintage", "compact", "deluxe"]
NOUNS = ["running shoes", "coffee beans", "headphones", "backpack", "kettle", "yoga mat", "desk lamp", "jacket",
         "chocolate bar", "phone case", "water bottle", "novel"]
BRANDS = ["Acme", "Northwind", "Fleet", "Umbra", "Kestrel", "Lumo", "Brio"]


def product_titles(n: int) -> list[str]:
    """``n`` distinct short titles such as 'Acme red running shoes, size 3'."""
    combos = itertools.cycle(itertools.product(BRANDS, ADJECTIVES, NOUNS))
    return [f"{b} {a} {noun}, size {i % 13}, pack of {i}" for i, (b, a, noun) in zip(range(n), combos)]


def bench_embed(n_texts: int, batch_size: int) -> np.ndarray:
    texts = product_titles(n_texts)
    with tempfile.TemporaryDirectory() as cache:
        emb = Embedder("all-MiniLM-L6-v2", cache_dir=cache, batch_size=batch_size)
        t0 = time.perf_counter()
        emb._load()  # timed apart: start-up cost, not throughput
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        vecs = emb.embed(texts)
        cold_s = time.perf_counter() - t0
        emb.close()
        warm = Embedder("all-MiniLM-L6-v2", cache_dir=cache, batch_size=batch_size)
        t0 = time.perf_counter()
        again = warm.embed(texts)
        hit_s = time.perf_counter() - t0
        assert warm.stats["model_loads"] == 0 and np.array_equal(vecs, again)
        warm.close()
    print(f"model load                 {load_s:8.2f} s")
    print(f"embed, cold cache          {n_texts / cold_s:8.0f} texts/s  ({n_texts} texts, batch {batch_size})")
    print(f"embed, warm cache          {n_texts / hit_s:8.0f} texts/s  (model not loaded)")
    return vecs


def bench_search(n_items: int, dim: int, k: int, repeat_s: float = 2.0) -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n_items, dim)).astype(np.float32)
    index = VectorIndex(dim)
    t0 = time.perf_counter()
    index.upsert([f"i{i}" for i in range(n_items)], vecs)
    print(f"index build                {time.perf_counter() - t0:8.3f} s  ({n_items} items, {dim}-d)")
    t0 = time.perf_counter()
    for i in range(100):
        index.upsert([f"i{i}"], vecs[i + 1 : i + 2])
    print(f"replace one item           {(time.perf_counter() - t0) * 10:8.2f} ms each")
    exclude_one = [{f"i{j}" for j in range(20)}]
    for batch in (1, 256):
        queries = rng.standard_normal((batch, dim)).astype(np.float32)
        exclude = exclude_one * batch
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < repeat_s:
            index.search(queries, k=k, exclude=exclude)
            done += batch
        qps = done / (time.perf_counter() - t0)
        print(f"search, batch {batch:<4d}        {qps:8.0f} queries/s  (k={k}, 20 exclusions each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    vecs = bench_embed(args.texts, args.batch_size)
    bench_search(args.items, vecs.shape[1], args.k)


if __name__ == "__main__":
    main()
