"""Search cost per event (no Kafka): query encoding (cache miss / hit), BM25 rebuild, and the
time ``Shard.process`` spends on a batch that holds one search; with ``--search-share``, the
live benchmark's mixed workload through ``Shard.process``.

    .venv/bin/python benchmarks/search_speed.py [--items 10000] [--users 2000] [--searches 300]
    .venv/bin/python benchmarks/search_speed.py --search-share 0.2 [--users 20000] [--warm-events 40000]
        [--mixed-events 20000] [--min-batch 20] [--max-batch 100] [--profile [--profile-out FILE]] [--skip-recs-only] [--warm-up]
        [--results-out FILE] [--distinct-queries N [--zipf-s 1.0]] [--new-items N] [--price-changes N]

Synthetic catalog and shoppers (load test only). Without ``--search-share``: queries drawn
from the catalog's words (half of them repeated, so the query-vector cache is exercised);
prints milliseconds.

``--search-share S`` (issue 13's mixed workload): the engine is warmed with ``--warm-events``
events, then fed ``--mixed-events`` more in batches of random size between ``--min-batch``
and ``--max-batch`` (what the live flow sees at 1,000 events/s), once as they are
(recommendations only) and once with a share ``S`` of them turned into searches the way
``benchmarks/throughput.py --search-share`` does (``recsys.synthetic.with_searches``), each
run on a fresh engine warmed the same way. Prints events/s (wall and per CPU-second) of both
runs, and for the mixed run the CPU per event outside ``Search.step`` and the CPU inside it per
search (in all, in the batches whose queries were all cached: the steady state, and without the
CPU of the query model's calls), the query candidates cache's hits, misses and size, the wall
time of the first batch with a search and of the slowest batch, and a digest of the search results (items in order and their
reasons: equal digests mean the same answers, e.g. across two trees; ``--results-out``
writes the answers, emission time left out, to compare two trees' scores). ``--profile``:
cProfile of the mixed run, the search path's functions by cumulative time. ``--warm-up``:
load the query model and build BM25 before the measured events (``Search.warm_up``), as a
live flow can at start-up; without it the first search pays both. ``--distinct-queries N``:
the searches' queries drawn from ``N`` distinct ones by a Zipf law (``--zipf-s``), see
``recsys.synthetic.with_searches``: without it the stream has only 144 distinct queries, so
any per-query cache looks perfect. ``--new-items N`` / ``--price-changes N``: that many new
catalog items / price changes of existing items, spread evenly over each run (the live
benchmark's ``--new-items`` sends 20 over its 20k events), so the cost of catalog churn to the
query candidates cache shows.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import hashlib
import os
import pstats
import tempfile
import time

import numpy as np
import orjson

from recsys.events import CatalogItem, Envelope, Event, encode
from recsys.items.embeddings import Embedder
from recsys.search.lexical import LexicalIndex
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.synthetic import generate_catalog, generate_events, with_searches


def _pct(xs: list[float]) -> str:
    a = np.array(xs) * 1000
    return f"p50 {np.percentile(a, 50):.2f} ms, p99 {np.percentile(a, 99):.2f} ms, mean {a.mean():.2f} ms (n={len(a)})"


def _nbytes(obj, _seen=None) -> int:
    """Rough memory held by ``obj``: containers, arrays and dataclasses followed; strings and
    catalog items are counted as references only (the catalog holds them anyway)."""
    import dataclasses
    import sys

    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes + 112
    if isinstance(obj, (str, bytes)) or type(obj).__name__ == "CatalogItem":
        return 0
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(_nbytes(k, seen) + _nbytes(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        size += sum(_nbytes(v, seen) for v in obj)
    elif dataclasses.is_dataclass(obj):
        size += sum(_nbytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return size


def _envelopes(events, first_offset: int = 0) -> list[Envelope]:
    return [Envelope("events", 0, first_offset + i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(events)]


def _engine(tmp: str, args, catalog, warm: list[Envelope]) -> Shard:
    settings = Settings(state_dir=tmp, embed_cache_dir=args.embed_cache_dir, recovery_dir=None)
    engine = Shard.open(settings)
    engine.upsert_catalog(catalog)
    for i in range(0, len(warm), 1000):
        engine.process(warm[i:i + 1000])
    return engine


def _catalog_changes(catalog: list[CatalogItem], new_items: int, price_changes: int, n_batches: int,
                     ) -> dict[int, list[Envelope]]:
    """``--new-items`` / ``--price-changes``: catalog records spread evenly over the mixed run's
    batches (batch index -> records, processed at the start of that batch as the live flow
    does). New items read like the catalog's (an existing item's title, brand and category,
    with a word of their own); their texts are fixed, so the embedding cache holds them after
    the first run. Price changes move an existing item's price by 10%."""
    changes: list[CatalogItem] = []
    for j in range(new_items):
        like = catalog[(j * 7919) % len(catalog)]
        changes.append(CatalogItem(f"new-item-{j}", title=f"{like.title} edition {j}", brand=like.brand,
                                   category=like.category, price=like.price))
    for j in range(price_changes):
        item = catalog[(j * 104729 + 13) % len(catalog)]
        changes.append(dataclasses.replace(item, price=round((item.price or 10.0) * 1.1, 2)))
    order = np.random.default_rng(4).permutation(len(changes)).tolist()
    out: dict[int, list[Envelope]] = {}
    for k, j in enumerate(order):
        item = changes[j]
        batch = (k + 1) * n_batches // (len(changes) + 1)
        out.setdefault(batch, []).append(Envelope("catalog", 0, k, item.item_id.encode(), encode(item), 0))
    return out


def _run(engine: Shard, envs: list[Envelope], sizes: list[int], profiler: cProfile.Profile | None,
         results_out: list | None = None, catalog_at: dict[int, list[Envelope]] | None = None) -> dict:
    """Feed ``envs`` in batches of ``sizes`` (``catalog_at[b]`` first in batch ``b``): wall and
    CPU seconds in all, and per batch the time ``Shard.process`` and ``Search.step`` took, its
    searches and whether it encoded a query."""
    inner = engine.search.step
    in_step = [0.0, 0.0]

    def timed_step(*a, **kw):
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            return inner(*a, **kw)
        finally:
            in_step[0] += time.perf_counter() - w0
            in_step[1] += time.process_time() - c0

    engine.search.step = timed_step
    embed, in_model = engine.search.encoder._embed, [0.0]

    def timed_embed(texts):  # the query model's CPU (all its threads), inside Search.step
        c0 = time.process_time()
        try:
            return embed(texts)
        finally:
            in_model[0] += time.process_time() - c0

    engine.search.encoder._embed = timed_embed
    stats = engine.search.encoder.stats
    digest, n_results, i = hashlib.sha256(), 0, 0
    batches = []  # (process wall, Search.step CPU, searches answered, encoded a query)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    for b, size in enumerate(sizes):
        misses, step_cpu, b0 = stats["misses"], in_step[1], time.perf_counter()
        result = engine.process([*(catalog_at or {}).get(b, ()), *envs[i:i + size]])
        batches.append((time.perf_counter() - b0, in_step[1] - step_cpu, len(result.search_results),
                        stats["misses"] > misses))
        i += size
        for _user, payload in result.search_results:
            rec = orjson.loads(payload)
            digest.update(orjson.dumps([rec["user_id"], rec["query"], rec["no_match"], rec["trigger_event_id"],
                                        [[it["item_id"], it["reason"]] for it in rec["items"]]]))
            if results_out is not None:
                rec.pop("emitted_at")
                results_out.append(rec)
            n_results += 1
    if profiler is not None:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    engine.search.step = inner
    engine.search.encoder._embed = embed
    return {"wall": wall, "cpu": cpu, "step_wall": in_step[0], "step_cpu": in_step[1], "model_cpu": in_model[0],
            "results": n_results,
            "digest": digest.hexdigest()[:16], "batches": batches}


def mixed(args) -> None:
    """The mixed workload (see the module): recommendations only, then with searches."""
    print(f"load average: {os.getloadavg()}")
    catalog = generate_catalog(args.items, seed=0)
    Embedder("all-MiniLM-L6-v2", args.embed_cache_dir).embed([c.text for c in catalog], progress=True)
    events = generate_events(args.warm_events + args.mixed_events, catalog, n_users=args.users, seed=1)
    warm, plain = _envelopes(events[:args.warm_events]), events[args.warm_events:]
    with_search = with_searches(plain, catalog, args.search_share, seed=2, distinct_queries=args.distinct_queries,
                                zipf_s=args.zipf_s)
    n_search = sum(e.type == "search" for e in with_search)
    queries = [e.query for e in with_search if e.type == "search"]
    print(f"queries: {len(set(queries))} distinct in {len(queries)} searches "
          f"({'the default stream' if args.distinct_queries is None else f'Zipf s={args.zipf_s} over {args.distinct_queries}'}); "
          f"{len(set(queries)) / max(len(queries), 1):.0%} of the searches are a query's first")
    n = len(plain)
    rng = np.random.default_rng(3)
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(args.min_batch, args.max_batch + 1)))
    print(f"{args.items} items, {args.users} users, warm-up {len(warm)} events, then {n} events in {len(sizes)} "
          f"batches of {args.min_batch}-{args.max_batch} (mean {n / len(sizes):.0f}); {n_search} searches "
          f"({n_search / n:.0%}) in the mixed run; {args.new_items} new items and {args.price_changes} price "
          f"changes spread over each run")
    catalog_at = _catalog_changes(catalog, args.new_items, args.price_changes, len(sizes))
    runs = {}
    plan = [("mixed", with_search)] if args.skip_recs_only else [("recs only", plain), ("mixed", with_search)]
    profiler = cProfile.Profile() if args.profile else None
    for name, stream in plan:
        with tempfile.TemporaryDirectory() as tmp:
            engine = _engine(tmp, args, catalog, warm)
            if args.warm_up:
                engine.search.warm_up()
            answers: list = []
            runs[name] = r = _run(engine, _envelopes(stream, len(warm)), sizes, profiler if name == "mixed" else None,
                                  answers if args.results_out and name == "mixed" else None, catalog_at)
            if answers:
                with open(args.results_out, "wb") as f:
                    f.writelines(orjson.dumps(rec) + b"\n" for rec in answers)
            enc = engine.search.encoder.stats
            r["encode_s"] = enc["encode_s"]
            base = getattr(engine.search, "base_stats", None)  # the candidates cache (absent in older trees)
            if base is not None and name == "mixed":
                kept = engine.search._base_cache
                refreshed = f", {base['refreshed']} refreshed after a catalog change" if "refreshed" in base else ""
                print(f"    query candidates cache: {base['hits']} hits{refreshed}, {base['misses']} misses, {len(kept)} kept "
                      f"(bound {engine.search.config.retrieval_cache}), ~{_nbytes(kept) / max(len(kept), 1) / 1e3:.0f} kB "
                      f"an entry")
            print(f"{name:>9}: {n / r['wall']:,.0f} events/s wall, {n / r['cpu']:,.0f} events/CPU-s "
                  f"({r['cpu'] / n * 1e3:.3f} CPU-ms/event); Search.step {r['step_cpu'] * 1e3:.0f} CPU-ms in all; "
                  f"{r['results']} search results, digest {r['digest']}; query vectors: {enc['misses']} encoded "
                  f"in {enc.get('calls', enc['misses'])} model calls, {enc['encode_s']:.2f} s in all (the first "
                  f"loads the model), {enc['hits']} from the cache; "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
            engine.close()
    m = runs["mixed"]
    cached = [(cpu, k) for _w, cpu, k, encoded in m["batches"] if k and not encoded]
    first = next(b for b in m["batches"] if b[2])
    print(f"Search.step per search: {m['step_cpu'] / max(n_search, 1) * 1e3:.2f} CPU-ms in all; "
          f"{sum(c for c, _ in cached) / max(sum(k for _, k in cached), 1) * 1e3:.2f} CPU-ms in the "
          f"{len(cached)} batches whose queries were all cached; "
          f"{(m['step_cpu'] - m['model_cpu']) / max(n_search, 1) * 1e3:.2f} CPU-ms without the query model's calls "
          f"({m['model_cpu']:.1f} CPU-s in them)")
    walls = np.array([b[0] for b in m["batches"]]) * 1e3
    print(f"Shard.process per batch: the first with a search {first[0] * 1e3:.0f} ms, max {walls.max():.0f} ms, "
          f"p99 {np.percentile(walls, 99):.0f} ms, median {np.median(walls):.1f} ms (wall)")
    rest = (m["cpu"] - m["step_cpu"]) / n
    print(f"mixed run, CPU per event: {rest * 1e3:.3f} ms outside Search.step (every event: decode, state, "
          f"signals, the recommendation), plus {m['step_cpu'] / max(n_search, 1) * 1e3:.3f} ms in Search.step "
          f"per search: a search costs {(rest + m['step_cpu'] / max(n_search, 1)) / rest:.1f}x another event")
    print(f"load average: {os.getloadavg()}")
    if profiler is not None:
        if args.profile_out:
            profiler.dump_stats(args.profile_out)
        stats = pstats.Stats(profiler).sort_stats("cumulative")
        stats.print_stats(r"recsys/search|recsys/items|faiss|sentence_transformers|bm25s|intent", int(os.environ.get("TOP", "40")))
        pstats.Stats(profiler).sort_stats("tottime").print_stats(int(os.environ.get("TOP", "25")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--users", type=int, default=None, help="default 2,000; 20,000 with --search-share")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--searches", type=int, default=300)
    p.add_argument("--embed-cache-dir", default=os.environ.get("RECSYS_EMBED_CACHE_DIR", "var/embeddings"))
    p.add_argument("--search-share", type=float, default=0.0,
                   help="run the mixed workload with this share of searches (issue 13: 0.2)")
    p.add_argument("--warm-events", type=int, default=40_000, help="--search-share: events before the measured ones")
    p.add_argument("--mixed-events", type=int, default=20_000, help="--search-share: events measured")
    p.add_argument("--min-batch", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=100)
    p.add_argument("--skip-recs-only", action="store_true", help="--search-share: only the mixed run")
    p.add_argument("--profile", action="store_true", help="--search-share: cProfile of the mixed run")
    p.add_argument("--warm-up", action="store_true",
                   help="--search-share: Search.warm_up() before the measured events (query model, BM25)")
    p.add_argument("--profile-out", default="", help="with --profile: also write the pstats file here")
    p.add_argument("--distinct-queries", type=int, default=None,
                   help="--search-share: draw the queries from this many distinct ones (Zipf) instead of the 144 default ones")
    p.add_argument("--zipf-s", type=float, default=1.0, help="with --distinct-queries: the Zipf exponent over query rank")
    p.add_argument("--new-items", type=int, default=0, help="--search-share: new catalog items spread over each run")
    p.add_argument("--price-changes", type=int, default=0,
                   help="--search-share: price changes of existing items spread over each run")
    p.add_argument("--results-out", default="", help="--search-share: write the mixed run's search results here (JSONL)")
    args = p.parse_args()
    if args.search_share:
        args.users = args.users or 20_000  # the live benchmark's users
        mixed(args)
        return
    args.users = args.users or 2_000
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
        engine.search.rank("warm up", None, 0)
        upsert_s = time.perf_counter() - start
        lexical = LexicalIndex()
        start = time.perf_counter()
        lexical.upsert(catalog)
        index_s = time.perf_counter() - start
        one = CatalogItem(catalog[0].item_id, catalog[0].title + " changed")
        start = time.perf_counter()
        lexical.upsert([one])
        print(f"catalog of {len(catalog)} items: BM25 index {index_s * 1000:.0f} ms from empty "
              f"({index_s / len(catalog) * 1e6:.1f} µs/item), then one changed item "
              f"{(time.perf_counter() - start) * 1e6:.0f} µs (in place); upsert total {upsert_s:.1f} s")
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
