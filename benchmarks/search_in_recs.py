"""Does a recent search help the next recommendations? (issue 13, ``RECSYS_SEARCH_IN_HISTORY``)

    .venv/bin/python benchmarks/search_in_recs.py --format rees46 --events ../shared/data/rees46/2019-Oct_head17k.csv --search-targets purchase,add_to_cart
    .venv/bin/python benchmarks/search_in_recs.py --format completejourney --limit 100000 --search-sample 0.03

The log gets the search backtest's derived searches (``recsys/search/replay.py``: a search
1 ms before each sampled purchase / add to cart whose query is the item's category path; Ai et
al. 2017: **derived queries favour category matching**, and here they are built from the very
item bought next, so the "after a search" slice is an upper bound of what real queries give).
Two full systems, identical but for ``search_in_history``, learn the same stream in the same
user-disjoint chunks (prequential: each chunk's events are scored against what each system
would have shown the user right before, then learned). Prints HR@10, NDCG@10 and MRR@10 over
every event with an item, and over the events inside an open search window (the events the
setting can change).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

from recsys.backtest.metrics import hr_at_k, mrr_at_k, ndcg_at_k
from recsys.backtest.system import FullSystem
from recsys.datasets import load_dataset
from recsys.search.replay import category_queries, completejourney_queries, derive_searches
from recsys.settings import Settings
from recsys.shard.batching import user_disjoint_chunks
from recsys.shard.step import Shard

K = 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", required=True)
    p.add_argument("--events", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--search-targets", default="purchase")
    p.add_argument("--search-sample", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--embed-cache-dir", default="var/embeddings")
    p.add_argument("--variants", default="lead,interleave", help="how the search's items enter the list (recsys/search/intent.py)")
    args = p.parse_args()
    print(f"load average: {os.getloadavg()}", flush=True)
    ds = load_dataset(args.format, args.events, None, limit=args.limit)
    queries = completejourney_queries(args.events, ds.catalog) if ds.name == "completejourney" else category_queries(ds.catalog)
    types = tuple(t.strip() for t in args.search_targets.split(","))
    events, targets = derive_searches(ds.events, queries, types=types, sample=args.search_sample)
    print(f"{ds.name}: {len(ds.events)} events, {len(targets)} derived searches", flush=True)

    base = Settings.from_env(os.environ).replace(unknown_items="admit", state_ttl_days=36_500.0, recovery_dir=None,
                                                 embed_cache_dir=args.embed_cache_dir)
    systems = {}
    for variant in ("off", *args.variants.split(",")):
        engine = Shard.open(base.replace(search_in_history=variant != "off"), in_memory=True, emit=False)
        if variant != "off":
            engine.recommender.mode = variant
        engine.upsert_catalog(ds.catalog)
        systems[variant] = FullSystem(engine, batch_size=args.batch_size)
    sums = {on: {s: Counter() for s in ("all", "after a search")} for on in systems}
    start = time.perf_counter()
    for chunk in user_disjoint_chunks(events, args.batch_size):
        scored = [ev for ev in chunk if ev.item_id is not None]
        if scored:
            users = list(dict.fromkeys(ev.user_id for ev in scored))
            windows = systems["off"].engine.search.windows  # the same in all (same events)
            after = {u for u in users if windows.open_window(u, scored[0].ts) is not None}
            for on, model in systems.items():
                lists = dict(zip(users, model.recommend(users, K, chunk[0].ts)))
                for ev in scored:
                    items, target = lists[ev.user_id], {ev.item_id}
                    for s in ("all", "after a search") if ev.user_id in after else ("all",):
                        acc = sums[on][s]
                        acc["n"] += 1
                        acc["hr"] += hr_at_k(items, target, K)
                        acc["ndcg"] += ndcg_at_k(items, target, K)
                        acc["mrr"] += mrr_at_k(items, target, K)
        for model in systems.values():
            model.learn(chunk)
    seconds = time.perf_counter() - start
    print(f"\n{ds.name} prequential, derived searches ({len(targets)}; they favour category matching), "
          f"{seconds:.0f} s\n")
    print(f"| events scored | search_in_history | HR@{K} | NDCG@{K} | MRR@{K} |\n|---|---|---:|---:|---:|")
    for s in ("all", "after a search"):
        for on in systems:
            acc = sums[on][s]
            n = max(acc["n"], 1)
            print(f"| {s} ({acc['n']}) | {on} | {acc['hr'] / n:.4f} | {acc['ndcg'] / n:.4f} | "
                  f"{acc['mrr'] / n:.4f} |")
    for model in systems.values():
        model.engine.close()


if __name__ == "__main__":
    main()
