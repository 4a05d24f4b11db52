"""The search backtest (``recsys replay --task search``) on derived queries.

**Protocol** (Ai et al., SIGIR 2017, "Learning a Hierarchical Embedding Model for Personalized
Product Search", and its successors): none of the shared logs has search events, so for each
purchase (or add to cart) a ``search`` event is put 1 ms before it, by the same user, whose
query is the item's category path: Complete Journey ``department product_category
product_type`` (read from ``products.parquet``; e.g. ``grocery cold cereal kids cereal``),
REES46 and other logs the catalog ``category`` with its separators as spaces (REES46
``category_code``: ``electronics smartphone``). Distinct words only, in path order. Items with
no category get no search. ``sample`` keeps a deterministic fraction of the purchases (by a
hash of the event id) to bound the replay's time.

**Such queries favour category matching**: every item of the category matches the query
word for word, so lexical retrieval alone finds the category and the ranking inside it decides.

The whole stream (with the searches) runs through :meth:`recsys.shard.step.Shard.process`, the
step the dataflow runs, so the user state, the popularity and the learned associations are
those of the live system at that moment. At each search, before it is learned from, every
mode of :data:`recsys.search.MODES` ranks from the same candidates and is scored against the
item engaged right after: HR@k, NDCG@k, MRR@k, overall and per slice (new / returning user,
head / tail query: a query seen fewer than ``HEAD_QUERY_MIN`` times before is tail; whether the
target item is already in the user's history -- viewed or bought before -- or new to them).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from recsys.backtest.metrics import hr_at_k, mrr_at_k, ndcg_at_k
from recsys.events import CatalogItem, Event
from recsys.search.service import MODES
from recsys.search.text import query_key

#: A query seen at least this many times before in the replay counts as a head query.
HEAD_QUERY_MIN = 20
PROTOCOL_NOTE = "derived queries (item category path, Ai et al. 2017): they favour category matching"


def category_queries(catalog: list[CatalogItem]) -> dict[str, str]:
    """item -> query from its ``category`` (``/``, ``.``, ``>`` and ``|`` as word breaks), distinct words.

    >>> category_queries([CatalogItem("1", "x", category="electronics.smartphone"), CatalogItem("2", "y")])
    {'1': 'electronics smartphone'}
    """
    out = {}
    for item in catalog:
        if item.category:
            words = [w for w in re.split(r"[/.>|\s]+", item.category.lower()) if w]
            if words:
                out[item.item_id] = " ".join(dict.fromkeys(words))
    return out


def completejourney_queries(events_path: str | None, catalog: list[CatalogItem]) -> dict[str, str]:
    """item -> ``department product_category product_type`` words from Complete Journey's products file."""
    import pyarrow.parquet as pq

    from recsys.datasets.completejourney import PRODUCTS_FILE, package_data_dir

    directory = events_path if events_path and os.path.isdir(events_path) else (
        os.path.dirname(events_path) if events_path and events_path not in ("-", "completejourney") else package_data_dir())
    table = pq.read_table(os.path.join(directory, PRODUCTS_FILE),
                          columns=["product_id", "department", "product_category", "product_type"]).to_pydict()
    wanted = {c.item_id for c in catalog}
    out = {}
    for pid, dept, cat, ptype in zip(table["product_id"], table["department"], table["product_category"], table["product_type"]):
        pid = str(pid)
        if pid not in wanted:
            continue
        words = [w for part in (dept, cat, ptype) if part for w in re.split(r"[\s/&,-]+", part.lower()) if w]
        if words:
            out[pid] = " ".join(dict.fromkeys(words))
    return out


def derive_searches(events: list[Event], queries: dict[str, str], *, types: tuple[str, ...] = ("purchase",),
                    sample: float = 1.0) -> tuple[list[Event], dict[str, str]]:
    """The events with a derived search 1 ms before each kept engagement; and search id -> item."""
    out: list[Event] = []
    targets: dict[str, str] = {}
    cut = int(sample * 2**32)
    for ev in events:
        if ev.type in types and ev.item_id in queries:
            h = int.from_bytes(hashlib.blake2b(ev.event_id.encode(), digest_size=4).digest(), "big")
            if h < cut:
                sid = f"q:{ev.event_id}"
                out.append(Event(sid, "search", ev.user_id, None, max(ev.ts - 1, 0), session_id=ev.session_id,
                                 query=queries[ev.item_id]))
                targets[sid] = ev.item_id
        out.append(ev)
    out.sort(key=lambda e: e.ts)  # stable: a search stays before its engagement
    return out, targets


class SearchScorer:
    """The observer the replay hands to :class:`recsys.search.Search`: ranks every mode at each
    derived search and scores it against the item engaged after it."""

    def __init__(self, search: Any, targets: dict[str, str], ks: tuple[int, ...] = (10,),
                 modes: tuple[str, ...] = MODES, *, keep_features: bool = False) -> None:
        self.search = search
        #: ``keep_features``: per scored search, the eligible candidates' signals, the target's
        #: row (-1: not a candidate), the id order for ties and the slices (:meth:`features`)
        self.kept: list[tuple[np.ndarray, np.ndarray, int, int, tuple[str, ...]]] | None = [] if keep_features else None
        self.targets = targets
        self.ks = tuple(sorted(set(ks)))  # each mode ranks the deepest cut-off once; the others read its head
        self.modes = modes
        self.sums: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
        self.query_seen: Counter = Counter()
        self.rank_s = 0.0
        self.n = 0

    def __call__(self, event: Event, state: Any) -> None:
        target = self.targets.get(event.event_id)
        if target is None or event.query is None:
            return
        start = time.perf_counter()
        seen: list[tuple[list[str], np.ndarray]] = []
        ranked = self.search.rank_modes(event.query, state, event.ts, self.ks[-1], self.modes, user_id=event.user_id,
                                        on_candidates=None if self.kept is None else lambda i, x: seen.append((i, x)))
        self.rank_s += time.perf_counter() - start
        self.n += 1
        key = query_key(event.query)
        known = any(h[0] == target for h in state.history) or target in state.bought
        slices = ("all", "returning user" if state.history else "new user",
                  "head query" if self.query_seen[key] >= HEAD_QUERY_MIN else "tail query",
                  "target in user history" if known else "target new to user")
        if self.kept is not None:
            ids, x = seen[0] if seen else ([], np.zeros((0, 0)))
            order = np.argsort(np.argsort(np.array(ids, dtype=str), kind="stable"), kind="stable") if ids else np.zeros(0)
            self.kept.append((x.astype(np.float32), order.astype(np.int32),
                              ids.index(target) if target in ids else -1, event.ts, slices))
        self.query_seen[key] += 1
        for mode, items in ranked.items():
            values = {name: v for k in self.ks for name, v in (
                (f"hr@{k}", hr_at_k(items, {target}, k)), (f"ndcg@{k}", ndcg_at_k(items, {target}, k)),
                (f"mrr@{k}", mrr_at_k(items, {target}, k)))}
            for s in slices:
                acc = self.sums[mode][s]
                acc["n"] += 1
                for name, v in values.items():
                    acc[name] += v

    def save_features(self, path: str) -> None:
        """The kept candidates as one ``.npz`` (``benchmarks/search_weights.py`` fits on it):
        ``x`` all rows, ``offsets`` each search's first row, ``id_rank`` the rows' id order
        within their search (the replay's tie break), ``target`` the target's row within its
        search (-1: not a candidate), ``ts``, ``slices`` (one string per search, ``|``-joined),
        ``features`` the signal names."""
        from recsys.search.service import FEATURES

        kept = self.kept or []
        sizes = [len(k[1]) for k in kept]
        x = np.concatenate([k[0] for k in kept if len(k[1])]) if any(sizes) else np.zeros((0, len(FEATURES)), np.float32)
        np.savez_compressed(path, x=x, offsets=np.cumsum([0, *sizes]), features=np.array(FEATURES),
                            id_rank=np.concatenate([k[1] for k in kept]) if kept else np.zeros(0, np.int32),
                            target=np.array([k[2] for k in kept]), ts=np.array([k[3] for k in kept]),
                            slices=np.array(["|".join(k[4]) for k in kept]))

    def result(self) -> dict[str, Any]:
        models = {m: {name: v / s["all"]["n"] for name, v in s["all"].items() if name != "n"} for m, s in self.sums.items()}
        slices = {m: {sl: {**{name: v / acc["n"] for name, v in acc.items() if name != "n"}, "n": acc["n"]}
                      for sl, acc in s.items() if sl != "all"} for m, s in self.sums.items()}
        return {"models": models, "slices": slices, "scored": self.n, "ks": list(self.ks),
                "rank_ms_per_search_all_modes": 1000 * self.rank_s / max(self.n, 1)}


def replay_search(engine: Any, events: list[Event], targets: dict[str, str], *, ks: tuple[int, ...] = (10,),
                  batch_size: int = 500, progress: bool = True, features: str | None = None) -> dict[str, Any]:
    """Run ``events`` (with derived searches) through ``engine.process``, scoring every search;
    ``features``: also write every search's candidates and signals there (``.npz``)."""
    from recsys.backtest.system import FullSystem

    scorer = SearchScorer(engine.search, targets, ks, keep_features=features is not None)
    engine.search.observer = scorer
    engine.search.respond = False  # the scorer ranks; the engine's own answer would be the "full" mode again
    model = FullSystem(engine, batch_size=batch_size)
    start = time.perf_counter()
    step = 50_000
    for i in range(0, len(events), step):
        model.learn(events[i : i + step])
        if progress:
            done = min(i + step, len(events))
            print(f"  search replay: {done}/{len(events)} events, {scorer.n} searches scored, "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    seconds = time.perf_counter() - start
    out = scorer.result()
    if features is not None:
        scorer.save_features(features)
        out.update(features=features)
    out.update(seconds=seconds, events=len(events), events_per_s=len(events) / seconds if seconds else None,
               search_stats=engine.search.stats())
    return out


def add_arguments(parser: Any) -> None:
    """The search replay's own flags of ``recsys replay``."""
    parser.add_argument("--search-sample", type=float, default=1.0,
                        help="--task search: fraction of the engagements that get a derived search (deterministic)")
    parser.add_argument("--search-targets", default="purchase",
                        help="--task search: event types that get a derived search before them (comma list)")
    parser.add_argument("--query-log", default=None, metavar="CSV",
                        help="--task search: score on a real search log instead of derived queries (columns by "
                             "--map user_id=,query=,query_ts=,item_id=,ts=; see recsys/search/querylog.py)")
    parser.add_argument("--search-features", action="store_true",
                        help="--task search: also write every search's candidates and signals to "
                             "OUT/search_features.npz (for benchmarks/search_weights.py)")


class NothingToScore(ValueError):
    """The events give no search to score (no query could be derived)."""


def run(args: Any, ds: Any, settings: Any, command: str, ks: tuple[int, ...] = (10,)) -> dict[str, Any]:
    """``recsys replay --task search``: derive the searches, replay, write metrics.json + report
    (HR, NDCG and MRR at each cut-off of ``ks``)."""
    from recsys.backtest.report import write_report
    from recsys.shard.step import Shard

    queries = (completejourney_queries(args.events, ds.catalog) if ds.name == "completejourney"
               else category_queries(ds.catalog))
    types = tuple(dict.fromkeys(t.strip() for t in args.search_targets.split(",") if t.strip()))  # each once
    events, targets = derive_searches(ds.events, queries, types=types, sample=args.search_sample)
    print(f"derived {len(targets)} searches ({len(queries)} items with a query; targets {types}, "
          f"sample {args.search_sample})", flush=True)
    if not targets:  # a report of zeros would read as if search had been measured
        eligible = sum(e.type in types and e.item_id in queries for e in ds.events)
        raise NothingToScore(f"no search to derive from --events {args.events}: "
                             + ("no catalog item has a category to build a query from (give a --catalog with categories)"
                                if not queries else
                                f"--search-sample {args.search_sample:g} chose none of the {eligible} event(s) of type "
                                f"{', '.join(types)} with a query; give a larger sample" if eligible else
                                f"no event of type {', '.join(types)} names an item with a query"))
    engine = Shard.open(settings.replace(search_k=max(ks)), in_memory=args.state_dir is None, emit=False)
    try:
        engine.upsert_catalog(ds.catalog, progress=True)
        os.makedirs(args.out, exist_ok=True)
        features = os.path.join(args.out, "search_features.npz") if getattr(args, "search_features", False) else None
        result = replay_search(engine, events, targets, ks=ks, batch_size=args.batch_size, features=features)
    finally:
        engine.close()
    result.update(protocol="search (derived queries)", dataset=ds.name, exclude_history=False, note=PROTOCOL_NOTE,
                  targets=list(types), sample=args.search_sample, catalog_size=len(ds.catalog), batch_size=args.batch_size,
                  skipped=dict(ds.skipped), _skip_examples=list(ds.examples),
                  input_notes=list(getattr(args, "input_notes", [])))
    paths = write_report(result, args.out, title=f"Search backtest: {ds.name} ({PROTOCOL_NOTE})", command=command,
                         dataset=ds.name)
    print(open(os.path.join(args.out, "report.md"), encoding="utf-8").read(), flush=True)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return result


def engaged_not_in_catalog(ds: Any, targets: dict[str, str]) -> int:
    """How many of a query log's scored searches (``targets``) engaged an item its catalog lacks:
    each is a miss for every model, since the item is admitted only at its engagement."""
    known = {item.item_id for item in ds.catalog}
    return sum(1 for item in targets.values() if item not in known)


def run_query_log(args: Any, ds: Any, targets: dict[str, str], settings: Any, command: str,
                  ks: tuple[int, ...] = (10,)) -> dict[str, Any]:
    """``recsys replay --task search --query-log FILE``: score the engaged item of each logged
    search (``ds``, ``targets``: :func:`recsys.search.querylog.load_query_log`'s)."""
    from recsys.backtest.report import write_report
    from recsys.shard.step import Shard

    engine = Shard.open(settings.replace(search_k=max(ks)), in_memory=args.state_dir is None, emit=False)
    try:
        engine.upsert_catalog(ds.catalog, progress=True)
        result = replay_search(engine, ds.events, targets, ks=ks, batch_size=args.batch_size)
    finally:
        engine.close()
    note = "logged searches and the item engaged after each"
    result.update(protocol="search (query log)", dataset=ds.name, exclude_history=False, note=note,
                  catalog_size=len(ds.catalog), batch_size=args.batch_size, skipped=dict(ds.skipped),
                  _skip_examples=list(ds.examples), input_notes=list(getattr(args, "input_notes", [])),
                  engaged_not_in_catalog=engaged_not_in_catalog(ds, targets))
    paths = write_report(result, args.out, title=f"Search backtest: {args.query_log} ({note})", command=command,
                         dataset=ds.name)
    print(open(os.path.join(args.out, "report.md"), encoding="utf-8").read(), flush=True)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return result
