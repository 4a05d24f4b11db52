"""Shard.process alone (no Kafka): events/s and where the time goes, for the benchmark workload.

    .venv/bin/python benchmarks/engine_speed.py [--items 10000] [--users 20000] [--events 40000]
        [--batch 1000] [--windows 20000] [--settle-heap] [--no-head] [--set NAME=VALUE ...]
        [--profile [--profile-from N] [--profile-out FILE]] [--phases]

Synthetic data (load test only). Prints events/s, µs/event, and with --profile the top functions.
Wall-clock rates on a shared machine are noisy, so every figure is also given per second of
this process's CPU time (``time.process_time``: both user and system time of all its threads),
which other processes on the machine barely move. ``--windows N`` prints both rates for every N
events, from the first event (the first window includes the warm-up batches), to show whether
the engine slows as its global state fills. ``--settle-heap`` freezes start-up objects out of
the garbage collector's view once the catalog is loaded, as ``recsys run`` and ``recsys replay``
do (``dataflows.live.settle_heap``); without it, full collections rescan torch, the model and
the benchmark's own event list, and that cost lands on whatever line allocates.
``--phases`` (with ``--windows``) also prints, per window, the CPU-µs per event of each phase
of the step and of the ranking's parts (nested: a part's time is inside its phase's). It times
a dozen calls per batch, so unlike ``--profile`` it barely changes the rates: it shows which
part grows as state fills.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

# this tree's code, whatever an editable install in the environment points at (a git worktree
# sharing another checkout's .venv would otherwise import and measure that checkout's code)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.events import Envelope, encode  # noqa: E402
from recsys.items.embeddings import Embedder  # noqa: E402
from recsys.settings import Settings  # noqa: E402
from recsys.shard.step import _OUTBOX_PREFIX, Shard  # noqa: E402
from recsys.synthetic import generate_catalog, generate_events, generate_visits  # noqa: E402

#: ``--phases``: (label, object path from the engine, method); parts of a phase are indented.
#: "ranker" is the :class:`recsys.ranking.recommender.Recommender` (unwrapped from search intent).
PHASES = (
    ("decode", "", "_decode"),
    ("admit", "", "_admit"),
    ("load users", "users", "get_many"),
    ("load outboxes", "", "_load_outboxes"),
    ("search", "search", "step"),
    ("apply", "", "_apply"),
    ("  re-ranker learns", "", "_learn_from_shown"),
    ("learn head", "", "_learn_head"),
    ("rank and emit", "", "_rank_and_emit"),
    ("  rank", "ranker", "rank"),
    ("    head queries", "ranker", "_queries"),
    ("    faiss search", "items.index", "search_rows"),
    ("    neighbours", "ranker", "_add_neighbours"),
    ("    session votes", "ranker", "_add_session_votes"),
    ("    buy again", "ranker", "_add_buy_again"),
    ("    context features", "ranker", "_context_features"),
    ("    reasons", "ranker", "_reasons_for"),
    ("commit", "", "_commit"),
    ("  co-visitation export", "covisit", "export_dirty"),
    ("  transitions export", "transitions", "export_dirty"),
    ("  sessions export", "sessions", "export_dirty"),
    ("  store write", "kv", "write"),
)


def describe_histories(events, window: int, cap: int = 50) -> str:
    """Per window of ``window`` events: the share that is its shopper's first event, and the
    mean number of earlier events of the same shopper (at most ``cap``, the history kept): how
    much each shopper had done, which the cost of ranking for them grows with."""
    seen: dict[str, int] = {}
    parts = []
    for lo in range(0, len(events), window):
        first = done = 0
        for e in events[lo : lo + window]:
            n = seen.get(e.user_id, 0)
            first += n == 0
            done += min(n, cap)
            seen[e.user_id] = n + 1
        size = len(events[lo : lo + window])
        parts.append(f"{first / size:.0%} first / {done / size:.1f}")
    return f"per window, events that are their shopper's first / mean earlier events of the shopper: {', '.join(parts)}"


def time_phases(engine: Shard) -> dict[str, float]:
    """Wrap the methods in :data:`PHASES` on their instances so that each adds its CPU seconds
    to the returned dict (read and reset it per window); also the bytes each batch writes to the
    store (keys and values put), all and the outboxes' (``written``, ``outboxes written``)."""
    spent = dict.fromkeys((label for label, _, _ in PHASES), 0.0)
    spent.update({"written": 0.0, "outboxes written": 0.0})
    for label, path, name in PHASES:
        owner = engine
        for attr in filter(None, path.split(".")):
            # the ranker: the recommender itself, inside its search-intent wrapper when there is one
            owner = getattr(engine.recommender, "_inner", engine.recommender) if attr == "ranker" else getattr(owner, attr)
        method = getattr(owner, name)

        def timed(*a, _method=method, _label=label, **kw):
            t0 = time.process_time()
            try:
                return _method(*a, **kw)
            finally:
                spent[_label] += time.process_time() - t0

        setattr(owner, name, timed)
    write = engine.kv.write  # counted outside the timed call

    def counted(puts, deletes=()):  # noqa: ANN001, ANN202
        spent["written"] += sum(len(k) + len(v) for k, v in puts.items())
        spent["outboxes written"] += sum(len(k) + len(v) for k, v in puts.items() if k.startswith(_OUTBOX_PREFIX))
        return write(puts, deletes)

    engine.kv.write = counted
    return spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--workload", choices=("returning", "visits"), default="returning",
                   help="returning (default, issue 12's): --users shoppers come back all through the stream, so "
                        "histories grow from the first event to the last; visits: --active-users shoppers on the "
                        "site at a time, each for a visit of --mean-visit events, so what an event's shopper has "
                        "done is the same in every window and only the global state grows")
    p.add_argument("--active-users", type=int, default=2_000, help="--workload visits")
    p.add_argument("--mean-visit", type=float, default=10.0, help="--workload visits: mean events per visit")
    p.add_argument("--events", type=int, default=40_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--no-head", action="store_true")
    p.add_argument("--windows", type=int, default=0, help="also print the rates for every N events")
    p.add_argument("--settle-heap", action="store_true", help="gc.freeze() after start-up, as recsys run does")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-from", type=int, default=0,
                   help="with --profile: start profiling at this event (to see what a late window pays for)")
    p.add_argument("--profile-out", default="", help="with --profile: also write the pstats file here")
    p.add_argument("--phases", action="store_true",
                   help="with --windows: CPU-µs per event of each phase of the step, per window")
    p.add_argument("--embed-cache-dir", default="var/embeddings")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for the engine (e.g. session_query_items=10), validated as RECSYS_NAME would be")
    args = p.parse_args()
    if args.events <= args.batch * 5:  # the first five batches warm up and are not timed
        p.error(f"--events {args.events} leaves nothing to time after the warm-up of 5 batches of {args.batch}: "
                f"give more than {args.batch * 5}")
    overrides = dict(item.split("=", 1) for item in args.set)
    print(f"load average: {os.getloadavg()}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or '(unset)'} "
          "(README, Operating it: the memory allocator)")
    print(f"code: {ROOT}")
    catalog = generate_catalog(args.items, seed=0)
    Embedder("all-MiniLM-L6-v2", args.embed_cache_dir).embed([c.text for c in catalog], progress=True)
    if args.workload == "visits":
        events = generate_visits(args.events, catalog, active_users=args.active_users, mean_visit=args.mean_visit, seed=1)
    else:
        events = generate_events(args.events, catalog, n_users=args.users, seed=1)
    print(f"workload: {args.workload}; {describe_histories(events, args.windows or len(events))}")
    envs = [Envelope("events", 0, i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(events)]
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env({Settings.env_var(name): value for name, value in overrides.items()},
                                     state_dir=tmp, embed_cache_dir=args.embed_cache_dir, head_enabled=not args.no_head)
        if overrides:
            print(f"settings: {overrides}")
        engine = Shard.open(settings)
        engine.upsert_catalog(catalog)
        if args.settle_heap:
            from dataflows.live import settle_heap

            settle_heap()
        spent = time_phases(engine) if args.phases else {}
        phase_rows: list[dict[str, float]] = []
        warm = args.batch * 5
        window_start = (time.perf_counter(), time.process_time(), 0)
        windows = []

        def window(done: int) -> None:
            nonlocal window_start
            wall0, cpu0, n0 = window_start
            wall, cpu = time.perf_counter(), time.process_time()
            windows.append((n0, done, done - n0, wall - wall0, cpu - cpu0))
            print(f"  events {n0:>7,}-{done:>7,}: {(done - n0) / (wall - wall0):>7,.0f} events/s wall, "
                  f"{(done - n0) / max(cpu - cpu0, 1e-9):>7,.0f} events/CPU-s, load {os.getloadavg()[0]:.1f}", flush=True)
            window_start = (wall, cpu, done)
            if spent:
                phase_rows.append({label: t / (done - n0) * 1e6 for label, t in spent.items()})
                spent.update(dict.fromkeys(spent, 0.0))

        for i in range(0, warm, args.batch):
            engine.process(envs[i : i + args.batch])
            if args.windows and (i + args.batch) % args.windows == 0:
                window(i + args.batch)
        profiler = cProfile.Profile(time.process_time) if args.profile else None  # CPU clock: shares exclude waiting
        profiling = False
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(warm, len(envs), args.batch):
            if profiler and i >= args.profile_from and not profiling:
                profiler.enable()
                profiling = True
            engine.process(envs[i : i + args.batch])
            done = min(i + args.batch, len(envs))
            if args.windows and (done % args.windows == 0 or done == len(envs)):
                window(done)
        if profiler:
            profiler.disable()
        took, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        n = len(envs) - warm
        shoppers = args.users if args.workload == "returning" else f"{args.active_users} active"
        print(f"engine: {n / took:,.0f} events/s ({took / n * 1e6:.0f} µs/event) wall, "
              f"{n / cpu:,.0f} events/CPU-s ({cpu / n * 1e6:.0f} CPU-µs/event), batch {args.batch}, "
              f"{args.items} items, {shoppers} users, head {'off' if args.no_head else 'on'}; totals {dict(engine.totals)}")
        if len(windows) >= 2:
            first, last = windows[0], windows[-1]
            print(f"last window / first window: {last[2] / last[3] / (first[2] / first[3]):.2f} wall, "
                  f"{last[2] / last[4] / (first[2] / first[4]):.2f} CPU")
        if phase_rows:
            print("CPU-µs per event by phase, per window (parts indented, inside their phase):")
            print(f"  {'':<22}" + "".join(f"{w[1] // 1000:>7}k" for w in windows))
            for label, _, _ in PHASES:
                print(f"  {label:<22}" + "".join(f"{row[label]:>8.0f}" for row in phase_rows))
            print(f"  {'whole step (CPU)':<22}" + "".join(f"{w[4] / w[2] * 1e6:>8.0f}" for w in windows))
            print("bytes written to the store per event (keys and values put), per window:")
            for label in ("written", "outboxes written"):
                print(f"  {label:<22}" + "".join(f"{row[label] / 1e6:>8.0f}" for row in phase_rows))
        print(f"load average: {os.getloadavg()}")
        engine.close()
    if profiler:
        if args.profile_out:
            profiler.dump_stats(args.profile_out)
        pstats.Stats(profiler).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "20")))


if __name__ == "__main__":
    main()
