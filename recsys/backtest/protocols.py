"""Offline backtests: prequential (test-then-learn) and leave-last-out, over plain event lists.

Every recommender implements :class:`BacktestModel`. Both protocols feed every model exactly the
same stream, score with :class:`recsys.backtest.metrics.MetricAccumulator`, and return::

    {"protocol": "prequential" | "leave_last_out", "ks": [...], "exclude_history": bool,
     "exclusion": str, "models": {name: {"hr@10": .., "recall@10": .., "ndcg@10": ..,
     "mrr@10": .., "coverage@10": .., "novelty@10": .., ...}},
     "per_type": {name: {event_type: {...}}}, "slices": {name: {slice: {...}}},
     "series": {name: [{"start_ts", "end_ts", "n", "hr@10", ...}, ...]},
     "timing": {name: {"recommend_s", "learn_s"}}, "events": n, "scored": n_scored,
     "catalog_size": n_items, "seconds": s, "events_per_s": r,
     "fallback": {name: {"lists", "fell_back", "share", ...}},  # models with ``fallback_stats``
     "_per_user": {name: per-user metric sums}}  # for recsys.backtest.bootstrap; never written to disk

Everything but the timings is deterministic given the models and the events.

>>> from recsys.backtest.baselines import PopularityBaseline
>>> from recsys.events import Event
>>> evs = [Event(str(i), "click", u, it, i) for i, (u, it) in enumerate([("u1", "a"), ("u2", "a"), ("u3", "b")])]
>>> r = prequential([PopularityBaseline()], evs, ks=(1,), batch_size=1, progress=False)
>>> r["scored"], r["models"]["popularity"]["hr@1"]  # u1: nothing known; u2: a (hit); u3: a (miss)
(3, 0.3333333333333333)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from tqdm.auto import tqdm

from recsys.backtest.metrics import MetricAccumulator
from recsys.events import Event
from recsys.shard.batching import user_disjoint_chunks

__all__ = ["BacktestModel", "prequential", "PrequentialScorer", "leave_last_out", "PURCHASE_TYPES"]

#: Event types scored by ``target="next_purchase"``: the user committed to the item.
PURCHASE_TYPES: frozenset[str] = frozenset({"add_to_cart", "purchase"})

#: Points in a time series when the caller does not choose: enough to see drift, few enough to plot.
_SERIES_POINTS = 50

_MODEL_EXCLUSION = "each model excludes items the user purchased (nothing else)"


@runtime_checkable
class BacktestModel(Protocol):
    """A recommender under test: learn from events in ts order, recommend from what it learned."""

    name: str

    def recommend(self, user_ids: list[str], k: int, now_ts: int) -> list[list[str]]:
        """One ranked list (best first, at most ``k`` ids) per user, using only what was learned so far."""
        ...

    def learn(self, events: list[Event]) -> None:
        """Absorb ``events``, which are in timestamp order."""
        ...

    # Optional: ``end_of_training()``, called by :func:`leave_last_out` once every training event
    # was learned and before the held-out users are ranked, for a model that learns in the
    # background and serves what it learned at points of its own (the full system's head).


def _check_inputs(models: Sequence[BacktestModel], events: Sequence[Event], ks: Sequence[int]) -> None:
    names = [m.name for m in models]
    if not models:
        raise ValueError("no models to evaluate")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cutoffs, got {ks!r}")
    for i in range(1, len(events)):
        if events[i].ts < events[i - 1].ts:
            raise ValueError(f"events must be sorted by ts: event {i} ({events[i].ts}) precedes event {i - 1} ({events[i - 1].ts})")


def _assemble(
    protocol: str,
    models: Sequence[BacktestModel],
    accs: dict[str, MetricAccumulator],
    timing: dict[str, dict[str, float]],
    *,
    ks: Sequence[int],
    n_events: int,
    catalog_size: int,
    seconds: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    out: dict[str, Any] = {"protocol": protocol, "ks": sorted(set(ks))}
    out.update(extra)
    reports = {m.name: accs[m.name].report(catalog_size=catalog_size) for m in models}
    scored = next(iter(accs.values())).n
    out["models"] = {name: {k: float(v) for k, v in r["overall"].items() if k != "n"} for name, r in reports.items()}
    out["per_type"] = {name: r["per_type"] for name, r in reports.items()}
    out["slices"] = {name: r["slices"] for name, r in reports.items()}
    out["series"] = {name: r["series"] for name, r in reports.items()}
    out["timing"] = timing
    fallback = {m.name: getattr(m, "fallback_stats", None) for m in models}
    out["fallback"] = {name: stats for name, stats in fallback.items() if stats is not None}
    # per-user metric sums for the bootstrap (recsys.backtest.bootstrap); "_" keys stay out of metrics.json
    out["_per_user"] = {m.name: accs[m.name].per_user() for m in models}
    out["events"] = n_events
    out["scored"] = scored
    out["catalog_size"] = catalog_size
    out["seconds"] = seconds
    out["events_per_s"] = n_events / seconds if seconds > 0 else 0.0
    return out


def prequential(
    models: Sequence[BacktestModel],
    events: Sequence[Event],
    *,
    ks: Sequence[int] = (10, 20),
    target: Literal["next", "next_purchase"] = "next",
    batch_size: int = 500,
    progress: bool = True,
    catalog_size: int | None = None,
    series_every: int | None = None,
    series_bucket_ms: int | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Test-then-learn over ``events`` (sorted by ts): score each event's item, then learn it.

    ``target="next"`` scores every event with an item against the recommendation its user
    would have seen just before it; ``"next_purchase"`` scores only add-to-cart and purchase
    events (every event is still learned). For speed the stream is cut into chunks of at most
    ``batch_size`` events in which no user repeats (:func:`user_disjoint_chunks`): each model
    recommends once for all the chunk's scored users (``now_ts`` = the chunk's first ts),
    then learns the chunk. A user's own previous events are therefore always learned before
    they are scored; other users' events may be learned up to one chunk late, as in a
    serving system that coalesces a batch. Models whose recommendations depend only on the
    user's own past give identical results for any ``batch_size``; ``batch_size=1`` is exact
    test-then-learn for every model.

    Slices: ``new_user`` (the user's first event of any kind), ``returning_user``, and
    ``new_item`` (the target item never appeared earlier in the stream). Novelty uses item
    popularity over the events before the scored one; coverage divides by ``catalog_size``
    (default: distinct items in ``events``).
    """
    _check_inputs(models, events, ks)
    kmax = max(ks)
    start = time.perf_counter()
    scorer = PrequentialScorer([m.name for m in models], ks, target=target, series_bucket_ms=series_bucket_ms,
                               series_every=series_every, n_events_hint=events)
    timing = {m.name: {"recommend_s": 0.0, "learn_s": 0.0} for m in models}

    with tqdm(total=len(events), disable=not progress, desc="prequential", unit="ev", mininterval=1.0) as bar:
        for chunk in user_disjoint_chunks(events, batch_size):
            users = [ev.user_id for ev in chunk if scorer.is_target(ev)]
            recs: dict[str, dict[str, list[str]]] = {}
            if users:
                for m in models:
                    t0 = time.perf_counter()
                    lists = m.recommend(users, kmax, chunk[0].ts)
                    timing[m.name]["recommend_s"] += time.perf_counter() - t0
                    if len(lists) != len(users):
                        raise ValueError(f"model {m.name!r} returned {len(lists)} lists for {len(users)} users")
                    recs[m.name] = dict(zip(users, lists))
            scorer.score_chunk(chunk, recs)
            for m in models:
                t0 = time.perf_counter()
                m.learn(chunk)
                timing[m.name]["learn_s"] += time.perf_counter() - t0
            bar.update(len(chunk))

    return scorer.result(models, timing, n_events=len(events), catalog_size=catalog_size,
                         seconds=time.perf_counter() - start, batch_size=batch_size, dataset=dataset)


class PrequentialScorer:
    """The scoring half of :func:`prequential`, usable by any driver that produces, for each
    user-disjoint chunk, what every model would have shown its users right before the chunk.

    :func:`prequential` drives it with plain-Python models; the Bytewax replay
    (``dataflows/replay.py``) drives it from the engine's own pre-batch recommendations, so both
    paths score with this one piece of code.
    """

    def __init__(
        self,
        model_names: Sequence[str],
        ks: Sequence[int],
        *,
        target: Literal["next", "next_purchase"] = "next",
        series_every: int | None = None,
        series_bucket_ms: int | None = None,
        n_events_hint: Sequence[Event] | None = None,
    ):
        if target not in ("next", "next_purchase"):
            raise ValueError(f"target must be 'next' or 'next_purchase', got {target!r}")
        self.target = target
        self.ks = tuple(ks)
        self.model_names = list(model_names)
        if series_every is None:
            n = sum(1 for ev in n_events_hint if self.is_target(ev)) if n_events_hint is not None else 0
            series_every = max(1, n // _SERIES_POINTS)
        self.accs = {
            name: MetricAccumulator(ks, series_every=series_every, series_bucket_ms=series_bucket_ms)
            for name in self.model_names
        }
        self.counts: dict[str, int] = {}
        self.total = 0
        self.seen_users: set[str] = set()

    def is_target(self, ev: Event) -> bool:
        return ev.item_id is not None and (self.target == "next" or ev.type in PURCHASE_TYPES)

    def score_chunk(self, chunk: Sequence[Event], recs: dict[str, dict[str, list[str]]]) -> None:
        """Score the chunk's target events against ``recs[model][user_id]``, then count the chunk."""
        for ev in chunk:
            if self.is_target(ev):
                item = ev.item_id
                tags = ("new_user" if ev.user_id not in self.seen_users else "returning_user",)
                if item not in self.counts:
                    tags += ("new_item",)
                for name in self.model_names:
                    self.accs[name].add(
                        recs[name][ev.user_id], (item,), event_type=ev.type, tags=tags, ts=ev.ts,
                        item_counts=self.counts, total=self.total, user=ev.user_id,
                    )
            self.seen_users.add(ev.user_id)
            if ev.item_id is not None:
                self.counts[ev.item_id] = self.counts.get(ev.item_id, 0) + 1
                self.total += 1

    def result(self, models, timing, *, n_events: int, catalog_size: int | None, seconds: float,
               batch_size: int, dataset: str | None) -> dict[str, Any]:
        return _assemble(
            "prequential", models, self.accs, timing, ks=self.ks, n_events=n_events,
            catalog_size=catalog_size or max(len(self.counts), 1), seconds=seconds,
            extra={"target": self.target, "batch_size": batch_size, "exclude_history": False,
                   "exclusion": _MODEL_EXCLUSION, "dataset": dataset},
        )


def leave_last_out(
    models: Sequence[BacktestModel],
    events: Sequence[Event],
    *,
    ks: Sequence[int] = (10, 50),
    exclude_history: bool = True,
    batch_size: int = 1000,
    progress: bool = True,
    catalog_size: int | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Hold out each user's last interaction, learn everything else in ts order, rank, score.

    Users with at least two events with an item have their last such event held out. All
    other events (including other users' later events, as in standard leave-last-out) are
    learned in ts order; then every held-out user is ranked with ``now_ts`` = the last
    learned ts. With ``exclude_history`` the model is asked for ``max(ks) + |history|``
    items and the items the user interacted with in training are dropped before cutting to
    ``max(ks)`` (so a held-out repeat of a history item can never be hit; the report says
    so). Users are ranked in batches of similar history length, so one call serves many.
    Slices: ``returning_user`` (all of them) and ``new_item`` (held-out item unseen in
    training).

    >>> from recsys.backtest.baselines import PopularityBaseline
    >>> evs = [Event(str(i), "click", u, it, i) for i, (u, it) in enumerate(
    ...     [("u1", "a"), ("u2", "b"), ("u3", "b"), ("u3", "c"), ("u1", "b")])]
    >>> r = leave_last_out([PopularityBaseline()], evs, ks=(1,), progress=False)
    >>> r["scored"], r["models"]["popularity"]["hr@1"]  # u1: [b, a] - {a} hits b; u3: [b, a] - {b} misses c
    (2, 0.5)
    """
    _check_inputs(models, events, ks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kmax = max(ks)
    start = time.perf_counter()

    last: dict[str, int] = {}
    n_interactions: dict[str, int] = {}
    for i, ev in enumerate(events):
        if ev.item_id is not None:
            last[ev.user_id] = i
            n_interactions[ev.user_id] = n_interactions.get(ev.user_id, 0) + 1
    held_idx = sorted(i for u, i in last.items() if n_interactions[u] >= 2)
    held_set = set(held_idx)
    train = [ev for i, ev in enumerate(events) if i not in held_set]

    history: dict[str, dict[str, None]] = {events[i].user_id: {} for i in held_idx}
    counts: dict[str, int] = {}
    for ev in train:
        if ev.item_id is not None:
            counts[ev.item_id] = counts.get(ev.item_id, 0) + 1
            h = history.get(ev.user_id)
            if h is not None:
                h[ev.item_id] = None
    total = sum(counts.values())
    now_ts = train[-1].ts if train else (events[0].ts if events else 0)

    timing = {m.name: {"recommend_s": 0.0, "learn_s": 0.0} for m in models}
    with tqdm(total=len(train), disable=not progress, desc="leave-last-out: learn", unit="ev", mininterval=1.0) as bar:
        for lo in range(0, len(train), 10_000):
            chunk = train[lo : lo + 10_000]
            for m in models:
                t0 = time.perf_counter()
                m.learn(chunk)
                timing[m.name]["learn_s"] += time.perf_counter() - t0
            bar.update(len(chunk))
    for m in models:
        if hasattr(m, "end_of_training"):
            m.end_of_training()

    # Rank users in batches of similar history length: one call per batch asks for enough
    # items for the longest history; lists are cut back per user, which equals asking each
    # user alone for a model whose top-k is a prefix of its top-(k + n).
    order = sorted(held_idx, key=lambda i: (len(history[events[i].user_id]), i))
    ranked: dict[int, dict[str, list[str]]] = {i: {} for i in held_idx}
    with tqdm(total=len(order), disable=not progress, desc="leave-last-out: rank", unit="user", mininterval=1.0) as bar:
        for lo in range(0, len(order), batch_size):
            batch = order[lo : lo + batch_size]
            users = [events[i].user_id for i in batch]
            extra = max(len(history[u]) for u in users) if exclude_history else 0
            for m in models:
                t0 = time.perf_counter()
                lists = m.recommend(users, kmax + extra, now_ts)
                timing[m.name]["recommend_s"] += time.perf_counter() - t0
                if len(lists) != len(users):
                    raise ValueError(f"model {m.name!r} returned {len(lists)} lists for {len(users)} users")
                for i, u, lst in zip(batch, users, lists):
                    if exclude_history:
                        hist = history[u]
                        lst = [x for x in lst[: kmax + len(hist)] if x not in hist]
                    ranked[i][m.name] = lst[:kmax]
            bar.update(len(batch))

    accs = {m.name: MetricAccumulator(ks, series_every=max(1, len(held_idx) // _SERIES_POINTS)) for m in models}
    for i in held_idx:  # stream order, so the series runs over time
        ev = events[i]
        tags = ("returning_user",) + (("new_item",) if ev.item_id not in counts else ())
        for m in models:
            accs[m.name].add(
                ranked[i][m.name], (ev.item_id,), event_type=ev.type, tags=tags, ts=ev.ts,  # type: ignore[arg-type]
                item_counts=counts, total=total, user=ev.user_id,
            )

    exclusion = _MODEL_EXCLUSION + (
        "; the protocol also drops every item of the user's training history" if exclude_history else ""
    )
    return _assemble(
        "leave_last_out", models, accs, timing, ks=ks, n_events=len(events),
        catalog_size=catalog_size or max(len({ev.item_id for ev in events if ev.item_id is not None}), 1),
        seconds=time.perf_counter() - start,
        extra={"exclude_history": exclude_history, "exclusion": exclusion, "dataset": dataset,
               "held_out_users": len(held_idx)},
    )
