"""Search weights fitted on the first part of search replays, scored on the rest (issue 13).

    recsys replay --task search --format completejourney --limit 200000 --search-sample 0.03 --search-features --out runs/search-cj
    .venv/bin/python benchmarks/search_weights.py runs/search-cj/search_features.npz runs/search-rees46/search_features.npz

``--search-features`` keeps, for every scored search, the eligible candidates and their signals
exactly as the replay ranked them (``recsys/search/replay.py``: ``SearchScorer.save_features``).
Each log's searches are split in stream order: the first ``--fit-share`` (default half) fit the
weights, the rest are scored, so no weight is ever fitted on a search it is scored on. Fitted
(a listwise softmax: the engaged item against all of its search's candidates, L2 toward 0,
each log weighing equally): all signals; the non-personal ones alone (a fair ablation); and
the personal ones with the non-personal weights fixed as they are (plus a free temperature),
which is how ``DEFAULT_WEIGHTS``' personal weights were set. Printed per log on the scored
part: the current default weights (which first reproduce the replay's ``full`` row over all
searches, as a check), the hand-set personal weights they replaced and the fitted ones, with
HR@10 / NDCG@10 / MRR@10 overall and NDCG@10 for targets new to the shopper and already known,
and paired bootstrap intervals of the margins. The ranking is the replay's: score descending,
ties by item id.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy.optimize import minimize

from recsys.search.service import DEFAULT_WEIGHTS, PERSONAL

K = 10
#: The personal weights before they were fitted (hand-set), for the comparison row.
HAND_SET_PERSONAL = {"affinity": 0.3, "category": 0.5, "brand": 0.3, "bought": 1.0, "seen": 0.3, "price": 0.2, "rebuy": 0.0}


def load(path: str) -> dict:
    z = np.load(path)
    return {name: z[name] for name in z.files}


def metrics(d: dict, w: np.ndarray, searches: range) -> dict[str, float]:
    """HR/NDCG/MRR@K of ranking each search's candidates by ``x . w`` (ties by id); ``"per
    search"``: each search's NDCG@K, in order."""
    x, off, idr, target, slices = d["x"], d["offsets"], d["id_rank"], d["target"], d["slices"]
    sums: dict[str, list[float]] = {}
    per_search = []
    for s in searches:
        rank = None
        t = int(target[s])
        if t >= 0:
            lo, hi = int(off[s]), int(off[s + 1])
            score = x[lo:hi].astype(np.float64) @ w
            ties = idr[lo:hi]
            better = (score > score[t]) | ((score == score[t]) & (ties < ties[t]))
            rank = int(better.sum())  # 0-based
        hit = rank is not None and rank < K
        values = (float(hit), 1.0 / math.log2(rank + 2) if hit else 0.0, 1.0 / (rank + 1) if hit else 0.0)
        per_search.append(values[1])
        for name in ("all", "target new to user" if "target new to user" in str(slices[s]) else "target in user history"):
            sums.setdefault(name, []).append(values)
    out = {}
    for name, rows in sums.items():
        a = np.array(rows)
        out[name] = {"n": len(a), f"hr@{K}": a[:, 0].mean(), f"ndcg@{K}": a[:, 1].mean(), f"mrr@{K}": a[:, 2].mean()}
    out["per search"] = np.array(per_search)  # type: ignore[assignment]
    return out


def margin_ci(full: np.ndarray, ablation: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Relative NDCG gain of ``full`` over ``ablation`` (paired per search) with a 95% bootstrap interval."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(full), size=(rounds, len(full)))
    ratios = full[idx].mean(axis=1) / np.maximum(ablation[idx].mean(axis=1), 1e-12) - 1
    return full.mean() / max(ablation.mean(), 1e-12) - 1, float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def fit(logs: list[tuple[dict, range]], mask: np.ndarray, l2: float, fixed: np.ndarray | None = None) -> np.ndarray:
    """Listwise softmax weights over the signals in ``mask``: the mean over ``logs`` of each
    log's mean loss on its searches (those whose target is among the candidates). ``fixed``:
    the other signals keep these weights (added to every score) and the fitted ones stay >= 0."""
    parts = []
    for d, searches in logs:
        x, off, target = d["x"].astype(np.float64), d["offsets"], d["target"]
        rows = [(x[int(off[s]):int(off[s + 1])], int(target[s])) for s in searches if target[s] >= 0]
        parts.append([(xs[:, mask] if fixed is None else np.column_stack([xs[:, mask], xs[:, ~mask] @ fixed[~mask]]), t)
                      for xs, t in rows])
    extra = 0 if fixed is None else 1  # the fixed signals' score: one more column, its weight (a temperature) fitted too

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        total, grad = 0.0, np.zeros_like(w)
        for lists in parts:
            part, part_grad = 0.0, np.zeros_like(w)
            for xs, t in lists:
                z = xs @ w
                e = np.exp(z - z.max())
                part += math.log(e.sum()) - (z[t] - z.max())
                part_grad += (e / e.sum()) @ xs - xs[t]
            total += part / max(len(lists), 1)
            grad += part_grad / max(len(lists), 1)
        return total / len(parts) + l2 * float(w @ w), grad / len(parts) + 2 * l2 * w

    bounds = None if fixed is None else [(0.0, None)] * (int(mask.sum()) + 1)
    res = minimize(loss, np.zeros(int(mask.sum()) + extra), jac=True, method="L-BFGS-B", bounds=bounds)
    out = np.zeros(len(mask)) if fixed is None else fixed.astype(np.float64).copy()
    # with fixed weights the ranking is x . fixed + x_mask . (w / temperature)
    out[mask] = res.x[: int(mask.sum())] / (res.x[-1] if extra and res.x[-1] > 0 else 1.0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("features", nargs="+",
                   help="search_features.npz written by recsys replay --task search --search-features (one per log)")
    p.add_argument("--fit-share", type=float, default=0.5, help="the first share of each log's searches that fits the weights")
    p.add_argument("--l2", type=float, default=1e-3)
    args = p.parse_args()
    logs = [load(path) for path in args.features]
    names = [str(f) for f in logs[0]["features"]]
    assert all([str(f) for f in d["features"]] == names for d in logs), "the replays have different signals"
    personal = np.array([f in PERSONAL for f in names])
    hand = np.array([DEFAULT_WEIGHTS.get(f, 0.0) for f in names])
    splits = []
    for path, d in zip(args.features, logs):
        n = len(d["target"])
        cut = int(n * args.fit_share)
        splits.append((range(cut), range(cut, n)))
        check = metrics(d, hand, range(n))["all"]
        print(f"{path}: {n} searches, fit on the first {cut}, scored on the last {n - cut} (stream order); "
              f"check: the current default weights over all {n}: NDCG@{K} {check[f'ndcg@{K}']:.4f} (the replay's 'full' row)")
    fitted = fit([(d, fit_part) for d, (fit_part, _) in zip(logs, splits)], np.ones(len(names), bool), args.l2)
    fitted_np = fit([(d, fit_part) for d, (fit_part, _) in zip(logs, splits)], ~personal, args.l2)
    fitted_personal = fit([(d, fit_part) for d, (fit_part, _) in zip(logs, splits)], personal, args.l2, fixed=hand)
    for label, w in (("all signals", fitted), ("non-personal signals", fitted_np),
                     ("personal signals, the others as now", fitted_personal)):
        print(f"fitted weights ({label}): {{" + ", ".join(f'"{f}": {v:.2f}' for f, v in zip(names, w)) + "}")
    before = np.array([HAND_SET_PERSONAL.get(f, w) for f, w in zip(names, hand)])
    rows = [("no-personal, current default", np.where(personal, 0.0, hand)),
            ("full, hand-set personal weights (before)", before), ("full, current default", hand),
            ("no-personal, fitted", fitted_np), ("full, all fitted", fitted),
            ("full, personal fitted (others as now)", fitted_personal)]
    for path, d, (_, scored) in zip(args.features, logs, splits):
        print(f"\n{path}, the searches never fitted on:")
        table(d, rows, scored)
        per = {label: metrics(d, w, scored)["per search"] for label, w in rows}
        for better, worse in ((rows[2][0], rows[0][0]), (rows[2][0], rows[3][0]), (rows[2][0], rows[1][0])):
            gain, lo, hi = margin_ci(per[better], per[worse])
            print(f"'{better}' over '{worse}': NDCG@{K} {gain:+.1%} [95% paired bootstrap {lo:+.1%}, {hi:+.1%}]")


def table(d: dict, rows: list[tuple[str, np.ndarray]], scored: range) -> None:
    print(f"\n| weights (scored on {len(scored)} searches) | HR@{K} | NDCG@{K} | MRR@{K} | "
          f"NDCG@{K} target new to user | NDCG@{K} target in user history |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, w in rows:
        m = metrics(d, w, scored)
        new, old = m.get("target new to user", {}), m.get("target in user history", {})
        print(f"| {label} | {m['all'][f'hr@{K}']:.4f} | {m['all'][f'ndcg@{K}']:.4f} | {m['all'][f'mrr@{K}']:.4f} | "
              f"{new.get(f'ndcg@{K}', 0):.4f} ({new.get('n', 0)}) | {old.get(f'ndcg@{K}', 0):.4f} ({old.get('n', 0)}) |")


if __name__ == "__main__":
    main()
