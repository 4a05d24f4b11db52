"""The engine's learning lifecycle: exactly-once learning, snapshots, versions, feedback rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest

from recsys.events import CatalogItem, Envelope, Event, encode
from recsys.ranking.features import FEATURES
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.synthetic import generate_catalog, generate_events


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("emb"))


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog(60, seed=21)


def _settings(tmp_path, cache, **kw) -> Settings:
    return Settings(state_dir=str(tmp_path / "state"), embed_cache_dir=cache, head_snapshot_interval_s=3600, **kw)


def _envelopes(events, start=0):
    return [Envelope("events", 0, start + i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(events)]


def _head_params(engine):
    return {k: v.clone() for k, v in engine.head.state_dict()["model"].items()} if "model" in engine.head.state_dict() else None


def test_a_redelivered_batch_changes_nothing_not_even_the_head(tmp_path, cache, catalog):
    engine = Shard.open(_settings(tmp_path, cache))
    engine.upsert_catalog(catalog)
    events = generate_events(600, catalog, n_users=30, seed=22)
    batch = _envelopes(events)
    engine.process(batch)
    engine.head.publish()  # the step the batch started (a re-delivery would serve it: read further)
    version = engine.head.version
    query = engine.head.query_vectors([[("i1", "click", 0), ("i2", "browse", 1)]], [2])
    users = {u: s for u, s in engine.users.get_many(sorted({e.user_id for e in events}), now_ts=0).items()}
    again = engine.process(batch)  # re-delivery after a crash: same offsets
    assert again.counts["applied"] == 0 and again.counts["redelivered_skipped"] == len(events)
    assert engine.head.version == version
    np.testing.assert_array_equal(engine.head.query_vectors([[("i1", "click", 0), ("i2", "browse", 1)]], [2]), query)
    after = engine.users.get_many(sorted(users), now_ts=0)
    assert all(after[u] == users[u] for u in users)
    engine.close()


def test_model_version_names_the_head_and_learning_continues_after_restart(tmp_path, cache, catalog):
    settings = _settings(tmp_path, cache)
    events = generate_events(1200, catalog, n_users=40, seed=23)
    engine = Shard.open(settings)
    engine.upsert_catalog(catalog)
    before = engine.model_version
    result = engine.process(_envelopes(events[:600]))
    rec = orjson.loads(result.recommendations[0][1])
    # the batch was ranked with the head before its own step, which is served from its end on
    assert rec["model_version"] == before and "head-" in rec["model_version"] and engine.model_version != before
    version = engine.head.version
    probe = engine.head.query_vectors([[("i3", "purchase", 0)]], [1])
    engine.close()  # writes the snapshot

    restarted = Shard.open(settings)
    assert restarted.head.version == version  # loaded, not a fresh head
    np.testing.assert_allclose(restarted.head.query_vectors([[("i3", "purchase", 0)]], [1]), probe, rtol=1e-6)
    restarted.process(_envelopes(events[600:], start=600))
    restarted.head.publish()
    assert restarted.head.version != version  # and it keeps learning
    restarted.close()


def test_purchased_items_are_not_recommended_again_unless_repeat_purchase(tmp_path, cache):
    items = [CatalogItem(f"r{i}", f"running shoe model {i}", category="shoes") for i in range(20)]
    items.append(CatalogItem("coffee", "ground coffee beans", category="coffee", attributes={"repeat_purchase": True}))
    engine = Shard.open(_settings(tmp_path, cache))
    engine.upsert_catalog(items)
    events = [Event("e0", "click", "u", "r1", 1000), Event("e1", "purchase", "u", "r1", 2000), Event("e2", "purchase", "u", "coffee", 3000)]
    for i in range(30):  # others make r1 and coffee popular, so only the rule can keep r1 out
        events.append(Event(f"o{i}", "purchase", f"v{i}", "r1" if i % 2 else "coffee", 500 + i))
    events.sort(key=lambda e: e.ts)
    result = engine.process(_envelopes(events))
    mine = [orjson.loads(p) for u, p in result.recommendations if u == "u"][-1]
    ids = [i["item_id"] for i in mine["items"]]
    assert "r1" not in ids
    assert "coffee" in ids
    engine.close()


def test_a_shoppers_most_bought_repeat_items_come_back_as_buy_again(tmp_path, cache):
    """Groceries: the user's own staples are candidates (and the reason says so) even when
    nobody else buys them and the latest basket was about something else."""
    items = [CatalogItem(f"g{i}", f"grocery product {i}", category="grocery", attributes={"repeat_purchase": True}) for i in range(40)]
    engine = Shard.open(_settings(tmp_path, cache, top_k=20))
    engine.upsert_catalog(items)
    events = [Event(f"e{i}", "purchase", "u", item, 1000 * i) for i, item in enumerate(["g7", "g7", "g7", "g3", "g3"] + [f"g{20 + i}" for i in range(6)])]
    for i in range(60):  # everyone else buys other things, so only "buy again" can bring g7 back
        events.append(Event(f"o{i}", "purchase", f"v{i % 6}", f"g{30 + i % 10}", 100 + i))
    events.sort(key=lambda e: e.ts)
    engine.process(_envelopes(events))
    state = engine.users.get_many(["u"], now_ts=20_000)["u"]
    assert state.bought["g7"] == 3 and state.bought["g3"] == 2
    (recs, shown), = engine.recommender.rank([state], now_ts=20_000)
    again = {c: float(row[FEATURES.index("again")]) for c, row in zip(shown.candidates, shown.features)}
    assert again["g7"] == 1.0 and again["g3"] == pytest.approx(2 / 3) and again["g35"] == 0.0
    reasons = {i.item_id: i.reason for i in recs}
    assert reasons.get("g7") == "you buy this often", reasons  # not co-visited with the latest items
    engine.close()


def test_unavailable_items_are_never_recommended(tmp_path, cache, catalog):
    engine = Shard.open(_settings(tmp_path, cache))
    engine.upsert_catalog(catalog)
    events = generate_events(400, catalog, n_users=10, seed=24)
    engine.process(_envelopes(events))
    popular = engine.popularity.top(5, events[-1].ts)[0][0]
    item = next(c for c in catalog if c.item_id == popular)
    off = Envelope("catalog", 0, 0, item.item_id.encode(), encode(CatalogItem(item.item_id, item.title, available=False)), 0)
    result = engine.process([off] + _envelopes(events[:50], start=400))
    assert result.recommendations  # else the loop below proves nothing
    for _, payload in result.recommendations:
        assert popular not in [i["item_id"] for i in orjson.loads(payload)["items"]]
    engine.close()


def test_a_catalog_tombstone_withdraws_its_item_as_an_unavailable_record_does(tmp_path, cache, catalog):
    """A null value on the (compacted) catalog topic deletes its key: the item is withdrawn,
    keeps its title for the histories that name it, and stays withdrawn after a restart; no
    dead letter. A tombstone for an item never seen changes nothing; one without a key names
    no item and is dead-lettered with that reason."""
    settings = _settings(tmp_path, cache)
    engine = Shard.open(settings)
    engine.upsert_catalog(catalog)
    events = generate_events(400, catalog, n_users=10, seed=24)
    engine.process(_envelopes(events))
    popular = engine.popularity.top(5, events[-1].ts)[0][0]
    tombstones = [Envelope("catalog", 0, 0, popular.encode(), None, 0),
                  Envelope("catalog", 0, 1, b"never-seen", None, 0),
                  Envelope("catalog", 0, 2, None, None, 0)]
    result = engine.process(tombstones + _envelopes(events[:50], start=400))
    assert result.recommendations  # else the loop below proves nothing
    for _, payload in result.recommendations:
        assert popular not in [i["item_id"] for i in orjson.loads(payload)["items"]]
    letters = [orjson.loads(d) for _, d in result.dead_letters]
    assert [(d["source"]["offset"], d["reason"]) for d in letters] == [
        (2, "payload: a tombstone (null value) without a key: it names no item to withdraw")]
    withdrawn = dataclasses.replace(next(c for c in catalog if c.item_id == popular), available=False)
    assert engine.items.catalog.get(popular) == withdrawn
    assert "never-seen" not in engine.items.catalog
    engine.close()
    again = Shard.open(settings)  # the withdrawal is in the state
    assert again.items.catalog.get(popular) == withdrawn
    again.close()


def test_a_tombstone_after_its_items_record_in_one_batch_withdraws_it(tmp_path, cache):
    engine = Shard.open(_settings(tmp_path, cache))
    new = CatalogItem("t-new", "organic green tea leaves", category="tea")
    engine.process([Envelope("catalog", 0, 0, b"t-new", encode(new), 0), Envelope("catalog", 0, 1, b"t-new", None, 0)])
    assert engine.items.catalog.get("t-new").title == new.title and not engine.items.recommendable("t-new")
    engine.process([Envelope("catalog", 0, 2, b"t-new", encode(new), 0)])  # sent again: back
    assert engine.items.recommendable("t-new")
    engine.close()


def test_a_catalog_record_keyed_otherwise_than_its_item_is_applied_and_counted(tmp_path, cache):
    """The catalog topic is compacted by key: a record keyed by something else than its
    ``item_id`` (a SKU, a row id) is never removed by the item's tombstone, so a rebuilt flow
    would read it back. It is applied, as any shard reads the whole catalog, and counted
    (``catalog_key_mismatch``), as events keyed otherwise are (``key_mismatch``); a record
    without a key (a topic that is not compacted) is not counted."""
    engine = Shard.open(_settings(tmp_path, cache))
    items = [CatalogItem(f"t{i}", f"green tea variety {i}", category="tea") for i in range(3)]
    result = engine.process([Envelope("catalog", 0, 0, b"t0", encode(items[0]), 0),
                             Envelope("catalog", 0, 1, b"sku-77", encode(items[1]), 0),
                             Envelope("catalog", 0, 2, None, encode(items[2]), 0)])
    assert result.counts["catalog_key_mismatch"] == 1 and not result.dead_letters
    assert all(engine.items.recommendable(item.item_id) for item in items)
    engine.close()


def test_feedback_weights_order_purchase_over_cart_over_click_over_browse(tmp_path, cache, catalog):
    engine = Shard.open(_settings(tmp_path, cache))
    engine.upsert_catalog(catalog)
    events = [Event(f"e{t}", t, f"u{t}", f"i{n}", 1000) for n, t in enumerate(["browse", "click", "add_to_cart", "purchase"])]
    engine.process(_envelopes(events))
    scores = [engine.popularity.score(f"i{n}", 1000) for n in range(4)]
    assert scores == sorted(scores) and len(set(scores)) == 4
    engine.close()


def test_a_new_item_is_recommendable_as_soon_as_its_catalog_event_is_processed(tmp_path, cache):
    items = [CatalogItem(f"t{i}", f"green tea variety {i}", category="tea") for i in range(8)]
    items += [CatalogItem(f"k{i}", f"kitchen knife model {i}", category="knives") for i in range(40)]
    engine = Shard.open(_settings(tmp_path, cache, head_enabled=False))
    engine.upsert_catalog(items)
    events = [Event(f"e{i}", "click", "u", f"t{i % 8}", 1000 + i) for i in range(8)]
    engine.process(_envelopes(events))
    new = CatalogItem("t-new", "organic green tea leaves", category="tea")
    catalog_msg = Envelope("catalog", 0, 0, b"t-new", encode(new), 0)
    result = engine.process([catalog_msg] + _envelopes([Event("e9", "browse", "u", "t1", 2000)], start=8))
    rec = orjson.loads(result.recommendations[-1][1])
    assert "t-new" in [i["item_id"] for i in rec["items"]]  # found by content similarity, no event on it yet
    engine.close()


def test_a_new_user_gets_trending_then_personalised_after_one_event(tmp_path, cache, catalog):
    engine = Shard.open(_settings(tmp_path, cache))
    engine.upsert_catalog(catalog)
    events = generate_events(500, catalog, n_users=30, seed=25)
    engine.process(_envelopes(events))
    now = events[-1].ts + 1
    cold = engine.recommend_for(["stranger"], now_ts=now)[0]
    assert cold and all(i.reason == "trending" for i in cold)
    item = catalog[5]
    engine.process(_envelopes([Event("s1", "click", "stranger", item.item_id, now)], start=500))
    warm = engine.recommend_for(["stranger"], now_ts=now + 1)[0]
    assert any(i.reason != "trending" for i in warm)
    assert [i.item_id for i in warm] != [i.item_id for i in cold]
    engine.close()


def test_reasons_stay_valid_when_the_reranker_learned_negative_weights(tmp_path, cache, catalog):
    """With learned weights below zero, every reason still names a source the item came from.

    Guards the path of a crash seen in the crash test (a zero signal "explained" an item and
    its anchor lookup raised KeyError); this test does not reproduce that exact crash."""
    engine = Shard.open(_settings(tmp_path, cache, top_k=60))  # explain every candidate
    engine.upsert_catalog(catalog)
    events = generate_events(1500, catalog, n_users=40, seed=26)
    engine.process(_envelopes(events[:700]))
    new_sources, again = [0, 1, 2, 6, 7], 8  # content, covisit, trending, next, session; buy again
    sources = new_sources + [again]
    novel = np.zeros((4, len(FEATURES)), dtype=np.float32)
    novel[1:, new_sources] = 1.0  # every source signal, never engaged; the engaged row had none
    familiar = np.zeros((4, len(FEATURES)), dtype=np.float32)
    familiar[:, 3] = 1.0  # all seen (familiar vs familiar pairs teach every weight) ...
    familiar[1:, again] = 1.0  # ... and "buy again" never engaged
    effective = lambda: engine.recommender._base + engine.reranker.weights()  # noqa: E731
    for _ in range(100_000):  # weights go negative
        if (effective()[sources] < 0).all() and engine.reranker.active:
            break
        engine.reranker.learn(novel, 0)
        engine.reranker.learn(familiar, 0)
    assert engine.reranker.active and (effective()[sources] < 0).all()
    result = engine.process(_envelopes(events[700:], start=700))
    assert result.recommendations
    for _, payload in result.recommendations:
        for item in orjson.loads(payload)["items"]:
            assert item["reason"] and not item["reason"].endswith(("with ", "after ")), item["reason"]
    engine.close()


def test_state_written_under_another_shard_count_is_refused_naming_both(tmp_path):
    from recsys.shard.step import StateLayoutError

    base = Settings(state_dir=str(tmp_path / "state"), embed_cache_dir=str(tmp_path / "emb"), head_enabled=False)
    Shard.open(base.replace(shards=2, shard=1)).close()
    Shard.open(base.replace(shards=2, shard=1)).close()  # the same layout reopens
    with pytest.raises(StateLayoutError, match=r"written by shard 1 of 2.*shard 1 of 3.*Keep --processes/--shards 2"):
        Shard.open(base.replace(shards=3, shard=1))
    with pytest.raises(StateLayoutError, match="shard 0 of 1"):
        Shard.open(base)


def test_a_redelivery_re_emits_the_stored_bytes_from_binary_and_older_json_outboxes(tmp_path, cache, catalog):
    """A re-delivered trigger re-emits exactly the bytes emitted the first time, from the
    stamped binary outbox and from the two formats older trees stored (an upgrade in place):
    binary without stamps (2026-12-03) and JSON (before)."""
    import struct

    from recsys.shard.outbox import decode_outbox

    engine = Shard.open(_settings(tmp_path, cache))
    engine.upsert_catalog(catalog)
    events = generate_events(300, catalog, n_users=20, seed=24)
    batch = _envelopes(events)
    first = dict(engine.process(batch).recommendations)
    boxes = dict(engine.kv.iter_prefix(b"o:"))
    assert boxes and all(raw[:1] == b"\x02" for raw in boxes.values())
    assert sorted(dict(engine.process(batch).recommendations).items()) == sorted(first.items())
    entries = {key: sorted(decode_outbox(raw).items()) for key, raw in boxes.items()}
    older = {
        "binary of 2026-12-03": {key: bytes((1, len(e))) + b"".join(struct.pack("<iqI", p, o, len(pl)) for (p, o), (pl, _) in e)
                                 + b"".join(pl for _, (pl, _) in e) for key, e in entries.items()},
        "JSON": {key: orjson.dumps([[p, o, pl.decode()] for (p, o), (pl, _) in e]) for key, e in entries.items()},
    }
    for form, stored in older.items():
        engine.kv.write(stored)
        again = engine.process(batch)
        assert again.counts["redelivered_skipped"] == len(events), form
        assert sorted(dict(again.recommendations).items()) == sorted(first.items()), form
    engine.close()


@pytest.mark.parametrize("raw", [b"\x01", b"\x01\x01", b"\x02\x00", b"\x03\x00", b"\x01\x01" + b"\x00" * 16 + b"x",
                                 b"\x02\x01\x00\x00\x00" + b"\x00" * 20])
def test_a_damaged_outbox_is_refused_with_its_size(raw):
    from recsys.shard.outbox import decode_outbox

    with pytest.raises(ValueError, match=r"outbox: .*\d+ bytes"):
        decode_outbox(raw)


def test_the_garbage_collector_is_paused_for_a_batch_and_resumed_after(tmp_path, cache, catalog):
    """Collections in the middle of a batch moved its working set into the oldest generation
    and triggered full passes (benchmarks/README.md); the collector is off while a batch runs,
    on again after it, and a caller that turned it off keeps it off."""
    import gc

    engine = Shard.open(_settings(tmp_path, cache))
    engine.upsert_catalog(catalog)
    seen = []
    apply = engine._apply
    engine._apply = lambda *a, **kw: (seen.append(gc.isenabled()), apply(*a, **kw))[1]
    events = generate_events(200, catalog, n_users=20, seed=25)
    assert gc.isenabled()
    engine.process(_envelopes(events[:100]))
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        engine.process(_envelopes(events[100:], start=100))
        assert seen == [False, False] and not gc.isenabled()
    finally:
        gc.enable()
    engine.close()


def test_each_batch_reports_the_wall_time_of_its_phases(tmp_path, cache, catalog):
    """``BatchResult.phase_seconds`` (the slow-batch log and ``recsys_batch_phase_seconds``): every
    phase a batch of events goes through, timed by the clock around ``process``, summing to no
    more than the whole; a batch without events has no ranking phases."""
    import time

    from recsys.shard.step import PHASES

    engine = Shard.open(_settings(tmp_path, cache))
    engine.upsert_catalog(catalog)
    events = generate_events(300, catalog, n_users=20, seed=26)
    started = time.perf_counter()
    result = engine.process(_envelopes(events))
    took = time.perf_counter() - started
    assert set(result.phase_seconds) == {"decode", "admit", "load", "search", "apply", "head", "rank", "commit"}
    assert set(result.phase_seconds) <= set(PHASES)
    assert all(s >= 0 for s in result.phase_seconds.values())
    assert result.phase_seconds["rank"] > 0 and sum(result.phase_seconds.values()) <= took
    empty = engine.process([])
    assert set(empty.phase_seconds) == {"decode", "admit", "commit"}
    engine.close()


def test_the_engine_benchmark_prints_its_windows_and_phases(tmp_path):
    """``benchmarks/engine_speed.py --phases`` (issue 12, benchmarks/README.md) on a tiny
    workload: a rate per window, then a table of CPU-µs per event by phase with one column per
    window and the whole step last."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "benchmarks/engine_speed.py", "--items", "300", "--users", "200",
                          "--events", "6000", "--batch", "500", "--windows", "3000", "--phases",
                          "--embed-cache-dir", str(tmp_path / "emb")],
                         cwd=root, capture_output=True, text=True, timeout=300, check=True).stdout
    assert len(re.findall(r"^  events .* events/CPU-s", out, re.M)) == 2
    table = out[out.index("CPU-µs per event by phase"):].splitlines()
    rows = {line[:24].strip(): line[24:].split() for line in table[2:] if line.startswith("  ") and line[24:].split()}
    assert {"decode", "apply", "rank", "reasons", "commit", "whole step (CPU)"} <= set(rows)
    assert all(len(values) == 2 for values in rows.values())
    assert all(float(r) <= float(w) for r, w in zip(rows["rank"], rows["whole step (CPU)"]))


def test_the_collector_benchmark_prints_its_pauses_and_one_full_pass(tmp_path):
    """``benchmarks/gc_pauses.py --search-share`` (benchmarks/README.md, "The collector's full
    passes and the state the engine keeps") on a tiny mixed workload: the batch times, the
    objects the collector tracks with the references they hold, and one full pass over them."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "benchmarks/gc_pauses.py", "--items", "300", "--users", "200",
                          "--events", "1500", "--batch", "20", "--search-share", "0.2",
                          "--embed-cache-dir", str(tmp_path / "emb")],
                         cwd=root, capture_output=True, text=True, timeout=300, check=True).stdout
    assert re.search(r"^freeze on, batches of 20: Shard.process p50 [0-9.]+ ms", out, re.M)
    tracked = re.search(r"objects tracked by the collector at the end: ([0-9,]+), holding ([0-9,]+) references", out)
    assert tracked and int(tracked[1].replace(",", "")) > 0
    assert re.search(r"one full pass at the end: [0-9.]+ ms \(median of 3\)", out)


def test_an_open_engine_keeps_blas_on_one_thread(tmp_path, cache):
    """A second BLAS thread only spins between the ranker's products, on the core the Kafka
    client and other shards need (recsys/threads.py): opening an engine limits numpy's OpenBLAS
    (its own threads) to one, whatever the process had set before, and leaves the process's
    OpenMP threads (faiss's) as they were."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool.get("threading_layer") == "pthreads"}

    limits = threadpool_limits(2, user_api="blas")  # as a process starts on a 2-core machine
    try:
        assert blas_threads() == {2}
        import faiss

        omp = faiss.omp_get_max_threads()
        engine = Shard.open(_settings(tmp_path, cache, head_enabled=False))
        assert blas_threads() == {1}
        assert faiss.omp_get_max_threads() == omp
        engine.close()
    finally:
        limits.restore_original_limits()


def test_the_visits_workload_keeps_the_history_an_event_finds_stationary(tmp_path):
    """``engine_speed.py --workload visits`` (issue 12): shoppers come and go, so after a warm-up
    of about ``active users x mean visit`` events every window's events find about as much
    history as the last window's, while in the
    default workload every shopper keeps coming back and the history grows window by window.
    The script prints both per window; the engine runs on it like on the default."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def histories(*workload: str) -> list[float]:
        out = subprocess.run([sys.executable, "benchmarks/engine_speed.py", "--items", "300", "--events", "8000",
                              "--batch", "500", "--windows", "2000", "--embed-cache-dir", str(tmp_path / "emb"), *workload],
                             cwd=root, capture_output=True, text=True, timeout=300, check=True).stdout
        assert len(re.findall(r"^  events .* events/CPU-s", out, re.M)) == 4
        line = next(line for line in out.splitlines() if line.startswith("workload: "))
        return [float(x) for x in re.findall(r"% first / ([0-9.]+)", line)]

    visits = histories("--workload", "visits", "--active-users", "40", "--mean-visit", "8")
    returning = histories("--users", "400")
    assert len(visits) == len(returning) == 4
    # 40 shoppers x 8 events: stationary within the first window already
    assert max(visits) < 1.2 * min(visits), visits
    assert returning[3] > returning[2] + 1 > returning[1] + 2  # one more event per shopper every window


def _payloads(results) -> list[bytes]:
    out = []
    for result in results:
        for user_id, payload in result.recommendations:
            rec = orjson.loads(payload)
            rec.pop("emitted_at", None)
            out.append(orjson.dumps(rec, option=orjson.OPT_SORT_KEYS))
    return out


def test_the_lists_do_not_depend_on_how_long_the_heads_thread_takes(tmp_path, cache, catalog):
    """The head's step runs on its own thread; what it serves changes only at a message count
    (``_HEAD_PUBLISH_AFTER``), so a step that takes far longer gives the very same lists."""
    import time

    events = generate_events(3000, catalog, n_users=60, seed=27)
    sizes = [1, 7, 49, 300, 16, 16, 16, 5, 200, 64, 3]  # live-like small batches and replay-like large ones
    runs = []
    for slow in (False, True):
        engine = Shard.open(_settings(tmp_path / str(slow), cache))
        engine.upsert_catalog(catalog)
        if slow:
            run_steps = engine.head._run_steps
            engine.head._run_steps = lambda inputs: (time.sleep(0.05), run_steps(inputs))[1]
        results, at, i = [], 0, 0
        while at < len(events):
            n = sizes[i % len(sizes)]
            results.append(engine.process(_envelopes(events[at : at + n], start=at)))
            at, i = at + n, i + 1
        runs.append((_payloads(results), sum(r.counts["head_steps"] for r in results)))
        engine.close()
    (fast, fast_steps), (slow, slow_steps) = runs
    assert fast_steps == slow_steps >= 5 and len(fast) == len(slow) > 1000
    assert fast == slow


def test_a_replay_batch_does_not_wait_for_its_heads_step_to_end(tmp_path, cache, catalog):
    """A replay-sized batch reaches the message count that serves its own step, but the wait
    for the step is at the next read of the head, not at the batch's end: the step overlaps
    the next batch's decoding and loading, and its ranking's other sources."""
    import threading

    events = generate_events(1200, catalog, n_users=60, seed=29)
    engine = Shard.open(_settings(tmp_path, cache))
    engine.upsert_catalog(catalog)
    release = threading.Event()
    run_steps = engine.head._run_steps
    engine.head._run_steps = lambda inputs: (release.wait(30), run_steps(inputs))[1]
    served = engine.head.version
    result = engine.process(_envelopes(events[:600]))  # past the count: its step is served
    assert result.counts["head_steps"] >= 1
    assert not engine.head._in_flight.done()  # the batch ended while its step was held
    assert engine.head.version != served
    release.set()
    later = engine.process(_envelopes(events[600:], start=600))  # whose ranking reads the head
    assert later.recommendations
    engine.close()


def test_the_head_serves_its_step_once_enough_messages_were_read_after_it(tmp_path, cache, catalog):
    from recsys.shard import step

    engine = Shard.open(_settings(tmp_path, cache))
    engine.upsert_catalog(catalog)
    events = generate_events(2000, catalog, n_users=60, seed=28)
    at = 0
    while True:  # small batches until one starts a step
        served = engine.head.version
        result = engine.process(_envelopes(events[at : at + 10], start=at))
        at += 10
        if result.counts["head_steps"]:
            break
    read = 10  # the batch that started it counts
    while read + 10 < step._HEAD_PUBLISH_AFTER:
        assert engine.head.version == served  # still the head before the step
        engine.process(_envelopes(events[at : at + 10], start=at))
        at, read = at + 10, read + 10
    assert engine.head.version == served
    engine.process(_envelopes(events[at : at + 10], start=at))
    assert engine.head.version != served  # served from the end of the batch that reached the count
    engine.close()


def test_a_start_on_state_written_under_another_process_count_is_refused_before_it_is_touched(tmp_path):
    """`--processes 1` -> `2` on the same directories (a day-2 operator's probe, 2026-12-07): each
    shard opened an empty ``shard-<i>`` state beside the one-process state, and applied and answered
    every event again; back to one process, the old state went on as if nothing happened."""
    from dataflows.live import shard_factory
    from recsys.shard.step import StateLayoutError

    one = Settings(state_dir=str(tmp_path / "one"), embed_cache_dir=str(tmp_path / "emb"), head_enabled=False)
    Shard.open(one).close()
    with pytest.raises(StateLayoutError, match=r"written by one process.*shard 1 of 2.*Keep --processes/--shards 1,"):
        shard_factory(one.replace(shards=2, shard=1).for_shard())()
    assert not (tmp_path / "one" / "shard-1").exists()

    two = one.replace(state_dir=str(tmp_path / "two"))
    for shard in range(2):
        Shard.open(two.replace(shards=2, shard=shard).for_shard()).close()
    shard_factory(two.replace(shards=2, shard=0).for_shard())().close()  # the same layout starts
    with pytest.raises(StateLayoutError, match=r"written by 2 shard processes \(shard-0, shard-1\).*--shards 2,"):
        shard_factory(two)()
    assert not (tmp_path / "two" / "rocks").exists()


def test_the_start_up_catalog_file_applies_only_records_new_or_changed_since_it_last_gave_them(tmp_path):
    """A catalog file left in the settings (docker-compose's RECSYS_CATALOG_FILE) was applied over
    the state at every start (a day-2 operator's probe, 2026-12-07): an item withdrawn on the
    catalog topic since came back available. Now a record the file gave before is not applied
    again; a record that changed in the file, or a new one, is."""
    from dataflows.live import shard_factory

    catalog = generate_catalog(12, seed=5)
    file = tmp_path / "catalog.jsonl"

    def write(items: list[CatalogItem]) -> None:
        file.write_bytes(b"\n".join(encode(i) for i in items) + b"\n")

    def stored(engine: Shard, item_id: str) -> dict:
        return orjson.loads(engine.kv.get(b"item:" + item_id.encode()))

    write(catalog)
    settings = Settings(state_dir=str(tmp_path / "state"), embed_cache_dir=str(tmp_path / "emb"), head_enabled=False,
                        catalog_file=str(file))
    engine = shard_factory(settings)()
    first = catalog[0].item_id
    assert stored(engine, first)["available"] is True
    engine.upsert_catalog([dataclasses.replace(catalog[0], available=False)])  # withdrawn, as the catalog topic says
    engine.close()

    engine = shard_factory(settings)()  # the same file: withdrawn it stays
    assert stored(engine, first)["available"] is False
    engine.close()

    write([*catalog, dataclasses.replace(catalog[1], price=123.0), CatalogItem("new-item", "a new item")])
    engine = shard_factory(settings)()  # changed and new records are applied, the rest not
    assert stored(engine, catalog[1].item_id)["price"] == 123.0
    assert stored(engine, "new-item")["title"] == "a new item"
    assert stored(engine, first)["available"] is False
    engine.close()


def test_re_emitted_lists_are_not_timed_as_fresh_answers(tmp_path, cache, catalog):
    """A trigger read again (a restart, or the recovery directory moved aside) re-emits its stored
    list; the status line and ``recsys_event_to_recommendation_seconds`` timed it from its event's
    first append (a day-2 operator's probe, 2026-12-07: p99 23,709 ms after a restart that read its
    inputs again). They time fresh answers only; the re-emissions are counted apart."""
    from dataflows.metrics import FlowMetrics

    engine = Shard.open(_settings(tmp_path, cache, head_enabled=False))
    engine.upsert_catalog(catalog)
    batch = _envelopes(generate_events(60, catalog, n_users=6, seed=4))
    appended = max(e.timestamp_ms for e in batch)  # every record appended at once, after its event
    batch = [dataclasses.replace(e, timestamp_ms=appended) for e in batch]
    clock = [appended / 1000 + 0.05]
    metrics = FlowMetrics(Settings(), status=None, clock=lambda: clock[0])
    fresh = engine.process(batch)
    metrics.batch(engine, batch, fresh, 0.01)
    assert len(fresh.recommendations) == 6 and len(metrics._samples) == 6
    clock[0] += 3600  # an hour later, the same records again
    again = engine.process(batch)
    metrics.batch(engine, batch, again, 0.01)
    assert again.counts["reemitted"] == 6 and len(metrics._samples) == 6, metrics._samples
    assert max(metrics._samples) < 1.0
    engine.close()


def test_records_keyed_otherwise_than_their_id_are_counted_by_topic_and_said_in_the_status_line(tmp_path, cache,
                                                                                                catalog):
    """A catalog probe: a record keyed by another item's id was applied and only the totals at stop
    said so (on the compacted topic it replaces that item's record at compaction). Each batch now
    counts them in ``recsys_key_mismatches_total{topic}`` and the next status line says how many."""
    from dataflows.metrics import FlowMetrics

    engine = Shard.open(_settings(tmp_path, cache, head_enabled=False))
    engine.upsert_catalog(catalog)
    other = catalog[0].item_id.encode()
    event = generate_events(1, catalog, n_users=1, seed=5)[0]
    batch = [Envelope("catalog", 0, 0, other, encode(CatalogItem("renamed", "a lamp")), 5),
             Envelope("catalog", 0, 1, other, encode(CatalogItem("renamed-2", "a chair")), 5),
             Envelope("events", 0, 0, b"someone-else", encode(event), event.ts)]
    metrics = FlowMetrics(Settings(), status=None, clock=lambda: 100.0)
    metrics.batch(engine, batch, engine.process(batch), 0.001)
    assert metrics.key_mismatches.labels("catalog")._value.get() == 2
    assert metrics.key_mismatches.labels("events")._value.get() == 1
    assert "3 records keyed otherwise than their user_id / item_id" in metrics.status_line(110.0)
    assert "keyed otherwise" not in metrics.status_line(120.0)  # said for its interval only
    engine.close()


def test_a_state_holding_records_a_newer_rule_refuses_still_opens_with_them(tmp_path, cache, catalog):
    """A code review of 2026-12-07: the catalog rules added that day (repeat_purchase a boolean, no
    zero-width space in an id, a title of invisible characters blank) made a state stored before
    unloadable, every stored item being decoded again at start. Stored records are read as stored."""
    settings = _settings(tmp_path, cache, head_enabled=False)
    engine = Shard.open(settings)
    engine.upsert_catalog(catalog)
    engine.kv.write({b"item:tea-str": orjson.dumps({"item_id": "tea-str", "title": "Green tea",
                                                    "attributes": {"repeat_purchase": "false"}}),
                     "item:i\u200b5".encode(): orjson.dumps({"item_id": "i\u200b5", "title": "Lamp"}),
                     b"item:blank": orjson.dumps({"item_id": "blank", "title": "\u200b\u200b"})})
    engine.close()
    engine = Shard.open(settings)  # a DecodeError here before
    known = engine.items.catalog.items
    assert {"tea-str", "i\u200b5", "blank"} <= set(known) and len(known) == len(catalog) + 3
    assert known["tea-str"].repeat_purchase is False  # "false" is not true (bool("false") was)
    engine.close()
