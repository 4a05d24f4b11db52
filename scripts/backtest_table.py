"""Print the README's backtest tables from runs/*/metrics.json (written by scripts/backtests.sh).

    .venv/bin/python scripts/backtest_table.py [runs]

One table per dataset and protocol: every model's headline metrics (the best baseline per
column in bold, the full system's ablations below it), the full system's margin over the best
baseline per metric with its 95% bootstrap interval over users (a win only when the interval
excludes zero), and the share of known users each baseline fell back to popularity for.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = {
    "prequential": ["hr@10", "ndcg@10", "mrr@10", "coverage@10"],
    "leave_last_out": ["recall@10", "ndcg@10", "mrr@10", "recall@50", "ndcg@50"],
}
ORDER = ["popularity", "recent_popularity", "recently_seen", "most_bought", "covisitation", "session_knn", "itemknn",
         "transitions", "content", "river_biased_mf", "bpr_mf", "sasrec", "full-system", "full-system/frozen",
         "full-system/no-head", "full-system/no-reranker"]


def _pct(x: float) -> str:
    return f"{x * 100:+.0f}%"


def table(metrics: dict) -> str:
    protocol = metrics["protocol"].replace("-", "_")
    cols = COLUMNS.get(protocol, COLUMNS["prequential"])
    models = metrics["models"]
    names = [n for n in ORDER if n in models] + sorted(set(models) - set(ORDER))
    best = {c: max(models[n].get(c, 0.0) for n in names) for c in cols}
    fallback = metrics.get("fallback") or {}
    lines = ["| model | " + " | ".join(cols) + " | fell back |", "|---|" + "---:|" * (len(cols) + 1)]
    for n in names:
        cells = []
        for c in cols:
            v = models[n].get(c, 0.0)
            cells.append(f"**{v:.4f}**" if v == best[c] else f"{v:.4f}")
        fb = fallback.get(n)
        cells.append(f"{fb['share']:.0%}" if fb else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    margins = metrics.get("margins") or {}
    if "full-system" in models and len(names) > 1:
        row = []
        for c in cols:
            m = margins.get(c)
            if m and m.get("ci95"):
                lo, hi = m["ci95"]
                mark = " ✓" if m["verdict"] == "win" else " ✗" if m["verdict"] == "loss" else ""
                row.append(f"{_pct(m['margin'])} [{_pct(lo)}, {_pct(hi)}]{mark}")
            else:
                base = max(models[n].get(c, 0.0) for n in names if not n.startswith("full-system"))
                full = models["full-system"].get(c, 0.0)
                row.append(_pct((full - base) / base) if base > 0 else "n/a")
        lines.append("| *full system vs best baseline, 95% CI* | " + " | ".join(row) + " | |")
    return "\n".join(lines)


def ablation_line(metrics: dict, metric: str = "ndcg@10") -> str:
    """The full system's margin over each ablation on ``metric``, with its interval."""
    parts = []
    for variant, per_metric in (metrics.get("ablation_margins") or {}).items():
        m = per_metric.get(metric)
        if m and m.get("ci95"):
            lo, hi = m["ci95"]
            mark = " ✓" if m["verdict"] == "win" else " ✗" if m["verdict"] == "loss" else ""
            parts.append(f"{variant.split('/')[-1]} {_pct(m['margin'])} [{_pct(lo)}, {_pct(hi)}]{mark}")
    return f"What each part adds, the full system's {metric} over each ablation: " + "; ".join(parts) + "." if parts else ""


def main(root: str = "runs") -> None:
    for path in sorted(Path(root).glob("*/metrics.json")):
        m = json.loads(path.read_text())
        if len(m.get("models", {})) < 2:
            continue
        excl = "history excluded from the ranking" if m.get("exclude_history") else "history not excluded"
        print(f"#### {m.get('dataset')} — {m['protocol']} ({m['events']:,} events; {excl})\n")
        print(table(m))
        if ablation_line(m):
            print("\n" + ablation_line(m))
        margins = m.get("margins") or {}
        if margins:
            best = ", ".join(f"{c}: {v['baseline']}" for c, v in margins.items())
            print(f"\nBest baseline per metric: {best}. ✓ = win (interval above zero), ✗ = loss.")
        print(f"\n`{path.parent}/report.md` has the per-type, per-slice tables and plots.\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
