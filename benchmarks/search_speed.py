"""Search cost per event (no Kafka): query encoding (cache miss / hit), BM25 rebuild, and the
time ``Shard.process`` spends on a batch that holds one search.

    .venv/bin/python benchmarks/search_speed.py [--items 10000] [--users 2000] [--searches 300]

Synthetic catalog and shoppers (load test only); queries are drawn from the catalog's words
(half of them repeated, so the query-vector cache is exercised). Prints milliseconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from recsys.events import Envelope, Event, encode
from recsys.items.embeddings import Embedder
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.synthetic import generate_catalog, generate_events


def _pct(xs: list[float]) -> str:
    a = np.array(xs) * 1000
    return f"p50 {np.percentile(a, 50):.2f} ms, p99 {np.percentile(a, 99):.2f} ms, mean {a.mean():.2f} ms (n={len(a)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--users", type=int, default=2_000)
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--searches", type=int, default=300)
    p.add_argument("--embed-cache-dir", default="var/embeddings")
    args = p.parse_args()
    print(f"load average: {os.getloadavg()}")
    catalog = generate_catalog(args.items, seed=0)
    Embedder("all-MiniLM-L6-v2", args.embed_cache_dir).embed([c.text for c in catalog], progress=True)
    history = generate_events(args.events, catalog, n_users=args.users, seed=1)
    rng = np.random.default_rng(2)
    words = sorted({w for c in catalog[:500] for w in c.title.lower().split()})
    fresh = [" ".join(rng.choice(words, size=2, replace=False)) + f" {i}" for i in range(args.searches // 2)]
    queries = [q for pair in zip(fresh, fresh) for q in pair]  # each query twice: a miss, then a hit
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(state_dir=tmp, embed_cache_dir=args.embed_cache_dir, recovery_dir=None)
        engine = Shard.open(settings)
        start = time.perf_counter()
        engine.upsert_catalog(catalog)
        engine.search.lexical.rebuild_interval_s = 0.0
        engine.search.rank("warm up", None, 0)
        print(f"catalog of {len(catalog)} items: BM25 built in {engine.search.lexical.last_rebuild_s * 1000:.0f} ms "
              f"({engine.search.lexical.last_rebuild_s / len(catalog) * 1e6:.1f} µs/item); upsert total "
              f"{time.perf_counter() - start:.1f} s")
        offset = 0
        for i in range(0, len(history), 1000):
            envs = [Envelope("events", 0, offset + j, e.user_id.encode(), encode(e), e.ts) for j, e in enumerate(history[i:i + 1000])]
            offset += len(envs)
            engine.process(envs)
        users = sorted({e.user_id for e in history})
        ts = history[-1].ts
        steps, misses, hits = [], [], []
        for n, q in enumerate(queries):
            ts += 1000
            ev = Event(f"s{n}", "search", users[n % len(users)], None, ts, query=q)
            env = Envelope("events", 0, offset, ev.user_id.encode(), encode(ev), ts)
            offset += 1
            before = engine.search.encoder.stats["misses"]
            t0 = time.perf_counter()
            result = engine.process([env])
            dt = time.perf_counter() - t0
            assert len(result.search_results) == 1
            steps.append(dt)
            (misses if engine.search.encoder.stats["misses"] > before else hits).append(dt)
        enc = engine.search.encoder.stats
        print(f"query encoding (MiniLM, cache miss): {1000 * enc['encode_s'] / max(enc['misses'], 1):.2f} ms/query "
              f"over {enc['misses']} distinct queries")
        print(f"Shard.process, batch = one search event: {_pct(steps)}")
        print(f"  new query (encoded):        {_pct(misses)}")
        print(f"  repeated query (LRU cache): {_pct(hits)}")
        engine.close()


if __name__ == "__main__":
    main()
