"""Co-visitation and transitions alone on the engine benchmark's workload: what their plateau costs.

Issue 12: the engine slows as state grows, and co-visitation is one of the parts that grow (its
lists fill to ``covisit_neighbours``, after which nearly every new pair overflows a list). This
replays the workload of ``engine_speed.py`` (10k items, 20k users, batches of 1,000) through a
``CoVisitation`` and a directed one as the engine builds them, and per batch does what the
engine does with them: ``update`` per event (with the user's history before it), ``ranked`` for
each batch user's most recent distinct items (3 co-visitation anchors, 2 transition anchors, as
``Recommender._add_neighbours`` reads them) and ``export_dirty`` (the lists the batch's atomic
write carries). Prints CPU-microseconds per event for each of the three per window, and a sha256
of everything read and of every change to the stored lists (decoded, so trees that store
another record format compare), so a change to ``recsys/signals/covisitation.py`` can be
checked for the same answers and the same stored bytes (compare the digests of two trees)::

    .venv/bin/python benchmarks/covisit_speed.py --events 200000
    PYTHONPATH=<other tree> .venv/bin/python benchmarks/covisit_speed.py --events 200000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import numpy as np
import orjson

import recsys
from recsys.ranking.recommender import _recent_distinct
from recsys.settings import Settings
from recsys.signals.covisitation import CoVisitation
from recsys.synthetic import generate_catalog, generate_events


def decode_list(value: bytes) -> list[tuple[str, float, int]]:
    """A stored list as ``[(neighbour, weight, count), ...]`` in stored order, from any record
    format (as ``recsys.signals.covisitation.decode_record``, repeated here so that the digest
    compares trees that wrote different formats; ``output_digest.py`` uses it too). Binary
    records are read by the tree's own decoder: only trees that have it write them."""
    if value[:1] == b"\x01":
        from recsys.signals.covisitation import decode_record

        return decode_record(value)
    rows = orjson.loads(value)
    if isinstance(rows, dict):
        return list(zip(rows["n"], map(float, rows["w"]), rows["c"]))
    if rows and isinstance(rows[0], dict):
        return [(y, float(w), rows[1][y]) for y, w in rows[0].items()]
    return [(y, float(w), c) for y, w, c in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--windows", type=int, default=20_000, help="print the costs for every N events")
    args = p.parse_args()
    print(f"load average: {os.getloadavg()}; recsys from {os.path.dirname(recsys.__file__)}")
    settings = Settings()
    catalog = generate_catalog(args.items, seed=0)
    events = generate_events(args.events, catalog, n_users=args.users, seed=1)
    # built as recsys/shard/step.py builds them
    cov = CoVisitation(half_life_h=settings.covisit_half_life_h, max_neighbours=settings.covisit_neighbours, window=5)
    nxt = CoVisitation(half_life_h=settings.covisit_half_life_h, max_neighbours=settings.covisit_neighbours,
                       window=1, directed=True)
    histories: dict[str, list] = {}
    digest = hashlib.sha256()
    stored: dict[bytes, list] = {}  # the lists as the store would hold them
    spent = np.zeros(3)  # update, ranked, export: CPU seconds
    window_start, window_events = spent.copy(), 0
    for lo in range(0, len(events), args.batch):
        batch = events[lo:lo + args.batch]
        t0 = time.process_time()
        for e in batch:
            history = histories.setdefault(e.user_id, [])
            cov.update(history, e.item_id, e.type, e.ts)
            nxt.update(history, e.item_id, e.type, e.ts)
            history.append((e.item_id, e.type, e.ts))
            del history[:-settings.history_len]
        t1 = time.process_time()
        read = []
        for user in dict.fromkeys(e.user_id for e in batch):
            recent = [item_id for item_id, _ in _recent_distinct(histories[user], 3)]  # the ranker's anchors
            read += [cov.ranked(a) for a in recent] + [nxt.ranked(a) for a in recent[:2]]
        t2 = time.process_time()
        exported = {**cov.export_dirty(), **nxt.export_dirty()}
        t3 = time.process_time()
        spent += (t1 - t0, t2 - t1, t3 - t2)
        for names, weights, counts in read:  # outside the timed parts
            digest.update("|".join(names).encode() + np.asarray(weights, dtype=np.float64).tobytes() + repr(counts).encode())
        for key in sorted(exported):  # what the batch changed in the store (a rewrite of the same list is none)
            held = decode_list(exported[key])
            if stored.get(key) != held:
                stored[key] = held
                digest.update(key + b"=" + repr(held).encode())
        done = lo + len(batch)
        if done % args.windows == 0 or done == len(events):
            n = done - window_events
            window_events = done
            us = (spent - window_start) * 1e6 / n
            print(f"events {done - n:>7,}-{done:>7,}: update {us[0]:6.1f}, ranked {us[1]:6.1f}, export {us[2]:6.1f}, "
                  f"together {us.sum():6.1f} CPU-us/event", flush=True)
            window_start = spent.copy()
    lists = cov.lists() if hasattr(cov, "lists") else {i: (w, None) for i, w in cov._nbrs.items()}  # arrays / dicts
    sizes = [len(weights) for weights, _ in lists.values()]
    print(f"whole run: update {spent[0]:.2f} s, ranked {spent[1]:.2f} s, export {spent[2]:.2f} s (CPU); "
          f"co-visitation lists {len(sizes)}, mean length {np.mean(sizes):.1f}")
    print(f"digest {digest.hexdigest()}")


if __name__ == "__main__":
    main()
