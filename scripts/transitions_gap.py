"""Why transitions beats the full system on Complete Journey leave-last-out (issue 14): both, and
co-visitation, under the replay's leave-last-out protocol, then per slice of held-out users.

    .venv/bin/python scripts/transitions_gap.py [--order file|shuffled] [--models transitions,covisitation,full-system]

Slices: held-out item in the same basket as the user's last training item or not; held-out
product id above or below it; the user's last item with or without successors in the system's
own transitions signal; the held-out item among those successors. ``--order shuffled`` puts
events with equal timestamps in an order drawn from a hash of their event id, as
``scripts/basket_order_experiment.py`` does (the log lists a basket's items by product id).
Prints the protocol's figures, then one line per slice (recall@10, ndcg@10, recall@50).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os

from recsys.backtest.baselines import CoVisitationBaseline
from recsys.backtest.history_baselines import TransitionBaseline
from recsys.backtest.protocols import leave_last_out
from recsys.datasets import load_dataset


class _Recorded:
    """A backtest model that remembers the last list it gave each user."""

    def __init__(self, model) -> None:
        self.model, self.name, self.lists = model, model.name, {}

    def learn(self, events) -> None:
        self.model.learn(events)

    def recommend(self, user_ids, k, now_ts):
        out = self.model.recommend(user_ids, k, now_ts)
        self.lists.update(zip(user_ids, out))
        return out


def _full_system(ds):
    from recsys.backtest.system import FullSystem
    from recsys.settings import Settings
    from recsys.shard.step import Shard

    settings = Settings.from_env(os.environ).replace(unknown_items="admit", state_ttl_days=36_500.0,
                                                     state_dir="var/replay-state", recovery_dir=None)
    engine = Shard.open(settings.replace(shards=1, shard=0).for_shard(), evaluate=True, in_memory=True, emit=False)
    engine.eval_k = 50
    engine.upsert_catalog(ds.catalog, progress=False)
    return engine, FullSystem(engine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=300_000)
    ap.add_argument("--order", default="file", choices=("file", "shuffled"))
    ap.add_argument("--models", default="transitions,covisitation,full-system")
    a = ap.parse_args()
    ds = load_dataset("completejourney", None, None, limit=a.limit, progress=False)
    events = ds.events
    if a.order == "shuffled":
        events = sorted(events, key=lambda e: (e.ts, hashlib.blake2b(e.event_id.encode(), digest_size=8).digest()))
    repeat_items = {c.item_id for c in ds.catalog if c.repeat_purchase}
    engine, models = None, []
    for name in a.models.split(","):
        if name == "transitions":
            models.append(_Recorded(TransitionBaseline(repeat_items=repeat_items)))
        elif name == "covisitation":
            models.append(_Recorded(CoVisitationBaseline(repeat_items=repeat_items)))
        elif name == "full-system":
            engine, system = _full_system(ds)
            models.append(_Recorded(system))
        else:
            raise SystemExit(f"unknown model {name!r}")
    r = leave_last_out(models, events, ks=(10, 50), catalog_size=len(ds.catalog) or None, progress=False, dataset=ds.name)
    for name, m in r["models"].items():
        print(name, " ".join(f"{k} {m[k]:.4f}" for k in ("recall@10", "ndcg@10", "recall@50", "ndcg@50")))

    # the protocol's split, again: each user's last event held out, the rest their history
    last, count = {}, {}
    for i, e in enumerate(events):
        last[e.user_id] = i
        count[e.user_id] = count.get(e.user_id, 0) + 1
    held = {u: i for u, i in last.items() if count[u] >= 2}
    held_set = set(held.values())
    history, last_train = {}, {}
    for i, e in enumerate(events):
        if i not in held_set:
            last_train[e.user_id] = i
            history.setdefault(e.user_id, set()).add(e.item_id)
    rows = []
    for u, i in held.items():
        h, p = events[i], events[last_train[u]]
        row = {"same_basket": h.session_id == p.session_id, "higher_id": int(h.item_id) > int(p.item_id)}
        for m in models:
            lst = [x for x in m.lists.get(u, []) if x not in history[u]][:50]
            row[m.name] = lst.index(h.item_id) + 1 if h.item_id in lst else None
        if engine is not None:
            successors = engine.transitions.ranked(p.item_id)[0]
            row["sys_has"] = len(successors) > 0
            row["sys_holds"] = h.item_id in successors
        rows.append(row)
    slices = [("all", lambda r: True), ("same basket", lambda r: r["same_basket"]),
              ("new basket", lambda r: not r["same_basket"]), ("held-out id > last id", lambda r: r["higher_id"]),
              ("held-out id < last id", lambda r: not r["higher_id"])]
    if engine is not None:
        slices += [("last item has system transitions", lambda r: r["sys_has"]),
                   ("last item has no system transitions", lambda r: not r["sys_has"]),
                   ("held-out among the system's transitions", lambda r: r["sys_holds"])]
    for label, keep in slices:
        rs = [r for r in rows if keep(r)]
        if not rs:
            continue
        cells = []
        for m in models:
            ranks = [r[m.name] for r in rs if r[m.name]]
            at10 = [x for x in ranks if x <= 10]
            cells.append(f"{m.name} {len(at10) / len(rs):.4f} {sum(1 / math.log2(x + 1) for x in at10) / len(rs):.4f} "
                         f"{len(ranks) / len(rs):.4f}")
        print(f"{label:40s} {len(rs):5d} users | " + " | ".join(cells))
    if engine is not None:
        engine.close()


if __name__ == "__main__":
    main()
