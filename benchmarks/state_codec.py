"""Micro-benchmarks for user state and global signals; prints µs (or ms) per operation.

    .venv/bin/python benchmarks/state_codec.py

Measures: encode/decode of a user with a 50-item history and a 384-d interest vector
(target: round trip well under 50 µs), UserState.apply, Popularity.update/top over 100k items,
CoVisitation.update, and ``Popularity.top`` once per batch of a stream over 10k, 100k and 1M
items (from its pool, against every item decayed).
"""

from __future__ import annotations

import random
import timeit

import numpy as np

from recsys.events import Event
from recsys.signals.covisitation import CoVisitation
from recsys.signals.popularity import Popularity
from recsys.store.users import UserState, decode_user, encode_user


def per_op_us(fn, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e6


def main() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((1000, 384)).astype(np.float32)
    s = UserState("user-123456")
    types = ["browse", "click", "add_to_cart", "purchase"]
    for i in range(200):
        ev = Event(f"e{i}", types[i % 4], s.user_id, f"item-{i % 1000:06d}", 1_700_000_000_000 + i * 60_000, session_id="s1")
        s.apply(ev, vecs[i % 1000], 0, i, history_len=50, half_life_h=168)
    raw = encode_user(s)
    print(f"record: {len(raw)} bytes, history {len(s.history)}, purchased {len(s.purchased)}, dim {s.interest.shape[0]}")
    enc = per_op_us(lambda: encode_user(s), 20_000)
    dec = per_op_us(lambda: decode_user(raw), 20_000)
    print(f"encode_user          {enc:7.2f} µs/op")
    print(f"decode_user          {dec:7.2f} µs/op")
    print(f"encode+decode        {enc + dec:7.2f} µs/op   (target < 50)")

    state = {"offset": 10_000}

    def apply_one() -> None:
        state["offset"] += 1
        o = state["offset"]
        s.apply(Event("e", "click", s.user_id, f"item-{o % 1000}", 1_700_100_000_000 + o, None),
                vecs[o % 1000], 0, o, history_len=50, half_life_h=168)

    print(f"UserState.apply      {per_op_us(apply_one, 20_000):7.2f} µs/op")

    pop = Popularity(half_life_h=24)
    r = random.Random(0)
    n_items = 100_000
    ids = [f"item-{i:06d}" for i in range(n_items)]
    t0 = 1_700_000_000_000
    for i in range(n_items):  # every item seen at least once
        pop.update(ids[i], 1.0, t0 + i)
    clock = {"t": t0 + n_items}

    def pop_update() -> None:
        clock["t"] += 10
        pop.update(ids[r.randrange(n_items)], 2.0, clock["t"])

    print(f"Popularity.update    {per_op_us(pop_update, 50_000):7.2f} µs/op")
    exclude = set(r.sample(ids, 200))
    top_ms = per_op_us(lambda: pop.top(100, clock["t"], exclude), 50) / 1000
    print(f"Popularity.top(100) over {n_items} items, 200 excluded: {top_ms:.2f} ms/call")

    cov = CoVisitation(half_life_h=720, max_neighbours=50, window=5)
    hist: list[tuple[str, str, int]] = []
    for k in range(20_000):  # warm: fill neighbour lists
        item = ids[int(r.paretovariate(1.2)) % 5000]
        cov.update(hist, item, "click", t0 + k)
        hist = (hist + [(item, "click", t0 + k)])[-5:]

    def cov_update() -> None:
        clock["t"] += 10
        cov.update(hist, ids[int(r.paretovariate(1.2)) % 5000], "click", clock["t"])
        if hasattr(cov, "_apply"):  # since 2026-12-03 pairs wait for one compiled call per batch: time it per op
            cov._apply()

    print(f"CoVisitation.update  {per_op_us(cov_update, 20_000):7.2f} µs/op  (window 5, 50 neighbours)")
    trending()


def trending(batch: int = 32, calls: int = 2000) -> None:
    """``Popularity.top(30)`` as the ranker asks it, once per batch of ``batch`` events whose
    items are drawn Zipf(1.1) from the catalog, against the same answer computed over every
    item (``_top_of(None, ...)``: ``top`` before its pool, 2026-12-06); the answers are compared."""
    rng = np.random.default_rng(0)
    for n_items in (10_000, 100_000, 1_000_000):
        pop = Popularity(half_life_h=24)
        ts = 1_700_000_000_000
        for x in rng.zipf(1.1, 2 * n_items) % n_items:
            ts += 50
            pop.update(f"item-{x}", 1.0, ts)
        pooled = every = 0.0
        for _ in range(calls):
            for x in rng.zipf(1.1, batch) % n_items:
                ts += 50
                pop.update(f"item-{x}", 1.0, ts)
            t = timeit.default_timer()
            got = pop.top(30, ts)
            pooled += timeit.default_timer() - t
            t = timeit.default_timer()
            want = pop._top_of(None, 30, 0, ts, frozenset())
            every += timeit.default_timer() - t
            assert got == want, "the pool's answer differs from every item's"
        print(f"Popularity.top(30) every {batch} events, {n_items:>9,} items ({len(pop):,} seen): "
              f"{pooled / calls * 1e6:6.0f} µs/call (every item: {every / calls * 1e6:6.0f})")


if __name__ == "__main__":
    main()
