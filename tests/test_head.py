"""The learned head (recsys.ranking.head): determinism, persistence, purity, its starting point, its
budget, and that it learns a preference the frozen vectors cannot express alone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from recsys.backtest.baselines import ContentBaseline
from recsys.backtest.protocols import prequential
from recsys.events import Event
from recsys.items.catalog import VectorIndex
from recsys.ranking.head import Example, Head, HeadConfig, HeadOnly


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The machine is small and shared; restore the setting for other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

DIM = 8
_HOUR = 3_600_000
_T0 = 1_700_000_000_000
_TYPES = ("browse", "click", "add_to_cart", "purchase")


def _lookup(vecs: dict[str, np.ndarray]):
    return lambda ids: np.stack([vecs[i] for i in ids]) if ids else np.zeros((0, DIM), np.float32)


def _small_world(seed: int = 0, n_items: int = 40, n_examples: int = 300):
    """Random unit vectors and a stream of examples over them (ts one minute apart)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n_items, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    vecs = {f"i{j}": v[j] for j in range(n_items)}
    hist: dict[int, list[tuple[str, str, int]]] = {}
    examples = []
    for n in range(n_examples):
        u = int(rng.integers(10))
        item, etype, ts = f"i{int(rng.integers(n_items))}", _TYPES[int(rng.integers(4))], _T0 + 60_000 * n
        h = hist.setdefault(u, [])
        examples.append(Example(list(h), item, etype, ts))
        h.append((item, etype, ts))
    return vecs, examples


def _config(**kw) -> HeadConfig:
    base = dict(dim=DIM, history_len=5, batch_size=16, n_neg=16, lr=1e-2, max_steps_per_call=4, seed=3)
    base.update(kw)
    return HeadConfig(**base)


def _probe(vecs):
    histories = [[("i1", "click", _T0), ("i2", "browse", _T0 + _HOUR)], [("i5", "purchase", _T0)]]
    return histories, [_T0 + 2 * _HOUR] * 2, [["i0", "i3", "i7", "i9"], ["i1", "i5", "i30"]]


def _scores(head, vecs):
    return head.score(*_probe(vecs))


def _train(head, examples, chunk=50):
    for lo in range(0, len(examples), chunk):
        head.learn(examples[lo : lo + chunk])


def test_same_seed_and_stream_give_identical_scores():
    vecs, examples = _small_world()
    a, b = Head(_config(), _lookup(vecs)), Head(_config(), _lookup(vecs))
    before = _scores(a, vecs)
    _train(a, examples)
    _train(b, examples)
    assert a.version == b.version != "head-0"
    for sa, sb, s0 in zip(_scores(a, vecs), _scores(b, vecs), before):
        assert np.array_equal(sa, sb)
        assert not np.allclose(sa, s0)  # it did learn something


def test_save_and_load_give_identical_scores_and_identical_further_learning(tmp_path):
    vecs, examples = _small_world()
    head = Head(_config(), _lookup(vecs))
    _train(head, examples[:150])
    path = tmp_path / "head-v1.pt"
    head.save(path)
    loaded = Head.load(path, _lookup(vecs))
    assert loaded.version == head.version and loaded.config == head.config
    for s1, s2 in zip(_scores(head, vecs), _scores(loaded, vecs)):
        assert np.array_equal(s1, s2)
    _train(head, examples[150:])  # needs Adam moments, RNG and popularity counts restored
    _train(loaded, examples[150:])
    for s1, s2 in zip(_scores(head, vecs), _scores(loaded, vecs)):
        assert np.array_equal(s1, s2)
    assert [p.name for p in tmp_path.iterdir()] == ["head-v1.pt"]  # no temporary file left


def test_load_state_dict_rejects_another_config():
    vecs, _ = _small_world()
    state = Head(_config(), _lookup(vecs)).state_dict()
    with pytest.raises(ValueError, match="config"):
        Head(_config(history_len=7), _lookup(vecs)).load_state_dict(state)


def test_learn_does_not_mutate_its_inputs():
    vecs, examples = _small_world()
    frozen = {k: v.copy() for k, v in vecs.items()}
    snapshot = copy.deepcopy(examples)
    Head(_config(), _lookup(vecs)).learn(examples)
    assert examples == snapshot
    assert all(np.array_equal(vecs[k], frozen[k]) for k in vecs)


def test_untrained_query_is_the_recency_weighted_mean_of_the_last_history_items():
    vecs, _ = _small_world()
    head = Head(_config(history_len=5, recency_power=1.0), _lookup(vecs))
    rng = np.random.default_rng(1)
    # 8 entries (only the last 5 count), hours to days apart, all event types
    histories = [[(f"i{int(rng.integers(40))}", _TYPES[j % 4], _T0 + int(gap) * _HOUR)
                  for j, gap in enumerate(np.cumsum(rng.integers(1, 30, size=8)))] for _ in range(4)]
    now = [h[-1][2] + _HOUR for h in histories]
    got = head.query_vectors(histories, now)
    for hist, ts, q in zip(histories, now, got):
        recent = hist[-5:]
        w = np.array([(1 + (ts - t) / _HOUR) ** -1.0 for _, _, t in recent])
        want = (w[:, None] * np.stack([vecs[i] for i, _, _ in recent])).sum(0) / w.sum()
        np.testing.assert_allclose(q / np.linalg.norm(q), want / np.linalg.norm(want), atol=1e-5)


def test_query_vectors_rank_the_frozen_vectors_exactly_as_score_does():
    vecs, examples = _small_world()
    head = Head(_config(), _lookup(vecs))
    _train(head, examples)
    histories, now, cands = _probe(vecs)
    q = head.query_vectors(histories, now)
    for row, c, s in zip(q, cands, head.score(histories, now, cands)):
        np.testing.assert_allclose(np.stack([vecs[i] for i in c]) @ row, s, rtol=1e-5, atol=1e-6)


def test_empty_history_gives_a_zero_query():
    vecs, _ = _small_world()
    assert not Head(_config(), _lookup(vecs)).query_vectors([[]], [_T0]).any()


def test_learn_takes_at_most_max_steps_per_call():
    vecs, examples = _small_world(n_examples=300)
    head = Head(_config(batch_size=16, max_steps_per_call=3), _lookup(vecs))
    stats = head.learn(examples)
    assert stats["steps"] == 3 and stats["examples"] == 48 and np.isfinite(stats["loss"])
    assert head.version == "head-3"


def test_search_examples_teach_nothing():
    vecs, examples = _small_world()
    head = Head(_config(), _lookup(vecs))
    searches = [Example(ex.history, ex.target, "search", ex.ts) for ex in examples if ex.history]
    assert head.learn(searches) == {"steps": 0, "loss": None, "examples": 0}
    assert head.version == "head-0"


def test_head_model_never_recommends_what_the_user_purchased():
    vecs, _ = _small_world()
    index = VectorIndex(DIM)
    index.upsert(list(vecs), np.stack(list(vecs.values())))
    model = HeadOnly(Head(_config(), index.vectors), index)
    model.learn([Event("e1", "purchase", "u", "i1", _T0), Event("e2", "click", "u", "i2", _T0 + 1)])
    recs = model.recommend(["u", "stranger"], k=len(vecs), now_ts=_T0 + 2)
    assert "i1" not in recs[0] and len(recs[0]) == len(vecs) - 1
    assert recs[1] == ["i1", "i2"]  # no history: popularity (ties: first seen)


def _permutation_stream(n_events=4000, n_users=100, n_clusters=10, per_cluster=20, dim=32, p_rule=0.9, seed=0):
    """Items cluster in vector space, but after an item of cluster c users move to cluster perm(c).

    Content similarity says "more of c"; the truth is perm(c), a fixed cyclic permutation
    (no fixed points). Returns item ids, their vectors, and the events.
    """
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(n_clusters, dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    cluster = np.repeat(np.arange(n_clusters), per_cluster)
    vecs = (centroids[cluster] + 0.5 * rng.normal(size=(len(cluster), dim)) / np.sqrt(dim)).astype(np.float32)
    order = rng.permutation(n_clusters)
    perm = np.empty(n_clusters, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    members = [np.flatnonzero(cluster == c) for c in range(n_clusters)]
    ids = [f"i{j}" for j in range(len(cluster))]
    last: dict[int, int] = {}
    events = []
    for n in range(n_events):
        u = int(rng.integers(n_users))
        if u in last and rng.random() < p_rule:
            j = int(rng.choice(members[perm[cluster[last[u]]]]))
        else:
            j = int(rng.integers(len(ids)))
        last[u] = j
        etype = _TYPES[int(rng.choice(4, p=[0.7, 0.2, 0.07, 0.03]))]
        events.append(Event(f"e{n}", etype, f"u{u}", ids[j], _T0 + 60_000 * n))
    return ids, vecs, events


def test_head_learns_a_transition_the_frozen_vectors_cannot_express():
    ids, vecs, events = _permutation_stream()
    index = VectorIndex(32)
    index.upsert(ids, vecs)
    head = HeadOnly(Head(HeadConfig(dim=32, batch_size=64, n_neg=64, lr=1e-2), index.vectors), index)
    content = ContentBaseline({i: index.vector(i) for i in ids})
    r = prequential([head, content], events, ks=(10,), batch_size=100, progress=False,
                    series_every=(len(events) + 1) // 2)
    (h1, h2), (c1, c2) = ([p["hr@10"] for p in r["series"][name]] for name in ("head", "content"))
    assert h2 > h1 + 0.03  # it keeps learning over the stream
    assert h2 > c2 + 0.2  # and ends far above the content model (perfect cluster guess: ~0.45)


def test_steps_in_the_background_learn_the_same_bits_and_are_served_from_the_next_call_on():
    vecs, examples = _small_world(n_examples=300)
    inline, behind = (Head(_config(batch_size=16, max_steps_per_call=2), _lookup(vecs)) for _ in range(2))
    histories, now, _ = _probe(vecs)
    for lo in range(0, len(examples), 40):
        served_before = inline.query_vectors(histories, now)
        version_before = inline.version
        inline.learn(examples[lo : lo + 40])
        stats = behind.learn(examples[lo : lo + 40], background=True)
        assert stats["loss"] is None  # not known until the steps have run
        # until the next call, queries read the parameters as they were before this call's steps,
        # however far the thread has got
        assert behind.version == version_before
        assert np.array_equal(behind.query_vectors(histories, now), served_before)
        behind.wait()
        assert np.array_equal(behind.query_vectors(histories, now), served_before)
    behind.publish()
    assert behind.version == inline.version and inline.version != "head-0"
    assert np.array_equal(behind.query_vectors(histories, now), inline.query_vectors(histories, now))
    a, b = inline.state_dict(), behind.state_dict()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["rng"] == b["rng"]
    assert a["n_updates"] == b["n_updates"]
    behind.close()
    assert behind.learn(examples[:40], background=True)["steps"] > 0  # a closed head starts its thread again
    behind.close()


def test_a_step_served_at_the_next_read_is_waited_for_there_and_not_before():
    """``serve_at_next_read``: to every reader the step is served at once (its version, then
    the queries), but the caller waits for the step only when it reads."""
    import threading

    vecs, examples = _small_world(n_examples=300)
    inline, behind = (Head(_config(batch_size=16, max_steps_per_call=2), _lookup(vecs)) for _ in range(2))
    histories, now, _ = _probe(vecs)
    release = threading.Event()
    run_steps = behind._run_steps
    behind._run_steps = lambda inputs: (release.wait(30), run_steps(inputs))[1]  # held until released
    inline.learn(examples[:40])
    behind.learn(examples[:40], background=True)
    before = behind.query_vectors(histories, now)
    behind.serve_at_next_read()
    assert not behind._in_flight.done()  # it returned without waiting for the held step
    assert behind.version == inline.version != "head-0"  # but says the step is served
    release.set()
    after = behind.query_vectors(histories, now)  # the first read waits for it and serves it
    assert np.array_equal(after, inline.query_vectors(histories, now)) and not np.array_equal(after, before)
    assert behind.version == inline.version
    behind.learn(examples[40:80], background=True)
    behind.serve_at_next_read()
    inline.learn(examples[40:80])
    assert behind.version == inline.version  # a step that has already run is due all the same
    assert np.array_equal(behind.query_vectors(histories, now), inline.query_vectors(histories, now))
    behind.close()


def test_a_snapshot_taken_while_a_step_runs_holds_the_step():
    vecs, examples = _small_world(n_examples=300)
    inline, behind = (Head(_config(batch_size=16), _lookup(vecs)) for _ in range(2))
    inline.learn(examples[:40])
    behind.learn(examples[:40], background=True)
    a, b = inline.state_dict(), behind.state_dict()  # waits for the thread
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["n_updates"] == b["n_updates"]
    restored = Head(_config(batch_size=16), _lookup(vecs))
    restored.load_state_dict(b)
    assert restored.version == inline.version  # a restored head serves what it learned
    behind.close()


def test_a_background_step_that_fails_raises_at_the_next_call():
    vecs, examples = _small_world()
    head = Head(_config(), _lookup(vecs))
    head._run_steps = lambda inputs: 1 / 0  # a step that fails on the head's thread
    head.learn([ex for ex in examples if ex.history], background=True)
    with pytest.raises(ZeroDivisionError):
        head.publish()
    assert head.version == "head-0"  # raised once; what is served is unchanged
    head.learn([ex for ex in examples if ex.history], background=True)
    head.serve_at_next_read()
    assert head.version != "head-0"  # claimed served at once ...
    histories = [ex.history for ex in examples if ex.history][:3]
    with pytest.raises(ZeroDivisionError):
        head.query_vectors(histories, [ex.ts for ex in examples if ex.history][:3])  # ... the read raises
    assert head.version == "head-0"  # and what is served is unchanged
    head.close()
