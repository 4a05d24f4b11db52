"""Engine.process alone (no Kafka): events/s and where the time goes, for the benchmark workload.

    .venv/bin/python benchmarks/engine_speed.py [--items 10000] [--users 20000] [--events 40000]
        [--batch 1000] [--no-head] [--profile]

Synthetic data (load test only). Prints events/s, µs/event, and with --profile the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time

from recsys.embeddings import Embedder
from recsys.engine import Engine
from recsys.events import Envelope, encode
from recsys.settings import Settings
from recsys.synthetic import generate_catalog, generate_events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--events", type=int, default=40_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--no-head", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--embed-cache-dir", default="var/embeddings")
    args = p.parse_args()
    print(f"load average: {os.getloadavg()}")
    catalog = generate_catalog(args.items, seed=0)
    Embedder("all-MiniLM-L6-v2", args.embed_cache_dir).embed([c.text for c in catalog], progress=True)
    events = generate_events(args.events, catalog, n_users=args.users, seed=1)
    envs = [Envelope("events", 0, i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(events)]
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(state_dir=tmp, embed_cache_dir=args.embed_cache_dir, head_enabled=not args.no_head)
        engine = Engine.open(settings)
        engine.upsert_catalog(catalog)
        warm = args.batch * 5
        for i in range(0, warm, args.batch):
            engine.process(envs[i : i + args.batch])
        profiler = cProfile.Profile() if args.profile else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        for i in range(warm, len(envs), args.batch):
            engine.process(envs[i : i + args.batch])
        if profiler:
            profiler.disable()
        took = time.perf_counter() - start
        n = len(envs) - warm
        print(f"engine: {n / took:,.0f} events/s ({took / n * 1e6:.0f} µs/event), batch {args.batch}, "
              f"{args.items} items, {args.users} users, head {'off' if args.no_head else 'on'}; totals {dict(engine.totals)}")
        engine.close()
    if profiler:
        pstats.Stats(profiler).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "20")))


if __name__ == "__main__":
    main()
