"""Bootstrap intervals over users for the full system's margin: hand-computed small cases."""

import pytest

from recsys.backtest.bootstrap import margin_ci, margins


def _pu(values, n=None):
    """per-user sums of one metric "m@1" from {user: sum}."""
    users = list(values)
    return {"metrics": ["m@1"], "users": users, "n": [(n or {}).get(u, 1) for u in users],
            "sums": [[values[u]] for u in users]}


def test_a_constant_ratio_on_every_user_gives_a_degenerate_interval_and_a_win():
    pu = {"full": _pu({"a": 0.6, "b": 0.3, "c": 0.9}), "base": _pu({"a": 0.3, "b": 0.15, "c": 0.45})}
    r = margin_ci(pu, "full", "base", "m@1", n_boot=300, seed=1)
    assert r["margin"] == pytest.approx(1.0)
    assert r["ci95"] == pytest.approx([1.0, 1.0])
    assert r["verdict"] == "win"


def test_identical_models_are_not_a_win():
    pu = {"full": _pu({"a": 1.0, "b": 0.0, "c": 0.5}), "base": _pu({"a": 1.0, "b": 0.0, "c": 0.5})}
    r = margin_ci(pu, "full", "base", "m@1", n_boot=300)
    assert r["margin"] == 0.0 and r["ci95"] == [0.0, 0.0] and r["verdict"] == "not significant"


def test_two_users_interval_matches_the_hand_computed_resampling_distribution():
    # u1: full 1.0 vs base 0.5; u2: 0.5 vs 0.5. Resamples of two users: {u1,u1} margin 1 (p 1/4),
    # {u1,u2} 1.5/1 - 1 = 0.5 (p 1/2), {u2,u2} 0 (p 1/4): the 2.5th and 97.5th percentiles are 0 and 1
    pu = {"full": _pu({"u1": 1.0, "u2": 0.5}), "base": _pu({"u1": 0.5, "u2": 0.5})}
    r = margin_ci(pu, "full", "base", "m@1", n_boot=4000, seed=0)
    assert r["margin"] == pytest.approx(0.5)
    assert r["ci95"] == pytest.approx([0.0, 1.0])
    assert r["verdict"] == "not significant"  # the interval touches zero


def test_users_with_more_lists_weigh_more_and_a_worse_full_system_is_a_loss():
    # means are over lists: full (0 + 2) / (1 + 4) = 0.4, base (1 + 3) / 5 = 0.8
    pu = {"full": _pu({"a": 0.0, "b": 2.0}, n={"b": 4}), "base": _pu({"a": 1.0, "b": 3.0}, n={"b": 4})}
    r = margin_ci(pu, "full", "base", "m@1", n_boot=500)
    assert r["full_value"] == pytest.approx(0.4) and r["baseline_value"] == pytest.approx(0.8)
    assert r["margin"] == pytest.approx(-0.5)
    assert r["ci95"][1] < 0 and r["verdict"] == "loss"


def test_the_bootstrap_is_seeded():
    pu = {"full": _pu({f"u{i}": (i % 3) / 2 for i in range(30)}), "base": _pu({f"u{i}": (i % 2) / 2 for i in range(30)})}
    assert margin_ci(pu, "full", "base", "m@1", seed=7) == margin_ci(pu, "full", "base", "m@1", seed=7)
    assert margin_ci(pu, "full", "base", "m@1", seed=7)["ci95"] != margin_ci(pu, "full", "base", "m@1", seed=8)["ci95"]


def test_margins_pick_the_best_baseline_per_metric_and_never_an_ablation():
    result = {
        "models": {"full-system": {"m@1": 0.5}, "pop": {"m@1": 0.2}, "knn": {"m@1": 0.25},
                   "full-system/frozen": {"m@1": 0.45}},
        "_per_user": {"full-system": _pu({"a": 0.5}), "pop": _pu({"a": 0.2}), "knn": _pu({"a": 0.25}),
                      "full-system/frozen": _pu({"a": 0.45})},
    }
    m = margins(result, ["m@1"], n_boot=50)
    assert m["m@1"]["baseline"] == "knn" and m["m@1"]["margin"] == pytest.approx(1.0)
    assert margins({"models": {}, "_per_user": {"pop": _pu({"a": 1.0})}}, ["m@1"]) == {}
