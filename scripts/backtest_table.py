"""Print the README's backtest tables from runs/*/metrics.json (written by scripts/backtests.sh).

    .venv/bin/python scripts/backtest_table.py [runs]

One table per dataset and protocol: every model's headline metrics, the best in bold, and the
full system's margin over the best baseline per metric.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = {
    "prequential": ["hr@10", "ndcg@10", "mrr@10", "coverage@10"],
    "leave-last-out": ["recall@10", "ndcg@10", "mrr@10", "recall@50", "ndcg@50"],
}
ORDER = ["popularity", "recent_popularity", "covisitation", "session_knn", "content", "river_biased_mf", "full-system"]


def table(metrics: dict) -> str:
    protocol = metrics["protocol"]
    cols = COLUMNS.get(protocol, COLUMNS["prequential"])
    models = metrics["models"]
    names = [n for n in ORDER if n in models] + sorted(set(models) - set(ORDER))
    best = {c: max(models[n].get(c, 0.0) for n in names) for c in cols}
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for n in names:
        cells = []
        for c in cols:
            v = models[n].get(c, 0.0)
            cells.append(f"**{v:.4f}**" if v == best[c] else f"{v:.4f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if "full-system" in models and len(names) > 1:
        margin = []
        for c in cols:
            base = max(models[n].get(c, 0.0) for n in names if n != "full-system")
            full = models["full-system"].get(c, 0.0)
            margin.append(f"{(full - base) / base * 100:+.0f}%" if base > 0 else "n/a")
        lines.append("| *full system vs best baseline* | " + " | ".join(margin) + " |")
    return "\n".join(lines)


def main(root: str = "runs") -> None:
    for path in sorted(Path(root).glob("*/metrics.json")):
        m = json.loads(path.read_text())
        if len(m.get("models", {})) < 2:
            continue
        excl = "history excluded from the ranking" if m.get("exclude_history") else "history not excluded"
        print(f"#### {m.get('dataset')} — {m['protocol']} ({m['events']:,} events; {excl})\n")
        print(table(m))
        print(f"\n`{path.parent}/report.md` has the per-type, per-slice tables and plots.\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
