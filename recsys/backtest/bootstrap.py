"""Bootstrap confidence intervals over users for the full system's margin over a baseline.

A backtest's metric is a mean over scored lists; lists of one user are not independent, so
the unit resampled is the user: each resample draws as many users as were scored, with
replacement, and recomputes both models' means (sum over the drawn users' lists / number of
their lists) and the relative margin ``full / baseline - 1``. The 95% interval is the 2.5th
and 97.5th percentile of the margins. A margin is a **win** only when its interval lies above
zero (a **loss** when below); otherwise it is not significant.

Input: the ``"_per_user"`` entry of a result of :mod:`recsys.backtest.protocols` (see
:meth:`recsys.backtest.metrics.MetricAccumulator.per_user`).

>>> pu = {"full": {"metrics": ["hr@1"], "users": ["a", "b"], "n": [1, 1], "sums": [[1.0], [1.0]]},
...       "base": {"metrics": ["hr@1"], "users": ["a", "b"], "n": [1, 1], "sums": [[0.5], [0.5]]}}
>>> r = margin_ci(pu, "full", "base", "hr@1", n_boot=200, seed=0)
>>> r["margin"], r["ci95"], r["verdict"]
(1.0, [1.0, 1.0], 'win')
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["margin_ci", "margins", "user_sums"]


def user_sums(per_user: dict[str, Any], users: list[str], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(lists per user, metric sum per user)`` aligned to ``users`` (0 for absent users)."""
    col = per_user["metrics"].index(metric)
    pos = {u: j for j, u in enumerate(per_user["users"])}
    n = np.zeros(len(users))
    s = np.zeros(len(users))
    for j, u in enumerate(users):
        p = pos.get(u)
        if p is not None:
            n[j] = per_user["n"][p]
            s[j] = per_user["sums"][p][col]
    return n, s


def margin_ci(per_user: dict[str, dict[str, Any]], full: str, baseline: str, metric: str, *,
              n_boot: int = 1000, seed: int = 0, chunk: int = 50) -> dict[str, Any]:
    """The relative margin of ``full`` over ``baseline`` on ``metric`` with its 95% bootstrap
    interval over users: ``{"baseline", "full_value", "baseline_value", "margin", "ci95",
    "verdict"}``; ``margin`` is None where the baseline scores 0."""
    users = list(dict.fromkeys(per_user[full]["users"] + per_user[baseline]["users"]))
    n_f, s_f = user_sums(per_user[full], users, metric)
    n_b, s_b = user_sums(per_user[baseline], users, metric)
    f_val = s_f.sum() / max(n_f.sum(), 1)
    b_val = s_b.sum() / max(n_b.sum(), 1)
    out: dict[str, Any] = {"baseline": baseline, "full_value": float(f_val), "baseline_value": float(b_val),
                           "margin": None, "ci95": None, "verdict": "n/a", "n_boot": n_boot, "users": len(users)}
    if b_val <= 0 or not users:
        return out
    rng = np.random.default_rng(seed)
    margins = []
    for lo in range(0, n_boot, chunk):
        idx = rng.integers(0, len(users), size=(min(chunk, n_boot - lo), len(users)))
        full_mean = s_f[idx].sum(1) / np.maximum(n_f[idx].sum(1), 1)
        base_mean = s_b[idx].sum(1) / np.maximum(n_b[idx].sum(1), 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            margins.append(np.where(base_mean > 0, full_mean / base_mean - 1.0, np.nan))
    draws = np.concatenate(margins)
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    out["margin"] = float(f_val / b_val - 1.0)
    out["ci95"] = [float(low), float(high)]
    out["verdict"] = "win" if low > 0 else "loss" if high < 0 else "not significant"
    return out


def margins(result: dict[str, Any], metrics: list[str], *, full: str = "full-system", n_boot: int = 1000,
            seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per metric, the full system's margin over the best baseline on that metric (the best
    by the point estimate; ablations of the full system, named ``full-system/...``, are not
    baselines), with its interval. Empty when the result has no full system or no baseline."""
    per_user = result.get("_per_user") or {}
    models = result.get("models") or {}
    if full not in per_user:
        return {}
    baselines = [n for n in per_user if n != full and not n.startswith(full + "/")]
    out = {}
    for metric in metrics:
        scored = [n for n in baselines if metric in models.get(n, {})]
        if not scored or metric not in per_user[full]["metrics"]:
            continue
        best = max(scored, key=lambda n: (models[n][metric], n))
        out[metric] = margin_ci(per_user, full, best, metric, n_boot=n_boot, seed=seed)
    return out
