"""Garbage-collector pauses inside the engine, and the per-batch time they cause.

    .venv/bin/python benchmarks/gc_pauses.py [--batch 50] [--events 60000] [--no-freeze] [--search-share 0.2]

Small batches (``--batch 50``: what a poll returns at ~1,000 events/s) through Shard.process,
with a ``gc.callbacks`` hook timing every collection per generation. Prints the batch time
percentiles, the worst pause per generation and how many objects the collector tracks, then
the cost of one full pass over what the engine keeps at the end (the median of three
``gc.collect()``, and the references such a pass visits: what grows with the state the
engine keeps between batches). ``--no-freeze`` skips :func:`dataflows.live.settle_heap` (what
``recsys run`` does after start-up) to show what it saves. ``--search-share S``: that share
of the events are searches (``recsys.synthetic.with_searches``, as ``throughput.py
--search-share``), the query model loaded before the heap is settled, as ``recsys run`` does.
Synthetic data (load test only); asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# this tree's code, whatever an editable install in the environment points at (a git worktree
# sharing another checkout's .venv would otherwise import and measure that checkout's code)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataflows.live import settle_heap  # noqa: E402
from recsys.events import Envelope, encode  # noqa: E402
from recsys.items.embeddings import Embedder  # noqa: E402
from recsys.settings import Settings  # noqa: E402
from recsys.shard.step import Shard  # noqa: E402
from recsys.synthetic import generate_catalog, generate_events, with_searches  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--events", type=int, default=60_000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--no-freeze", action="store_true")
    p.add_argument("--search-share", type=float, default=0.0, help="share of the events that are searches")
    p.add_argument("--embed-cache-dir", default="var/embeddings")
    args = p.parse_args()
    print(f"load average: {os.getloadavg()}")
    catalog = generate_catalog(args.items, seed=0)
    Embedder("all-MiniLM-L6-v2", args.embed_cache_dir).embed([c.text for c in catalog], progress=True)
    # encoded payloads only: the benchmark's own event objects would otherwise be scanned too
    events = generate_events(args.events, catalog, n_users=args.users, seed=1)
    if args.search_share:
        events = with_searches(events, catalog, args.search_share, seed=1)
    envs = [Envelope("events", 0, i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(events)]
    del events
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def timer(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started[0])

    with tempfile.TemporaryDirectory() as tmp:
        engine = Shard.open(Settings(state_dir=tmp, embed_cache_dir=args.embed_cache_dir))
        engine.upsert_catalog(catalog)
        if args.search_share:
            engine.search.warm_up()
        if not args.no_freeze:
            settle_heap()
        gc.callbacks.append(timer)
        took = []
        for i in range(0, len(envs), args.batch):
            t = time.perf_counter()
            engine.process(envs[i : i + args.batch])
            took.append(time.perf_counter() - t)
        gc.callbacks.remove(timer)
        ms = np.array(took[len(took) // 3 :]) * 1000  # the last two thirds: state has built up
        print(f"freeze {'off' if args.no_freeze else 'on'}, batches of {args.batch}: Shard.process "
              f"p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms, max {ms.max():.1f} ms")
        for generation, times in pauses.items():
            if times:
                print(f"  gc generation {generation}: {len(times)} collections, worst {max(times) * 1000:.1f} ms, "
                      f"total {sum(times):.2f} s")
        tracked = gc.get_objects()
        visits = sum(len(gc.get_referents(o)) for o in tracked)
        print(f"  objects tracked by the collector at the end: {len(tracked):,}, holding {visits:,} references")
        del tracked
        full = []
        for _ in range(3):
            t = time.perf_counter()
            gc.collect()
            full.append(time.perf_counter() - t)
        print(f"  one full pass at the end: {np.median(full) * 1000:.1f} ms (median of 3)")
        engine.close()


if __name__ == "__main__":
    main()
