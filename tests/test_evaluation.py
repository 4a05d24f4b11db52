"""Prequential and leave-last-out protocols: ordering, scoring, chunking, contract."""

import random

import pytest

from recsys.backtest.baselines import CoVisitationBaseline, PopularityBaseline
from recsys.backtest.protocols import (
    BacktestModel,
    leave_last_out,
    prequential,
    user_disjoint_chunks,
)
from recsys.events import Event


def ev(i, user, item, etype="click", ts=None, **kw):
    return Event(f"e{i}", etype, user, item, i if ts is None else ts, **kw)


def stream(pairs, etype="click"):
    return [ev(i, u, it, etype) for i, (u, it) in enumerate(pairs)]


class OwnHistoryModel:
    """Recommends the user's own past items, most recent first: depends only on their events."""

    def __init__(self, name="own_history"):
        self.name = name
        self.hist = {}

    def learn(self, events):
        for e in events:
            if e.item_id is not None:
                h = self.hist.setdefault(e.user_id, [])
                if e.item_id in h:
                    h.remove(e.item_id)
                h.append(e.item_id)

    def recommend(self, user_ids, k, now_ts):
        return [list(reversed(self.hist.get(u, [])))[:k] for u in user_ids]


class RecordingModel:
    """Records every call, recommends the globally last learned item."""

    def __init__(self, name):
        self.name = name
        self.learned = []
        self.asked = []

    def learn(self, events):
        self.learned.extend(events)

    def recommend(self, user_ids, k, now_ts):
        self.asked.append((list(user_ids), k, now_ts))
        last = [e.item_id for e in self.learned if e.item_id is not None][-1:]
        return [list(last) for _ in user_ids]


def random_stream(n=600, users=25, items=40, seed=7):
    rng = random.Random(seed)
    types = ["browse", "click", "click", "add_to_cart", "purchase", "search"]
    out = []
    for i in range(n):
        t = rng.choice(types)
        item = None if t == "search" else f"i{int(rng.paretovariate(1.2)) % items}"
        out.append(Event(f"e{i}", t, f"u{rng.randrange(users)}", item, 1000 * i, query="q" if t == "search" else None))
    return out


def deterministic_part(result):
    return {k: v for k, v in result.items() if k not in ("seconds", "events_per_s", "timing", "batch_size")}


def test_baselines_and_test_doubles_satisfy_the_model_protocol():
    assert isinstance(OwnHistoryModel(), BacktestModel)
    assert isinstance(PopularityBaseline(), BacktestModel)


def test_chunks_never_repeat_a_user_and_keep_stream_order():
    events = random_stream(200)
    chunks = list(user_disjoint_chunks(events, 10))
    assert [e for c in chunks for e in c] == events
    assert all(len(c) <= 10 and len({e.user_id for e in c}) == len(c) for c in chunks)


def test_prequential_scores_an_event_before_learning_it():
    # the recording model recommends the last learned item; every item is new, so learning the
    # scored event first would make every recommendation a hit
    events = stream([("u1", "a"), ("u2", "b"), ("u1", "c"), ("u3", "d")])
    r = prequential([RecordingModel("rec")], events, ks=(1,), batch_size=1, progress=False)
    assert r["models"]["rec"]["hr@1"] == 0.0


def test_prequential_with_batch_size_one_matches_hand_computed_popularity():
    # pop before each event: {} -> miss; {a:1} u2 a hit; {a:2} u3 b miss; {a:2,b:1} u4 b: rank 2
    events = stream([("u1", "a"), ("u2", "a"), ("u3", "b"), ("u4", "b")])
    r = prequential([PopularityBaseline()], events, ks=(1, 2), batch_size=1, progress=False)
    m = r["models"]["popularity"]
    assert m["hr@1"] == pytest.approx(1 / 4)
    assert m["hr@2"] == pytest.approx(2 / 4)
    assert m["mrr@2"] == pytest.approx((1 + 0.5) / 4)


def test_prequential_results_do_not_depend_on_chunking_for_a_per_user_model():
    events = random_stream()
    runs = [
        prequential([OwnHistoryModel()], events, ks=(1, 5), batch_size=b, progress=False) for b in (1, 7, 500)
    ]
    assert deterministic_part(runs[0]) == deterministic_part(runs[1]) == deterministic_part(runs[2])
    assert runs[0]["models"]["own_history"]["hr@5"] > 0  # the comparison is not vacuous


def test_per_user_results_do_not_depend_on_chunking_when_baskets_of_one_moment_interleave():
    """A log whose times are to the second holds users' same-moment events interleaved with other
    users' (and rows written twice): until 2026-12-07 a full chunk could close inside a user's
    basket, so its second event was scored after the first was learned at one batch size and
    with it at another (an operator's probe: recently-seen HR@10 0.525 against 0.299)."""
    rng = random.Random(7)
    events, n = [], 0
    for second in range(300):
        users = [f"u{rng.randrange(40)}" for _ in range(rng.randrange(1, 6))]
        for user in users + users:  # each of the moment's users twice, the others between
            events.append(ev(n, user, f"i{rng.randrange(30)}", ts=1000 * second))
            n += 1
    runs = [prequential([OwnHistoryModel()], events, ks=(1, 5), batch_size=b, progress=False) for b in (1, 3, 500)]
    assert deterministic_part(runs[0]) == deterministic_part(runs[1]) == deterministic_part(runs[2])
    assert runs[0]["models"]["own_history"]["hr@5"] > 0
    assert all(len({e.user_id for e in c}) == len({(e.user_id, e.ts) for e in c}) for c in user_disjoint_chunks(events, 1))


def test_prequential_is_deterministic_for_the_baselines():
    events = random_stream()
    a = prequential([PopularityBaseline(), CoVisitationBaseline()], events, progress=False, batch_size=50)
    b = prequential([PopularityBaseline(), CoVisitationBaseline()], events, progress=False, batch_size=50)
    assert deterministic_part(a) == deterministic_part(b)


def test_every_model_sees_exactly_the_same_stream_and_requests():
    events = random_stream(300)
    m1, m2 = RecordingModel("one"), RecordingModel("two")
    prequential([m1, m2], events, batch_size=20, progress=False)
    assert m1.learned == m2.learned == events
    assert m1.asked == m2.asked


def test_next_purchase_scores_only_cart_and_purchase_events_but_learns_all():
    events = [
        ev(0, "u1", "a", "click"),
        ev(1, "u1", "a", "add_to_cart"),
        ev(2, "u2", "b", "browse"),
        ev(3, "u2", "b", "purchase"),
        ev(4, "u1", None, "search", query="shoes"),
    ]
    model = OwnHistoryModel()
    r = prequential([model], events, ks=(1,), target="next_purchase", progress=False)
    assert r["scored"] == 2
    assert set(r["per_type"]["own_history"]) == {"add_to_cart", "purchase"}
    assert r["models"]["own_history"]["hr@1"] == 1.0  # the click/browse before each was learned


def test_search_events_are_learned_but_not_scored():
    events = [ev(0, "u1", None, "search", query="q"), ev(1, "u1", "a", "click")]
    rec = RecordingModel("rec")
    r = prequential([rec], events, progress=False, batch_size=1)
    assert r["scored"] == 1 and rec.learned == events


def test_slices_tag_new_users_and_new_items_at_their_first_appearance():
    # u1 a (new user, new item); u2 a (new user); u1 b (returning, new item); u2 b (returning)
    events = stream([("u1", "a"), ("u2", "a"), ("u1", "b"), ("u2", "b")])
    r = prequential([OwnHistoryModel()], events, ks=(1,), progress=False)
    s = r["slices"]["own_history"]
    assert (s["new_user"]["n"], s["returning_user"]["n"], s["new_item"]["n"]) == (2, 2, 2)


def test_result_has_the_contract_keys():
    r = prequential([PopularityBaseline()], random_stream(100), progress=False)
    for key in ("models", "per_type", "slices", "series", "events", "seconds", "events_per_s", "exclude_history"):
        assert key in r
    metrics = r["models"]["popularity"]
    for name in ("hr@10", "recall@10", "ndcg@10", "mrr@10", "coverage@10", "novelty@10", "ndcg@20"):
        assert isinstance(metrics[name], float)
    assert r["events"] == 100 and r["series"]["popularity"]


def test_unsorted_events_are_refused():
    with pytest.raises(ValueError, match="sorted by ts"):
        prequential([PopularityBaseline()], [ev(0, "u", "a", ts=5), ev(1, "u", "b", ts=4)], progress=False)


def test_duplicate_model_names_are_refused():
    with pytest.raises(ValueError, match="unique"):
        prequential([PopularityBaseline(), PopularityBaseline()], random_stream(10), progress=False)


def test_leave_last_out_holds_out_each_users_last_interaction_only_for_users_with_two():
    events = stream([("u1", "a"), ("u2", "x"), ("u1", "b"), ("u3", "a"), ("u3", "c")])
    rec = RecordingModel("rec")
    r = leave_last_out([rec], events, ks=(1,), progress=False)
    assert r["scored"] == 2  # u1 and u3; u2 has one interaction
    held = {events[2], events[4]}
    assert rec.learned == [e for e in events if e not in held]
    assert r["exclude_history"] is True


def test_leave_last_out_learns_other_users_later_events():
    # u1's held-out b (ts 1) is predictable only from u2's later events (ts 2, 3)
    events = stream([("u1", "a"), ("u1", "b"), ("u2", "b"), ("u3", "b")])
    r = leave_last_out([PopularityBaseline()], events, ks=(1,), progress=False)
    assert r["models"]["popularity"]["hr@1"] == 1.0


def test_leave_last_out_excluding_history_drops_the_users_own_items():
    # pop: a=3, b=1 (u1 holds out b). With history {a} dropped, b is first; without, a is first.
    events = stream([("u2", "a"), ("u3", "a"), ("u1", "a"), ("u4", "b"), ("u1", "b")])
    on = leave_last_out([PopularityBaseline()], events, ks=(1,), progress=False)
    off = leave_last_out([PopularityBaseline()], events, ks=(1,), exclude_history=False, progress=False)
    assert on["models"]["popularity"]["hr@1"] == 1.0
    assert off["models"]["popularity"]["hr@1"] == 0.0
    assert off["exclude_history"] is False


def test_leave_last_out_does_not_depend_on_the_ranking_batch_size():
    events = random_stream(800, users=40)
    a = leave_last_out([PopularityBaseline(), CoVisitationBaseline()], events, batch_size=1, progress=False)
    b = leave_last_out([PopularityBaseline(), CoVisitationBaseline()], events, batch_size=1000, progress=False)
    assert deterministic_part(a) == deterministic_part(b)
    assert a["models"]["covisitation"]["recall@50"] > 0


# --------------------------------------------------------------------------- report


def test_write_report_writes_contract_json_markdown_and_valid_pngs(tmp_path):
    import json

    from matplotlib.image import imread

    from recsys.backtest.report import write_report

    result = prequential([PopularityBaseline(), CoVisitationBaseline()], random_stream(400), ks=(5, 10),
                         progress=False, dataset="synthetic")
    paths = write_report(result, tmp_path / "out", title="Synthetic backtest", command="recsys backtest --demo")
    names = {p.name for p in paths}
    assert {"metrics.json", "report.md", "series_hr_5.png", "series_ndcg_5.png", "per_type.png", "slices.png"} <= names
    assert all(p.exists() for p in paths)

    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("protocol", "dataset", "exclude_history", "events", "seconds", "models"):
        assert key in data
    assert data["protocol"] == "prequential" and data["dataset"] == "synthetic" and data["events"] == 400
    assert data["models"]["popularity"]["ndcg@5"] == result["models"]["popularity"]["ndcg@5"]

    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            image = imread(p)
            assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_a_report_written_where_an_earlier_one_was_leaves_none_of_its_plots(tmp_path):
    """An --out directory used again kept the earlier run's plots (its @5 series, its phases)
    beside the new report, where they passed for this run's (an operator's probe, 2026-12-06)."""
    from recsys.backtest.report import write_report

    events = random_stream(400)
    first = prequential([PopularityBaseline()], events, ks=(5,), progress=False, dataset="synthetic")
    write_report(first, tmp_path, title="first", command="recsys replay ...")
    assert (tmp_path / "series_hr_5.png").exists()
    second = prequential([PopularityBaseline()], events, ks=(10,), progress=False, dataset="synthetic")
    paths = write_report(second, tmp_path, title="second", command="recsys replay ... --k 10")
    on_disk = {p.name for p in tmp_path.iterdir()}
    assert on_disk == {p.name for p in paths} and "series_hr_5.png" not in on_disk and "series_hr_10.png" in on_disk


def test_report_markdown_bolds_the_best_model_per_column_and_states_the_protocol(tmp_path):
    from recsys.backtest.report import write_report

    result = {
        "protocol": "leave_last_out", "exclude_history": True, "events": 10, "seconds": 1.0, "ks": [10],
        "exclusion": "history dropped",
        "models": {"a": {"hr@10": 0.5, "ndcg@10": 0.1}, "b": {"hr@10": 0.25, "ndcg@10": 0.2}},
    }
    write_report(result, tmp_path, title="T", command="recsys backtest --protocol loo")
    md = (tmp_path / "report.md").read_text()
    assert "| a | **0.5000** | 0.1000 |" in md
    assert "| b | 0.2500 | **0.2000** |" in md
    assert "leave_last_out" in md and "exclude_history: True" in md
    assert "recsys backtest --protocol loo" in md


def test_results_carry_each_baselines_fallback_and_per_user_sums_that_add_up_to_the_means():
    from recsys.backtest.history_baselines import TransitionBaseline

    evs = [Event(str(i), "click", u, it, i) for i, (u, it) in enumerate(
        [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "c"), ("u3", "a"), ("u1", "c")])]
    r = prequential([PopularityBaseline(), TransitionBaseline()], evs, ks=(1,), batch_size=1, progress=False)
    assert set(r["fallback"]) == {"transitions"}  # popularity is the fallback itself
    # known users asked: u1 (after a: no successor yet), u2 (after a: a->b), u3 (after c: none), u1 (after b: none)
    assert r["fallback"]["transitions"]["lists"] == 4 and r["fallback"]["transitions"]["fell_back"] == 3
    for name in ("popularity", "transitions"):
        pu = r["_per_user"][name]
        col = pu["metrics"].index("hr@1")
        assert sum(pu["n"]) == r["scored"]
        assert sum(s[col] for s in pu["sums"]) / sum(pu["n"]) == pytest.approx(r["models"][name]["hr@1"])
