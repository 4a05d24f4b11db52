"""How the full system ranks *new* items on Complete Journey leave-last-out (issue 14): its own
candidates once the protocol drops the user's history, ranked by its blend and by each signal alone.

    .venv/bin/python scripts/new_item_ranking.py [--order file|shuffled] [--limit 300000]

Leave-last-out drops every item of a user's history from the ranked list, and a grocery
shopper's history holds most of what the system ranks first (buy again, seen). What is left is
the system's ranking of new items. This script runs the replay's leave-last-out protocol with the
full system and the co-visitation baseline, keeps each held-out user's candidates and their
signal rows (``Shown``, what the re-ranker learns from), drops the history items, and ranks what
is left again: by the blend the system used (prior + learned correction), by the prior alone, and
by each signal alone. A ranking that differs from the blend's only in its weights shows how much
of the gap to a baseline is the weights and how much the candidates. It also prints the learned
correction, and the blend by how long before the ranking time the held-out event happened
(leave-last-out ranks everyone at the end of the log). ``--order shuffled`` orders a basket's
items by a hash of their event id, as ``scripts/basket_order_experiment.py`` does. ~2 minutes.
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np

from recsys.backtest.baselines import CoVisitationBaseline
from recsys.backtest.protocols import leave_last_out
from recsys.datasets import load_dataset
from recsys.ranking.features import FEATURES


class _FullSystemLists:
    """The full system as a backtest model that also keeps, per user, its last list's candidates
    and signal rows."""

    name = "full-system"

    def __init__(self, engine, system) -> None:
        self.engine, self.system, self.shown = engine, system, {}

    def learn(self, events) -> None:
        self.system.learn(events)

    def recommend(self, user_ids, k, now_ts):
        out = self.system.recommend(user_ids, k, now_ts)
        for u in user_ids:
            self.shown[u] = self.engine.shown.get(u)
        return out


def _ndcg10(rows, weights) -> tuple[float, float]:
    """NDCG@10 and HR@10 over every held-out user of ``rows`` (candidates, signal rows, target),
    ranking each user's candidates by ``signals @ weights``, ties in the system's order."""
    total, hits = 0.0, 0
    for cands, x, target in rows:
        if target not in cands:
            continue
        s = x @ weights
        rank = int(np.flatnonzero(np.asarray(cands, dtype=object)[np.lexsort((np.arange(len(s)), -s))] == target)[0])
        if rank < 10:
            total += 1 / np.log2(rank + 2)
            hits += 1
    return total / max(len(rows), 1), hits / max(len(rows), 1)


def main() -> None:
    from transitions_gap import _full_system, _Recorded  # noqa: PLC0415 - a sibling script

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=300_000)
    ap.add_argument("--order", default="file", choices=("file", "shuffled"))
    a = ap.parse_args()
    ds = load_dataset("completejourney", None, None, limit=a.limit, progress=False)
    events = ds.events
    if a.order == "shuffled":
        events = sorted(events, key=lambda e: (e.ts, hashlib.blake2b(e.event_id.encode(), digest_size=8).digest()))
    engine, system = _full_system(ds)
    full = _FullSystemLists(engine, system)
    cov = _Recorded(CoVisitationBaseline(repeat_items={c.item_id for c in ds.catalog if c.repeat_purchase}))
    r = leave_last_out([full, cov], events, ks=(10, 50), catalog_size=len(ds.catalog) or None, progress=False,
                       dataset=ds.name)
    for name, m in r["models"].items():
        print(f"{name}: " + " ".join(f"{k} {m[k]:.4f}" for k in ("recall@10", "ndcg@10", "recall@50")))

    # the protocol's split again: each user's last event held out, the rest their history
    last, count = {}, {}
    for i, e in enumerate(events):
        if e.item_id is not None:
            last[e.user_id] = i
            count[e.user_id] = count.get(e.user_id, 0) + 1
    held = {u: i for u, i in last.items() if count[u] >= 2}
    held_set = set(held.values())
    history: dict[str, set[str]] = {}
    for i, e in enumerate(events):
        if i not in held_set and e.item_id is not None and e.user_id in held:
            history.setdefault(e.user_id, set()).add(e.item_id)
    end = max(e.ts for i, e in enumerate(events) if i not in held_set)
    rows, gaps = [], []
    for u, i in held.items():
        shown = full.shown[u]
        keep = [j for j, c in enumerate(shown.candidates) if c not in history[u]]
        rows.append(([shown.candidates[j] for j in keep], np.asarray(shown.features, dtype=np.float64)[keep],
                     events[i].item_id))
        gaps.append((end - events[i].ts) / 3_600_000)
    gaps = np.asarray(gaps)
    reranker = engine.reranker
    blend = reranker.prior + (reranker.w if reranker.active else 0.0)
    print(f"{len(rows)} held-out users, a median {np.median([len(h) for h in history.values()]):.0f} distinct items "
          f"in their history; new-item candidates left after dropping it: median "
          f"{np.median([len(c) for c, _, _ in rows]):.0f}; the held-out item among them for "
          f"{np.mean([t in c for c, _, t in rows]):.1%}")
    print("prior:  " + ", ".join(f"{f} {w:.2f}" for f, w in zip(FEATURES, reranker.prior)))
    print(f"learned correction ({reranker.examples:,} rows of shown lists): "
          + ", ".join(f"{f} {w:+.2f}" for f, w in zip(FEATURES, reranker.w)))
    print("new items ranked again (NDCG@10, HR@10 over every held-out user):")
    print(f"  {'blend (prior + learned)':28s} {_ndcg10(rows, blend)[0]:.4f} {_ndcg10(rows, blend)[1]:.4f}")
    print(f"  {'prior alone':28s} {_ndcg10(rows, reranker.prior)[0]:.4f} {_ndcg10(rows, reranker.prior)[1]:.4f}")
    for j, name in enumerate(FEATURES):
        if name in ("seen", "again", "head"):  # zero on new items, or never filled
            continue
        alone = 1e-6 * reranker.prior  # ties broken by the prior
        alone[j] = 1.0
        ndcg, hr = _ndcg10(rows, alone)
        print(f"  {name + ' alone':28s} {ndcg:.4f} {hr:.4f}")
    without = blend.copy()
    without[FEATURES.index("trending")] = 0.0
    print(f"  {'blend without trending':28s} {_ndcg10(rows, without)[0]:.4f} {_ndcg10(rows, without)[1]:.4f}")
    print(f"  the held-out events lie a median {np.median(gaps):.0f} h (p90 {np.percentile(gaps, 90):.0f} h) before the ranking time")
    for lo, hi in ((0, 24), (24, 168), (168, np.inf)):
        sel = [row for row, g in zip(rows, gaps) if lo <= g < hi]
        print(f"  held-out event {lo:g}-{hi:g} h before the ranking time: {len(sel)} users, blend NDCG@10 "
              f"{_ndcg10(sel, blend)[0]:.4f}, prior alone {_ndcg10(sel, reranker.prior)[0]:.4f}")
    engine.close()


if __name__ == "__main__":
    main()
