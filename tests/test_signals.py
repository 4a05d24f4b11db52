"""Global signals: time-decayed popularity and co-visitation, and their persistence."""

from __future__ import annotations

import random
import re
import textwrap

import numpy as np
import orjson
import pytest

from recsys.feedback import EVENT_WEIGHTS
from recsys.signals.covisitation import CoVisitation, decode_record
from recsys.signals.popularity import Popularity
from recsys.store.kv import MemoryKV

H = 3_600_000  # one hour in ms


def test_event_weights_are_the_documented_ones():
    assert EVENT_WEIGHTS == {"browse": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "search": 0.0}


# --------------------------------------------------------------------------- popularity


def test_popularity_decays_by_hand():
    p = Popularity(half_life_h=2.0)
    p.update("a", 4.0, ts=0)
    p.update("a", 1.0, ts=2 * H)  # 4 -> 2, + 1
    assert p.score("a", 2 * H) == pytest.approx(3.0)
    assert p.score("a", 6 * H) == pytest.approx(0.75)
    assert p.score("a", 0) == pytest.approx(3.0)  # asking about the past never inflates


def test_popularity_late_event_is_added_decayed():
    p = Popularity(half_life_h=1.0)
    p.update("a", 1.0, ts=2 * H)
    p.update("a", 4.0, ts=0)
    assert p.score("a", 2 * H) == pytest.approx(2.0)


def test_popularity_scores_of_many_items_are_exactly_score_of_each():
    rng = random.Random(3)
    p = Popularity(half_life_h=1.5)
    for _ in range(2_000):
        p.update(f"i{rng.randrange(300)}", rng.choice((1.0, 2.0, 4.0, 8.0)), ts=rng.randrange(0, 40 * H))
    ids = [f"i{n}" for n in range(320)]  # some never seen
    for now in (0, 7 * H + 123, 40 * H, 90 * H + 1):  # before some references (no decay), and after
        assert p.scores(ids, now).tolist() == [p.score(i, now) for i in ids]  # bit for bit, not approx
    assert p.scores([], 0).shape == (0,)


def test_popularity_scores_equal_score_bit_for_bit_over_many_random_times():
    """The compiled decay (the C library's pow per item) against ``score()`` (Python's ``**``)
    on 200,000 items and four read times: numpy's vectorised power would differ in the last
    bit for ~5% of them."""
    rng = np.random.default_rng(11)
    for half_life_h in (0.5, 24.0):
        p = Popularity(half_life_h=half_life_h)
        n = 100_000
        for item, weight, ts in zip(range(n), rng.choice([0.5, 1.0, 3.0, 7.25], n).tolist(),
                                    rng.integers(0, 400 * H, n).tolist()):
            p.update(f"i{item}", weight, ts=ts)
        ids = [f"i{i}" for i in range(n + 50)]  # the last 50 never seen: 0.0
        for now in (0, 200 * H + 17, 400 * H, 5_000 * H + 3):
            got = p.scores(ids, now)
            assert got.dtype == np.float64 and got.shape == (len(ids),)
            assert got.tolist() == [p.score(i, now) for i in ids]


def test_popularity_slots_stay_valid_until_a_load_renumbers_them(kv):
    """Search keeps a query's candidates' slots (Popularity.slots) between searches: a slot stays
    the item's while the stamp's generation does, an unseen item (-1) gets one when the count
    grows, and load() (which renumbers) moves the generation on."""
    p = Popularity(half_life_h=1.0)
    p.update("a", 1.0, ts=0)
    p.update("b", 2.0, ts=0)
    slots, stamp = p.slots(["b", "c", "a"]), p.stamp
    assert slots.tolist()[1] == -1 and p.scores_at(slots, H).tolist() == p.scores(["b", "c", "a"], H).tolist()
    p.update("a", 1.0, ts=10)
    assert p.stamp == stamp  # nothing new: the slots are still right
    p.update("c", 4.0, ts=10)
    assert p.stamp[0] == stamp[0] and p.stamp[1] == stamp[1] + 1  # c has a slot now
    assert p.slots(["b", "a"]).tolist() == [slots[0], slots[2]]
    kv.write(p.export_dirty())
    q = Popularity(half_life_h=1.0)
    q.update("z", 1.0, ts=0)  # occupies slot 0 before the load
    before = q.stamp
    q.load(kv)
    assert q.stamp[0] == before[0] + 1
    assert q.scores_at(q.slots(["a", "b", "c"]), H).tolist() == p.scores(["a", "b", "c"], H).tolist()


def test_popularity_unknown_item_scores_zero_and_zero_weights_are_ignored():
    p = Popularity(half_life_h=1.0)
    p.update("a", 0.0, ts=0)
    assert p.score("a", 0) == 0.0 and len(p) == 0 and p.top(5, 0) == []


def test_popularity_top_ranks_by_decayed_score():
    p = Popularity(half_life_h=1.0)
    p.update("old", 10.0, ts=0)  # 10 / 2**4 = 0.625 at 4h
    p.update("new", 1.0, ts=4 * H)
    p.update("mid", 2.0, ts=3 * H)  # 1.0 at 4h
    assert p.top(3, now_ts=4 * H) == [("mid", 1.0), ("new", 1.0), ("old", 0.625)]  # tie broken by id
    assert p.top(1, now_ts=0) == [("old", 10.0)]


def test_popularity_top_excludes_and_still_fills_n():
    p = Popularity(half_life_h=1.0)
    for i in range(20):
        p.update(f"i{i:02d}", float(i + 1), ts=0)
    got = p.top(3, now_ts=0, exclude={"i19", "i18", "nonexistent"})
    assert [i for i, _ in got] == ["i17", "i16", "i15"]


def test_popularity_top_matches_a_full_sort_with_ties():
    rng = random.Random(7)
    p = Popularity(half_life_h=5.0, initial_capacity=4)  # forces growth too
    for _ in range(3000):
        p.update(f"i{rng.randrange(500)}", float(rng.choice([1, 2, 4, 8])), ts=rng.randrange(0, 10 * H, H))
    now = 12 * H
    items = {f"i{i}" for i in range(500)}
    exclude = set(rng.sample(sorted(items), 40))
    full = sorted(((i, p.score(i, now)) for i in items if p.score(i, now) > 0 and i not in exclude), key=lambda t: (-t[1], t[0]))
    got = p.top(25, now, exclude)
    assert [i for i, _ in got] == [i for i, _ in full[:25]]
    assert [s for _, s in got] == pytest.approx([s for _, s in full[:25]])


def test_popularity_top_breaks_mass_ties_by_id():
    p = Popularity(half_life_h=1.0)
    for i in reversed(range(5000)):
        p.update(f"i{i:04d}", 1.0, ts=0)
    p.update("z", 2.0, ts=0)
    assert p.top(3, now_ts=0, exclude={"i0000"}) == [("z", 2.0), ("i0001", 1.0), ("i0002", 1.0)]


def _top_of_every_item(p: Popularity, n: int, now_ts: int, exclude: set[str]) -> list[tuple[str, float]]:
    """``Popularity.top`` as it was before the pool (2026-12-06): every item decayed, the whole
    order sorted, the same floats (``score * exp2(-dt / half_life)``)."""
    m = len(p)
    dt = np.maximum(now_ts - p._ref[:m], 0).astype(np.float64)
    eff = p._score[:m] * np.exp2(-dt / p._half_life_ms)
    ranked = sorted((j for j in range(m) if eff[j] > 0 and p._ids[j] not in exclude), key=lambda j: (-eff[j], p._ids[j]))
    return [(p._ids[j], float(eff[j])) for j in ranked[:n]]


def test_popularity_top_from_its_pool_is_the_top_of_every_item_float_for_float(kv, monkeypatch):
    """``top`` decays a pool of candidates, not every item; its answers must be those of every
    item decayed, bit for bit, through the pool's cuts (thousands of items), late events, times
    before the items' reference times, exclusions, mass ties and a reload."""
    rng = random.Random(11)
    p = Popularity(half_life_h=2.0, initial_capacity=8)
    every = subset = 0  # answers over every item; answers over a pool smaller than the items
    top_of = Popularity._top_of

    def counted(self, slots, *args):  # noqa: ANN001, ANN002
        nonlocal every, subset
        every += slots is None
        subset += slots is not None and len(slots) < len(self)
        return top_of(self, slots, *args)

    monkeypatch.setattr(Popularity, "_top_of", counted)
    now, calls = 0, 0
    for step in range(120):
        for _ in range(rng.choice([5, 50, 400])):
            now += rng.randrange(0, 60_000)
            late = rng.random() < 0.1
            r = rng.random()  # a long tail, a popular few, and a hot set
            item = f"i{rng.randrange(6000)}" if r < 0.4 else f"i{int(rng.paretovariate(0.8)) % 6000}" if r < 0.9 else f"t{rng.randrange(40)}"
            p.update(item, rng.choice([1.0, 2.0, 4.0, 8.0]), ts=now - (rng.randrange(0, 5 * H) if late else 0))
        if step % 7 == 3:  # equal scores at one time: ties the keys cannot tell apart
            for i in range(rng.randrange(1, 300)):
                p.update(f"tie{i}", 1.0, ts=now)
        if step == 60:  # a reload renumbers the slots and rebuilds the pool
            kv.write(p.export_dirty())
            p = Popularity(half_life_h=2.0)
            p.load(kv)
        for _ in range(3):
            at = now + rng.choice([0, -rng.randrange(0, 3 * H), rng.randrange(0, 48 * H)])
            n = rng.choice([1, 10, 30, 60, 200])
            exclude = set(rng.sample(p._ids, min(len(p), rng.choice([0, 3, 100])))) | {"unknown"}
            assert p.top(n, at, exclude) == _top_of_every_item(p, n, at, exclude)
            calls += 1
    assert len(p) > 2000
    assert every < calls / 4 and subset - every > calls / 2, f"{every} / {subset} of {calls}"
    # more than the pool holds: every item decayed, and the pool grows for the next such ask
    exclude = set(p._ids[:50])
    assert p.top(3000, now, exclude) == _top_of_every_item(p, 3000, now, exclude)
    p.update("i1", 1.0, ts=now)
    before = every
    assert p.top(3000, now, exclude) == _top_of_every_item(p, 3000, now, exclude)
    assert every == before


def test_popularity_export_and_load_reproduce_identical_scores(kv):
    rng = random.Random(1)
    p = Popularity(half_life_h=3.0)
    for _ in range(500):
        p.update(f"i{rng.randrange(60)}", float(rng.choice([1, 2, 4, 8])), ts=rng.randrange(0, 50 * H))
    kv.write(p.export_dirty())
    assert p.export_dirty() == {}  # the dirty set was cleared
    p.update("i1", 1.0, ts=51 * H)
    changed = p.export_dirty()
    assert list(changed) == [b"pop:i1"]  # only what changed since
    kv.write(changed)
    p.update("i2", 8.0, ts=52 * H)
    kv.write(p.export_dirty())
    q = Popularity(half_life_h=3.0)
    q.load(kv)
    assert len(q) == len(p)
    for i in range(60):
        assert q.score(f"i{i}", 60 * H) == p.score(f"i{i}", 60 * H)
    assert q.top(10, 60 * H) == p.top(10, 60 * H)


# --------------------------------------------------------------------------- co-visitation


def test_covisit_weight_by_event_type_and_time_gap():
    c = CoVisitation(half_life_h=1.0, max_neighbours=10, window=5)
    c.update([("a", "browse", 0), ("b", "click", 2 * H)], "c", "add_to_cart", ts=2 * H)
    assert c.neighbours("c", 5) == [("b", 4.0, 1), ("a", 1.0, 1)]  # 4 * 2**0, 4 * 2**-2


def test_covisit_is_symmetric_and_accumulates():
    c = CoVisitation(half_life_h=1.0, max_neighbours=10)
    c.update([("a", "browse", 0)], "b", "click", ts=0)
    c.update([("b", "browse", 0)], "a", "purchase", ts=0)
    assert c.neighbours("a", 5) == [("b", 10.0, 2)]
    assert c.neighbours("b", 5) == [("a", 10.0, 2)]


def test_covisit_uses_only_the_last_window_items_and_skips_self_and_repeats():
    c = CoVisitation(half_life_h=100.0, max_neighbours=10, window=3)
    hist = [("old", "browse", 0), ("x", "browse", 0), ("b", "browse", 0), ("x", "browse", 0)]
    c.update(hist, "x", "browse", ts=0)
    assert c.neighbours("x", 5) == [("b", 1.0, 1)]
    c.update([("b", "browse", 0), ("a", "browse", 0), ("a", "browse", 0)], "z", "browse", ts=0)
    assert c.neighbours("z", 5) == [("a", 1.0, 1), ("b", 1.0, 1)]  # "a" twice in the window counts once


def test_covisit_ignores_search_and_itemless_history():
    c = CoVisitation(half_life_h=1.0, max_neighbours=10)
    c.update([("a", "browse", 0)], None, "search", ts=0)
    c.update([(None, "search", 0)], "b", "click", ts=0)
    assert len(c) == 0


def test_covisit_neighbours_ordered_by_weight_then_id_and_truncated():
    c = CoVisitation(half_life_h=1.0, max_neighbours=10)
    c.update([("b", "browse", 0)], "a", "browse", ts=0)
    c.update([("c", "browse", 0)], "a", "purchase", ts=0)
    c.update([("d", "browse", 0)], "a", "browse", ts=0)
    assert c.neighbours("a", 2) == [("c", 8.0, 1), ("b", 1.0, 1)]
    assert c.neighbours("unknown", 5) == []


def test_covisit_stays_bounded_and_symmetric_under_eviction():
    rng = random.Random(3)
    c = CoVisitation(half_life_h=1.0, max_neighbours=4, window=5)
    hist: list[tuple[str, str, int]] = []
    for t in range(3000):
        item, etype = f"i{rng.randrange(40)}", rng.choice(["browse", "click", "add_to_cart", "purchase"])
        c.update(hist, item, etype, ts=t * 60_000)
        hist = (hist + [(item, etype, t * 60_000)])[-5:]
    pairs = {(a, b, w, n) for a in c.items() for b, w, n in c.neighbours(a, 100)}
    assert pairs and all(len(c.neighbours(a, 100)) <= 4 for a in c.items())
    assert {(b, a, w, n) for a, b, w, n in pairs} == pairs


def test_covisit_eviction_drops_the_weakest_pair_from_both_sides():
    c = CoVisitation(half_life_h=1.0, max_neighbours=2)
    c.update([("b", "browse", 0)], "a", "purchase", ts=0)  # a-b 8
    c.update([("c", "browse", 0)], "a", "click", ts=0)  # a-c 2
    c.update([("d", "browse", 0)], "a", "add_to_cart", ts=0)  # a-d 4 evicts a-c
    assert [n for n, _, _ in c.neighbours("a", 5)] == ["b", "d"]
    assert c.neighbours("c", 5) == []
    c.update([("e", "browse", 0)], "a", "browse", ts=0)  # a-e 1 is the weakest: dropped at once
    assert [n for n, _, _ in c.neighbours("a", 5)] == ["b", "d"] and c.neighbours("e", 5) == []


def test_covisit_export_and_load_round_trip(kv):
    rng = random.Random(5)
    c = CoVisitation(half_life_h=2.0, max_neighbours=3)
    hist: list[tuple[str, str, int]] = []
    for t in range(400):
        item = f"i{rng.randrange(25)}"
        c.update(hist, item, "click", ts=t * H // 10)
        hist = (hist + [(item, "click", t * H // 10)])[-5:]
        if t % 50 == 0:
            kv.write(c.export_dirty())
    kv.write(c.export_dirty())
    assert c.export_dirty() == {}
    d = CoVisitation(half_life_h=2.0, max_neighbours=3)
    d.load(kv)
    for i in range(25):
        assert d.neighbours(f"i{i}", 10) == c.neighbours(f"i{i}", 10)
    assert len(d) == len(c)


@pytest.mark.parametrize("earlier", ["rows", "maps", "columns"])
def test_covisit_loads_records_in_the_earlier_formats(earlier):
    """Stores written before 2026-11-30 (``[[nbr, weight, count], ...]``), before 2026-12-03
    (``[{nbr: weight}, {nbr: count}]``) and on 2026-12-03 (``{"n": ids, "w": weights, "c":
    counts}``) load, keep learning, and are re-exported in the binary form."""
    def record(pairs):
        if earlier == "rows":
            return orjson.dumps([list(p) for p in pairs])
        if earlier == "columns":
            return orjson.dumps({"n": [y for y, _, _ in pairs], "w": [w for _, w, _ in pairs], "c": [c for _, _, c in pairs]})
        return orjson.dumps([{y: w for y, w, _ in pairs}, {y: c for y, _, c in pairs}])

    kv = MemoryKV()
    kv.write({b"cov:a": record([("c", 1.0, 1), ("b", 2.5, 3)]), b"cov:b": record([("a", 2.5, 3)]),
              b"cov:c": record([("a", 1.0, 1)])})
    c = CoVisitation(half_life_h=1.0, max_neighbours=5)
    c.load(kv)
    assert c.neighbours("a", 5) == [("b", 2.5, 3), ("c", 1.0, 1)]
    c.update([("b", "browse", 0)], "a", "browse", ts=0)  # and keeps learning; re-exported anew
    out = c.export_dirty()
    assert out[b"cov:a"][:1] == b"\x01"
    assert decode_record(out[b"cov:a"]) == [("c", 1.0, 1), ("b", 3.5, 4)]  # the order they joined
    assert set(out) == {b"cov:a", b"cov:b"}


def test_covisit_binary_records_round_trip_any_id():
    """Ids of any length and script, and weights to the last bit, come back from the binary
    record as they went in."""
    ids = ["a", "ünïcödé-" * 9, "🛒x", "", "Ω"]
    c = CoVisitation(half_life_h=1.0, max_neighbours=10)
    hist: list[tuple[str, str, int]] = []
    for t, item in enumerate(ids * 3):
        c.update(hist, item, "click", ts=t * 777)
        hist = (hist + [(item, "click", t * 777)])[-5:]
    out = c.export_dirty()
    kv = MemoryKV()
    kv.write(out)
    d = CoVisitation(half_life_h=1.0, max_neighbours=10)
    d.load(kv)
    assert d.lists() == c.lists() and len(d.lists()) == len(ids)
    for key, value in out.items():
        name = key[len(b"cov:"):].decode()
        weights, counts = c.lists()[name]
        assert decode_record(value) == [(y, w, counts[y]) for y, w in weights.items()]


def test_covisit_load_names_a_corrupt_record():
    kv = MemoryKV()
    good = CoVisitation(half_life_h=1.0, max_neighbours=5)
    good.update([("b", "browse", 0)], "a", "browse", ts=0)
    kv.write({key: value[:-1] if key == b"cov:a" else value for key, value in good.export_dirty().items()})
    with pytest.raises(ValueError, match=re.escape("stored list b'cov:a': co-visitation record: 28 bytes, but its 1 pairs take 29")):
        CoVisitation(half_life_h=1.0, max_neighbours=5).load(kv)


def test_covisit_item_that_loses_every_neighbour_is_exported_empty():
    c = CoVisitation(half_life_h=1.0, max_neighbours=1)
    c.update([("b", "browse", 0)], "a", "browse", ts=0)
    c.export_dirty()
    c.update([("c", "browse", 0)], "a", "purchase", ts=0)  # a-c 8 evicts a-b
    out = c.export_dirty()
    assert orjson.loads(out[b"cov:b"]) == []
    kv = MemoryKV()
    kv.write(out)
    d = CoVisitation(half_life_h=1.0, max_neighbours=1)
    d.load(kv)
    assert d.neighbours("b", 5) == [] and len(d) == 2


_RUN = textwrap.dedent(
    """
    import hashlib, random
    from recsys.signals.covisitation import CoVisitation, decode_record
    from recsys.signals.popularity import Popularity
    rng = random.Random(11)
    pop, cov = Popularity(1.0), CoVisitation(1.0, max_neighbours=3)
    hist = []
    for t in range(2000):
        item = "i%d" % rng.randrange(30)
        pop.update(item, 1.0, t)
        cov.update(hist, item, "browse", t)
        hist = (hist + [(item, "browse", t)])[-5:]
    blob = repr(sorted(pop.export_dirty().items())) + repr(sorted(cov.export_dirty().items()))
    blob += repr(pop.top(30, 2000)) + repr([cov.neighbours("i%d" % i, 5) for i in range(30)])
    print(hashlib.sha256(blob.encode()).hexdigest())
    """
)


def test_signals_do_not_depend_on_the_hash_seed(outputs_under_hash_seeds):
    outs = outputs_under_hash_seeds(_RUN)
    assert len(outs) == 1


def test_co_visitation_keeps_its_pairs_out_of_the_garbage_collectors_view():
    """Full GC passes over ~500k [weight, count] lists stalled the live stream for ~0.5 s
    (benchmarks/README.md); the lists are rows of numpy arrays and the sorted answers tuples of
    plain values, none of which the collector scans."""
    import gc

    c = CoVisitation(half_life_h=1.0, max_neighbours=3, window=5)
    for i in range(50):
        c.update([(f"i{i}", "browse", 0), (f"i{i + 1}", "click", 1)], f"i{i + 2}", "purchase", ts=2)
    c.neighbours("i3", 5)  # builds the sorted cache too
    gc.collect()
    assert len(c) > 40 and c._ranked
    tracked = [name for name, value in vars(c).items() if gc.is_tracked(value)]
    assert sorted(tracked) == ["_ids", "_names", "_pa", "_pb", "_pw", "_ranked", "_rows"]  # one container each, not one per item
    assert not any(gc.is_tracked(r[0]) or gc.is_tracked(r[2]) for r in c._ranked.values())


def test_the_co_visitation_benchmark_runs_and_prints_its_windows():
    """``benchmarks/covisit_speed.py`` (issue 12's co-visitation plateau, benchmarks/README.md) on a
    tiny workload: one line per window and a digest that a change of the signal is checked with."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "benchmarks/covisit_speed.py", "--items", "300", "--users", "200",
                          "--events", "3000", "--batch", "500", "--windows", "1000"],
                         cwd=root, capture_output=True, text=True, timeout=120, check=True).stdout
    assert sum(line.startswith("events ") for line in out.splitlines()) == 3
    assert re.search(r"^digest [0-9a-f]{64}$", out, re.M)


def test_candidate_rows_from_codes_follow_the_index_as_items_come_and_go():
    """The ranker maps co-visitation and session-vote candidates to index rows from an array per
    signal (``recsys/signals/coderows.py``): after every catalog change (new items, an upsert
    that moves an item's row, a removal, an item back again) and every new code, the rows are
    exactly what ``index.rows`` of the ids answers."""
    import numpy as np

    from recsys.items.catalog import VectorIndex
    from recsys.signals.sessions import SessionNeighbours

    rng = random.Random(7)
    ids = [f"i{n}" for n in range(40)]
    index = VectorIndex(4)
    covisit = CoVisitation(half_life_h=24.0, max_neighbours=6)
    sessions = SessionNeighbours()
    history: dict[str, list] = {}
    ts = 0
    for step in range(12):
        # the catalog changes: some items (re-)indexed with new vectors, some removed
        index.upsert(rng.sample(ids, 8), np.random.default_rng(step).normal(size=(8, 4)).astype(np.float32))
        index.remove(rng.sample(ids, 3))
        for _ in range(60):  # events, new items among them (codes the maps have not seen)
            user, item = f"u{rng.randrange(8)}", rng.choice(ids + [f"new{step}-{rng.randrange(4)}"])
            ts += 60_000
            covisit.update(history.setdefault(user, []), item, "click", ts)
            history[user].append((item, "click", ts))
            sessions.update(user, None, item, ts)
        anchors = [i for h in history.values() for i, _, _ in h[-3:]]
        counts, names, weights = covisit.top(anchors, 5)
        got_counts, rows, got_weights = covisit.top_rows(anchors, 5, index)
        np.testing.assert_array_equal(rows, index.rows(names))
        np.testing.assert_array_equal(got_counts, counts)
        np.testing.assert_array_equal(got_weights, weights)
        users, codes, _ = sessions.ranked_votes(sorted(history), 10)
        assert len(codes) > 0
        np.testing.assert_array_equal(sessions.item_rows(codes, index), index.rows(sessions.item_names(codes)))
