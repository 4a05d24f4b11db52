"""Ranking metrics against hand-computed small cases."""

import math

import pytest

from recsys.backtest.metrics import (
    MetricAccumulator,
    catalog_coverage,
    hr_at_k,
    mrr_at_k,
    ndcg_at_k,
    novelty,
    recall_at_k,
)

RECS = ["a", "b", "c", "d", "e"]


def test_hr_is_one_only_when_a_relevant_item_is_within_the_cutoff():
    assert hr_at_k(RECS, {"c"}, 2) == 0.0
    assert hr_at_k(RECS, {"c"}, 3) == 1.0
    assert hr_at_k(RECS, {"z"}, 5) == 0.0


def test_recall_counts_the_share_of_relevant_items_found():
    # relevant {b, d, z}: b (rank 2) and d (rank 4) within k=4 -> 2/3; within k=3 only b -> 1/3
    assert recall_at_k(RECS, {"b", "d", "z"}, 4) == pytest.approx(2 / 3)
    assert recall_at_k(RECS, {"b", "d", "z"}, 3) == pytest.approx(1 / 3)


def test_ndcg_of_a_single_hit_at_rank_three_is_one_over_log2_of_four():
    assert ndcg_at_k(RECS, {"c"}, 10) == 0.5


def test_ndcg_of_a_hit_at_rank_one_is_one():
    assert ndcg_at_k(RECS, {"a"}, 10) == 1.0


def test_ndcg_with_two_relevant_items_divides_by_the_ideal_of_two_hits():
    # hits at ranks 2 and 4: DCG = 1/log2(3) + 1/log2(5); IDCG = 1 + 1/log2(3)
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(RECS, {"b", "d"}, 5) == pytest.approx(expected)


def test_ndcg_ideal_is_capped_at_k_hits():
    # 3 relevant, k=2, hits at ranks 1 and 2 -> DCG equals the ideal of min(k, 3) = 2 hits
    assert ndcg_at_k(RECS, {"a", "b", "e"}, 2) == pytest.approx(1.0)


def test_ndcg_ignores_hits_beyond_the_cutoff():
    assert ndcg_at_k(RECS, {"d"}, 3) == 0.0


def test_mrr_is_the_reciprocal_rank_of_the_first_hit():
    assert mrr_at_k(RECS, {"d", "c"}, 5) == pytest.approx(1 / 3)
    assert mrr_at_k(RECS, {"d"}, 3) == 0.0


def test_a_duplicated_recommendation_counts_once():
    recs = ["a", "a", "b"]
    assert recall_at_k(recs, {"a", "b"}, 3) == 1.0
    # a at rank 1, b at rank 3: (1 + 0.5) / (1 + 1/log2(3))
    assert ndcg_at_k(recs, {"a", "b"}, 3) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))


def test_metrics_refuse_an_empty_relevant_set():
    with pytest.raises(ValueError, match="relevant is empty"):
        ndcg_at_k(RECS, set(), 10)


def test_coverage_counts_distinct_items_in_the_top_k_over_catalog_size():
    # top-2 lists: {a, b} and {b, c} -> 3 distinct of 6
    assert catalog_coverage([["a", "b", "x"], ["b", "c", "y"]], catalog_size=6, k=2) == 0.5


def test_novelty_is_the_mean_self_information_of_recommended_items():
    counts = {"a": 8, "b": 2}
    # -log2(8/16) = 1, -log2(2/16) = 3, unseen c counts as 1: -log2(1/16) = 4
    assert novelty(["a", "b", "c"], counts, total=16, k=3) == pytest.approx((1 + 3 + 4) / 3)
    assert novelty(["a", "b", "c"], counts, total=16, k=1) == pytest.approx(1.0)


def test_accumulator_means_match_hand_computed_values_per_cutoff():
    acc = MetricAccumulator(ks=(1, 3))
    acc.add(["a", "b", "c"], {"c"})  # hit at 3
    acc.add(["x", "y", "z"], {"q"})  # miss
    acc.add(["c", "d", "e"], {"c"})  # hit at 1
    r = acc.report()["overall"]
    assert r["n"] == 3
    assert r["hr@1"] == pytest.approx(1 / 3)
    assert r["hr@3"] == pytest.approx(2 / 3)
    assert r["ndcg@3"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert r["mrr@3"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert r["recall@3"] == pytest.approx(2 / 3)


def test_accumulator_coverage_uses_the_given_catalog_size():
    acc = MetricAccumulator(ks=(2,))
    acc.add(["a", "b", "c"], {"a"})
    acc.add(["a", "d"], {"a"})
    assert acc.report(catalog_size=10)["overall"]["coverage@2"] == pytest.approx(3 / 10)


def test_accumulator_splits_by_event_type_and_slice_tags():
    acc = MetricAccumulator(ks=(1,))
    acc.add(["a"], {"a"}, event_type="click", tags=("new_user", "new_item"))
    acc.add(["a"], {"b"}, event_type="click", tags=("returning_user",))
    acc.add(["b"], {"b"}, event_type="purchase", tags=("returning_user",))
    r = acc.report()
    assert r["per_type"]["click"]["hr@1"] == 0.5
    assert r["per_type"]["purchase"]["hr@1"] == 1.0
    assert r["slices"]["new_user"]["n"] == 1 and r["slices"]["new_item"]["hr@1"] == 1.0
    assert r["slices"]["returning_user"]["hr@1"] == 0.5


def test_accumulator_novelty_averages_lists_that_had_popularity():
    acc = MetricAccumulator(ks=(1,))
    acc.add(["a"], {"a"}, item_counts={"a": 1, "b": 3}, total=4)  # -log2(1/4) = 2
    acc.add(["b"], {"a"}, item_counts={"a": 1, "b": 3}, total=4)  # -log2(3/4)
    acc.add(["b"], {"a"})  # no popularity: not part of the novelty mean
    assert acc.report()["overall"]["novelty@1"] == pytest.approx((2 - math.log2(3 / 4)) / 2)


def test_accumulator_series_has_one_point_per_n_lists():
    acc = MetricAccumulator(ks=(1,), series_every=2)
    for i, hit in enumerate([1, 1, 0, 0, 1]):
        acc.add(["a"], {"a" if hit else "b"}, ts=100 + i)
    series = acc.report()["series"]
    assert [p["n"] for p in series] == [2, 2, 1]
    assert [p["hr@1"] for p in series] == [1.0, 0.0, 1.0]
    assert (series[0]["start_ts"], series[0]["end_ts"]) == (100, 101)


def test_accumulator_series_can_bucket_by_time():
    acc = MetricAccumulator(ks=(1,), series_bucket_ms=1000)
    for ts, hit in [(10, 1), (999, 0), (1000, 1), (2500, 1)]:
        acc.add(["a"], {"a" if hit else "b"}, ts=ts)
    series = acc.report()["series"]
    assert [(p["start_ts"], p["n"], p["hr@1"]) for p in series] == [(10, 2, 0.5), (1000, 1, 1.0), (2500, 1, 1.0)]
