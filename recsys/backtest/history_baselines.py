"""Baselines built on each user's whole history, whatever the time between its events.

- :class:`RecentlySeenBaseline`: re-show the user's most recent distinct items (the first rule a
  reviewer tries on a log where people come back to what they looked at).
- :class:`MostBoughtBaseline`: the user's own most-bought items (grocery: buy again).
- :class:`TransitionBaseline`: first-order Markov chain, what users touched right after the
  user's last item, however long after.
- :class:`ItemKNNBaseline`: item-item cosine over users' whole histories (RecBole's ItemKNN).

Unlike :class:`recsys.backtest.baselines.CoVisitationBaseline` and
:class:`recsys.backtest.baselines.SessionKNNBaseline`, nothing here pairs events by closeness in time, so
they keep working on logs whose users' events are days apart. All follow the common rules of
:mod:`recsys.backtest.baselines` (purchased items excluded, popularity fill, fallback counted).

>>> from recsys.events import Event
>>> evs = [Event(str(i), "click", u, it, i * 86_400_000) for i, (u, it) in enumerate(
...     [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "a")])]
>>> m = TransitionBaseline(); m.learn(evs)
>>> m.recommend(["u3"], k=1, now_ts=evs[-1].ts)  # a -> b twice, days apart
[['b']]
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

from recsys.backtest.baselines import _Baseline, _top_keys
from recsys.events import Event

__all__ = ["RecentlySeenBaseline", "MostBoughtBaseline", "TransitionBaseline", "ItemKNNBaseline"]


class RecentlySeenBaseline(_Baseline):
    """The user's ``history`` most recent distinct items, newest first (purchases excluded as
    for every model); popularity fills the rest.

    >>> from recsys.events import Event
    >>> m = RecentlySeenBaseline()
    >>> m.learn([Event(str(i), "click", "u", it, i) for i, it in enumerate("abca")])
    >>> m.recommend(["u"], k=3, now_ts=4)
    [['a', 'c', 'b']]
    """

    def __init__(self, history: int = 50, *, repeat_items: Collection[str] = (),
                 fill_half_life_h: float | None = 24.0, name: str = "recently_seen") -> None:
        super().__init__(name=name, repeat_items=repeat_items, fill_half_life_h=fill_half_life_h)
        self.history = history
        self._recent: dict[str, dict[int, None]] = {}  # user -> distinct items, newest last

    def _learn_one(self, ev: Event, idx: int) -> None:
        recent = self._recent.setdefault(ev.user_id, {})
        recent.pop(idx, None)
        recent[idx] = None
        if len(recent) > self.history:
            del recent[next(iter(recent))]

    def _candidates(self, user_ids: list[str], m: int, now_ts: int) -> list[list[int]]:
        return [list(reversed(self._recent.get(u, {})))[:m] for u in user_ids]


class MostBoughtBaseline(_Baseline):
    """The user's most-purchased items (count, ties to the most recently bought), for logs of
    repeat purchases (only items the catalog lets be bought again survive the exclusion rule).

    >>> from recsys.events import Event
    >>> m = MostBoughtBaseline(repeat_items={"milk", "eggs", "tea"})
    >>> m.learn([Event(str(i), "purchase", "u", it, i) for i, it in enumerate(["milk", "eggs", "milk", "tea"])])
    >>> m.recommend(["u"], k=3, now_ts=4)
    [['milk', 'tea', 'eggs']]
    """

    def __init__(self, *, repeat_items: Collection[str] = (), fill_half_life_h: float | None = 24.0,
                 name: str = "most_bought") -> None:
        super().__init__(name=name, repeat_items=repeat_items, fill_half_life_h=fill_half_life_h)
        self._bought: dict[str, dict[int, list[int]]] = {}  # user -> item -> [count, last seq]
        self._seq = 0

    def _learn_one(self, ev: Event, idx: int) -> None:
        if ev.type != "purchase":
            return
        self._seq += 1
        entry = self._bought.setdefault(ev.user_id, {}).setdefault(idx, [0, 0])
        entry[0] += 1
        entry[1] = self._seq

    def _candidates(self, user_ids: list[str], m: int, now_ts: int) -> list[list[int]]:
        out = []
        for u in user_ids:
            bought = self._bought.get(u, {})
            out.append(sorted(bought, key=lambda i: (-bought[i][0], -bought[i][1]))[:m])
        return out


class TransitionBaseline(_Baseline):
    """First-order Markov transitions: ``T[a][b]`` counts how often a user's next distinct item
    after ``a`` was ``b`` (any time later). Recommends the most frequent successors of the
    user's last item; each row keeps its ``max_neighbours`` strongest entries.

    >>> from recsys.events import Event
    >>> evs = [Event(str(i), "click", u, it, i) for i, (u, it) in enumerate(
    ...     [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "c"), ("u3", "a"), ("u3", "c"), ("me", "a")])]
    >>> m = TransitionBaseline(); m.learn(evs)
    >>> m.recommend(["me"], k=2, now_ts=7)
    [['c', 'b']]
    """

    def __init__(self, max_neighbours: int = 100, *, repeat_items: Collection[str] = (),
                 fill_half_life_h: float | None = 24.0, name: str = "transitions") -> None:
        super().__init__(name=name, repeat_items=repeat_items, fill_half_life_h=fill_half_life_h)
        self.max_neighbours = max_neighbours
        self._last: dict[str, int] = {}
        self._next: dict[int, dict[int, float]] = {}

    def _learn_one(self, ev: Event, idx: int) -> None:
        prev = self._last.get(ev.user_id)
        self._last[ev.user_id] = idx
        if prev is None or prev == idx:
            return
        row = self._next.setdefault(prev, {})
        row[idx] = row.get(idx, 0.0) + 1.0
        if len(row) > 2 * self.max_neighbours:
            self._next[prev] = {j: row[j] for j in _top_keys(row, self.max_neighbours)}

    def _candidates(self, user_ids: list[str], m: int, now_ts: int) -> list[list[int]]:
        out = []
        for u in user_ids:
            last = self._last.get(u)
            row = self._next.get(last, {}) if last is not None else {}
            out.append(_top_keys(row, m))
        return out


class ItemKNNBaseline(_Baseline):
    """Item-item cosine over users' whole histories, as RecBole's ItemKNN: with ``X`` the binary
    user x item matrix, ``sim(a, b) = X_a . X_b / (|X_a| |X_b| + shrink)``; each item keeps its
    ``k`` most similar items, and a user's score for ``b`` sums ``sim(a, b)`` over the items
    ``a`` of their history.

    Learned incrementally: a user's first event with item ``b`` adds one co-occurrence with
    each of their other items. Two bounds, for memory on long logs (both far above the
    histories of the shared logs but grocery): a user pairs and is scored with their
    ``max_history`` most recent distinct items, and a co-occurrence row over ``max_row``
    entries keeps its ``max_row // 2`` most similar. Top-``k`` lists are recomputed lazily for
    rows changed since they were last read.

    >>> from recsys.events import Event
    >>> day = 86_400_000
    >>> rows = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "c"), ("u3", "d"), ("me", "a")]
    >>> m = ItemKNNBaseline(); m.learn([Event(str(i), "click", u, it, i * day) for i, (u, it) in enumerate(rows)])
    >>> m.recommend(["me"], k=2, now_ts=7 * day)  # a's one neighbour b, then popularity
    [['b', 'a']]
    """

    def __init__(self, k: int = 100, shrink: float = 0.0, *, max_history: int = 200, max_row: int = 2000,
                 repeat_items: Collection[str] = (), fill_half_life_h: float | None = 24.0,
                 name: str = "itemknn") -> None:
        super().__init__(name=name, repeat_items=repeat_items, fill_half_life_h=fill_half_life_h)
        self.k = k
        self.shrink = shrink
        self.max_history = max_history
        self.max_row = max_row
        self._hist: dict[str, dict[int, None]] = {}  # user -> distinct items, newest last
        self._users_of: dict[int, int] = {}  # item -> number of users who touched it (|X_b|^2)
        self._co: dict[int, dict[int, int]] = {}
        self._dirty: set[int] = set()
        self._top: dict[int, tuple[list[int], list[float]]] = {}

    def _learn_one(self, ev: Event, idx: int) -> None:
        hist = self._hist.setdefault(ev.user_id, {})
        if idx in hist:
            del hist[idx]
            hist[idx] = None
            return
        self._users_of[idx] = self._users_of.get(idx, 0) + 1
        self._dirty.add(idx)
        co = self._co
        mine = co.setdefault(idx, {})
        for a in hist:
            mine[a] = mine.get(a, 0) + 1
            row = co.setdefault(a, {})
            row[idx] = row.get(idx, 0) + 1
            self._dirty.add(a)
            if len(row) > self.max_row:
                self._prune(a)
        if len(mine) > self.max_row:
            self._prune(idx)
        hist[idx] = None
        if len(hist) > self.max_history:
            del hist[next(iter(hist))]

    def _sim_row(self, a: int) -> tuple[np.ndarray, np.ndarray]:
        row = self._co.get(a, {})
        keys = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
        counts = np.fromiter(row.values(), dtype=np.float64, count=len(row))
        n = self._users_of
        norms = np.sqrt(np.fromiter((n[b] for b in row), dtype=np.float64, count=len(row)) * n.get(a, 1))
        return keys, counts / (norms + self.shrink)

    def _prune(self, a: int) -> None:
        keys, sims = self._sim_row(a)
        keep = keys[np.lexsort((keys, -sims))[: self.max_row // 2]]
        row = self._co[a]
        self._co[a] = {int(b): row[int(b)] for b in keep}

    def neighbours(self, a: int) -> tuple[list[int], list[float]]:
        """Item index ``a``'s ``k`` most similar items and similarities, best first."""
        if a in self._dirty or a not in self._top:
            keys, sims = self._sim_row(a)
            order = np.lexsort((keys, -sims))[: self.k]
            self._top[a] = (keys[order].tolist(), sims[order].tolist())
            self._dirty.discard(a)
        return self._top[a]

    def _candidates(self, user_ids: list[str], m: int, now_ts: int) -> list[list[int]]:
        out = []
        for u in user_ids:
            scores: dict[int, float] = {}
            for a in self._hist.get(u, ()):
                for b, sim in zip(*self.neighbours(a)):
                    scores[b] = scores.get(b, 0.0) + sim
            out.append(_top_keys(scores, m))
        return out


def cosine(a: set[str], b: set[str], shrink: float = 0.0) -> float:
    """Binary cosine of two user sets (what :class:`ItemKNNBaseline` computes incrementally).

    >>> round(cosine({"u1", "u2"}, {"u2", "u3", "u4", "u5"}), 6)
    0.353553
    """
    return len(a & b) / (math.sqrt(len(a) * len(b)) + shrink) if a and b else 0.0
