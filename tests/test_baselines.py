"""Baselines learn something sensible on tiny hand-made streams, under one exclusion rule."""

import random

import numpy as np
import pytest

from recsys.backtest.baselines import (
    ContentBaseline,
    CoVisitationBaseline,
    PopularityBaseline,
    RecentPopularityBaseline,
    RiverBiasedMFBaseline,
    SessionKNNBaseline,
)
from recsys.backtest.history_baselines import (
    ItemKNNBaseline,
    MostBoughtBaseline,
    RecentlySeenBaseline,
    TransitionBaseline,
)
from recsys.backtest.protocols import BacktestModel, leave_last_out
from recsys.backtest.trained_baselines import BPRMFBaseline
from recsys.events import Event

H = 3_600_000  # one hour in ms


def ev(i, user, item, etype="click", ts=None, session=None):
    return Event(f"e{i}", etype, user, item, i if ts is None else ts, session_id=session)


def stream(rows, etype="click"):
    """rows of (user, item) or (user, item, type)."""
    return [ev(i, r[0], r[1], r[2] if len(r) > 2 else etype) for i, r in enumerate(rows)]


RNG_VECTORS = {f"i{j}": v for j, v in enumerate(np.random.default_rng(0).normal(size=(30, 8)))}

FACTORIES = {
    "popularity": lambda: PopularityBaseline(),
    "recent_popularity": lambda: RecentPopularityBaseline(half_life_h=1.0),
    "covisitation": lambda: CoVisitationBaseline(),
    "session_knn": lambda: SessionKNNBaseline(),
    "content": lambda: ContentBaseline(RNG_VECTORS),
    "river_mf": lambda: RiverBiasedMFBaseline(n_factors=4, seed=3),
    "recently_seen": lambda: RecentlySeenBaseline(),
    "most_bought": lambda: MostBoughtBaseline(),
    "itemknn": lambda: ItemKNNBaseline(),
    "transitions": lambda: TransitionBaseline(),
    "bpr_mf": lambda: BPRMFBaseline(factors=4, epochs=3, seed=3),
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
    assert isinstance(FACTORIES[kind](), BacktestModel)


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
    m = PopularityBaseline()
    m.learn(stream([("u1", "c"), ("u2", "b"), ("u3", "a"), ("u4", "b"), ("u5", "a"), ("u6", "b")]))
    # b: 3, a: 2, c: 1; stranger sees all
    assert m.recommend(["x"], k=3, now_ts=9) == [["b", "a", "c"]]
    m2 = PopularityBaseline()
    m2.learn(stream([("u1", "y"), ("u2", "x")]))
    assert m2.recommend(["z"], k=2, now_ts=9) == [["y", "x"]]


def test_purchased_items_are_excluded_but_viewed_and_carted_ones_are_not():
    m = PopularityBaseline()
    m.learn(stream([("u1", "a", "purchase"), ("u1", "b", "add_to_cart"), ("u2", "a"), ("u2", "c", "browse")]))
    assert m.recommend(["u1", "u2"], k=3, now_ts=9) == [["b", "c"], ["a", "b", "c"]]


def test_repeat_purchase_items_stay_recommendable():
    m = PopularityBaseline(repeat_items={"milk"})
    m.learn(stream([("u1", "milk", "purchase"), ("u1", "tv", "purchase")]))
    assert m.recommend(["u1"], k=2, now_ts=9) == [["milk"]]


def test_recent_popularity_prefers_recent_interest_over_old_volume():
    m = RecentPopularityBaseline(half_life_h=1.0)
    old = [ev(i, f"u{i}", "old", ts=0) for i in range(4)]  # 4 events, 5 hours ago: 4/32 = 0.125
    new = [ev(10, "u9", "new", ts=5 * H)]  # 1 event now: 1
    m.learn(old + new)
    assert m.recommend(["x"], k=2, now_ts=5 * H) == [["new", "old"]]
    all_time = PopularityBaseline()
    all_time.learn(old + new)
    assert all_time.recommend(["x"], k=2, now_ts=5 * H) == [["old", "new"]]


def test_recent_popularity_survives_many_half_lives_without_overflow():
    m = RecentPopularityBaseline(half_life_h=0.01)
    m.learn([ev(0, "u", "a", ts=0), ev(1, "u", "b", ts=1000 * H), ev(2, "v", "b", ts=1000 * H)])
    assert m.recommend(["x"], k=2, now_ts=1000 * H) == [["b", "a"]]


def test_covisitation_recommends_what_followed_the_users_last_item():
    rows = []
    for u in range(5):
        rows += [(f"u{u}", "a"), (f"u{u}", "b")]  # a -> b, five times
    rows += [(f"p{j}", "pop") for j in range(20)]  # far more popular, never with a
    rows += [("me", "a")]
    m = CoVisitationBaseline()
    m.learn(stream(rows))
    assert m.recommend(["me"], k=1, now_ts=99) == [["b"]]


def test_covisitation_weights_purchases_above_browses():
    rows = [("u1", "a"), ("u1", "browsed", "browse"), ("u2", "a"), ("u2", "bought", "purchase"), ("me", "a")]
    m = CoVisitationBaseline()
    m.learn(stream(rows))
    assert m.recommend(["me"], k=2, now_ts=9)[0][:1] == ["bought"]


def test_covisitation_ignores_pairs_further_apart_than_max_gap():
    m = CoVisitationBaseline(max_gap_h=1.0, fill_half_life_h=None)
    # u1, u4: a then far later b (no pair); u2: a then c within the gap
    m.learn([ev(0, "u1", "a", ts=0), ev(1, "u4", "a", ts=0), ev(2, "u2", "a", ts=0), ev(3, "u2", "c", ts=H // 2),
             ev(4, "u1", "b", ts=10 * H), ev(5, "u4", "b", ts=10 * H), ev(6, "me", "a", ts=10 * H)])
    assert m.recommend(["me"], k=1, now_ts=10 * H) == [["c"]]


def test_session_knn_recommends_the_continuation_of_a_similar_past_session():
    rows = [("old", "x", "s1"), ("old", "y", "s1"), ("old", "z", "s1")]
    rows += [("other", "p", "s2"), ("other", "q", "s2")]
    rows += [(f"fan{j}", "p", f"f{j}") for j in range(10)]  # p is very popular
    rows += [("me", "x", "s9"), ("me", "y", "s9")]
    m = SessionKNNBaseline()
    m.learn([ev(i, u, it, session=s) for i, (u, it, s) in enumerate(rows)])
    recs = m.recommend(["me"], k=5, now_ts=99)[0]
    assert "z" in recs and recs.index("z") < recs.index("p")


def test_session_knn_splits_sessions_on_inactivity_when_no_session_id():
    m = SessionKNNBaseline(session_gap_min=30)
    # "me" touched x long ago, then w just now: the current session is only [w]
    hot = [ev(10 + j, f"fan{j}", "hot", ts=5 + j) for j in range(5)]  # popular, in nobody's session with x or w
    m.learn([ev(0, "old", "x", ts=0), ev(1, "old", "z", ts=1), ev(2, "o2", "w", ts=2), ev(3, "o2", "v", ts=3),
             ev(4, "me", "x", ts=4), *hot, ev(5, "me", "w", ts=4 + 2 * H)])
    recs = m.recommend(["me"], k=3, now_ts=5 * H)[0]
    # the neighbour of [w] votes w and v, then popularity; one session [x, w] would let "old" vote z, x
    assert recs == ["w", "v", "hot"]


def test_session_knn_does_not_use_the_users_own_session_as_neighbour():
    m = SessionKNNBaseline(fill_half_life_h=None)
    m.learn([ev(0, "me", "a", session="s"), ev(1, "me", "b", session="s"), ev(2, "u", "c"), ev(3, "v", "c")])
    assert m.recommend(["me"], k=1, now_ts=9) == [["c"]]  # only popularity: c (2) beats a, b (1)


def test_content_model_ranks_items_by_inner_product_with_the_users_vectors():
    vecs = RNG_VECTORS
    m = ContentBaseline(vecs, half_life_h=1e9)  # no decay: a plain mean
    m.learn([ev(0, "u", "i3"), ev(1, "u", "i7")])
    query = (vecs["i3"] + vecs["i7"]) / 2
    expected = sorted(vecs, key=lambda i: -float(np.dot(vecs[i], query)))[:5]
    assert m.recommend(["u"], k=5, now_ts=2) == [expected]


def test_content_model_can_recommend_items_nobody_touched_yet():
    m = ContentBaseline({"a": [1.0, 0.0], "twin": [0.99, 0.01], "far": [0.0, 1.0]})
    m.learn([ev(0, "u", "a"), ev(1, "v", "far"), ev(2, "w", "far")])
    assert m.recommend(["u"], k=2, now_ts=3) == [["a", "twin"]]


def test_content_model_weights_recent_history_more():
    m = ContentBaseline({"a": [1.0, 0.0], "b": [0.0, 1.0], "a2": [0.9, 0.0], "b2": [0.0, 0.9]}, half_life_h=1.0)
    m.learn([ev(0, "u", "a", ts=0), ev(1, "u", "b", ts=3 * H)])
    assert m.recommend(["u"], k=2, now_ts=3 * H) == [["b", "b2"]]


def test_content_model_asks_a_vector_function_once_per_batch_for_new_items_only():
    calls = []

    def vectors(ids):
        calls.append(list(ids))
        return np.stack([RNG_VECTORS[i] for i in ids])

    m = ContentBaseline(vectors)
    m.learn([ev(0, "u", "i1"), ev(1, "v", "i2"), ev(2, "w", "i1")])
    m.learn([ev(3, "u", "i2"), ev(4, "u", "i5")])
    assert calls == [["i1", "i2"], ["i5"]]
    assert set(m.recommend(["u"], k=3, now_ts=5)[0]) == {"i1", "i2", "i5"}


def test_content_model_leaves_out_items_its_function_has_no_vector_for():
    """A zero row from the vector function means no vector: an item the catalog lacks (a replay
    admits such items without text). Until 2026-12-06 (forty-fourth session) the replay's
    function raised KeyError for them, and `recsys replay --models content` stopped in a
    traceback on any log naming an item its catalog lacks; a zero row would have been indexed,
    and ranked above every item less like the shopper than nothing."""
    known = {"a": [1.0, 0.0], "b": [0.9, 0.1], "c": [-1.0, 0.0]}
    calls = []

    def vectors(ids):
        calls.append(list(ids))
        return np.asarray([known.get(i, [0.0, 0.0]) for i in ids], dtype=np.float32)

    m = ContentBaseline(vectors, fill_half_life_h=None)
    m.learn([ev(0, "u", "a"), ev(1, "v", "x"), ev(2, "v", "b"), ev(3, "w", "c")])
    m.learn([ev(4, "v", "x")])  # asked once: it has no vector now, nor later
    assert calls == [["a", "x", "b", "c"]]
    assert m.recommend(["u"], k=3, now_ts=5) == [["a", "b", "c"]]
    assert m.recommend(["v"], k=3, now_ts=5) == [["a", "b", "c"]]  # who touched it too


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
        m = RiverBiasedMFBaseline(n_factors=4, negatives=4, learning_rate=0.1, seed=seed, fill_half_life_h=None)
        m.learn(stream(rows))
        recs = m.recommend(["me"], k=8, now_ts=999)[0]
        assert len(recs) == len(set(recs)) == 8
        pop = PopularityBaseline()
        pop.learn(stream(rows))
        assert not any(i.startswith("g1") for i in pop.recommend(["me"], k=4, now_ts=999)[0])
        g1_share.append(sum(i.startswith("g1") for i in recs[:4]) / 4)
    assert sum(g1_share) / len(g1_share) > 0.6


def test_river_mf_reading_scores_does_not_add_users_to_the_river_model():
    m = RiverBiasedMFBaseline(n_factors=2)
    m.learn(stream([("u", "a"), ("v", "b")]))
    m.recommend(["ghost"], k=2, now_ts=9)
    assert "ghost" not in m.model.u_latents


# ---- issue 14: recently seen, most bought, transitions, ItemKNN, BPR-MF, fallback counting

DAY = 24 * H


def test_recently_seen_reshows_the_users_distinct_items_newest_first_without_purchases():
    m = RecentlySeenBaseline(fill_half_life_h=None)
    m.learn(stream([("u", "a"), ("u", "b"), ("u", "c", "purchase"), ("u", "a"), ("v", "p"), ("w", "p")]))
    # a (newest), b; c was bought; then popularity: p (2)
    assert m.recommend(["u"], k=3, now_ts=9) == [["a", "b", "p"]]


def test_recently_seen_keeps_only_its_history_length():
    m = RecentlySeenBaseline(history=2, fill_half_life_h=None)
    m.learn(stream([("u", "a"), ("u", "b"), ("u", "c")]))
    assert m.recommend(["u"], k=2, now_ts=9) == [["c", "b"]]


def test_most_bought_ranks_by_purchase_count_then_recency_and_ignores_views():
    m = MostBoughtBaseline(repeat_items={"milk", "eggs", "tea", "tv"}, fill_half_life_h=None)
    m.learn(stream([("u", "eggs", "purchase"), ("u", "milk", "purchase"), ("u", "tea", "purchase"),
                    ("u", "milk", "purchase"), ("u", "tv", "click"), ("u", "tv", "click"), ("u", "tv", "click")]))
    # milk 2; tea and eggs 1 each, tea bought later; tv only viewed: after them, by popularity
    assert m.recommend(["u"], k=4, now_ts=9) == [["milk", "tea", "eggs", "tv"]]


def test_transitions_count_the_next_distinct_item_however_far_apart():
    evs = [ev(0, "u1", "a", ts=0), ev(1, "u1", "a", ts=DAY), ev(2, "u1", "b", ts=9 * DAY),  # a, a, b: one a->b
           ev(3, "u2", "a", ts=0), ev(4, "u2", "c", ts=30 * DAY), ev(5, "u3", "a", ts=0), ev(6, "u3", "c", ts=40 * DAY),
           ev(7, "me", "b", ts=0), ev(8, "me", "a", ts=50 * DAY)]
    m = TransitionBaseline(fill_half_life_h=None)
    m.learn(evs)
    assert m.recommend(["me"], k=2, now_ts=50 * DAY) == [["c", "b"]]  # a->c twice, a->b once
    assert m.fallback_stats["fell_back"] == 0


def test_itemknn_scores_are_binary_cosine_over_whole_histories():
    # users of a: u1 u2 u3 me (4); b: u1 u2 (2); c: u2 u3 u4 (3); d: u4
    rows = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u2", "c"), ("u3", "a"), ("u3", "c"),
            ("u4", "c"), ("u4", "d"), ("me", "a")]
    m = ItemKNNBaseline(fill_half_life_h=None)
    m.learn([ev(i, u, it, ts=i * 3 * DAY) for i, (u, it) in enumerate(rows)])
    idx = m._items.pos
    names, sims = m.neighbours(idx["a"])
    assert [m._items.ids[j] for j in names] == ["b", "c"]
    assert sims == pytest.approx([2 / np.sqrt(4 * 2), 2 / np.sqrt(4 * 3)])
    assert m.recommend(["me"], k=2, now_ts=99 * DAY) == [["b", "c"]]
    names, sims = m.neighbours(idx["c"])  # c: a (2 of 3 and 4 users), d (1 of 3 and 1), b (1 of 3 and 2)
    assert dict(zip([m._items.ids[j] for j in names], sims)) == pytest.approx(
        {"a": 2 / np.sqrt(12), "d": 1 / np.sqrt(3), "b": 1 / np.sqrt(6)})


def test_itemknn_shrink_lowers_similarities_of_rare_pairs():
    rows = [("u1", "a"), ("u1", "b")]
    m = ItemKNNBaseline(shrink=1.0)
    m.learn(stream(rows))
    assert m.neighbours(0)[1] == pytest.approx([1 / (1 + 1)])


def _days_apart_log(n_users=40, groups=10, n_long=10):
    """Each user walks the chain x -> y -> z (-> w for the first ``n_long`` users) of their
    group, two to three days between events: one event per visit, as on a review log."""
    events, i = [], 0
    for u in range(n_users):
        g = u % groups
        for step, item in enumerate(("x", "y", "z", "w")[: 4 if u < n_long else 3]):
            events.append(Event(f"e{i}", "click", f"u{u}", f"{item}{g}", (u * 7 + step * 2) * DAY + u * H))
            i += 1
    return sorted(events, key=lambda e: e.ts)


def test_on_a_log_of_events_days_apart_itemknn_and_transitions_find_neighbours_and_time_window_models_fall_back():
    events = _days_apart_log()
    models = [ItemKNNBaseline(), TransitionBaseline(), CoVisitationBaseline(), SessionKNNBaseline(), PopularityBaseline()]
    r = leave_last_out(models, events, ks=(10,), progress=False)
    fb = r["fallback"]
    assert "popularity" not in fb  # popularity is the fallback
    assert fb["itemknn"]["lists"] == fb["transitions"]["lists"] == 40
    assert fb["itemknn"]["fell_back"] == 0  # every history item has co-occurring items
    # the 30 short walkers' last item y has the successor z (from their group's long walker);
    # the 10 long walkers' last item z has none in training (every w is held out)
    assert fb["transitions"]["fell_back"] == 10
    assert fb["covisitation"]["share"] == 1.0  # every pair is further apart than its 24 h gap
    assert fb["session_knn"]["share"] == 1.0  # one-event sessions: neighbours only re-vote the user's item
    # real neighbours find the held-out z of the short walkers; the fallen-back models cannot
    assert r["models"]["transitions"]["recall@10"] == pytest.approx(30 / 40)
    assert r["models"]["itemknn"]["recall@10"] >= 30 / 40
    assert r["models"]["covisitation"]["recall@10"] == r["models"]["popularity"]["recall@10"] < 0.5


def test_fallback_is_counted_only_for_users_the_model_knows():
    m = TransitionBaseline()
    m.learn(stream([("u", "a"), ("v", "a"), ("v", "b")]))
    m.recommend(["u", "v", "stranger"], k=2, now_ts=9)  # u: a->b; v: b has no successor; stranger unknown
    assert m.fallback_stats == {"lists": 2, "fell_back": 1, "share": 0.5, "users": 2, "users_fell_back": 1,
                                "user_share": 0.5}
    assert PopularityBaseline().fallback_stats is None


def test_bpr_mf_personalises_against_popularity():
    shares = []
    for seed in range(3):
        rng = random.Random(seed)
        rows = []
        for _ in range(400):
            u = rng.randrange(10)
            rows.append((f"u{u}", f"{'g1' if u < 3 else 'g2'}_{rng.randrange(4)}"))
        m = BPRMFBaseline(factors=8, epochs=40, seed=seed, fill_half_life_h=None)
        m.learn(stream(rows))
        recs = m.recommend(["u0"], k=4, now_ts=999)[0]
        shares.append(sum(i.startswith("g1") for i in recs) / 4)
    assert sum(shares) / len(shares) > 0.7


def test_bpr_mf_with_a_retrain_period_trains_at_the_first_ask_of_each_new_period():
    m = BPRMFBaseline(factors=2, epochs=1, retrain_every_h=24.0)
    m.learn([ev(0, "u", "a", ts=0), ev(1, "v", "b", ts=H)])
    m.recommend(["u"], k=1, now_ts=2 * H)  # day 0: the first ask fixes the period, nothing trained yet
    assert m.trainings == 0 and m.fallback_stats["fell_back"] == 1
    m.recommend(["u"], k=1, now_ts=DAY + H)  # day 1: the nightly job has run
    m.recommend(["u"], k=1, now_ts=DAY + 2 * H)
    assert m.trainings == 1 and m.fallback_stats["fell_back"] == 1
    m.learn([ev(2, "w", "c", ts=DAY + 3 * H)])
    m.recommend(["w"], k=1, now_ts=DAY + 4 * H)  # w arrived after the training: not in the model
    assert m.trainings == 1 and m.fallback_stats["fell_back"] == 2
    m.recommend(["w"], k=1, now_ts=2 * DAY)
    assert m.trainings == 2 and m.fallback_stats["fell_back"] == 2


def test_bpr_mf_trains_once_in_leave_last_out_style_use():
    m = BPRMFBaseline(factors=2, epochs=1)
    m.learn(random_stream())
    m.recommend(["u1"], k=3, now_ts=0)
    m.recommend(["u2"], k=3, now_ts=0)
    assert m.trainings == 1
