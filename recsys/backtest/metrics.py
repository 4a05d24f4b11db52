"""Ranking metrics for top-k recommendation, and an accumulator that slices them.

Every per-list metric takes ``recommended`` (item ids, best first) and ``relevant`` (a
non-empty collection of item ids that count as hits) and a cutoff ``k``. Relevance is
binary; an item recommended twice counts once, at its first rank.

>>> recs = ["a", "b", "c", "d"]
>>> hr_at_k(recs, {"c"}, 2), hr_at_k(recs, {"c"}, 3)
(0.0, 1.0)
>>> ndcg_at_k(recs, {"c"}, 10)  # hit at rank 3: 1 / log2(3 + 1)
0.5
>>> mrr_at_k(recs, {"b", "d"}, 10), recall_at_k(recs, {"b", "x"}, 10)
(0.5, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "hr_at_k",
    "recall_at_k",
    "ndcg_at_k",
    "mrr_at_k",
    "catalog_coverage",
    "novelty",
    "MetricAccumulator",
    "SLICES",
]

#: Slice tags the evaluators attach to a scored event.
SLICES: tuple[str, ...] = ("new_user", "returning_user", "new_item")

_LIST_METRICS = ("hr", "recall", "ndcg", "mrr")


def _check(relevant: Collection[str], k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not relevant:
        raise ValueError("relevant is empty: ranking metrics are undefined without a relevant item")


def _hit_ranks(recommended: Sequence[str], relevant: Collection[str], k: int) -> list[int]:
    """1-based ranks (ascending) in the top ``k`` at which a relevant item first appears."""
    seen: set[str] = set()
    ranks = []
    for rank, item in enumerate(recommended[:k], start=1):
        if item in relevant and item not in seen:
            seen.add(item)
            ranks.append(rank)
    return ranks


def hr_at_k(recommended: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Hit rate: 1.0 if any relevant item is in the top ``k``, else 0.0.

    >>> hr_at_k(["a", "b"], {"b"}, 1), hr_at_k(["a", "b"], {"b"}, 2)
    (0.0, 1.0)
    """
    _check(relevant, k)
    return 1.0 if _hit_ranks(recommended, relevant, k) else 0.0


def recall_at_k(recommended: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Share of the relevant items found in the top ``k``: ``|top-k ∩ relevant| / |relevant|``.

    >>> recall_at_k(["a", "b", "c"], {"a", "c", "z", "y"}, 3)
    0.5
    """
    _check(relevant, k)
    return len(_hit_ranks(recommended, relevant, k)) / len(set(relevant))


def ndcg_at_k(recommended: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Normalised discounted cumulative gain with binary relevance and a log2 discount.

    DCG sums ``1 / log2(rank + 1)`` over hits in the top ``k``; the ideal DCG puts
    ``min(k, |relevant|)`` hits at ranks 1, 2, ...

    >>> ndcg_at_k(["a", "b", "c"], {"c"}, 3)
    0.5
    """
    _check(relevant, k)
    dcg = sum(1.0 / math.log2(r + 1) for r in _hit_ranks(recommended, relevant, k))
    ideal = sum(1.0 / math.log2(r + 1) for r in range(1, min(k, len(set(relevant))) + 1))
    return dcg / ideal


def mrr_at_k(recommended: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Reciprocal rank of the first relevant item in the top ``k`` (0.0 when none).

    >>> mrr_at_k(["a", "b", "c", "d"], {"d", "c"}, 4), mrr_at_k(["a", "b"], {"z"}, 2)
    (0.3333333333333333, 0.0)
    """
    _check(relevant, k)
    ranks = _hit_ranks(recommended, relevant, k)
    return 1.0 / ranks[0] if ranks else 0.0


def catalog_coverage(recommended_lists: Iterable[Sequence[str]], catalog_size: int, k: int) -> float:
    """Distinct items appearing in any top-``k`` list, over the catalog size.

    >>> catalog_coverage([["a", "b", "c"], ["b", "d"]], catalog_size=10, k=2)
    0.3
    """
    if catalog_size < 1:
        raise ValueError(f"catalog_size must be >= 1, got {catalog_size}")
    distinct: set[str] = set()
    for recs in recommended_lists:
        distinct.update(recs[:k])
    return len(distinct) / catalog_size


def novelty(recommended: Sequence[str], item_counts: Mapping[str, float], total: float, k: int) -> float | None:
    """Mean self-information ``-log2(count / total)`` of the top-``k`` items.

    ``item_counts`` are interaction counts on the events seen so far and ``total`` their sum.
    An item never seen counts as seen once (the most novel an item can be), so the value
    stays finite. Returns None for an empty list or before any event was seen.

    >>> novelty(["a", "b"], {"a": 4, "b": 1}, total=8, k=2)  # (-log2(1/2) - log2(1/8)) / 2
    2.0
    """
    items = recommended[:k]
    if not items or total <= 0:
        return None
    return sum(_self_information(items, item_counts, total)) / len(items)


def _self_information(items: Sequence[str], item_counts: Mapping[str, float], total: float) -> list[float]:
    """``-log2(count / total)`` of each item, an item never seen counted once (:func:`novelty`)."""
    return [-math.log2(max(item_counts.get(i, 0), 1) / total) for i in items]


class _Sums:
    """Running sums of the per-list metrics at each cutoff, for one group of events.

    ``values`` come as a list in the order of ``names`` (``{metric}@{k}`` for every cutoff,
    then metric), novelty as a list in the order of the cutoffs: the accumulator adds each
    list to five or six groups, so the names are built once, not per list.
    """

    __slots__ = ("ks", "names", "n", "sums", "novelty_sum", "novelty_n")

    def __init__(self, ks: tuple[int, ...], names: list[str]) -> None:
        self.ks = ks
        self.names = names
        self.n = 0
        self.sums = [0.0] * len(names)
        self.novelty_sum = [0.0] * len(ks)
        self.novelty_n = 0

    def add(self, values: list[float], nov: list[float] | None) -> None:
        self.n += 1
        sums = self.sums
        for j, v in enumerate(values):
            sums[j] += v
        if nov is not None:
            self.novelty_n += 1
            nsum = self.novelty_sum
            for j, v in enumerate(nov):
                nsum[j] += v

    def means(self) -> dict[str, float]:
        out = {name: (s / self.n if self.n else 0.0) for name, s in zip(self.names, self.sums)}
        for k, s in zip(self.ks, self.novelty_sum):
            out[f"novelty@{k}"] = s / self.novelty_n if self.novelty_n else 0.0
        out["n"] = self.n
        return out


class MetricAccumulator:
    """Adds one scored recommendation at a time; reports means overall, by type, by slice, over time.

    ``add(recommended, relevant, event_type=, tags=, ts=, item_counts=, total=)`` takes one
    list and its relevant set; ``report(catalog_size)`` returns::

        {"overall": {"hr@10": .., "recall@10": .., "ndcg@10": .., "mrr@10": ..,
                     "coverage@10": .., "novelty@10": .., ..., "n": count},
         "per_type": {event_type: {... same metrics but coverage ...}},
         "slices": {"new_user" | "returning_user" | "new_item": {...}},
         "series": [{"start_ts", "end_ts", "n", "hr@10", "ndcg@10", ...}, ...]}

    The series has one point per ``series_every`` added lists, or, when ``series_bucket_ms``
    is set, one per time bucket of that width (by ``ts``).

    >>> acc = MetricAccumulator(ks=(1, 3))
    >>> acc.add(["a", "b", "c"], {"c"}, event_type="click", tags=("new_user",), ts=0)
    >>> acc.add(["c", "b", "a"], {"c"}, event_type="purchase", tags=("returning_user",), ts=1)
    >>> r = acc.report(catalog_size=3)
    >>> r["overall"]["hr@1"], r["overall"]["ndcg@3"], r["overall"]["coverage@1"]
    (0.5, 0.75, 0.6666666666666666)
    >>> r["slices"]["new_user"]["mrr@3"], r["per_type"]["purchase"]["hr@1"]
    (0.3333333333333333, 1.0)
    """

    def __init__(
        self,
        ks: Sequence[int] = (10, 20),
        *,
        series_every: int = 1000,
        series_bucket_ms: int | None = None,
    ) -> None:
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"ks must be positive cutoffs, got {ks!r}")
        if series_every < 1:
            raise ValueError(f"series_every must be >= 1, got {series_every}")
        self.series_every = series_every
        self.series_bucket_ms = series_bucket_ms
        # every list's values come in this order (``{metric}@{k}``, cutoff by cutoff)
        self._metric_names = [f"{m}@{k}" for k in self.ks for m in _LIST_METRICS]
        self._overall = _Sums(self.ks, self._metric_names)
        # ideal DCG per (cutoff, number of relevant items)
        self._ideal: dict[tuple[int, int], float] = {}
        self._per_type: dict[str, _Sums] = {}
        self._slices: dict[str, _Sums] = {}
        self._covered: dict[int, set[str]] = {k: set() for k in self.ks}
        # per-user sums of every list metric (``add(user=...)``): bootstrap over users
        self._per_user: dict[str, list[float]] = {}
        # series buckets: key -> [sums, start_ts, end_ts]
        self._series: dict[int, list[Any]] = {}

    @property
    def n(self) -> int:
        return self._overall.n

    def add(
        self,
        recommended: Sequence[str],
        relevant: Collection[str],
        *,
        event_type: str | None = None,
        tags: Iterable[str] = (),
        ts: int | None = None,
        item_counts: Mapping[str, float] | None = None,
        total: float = 0,
        user: str | None = None,
    ) -> None:
        """Score one list (best first) against its relevant set and add it to every group it
        belongs to; with ``user``, also to that user's sums (:meth:`per_user`)."""
        _check(relevant, self.ks[0])
        kmax = self.ks[-1]
        ranks = _hit_ranks(recommended, relevant, kmax)
        n_rel = len(set(relevant))
        values: list[float] = []  # in the order of self._metric_names
        for k in self.ks:
            hits = [r for r in ranks if r <= k]
            ideal = self._ideal.get((k, n_rel))
            if ideal is None:
                ideal = self._ideal[(k, n_rel)] = sum(1.0 / math.log2(r + 1) for r in range(1, min(k, n_rel) + 1))
            values.append(1.0 if hits else 0.0)  # hr
            values.append(len(hits) / n_rel)  # recall
            values.append(sum(1.0 / math.log2(r + 1) for r in hits) / ideal)  # ndcg
            values.append(1.0 / hits[0] if hits else 0.0)  # mrr
            self._covered[k].update(recommended[:k])
        nov: list[float] | None = None
        if item_counts is not None and total > 0 and recommended:
            # novelty() at every cutoff, each item's term computed once: the same terms summed
            # in the same order, so the same floats
            top = recommended[:kmax]
            terms = _self_information(top, item_counts, total)
            nov = [sum(terms[:k]) / len(top[:k]) for k in self.ks]
        self._overall.add(values, nov)
        if user is not None:
            sums = self._per_user.get(user)
            if sums is None:
                sums = self._per_user[user] = [0.0] * (len(self._metric_names) + 1)
            sums[0] += 1
            for j, v in enumerate(values, start=1):
                sums[j] += v
        if event_type is not None:
            self._group(self._per_type, event_type).add(values, nov)
        for tag in tags:
            self._group(self._slices, tag).add(values, nov)
        key = (self._overall.n - 1) // self.series_every
        if self.series_bucket_ms is not None and ts is not None:
            key = ts // self.series_bucket_ms
        bucket = self._series.get(key)
        if bucket is None:
            bucket = self._series[key] = [_Sums(self.ks, self._metric_names), ts, ts]
        bucket[0].add(values, nov)
        if ts is not None:
            bucket[1] = ts if bucket[1] is None else min(bucket[1], ts)
            bucket[2] = ts if bucket[2] is None else max(bucket[2], ts)

    def per_user(self) -> dict[str, Any]:
        """``{"metrics": [name, ...], "users": [id, ...], "n": [lists per user],
        "sums": [[sum of each metric over the user's lists], ...]}`` for lists added with a user.

        >>> acc = MetricAccumulator(ks=(1,))
        >>> acc.add(["a"], {"a"}, user="u"); acc.add(["b"], {"a"}, user="u"); acc.add(["a"], {"a"}, user="v")
        >>> pu = acc.per_user(); pu["users"], pu["n"], [s[pu["metrics"].index("hr@1")] for s in pu["sums"]]
        (['u', 'v'], [2, 1], [1.0, 1.0])
        """
        users = list(self._per_user)
        return {"metrics": list(self._metric_names), "users": users,
                "n": [int(self._per_user[u][0]) for u in users], "sums": [self._per_user[u][1:] for u in users]}

    def _group(self, groups: dict[str, _Sums], name: str) -> _Sums:
        g = groups.get(name)
        if g is None:
            g = groups[name] = _Sums(self.ks, self._metric_names)
        return g

    def report(self, catalog_size: int | None = None) -> dict[str, Any]:
        """Means of everything added so far; coverage only when ``catalog_size`` is given."""
        overall = self._overall.means()
        if catalog_size:
            for k in self.ks:
                overall[f"coverage@{k}"] = len(self._covered[k]) / catalog_size
        series = []
        for key in sorted(self._series):
            sums, start, end = self._series[key]
            point = {"start_ts": start, "end_ts": end}
            point.update(sums.means())
            series.append(point)
        return {
            "overall": overall,
            "per_type": {t: g.means() for t, g in sorted(self._per_type.items())},
            "slices": {s: g.means() for s, g in sorted(self._slices.items())},
            "series": series,
        }

