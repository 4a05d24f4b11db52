"""Baselines learn something sensible on tiny hand-made streams, under one exclusion rule."""

import random

import numpy as np
import pytest

from recsys.baselines import (
    ContentModel,
    CoVisitationModel,
    PopularityModel,
    RecentPopularityModel,
    RiverBiasedMFModel,
    SessionKNNModel,
)
from recsys.evaluation import Model
from recsys.events import Event

H = 3_600_000  # one hour in ms


def ev(i, user, item, etype="click", ts=None, session=None):
    return Event(f"e{i}", etype, user, item, i if ts is None else ts, session_id=session)


def stream(rows, etype="click"):
    """rows of (user, item) or (user, item, type)."""
    return [ev(i, r[0], r[1], r[2] if len(r) > 2 else etype) for i, r in enumerate(rows)]


RNG_VECTORS = {f"i{j}": v for j, v in enumerate(np.random.default_rng(0).normal(size=(30, 8)))}

FACTORIES = {
    "popularity": lambda: PopularityModel(),
    "recent_popularity": lambda: RecentPopularityModel(half_life_h=1.0),
    "covisitation": lambda: CoVisitationModel(),
    "session_knn": lambda: SessionKNNModel(),
    "content": lambda: ContentModel(RNG_VECTORS),
    "river_mf": lambda: RiverBiasedMFModel(n_factors=4, seed=3),
}


def random_stream(n=400, users=15, items=30, seed=1):
    rng = random.Random(seed)
    types = ["browse", "click", "add_to_cart", "purchase"]
    return [
        Event(f"e{i}", rng.choice(types), f"u{rng.randrange(users)}", f"i{rng.randrange(items)}", 60_000 * i)
        for i in range(n)
    ]


@pytest.mark.parametrize("kind", FACTORIES)
def test_every_baseline_implements_the_model_protocol(kind):
    assert isinstance(FACTORIES[kind](), Model)


@pytest.mark.parametrize("kind", FACTORIES)
def test_every_baseline_returns_k_distinct_items_per_user_without_purchases(kind):
    model = FACTORIES[kind]()
    events = random_stream()
    model.learn(events)
    users = [f"u{j}" for j in range(15)] + ["stranger"]
    recs = model.recommend(users, k=10, now_ts=events[-1].ts)
    bought = {}
    for e in events:
        if e.type == "purchase":
            bought.setdefault(e.user_id, set()).add(e.item_id)
    assert len(recs) == len(users)
    for user, lst in zip(users, recs):
        assert len(lst) == len(set(lst)) == 10
        assert not set(lst) & bought.get(user, set())


@pytest.mark.parametrize("kind", FACTORIES)
def test_every_baseline_is_deterministic_and_independent_of_learn_batching(kind):
    events = random_stream()
    one, many = FACTORIES[kind](), FACTORIES[kind]()
    one.learn(events)
    for lo in range(0, len(events), 37):
        many.learn(events[lo : lo + 37])
    users = [f"u{j}" for j in range(15)]
    assert one.recommend(users, 10, events[-1].ts) == many.recommend(users, 10, events[-1].ts)


@pytest.mark.parametrize("kind", FACTORIES)
def test_recommending_before_any_learning_returns_empty_lists(kind):
    assert FACTORIES[kind]().recommend(["u"], k=5, now_ts=0) == [[]]


def test_popularity_orders_by_count_and_breaks_ties_by_first_seen():
    m = PopularityModel()
    m.learn(stream([("u1", "c"), ("u2", "b"), ("u3", "a"), ("u4", "b"), ("u5", "a"), ("u6", "b")]))
    # b: 3, a: 2, c: 1; stranger sees all
    assert m.recommend(["x"], k=3, now_ts=9) == [["b", "a", "c"]]
    m2 = PopularityModel()
    m2.learn(stream([("u1", "y"), ("u2", "x")]))
    assert m2.recommend(["z"], k=2, now_ts=9) == [["y", "x"]]


def test_purchased_items_are_excluded_but_viewed_and_carted_ones_are_not():
    m = PopularityModel()
    m.learn(stream([("u1", "a", "purchase"), ("u1", "b", "add_to_cart"), ("u2", "a"), ("u2", "c", "browse")]))
    assert m.recommend(["u1", "u2"], k=3, now_ts=9) == [["b", "c"], ["a", "b", "c"]]


def test_repeat_purchase_items_stay_recommendable():
    m = PopularityModel(repeat_items={"milk"})
    m.learn(stream([("u1", "milk", "purchase"), ("u1", "tv", "purchase")]))
    assert m.recommend(["u1"], k=2, now_ts=9) == [["milk"]]


def test_recent_popularity_prefers_recent_interest_over_old_volume():
    m = RecentPopularityModel(half_life_h=1.0)
    old = [ev(i, f"u{i}", "old", ts=0) for i in range(4)]  # 4 events, 5 hours ago: 4/32 = 0.125
    new = [ev(10, "u9", "new", ts=5 * H)]  # 1 event now: 1
    m.learn(old + new)
    assert m.recommend(["x"], k=2, now_ts=5 * H) == [["new", "old"]]
    all_time = PopularityModel()
    all_time.learn(old + new)
    assert all_time.recommend(["x"], k=2, now_ts=5 * H) == [["old", "new"]]


def test_recent_popularity_survives_many_half_lives_without_overflow():
    m = RecentPopularityModel(half_life_h=0.01)
    m.learn([ev(0, "u", "a", ts=0), ev(1, "u", "b", ts=1000 * H), ev(2, "v", "b", ts=1000 * H)])
    assert m.recommend(["x"], k=2, now_ts=1000 * H) == [["b", "a"]]


def test_covisitation_recommends_what_followed_the_users_last_item():
    rows = []
    for u in range(5):
        rows += [(f"u{u}", "a"), (f"u{u}", "b")]  # a -> b, five times
    rows += [(f"p{j}", "pop") for j in range(20)]  # far more popular, never with a
    rows += [("me", "a")]
    m = CoVisitationModel()
    m.learn(stream(rows))
    assert m.recommend(["me"], k=1, now_ts=99) == [["b"]]


def test_covisitation_weights_purchases_above_browses():
    rows = [("u1", "a"), ("u1", "browsed", "browse"), ("u2", "a"), ("u2", "bought", "purchase"), ("me", "a")]
    m = CoVisitationModel()
    m.learn(stream(rows))
    assert m.recommend(["me"], k=2, now_ts=9)[0][:1] == ["bought"]


def test_covisitation_ignores_pairs_further_apart_than_max_gap():
    m = CoVisitationModel(max_gap_h=1.0, fill_half_life_h=None)
    # u1, u4: a then far later b (no pair); u2: a then c within the gap
    m.learn([ev(0, "u1", "a", ts=0), ev(1, "u4", "a", ts=0), ev(2, "u2", "a", ts=0), ev(3, "u2", "c", ts=H // 2),
             ev(4, "u1", "b", ts=10 * H), ev(5, "u4", "b", ts=10 * H), ev(6, "me", "a", ts=10 * H)])
    assert m.recommend(["me"], k=1, now_ts=10 * H) == [["c"]]


def test_session_knn_recommends_the_continuation_of_a_similar_past_session():
    rows = [("old", "x", "s1"), ("old", "y", "s1"), ("old", "z", "s1")]
    rows += [("other", "p", "s2"), ("other", "q", "s2")]
    rows += [(f"fan{j}", "p", f"f{j}") for j in range(10)]  # p is very popular
    rows += [("me", "x", "s9"), ("me", "y", "s9")]
    m = SessionKNNModel()
    m.learn([ev(i, u, it, session=s) for i, (u, it, s) in enumerate(rows)])
    recs = m.recommend(["me"], k=5, now_ts=99)[0]
    assert "z" in recs and recs.index("z") < recs.index("p")


def test_session_knn_splits_sessions_on_inactivity_when_no_session_id():
    m = SessionKNNModel(session_gap_min=30)
    # "me" touched x long ago, then w just now: the current session is only [w]
    hot = [ev(10 + j, f"fan{j}", "hot", ts=5 + j) for j in range(5)]  # popular, in nobody's session with x or w
    m.learn([ev(0, "old", "x", ts=0), ev(1, "old", "z", ts=1), ev(2, "o2", "w", ts=2), ev(3, "o2", "v", ts=3),
             ev(4, "me", "x", ts=4), *hot, ev(5, "me", "w", ts=4 + 2 * H)])
    recs = m.recommend(["me"], k=3, now_ts=5 * H)[0]
    # the neighbour of [w] votes w and v, then popularity; one session [x, w] would let "old" vote z, x
    assert recs == ["w", "v", "hot"]


def test_session_knn_does_not_use_the_users_own_session_as_neighbour():
    m = SessionKNNModel(fill_half_life_h=None)
    m.learn([ev(0, "me", "a", session="s"), ev(1, "me", "b", session="s"), ev(2, "u", "c"), ev(3, "v", "c")])
    assert m.recommend(["me"], k=1, now_ts=9) == [["c"]]  # only popularity: c (2) beats a, b (1)


def test_content_model_ranks_items_by_inner_product_with_the_users_vectors():
    vecs = RNG_VECTORS
    m = ContentModel(vecs, half_life_h=1e9)  # no decay: a plain mean
    m.learn([ev(0, "u", "i3"), ev(1, "u", "i7")])
    query = (vecs["i3"] + vecs["i7"]) / 2
    expected = sorted(vecs, key=lambda i: -float(np.dot(vecs[i], query)))[:5]
    assert m.recommend(["u"], k=5, now_ts=2) == [expected]


def test_content_model_can_recommend_items_nobody_touched_yet():
    m = ContentModel({"a": [1.0, 0.0], "twin": [0.99, 0.01], "far": [0.0, 1.0]})
    m.learn([ev(0, "u", "a"), ev(1, "v", "far"), ev(2, "w", "far")])
    assert m.recommend(["u"], k=2, now_ts=3) == [["a", "twin"]]


def test_content_model_weights_recent_history_more():
    m = ContentModel({"a": [1.0, 0.0], "b": [0.0, 1.0], "a2": [0.9, 0.0], "b2": [0.0, 0.9]}, half_life_h=1.0)
    m.learn([ev(0, "u", "a", ts=0), ev(1, "u", "b", ts=3 * H)])
    assert m.recommend(["u"], k=2, now_ts=3 * H) == [["b", "b2"]]


def test_content_model_asks_a_vector_function_once_per_batch_for_new_items_only():
    calls = []

    def vectors(ids):
        calls.append(list(ids))
        return np.stack([RNG_VECTORS[i] for i in ids])

    m = ContentModel(vectors)
    m.learn([ev(0, "u", "i1"), ev(1, "v", "i2"), ev(2, "w", "i1")])
    m.learn([ev(3, "u", "i2"), ev(4, "u", "i5")])
    assert calls == [["i1", "i2"], ["i5"]]
    assert set(m.recommend(["u"], k=3, now_ts=5)[0]) == {"i1", "i2", "i5"}


def test_river_mf_personalises_against_popularity():
    # g2 items are more popular overall; "me" only ever touches g1 items (the first two of them),
    # so g1 items should fill most of me's top 4, where popularity alone would put none
    g1_share = []
    for seed in range(5):
        rng = random.Random(seed)
        rows = []
        for _ in range(300):
            u = rng.randrange(10)
            rows.append((f"u{u}", f"{'g1' if u < 3 else 'g2'}_{rng.randrange(4)}"))
            if rng.random() < 0.05:
                rows.append(("me", f"g1_{rng.randrange(2)}"))
        m = RiverBiasedMFModel(n_factors=4, negatives=4, learning_rate=0.1, seed=seed, fill_half_life_h=None)
        m.learn(stream(rows))
        recs = m.recommend(["me"], k=8, now_ts=999)[0]
        assert len(recs) == len(set(recs)) == 8
        pop = PopularityModel()
        pop.learn(stream(rows))
        assert not any(i.startswith("g1") for i in pop.recommend(["me"], k=4, now_ts=999)[0])
        g1_share.append(sum(i.startswith("g1") for i in recs[:4]) / 4)
    assert sum(g1_share) / len(g1_share) > 0.6


def test_river_mf_reading_scores_does_not_add_users_to_the_river_model():
    m = RiverBiasedMFModel(n_factors=2)
    m.learn(stream([("u", "a"), ("v", "b")]))
    m.recommend(["ghost"], k=2, now_ts=9)
    assert "ghost" not in m.model.u_latents
