"""Baseline recommenders for backtests: popularity, recently seen, most bought, co-visitation,
session kNN, ItemKNN, transitions, content, river MF, BPR-MF.

Each class implements :class:`recsys.backtest.protocols.BacktestModel`: ``learn(events)`` absorbs events in
timestamp order, ``recommend(user_ids, k, now_ts)`` returns one ranked list of item ids per
user, using only what was learned so far. Hyper-parameters are ``__init__`` keywords; every
model is deterministic given its inputs (ties break toward the item seen first).

One exclusion rule, identical across models: a user is never recommended an item they
purchased, unless the item is in ``repeat_items``; nothing else is excluded. Every model
fills short lists with time-decayed popularity (``fill_half_life_h``; ``None`` = all-time).

Falling back is counted: ``fallback_stats`` holds, over every list asked for a user the model
had already learned an event of, how many (``lists``) and how many of them the model's own
evidence contributed nothing to (``fell_back``: the list is pure popularity, or, for the
neighbourhood models, no neighbour was found), plus the same per distinct user. A model that
silently became popularity on some log says so in the report.

>>> from recsys.events import Event
>>> stream = [Event(f"e{i}", t, u, item, i) for i, (t, u, item) in enumerate([
...     ("click", "u1", "a"), ("click", "u2", "a"), ("click", "u2", "b"), ("purchase", "u1", "a")])]
>>> m = PopularityBaseline(); m.learn(stream)
>>> m.recommend(["u1", "u3"], k=2, now_ts=10)
[['b'], ['a', 'b']]
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from recsys.events import Event
from recsys.feedback import EVENT_WEIGHTS, MS_PER_HOUR

__all__ = [
    "PopularityBaseline",
    "RecentPopularityBaseline",
    "CoVisitationBaseline",
    "SessionKNNBaseline",
    "ContentBaseline",
    "RiverBiasedMFBaseline",
]

# Decayed scores are stored as w * 2**((ts - ref) / half_life); re-base once the exponent
# passes this, long before float64 (max ~2**1023) could overflow.
_REBASE_EXPONENT = 60.0
_EMPTY: frozenset[int] = frozenset()


def _top_indices(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` largest scores, ordered by (-score, index): deterministic ties.

    >>> _top_indices(np.array([1.0, 3.0, 3.0, 2.0]), 3).tolist()
    [1, 2, 3]
    """
    n = len(scores)
    if m <= 0 or n == 0:
        return np.empty(0, dtype=np.int64)
    if m < n:
        threshold = scores[np.argpartition(-scores, m - 1)[:m]].min()
        cand = np.flatnonzero(scores >= threshold)  # every tie at the boundary, by index
    else:
        cand = np.arange(n)
    order = np.lexsort((cand, -scores[cand]))
    return cand[order][:m]


def _top_keys(scores: Mapping[int, float], m: int) -> list[int]:
    """Keys of the ``m`` largest values, ordered by (-value, key): deterministic ties.

    >>> _top_keys({7: 1.0, 3: 2.0, 5: 2.0, 9: 0.5}, 3)
    [3, 5, 7]
    """
    n = len(scores)
    if n == 0 or m <= 0:
        return []
    keys = np.fromiter(scores.keys(), dtype=np.int64, count=n)
    vals = np.fromiter(scores.values(), dtype=np.float64, count=n)
    if m < n:
        keep = vals >= np.partition(vals, n - m)[n - m]  # the m-th largest and every tie with it
        keys, vals = keys[keep], vals[keep]
    return keys[np.lexsort((keys, -vals))[:m]].tolist()


class _IdMap:
    """Item id <-> dense integer, in order of first sight."""

    __slots__ = ("ids", "pos")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}

    def add(self, item_id: str) -> int:
        idx = self.pos.get(item_id)
        if idx is None:
            idx = self.pos[item_id] = len(self.ids)
            self.ids.append(item_id)
        return idx

    def __len__(self) -> int:
        return len(self.ids)


class _DecayedCounts:
    """Per-item scores with exponential time decay (``half_life_h=None``: plain counts)."""

    def __init__(self, half_life_h: float | None) -> None:
        self.half_life_ms = None if half_life_h is None else half_life_h * MS_PER_HOUR
        self.values = np.zeros(1024, dtype=np.float64)
        self.n = 0
        self.ref_ts: int | None = None

    def add(self, idx: int, weight: float, ts: int) -> None:
        if idx >= len(self.values):
            grown = np.zeros(max(2 * len(self.values), idx + 1), dtype=np.float64)
            grown[: len(self.values)] = self.values
            self.values = grown
        self.n = max(self.n, idx + 1)
        if self.half_life_ms is not None:
            if self.ref_ts is None:
                self.ref_ts = ts
            exponent = (ts - self.ref_ts) / self.half_life_ms
            if exponent > _REBASE_EXPONENT:
                self.values[: self.n] *= 2.0**-exponent
                self.ref_ts, exponent = ts, 0.0
            weight *= 2.0**exponent
        self.values[idx] += weight

    def top(self, m: int) -> np.ndarray:
        return _top_indices(self.values[: self.n], m)


class _Baseline:
    """Shared plumbing: item index, purchase exclusion, popularity fill, merge of candidates."""

    name: str
    #: False for models that are popularity by design (their "fallback" is the model itself)
    reports_fallback = True

    def __init__(self, *, name: str, repeat_items: Collection[str], fill_half_life_h: float | None) -> None:
        self.name = name
        self.repeat_items = frozenset(repeat_items)
        self._items = _IdMap()
        self._pop = _DecayedCounts(fill_half_life_h)
        self._purchased: dict[str, set[int]] = {}
        self._known_users: set[str] = set()  # users with at least one learned event with an item
        # positions (in the current ``_candidates`` call) of users the model found no evidence
        # for, although it returned candidates (e.g. session-kNN voting only the user's own items)
        self._no_evidence: set[int] = set()
        self._fallback = {"lists": 0, "fell_back": 0}
        self._fallback_users: dict[str, bool] = {}  # user -> fell back at least once

    @property
    def fallback_stats(self) -> dict[str, float] | None:
        """How often the model had nothing of its own for a user it knew (see the module doc);
        ``None`` for the popularity models, which are the fallback."""
        if not self.reports_fallback:
            return None
        lists, fell = self._fallback["lists"], self._fallback["fell_back"]
        users = len(self._fallback_users)
        fell_users = sum(self._fallback_users.values())
        return {"lists": lists, "fell_back": fell, "share": fell / lists if lists else 0.0,
                "users": users, "users_fell_back": fell_users, "user_share": fell_users / users if users else 0.0}

    # ---- learning
    def learn(self, events: Sequence[Event]) -> None:
        """Absorb ``events`` (timestamp order); events without an item only reach ``_learn_other``."""
        for ev in events:
            if ev.item_id is None:
                continue
            idx = self._items.add(ev.item_id)
            self._known_users.add(ev.user_id)
            self._pop.add(idx, 1.0, ev.ts)
            if ev.type == "purchase" and ev.item_id not in self.repeat_items:
                self._purchased.setdefault(ev.user_id, set()).add(idx)
            self._learn_one(ev, idx)

    def _learn_one(self, ev: Event, idx: int) -> None:
        """Model-specific learning from one event with an item (already indexed as ``idx``)."""

    # ---- ranking
    def _candidates(self, user_ids: list[str], m: int, now_ts: int) -> list[list[int]]:
        """Per user, up to ``m`` item indices, best first (empty: popularity only)."""
        return [[] for _ in user_ids]

    def recommend(self, user_ids: list[str], k: int, now_ts: int) -> list[list[str]]:
        """Top ``k`` item ids per user: model candidates, then popularity, minus purchases."""
        if not user_ids:
            return []
        excluded = [self._purchased.get(u, _EMPTY) for u in user_ids]
        m = k + max(len(e) for e in excluded)
        self._no_evidence = set()
        primary = self._candidates(user_ids, m, now_ts)
        fill = self._pop.top(m + k).tolist()
        ids = self._items.ids
        out = []
        for pos, (user, cands, excl) in enumerate(zip(user_ids, primary, excluded)):
            ranked: list[int] = []
            taken: set[int] = set()
            own = 0  # items from the model's own candidates
            for source in (cands, fill):
                for i in source:
                    if i in excl or i in taken:
                        continue
                    ranked.append(i)
                    taken.add(i)
                    if len(ranked) == k:
                        break
                if source is cands:
                    own = len(ranked)
                if len(ranked) == k:
                    break
            if user in self._known_users and k > 0:
                fell = own == 0 or pos in self._no_evidence
                self._fallback["lists"] += 1
                self._fallback["fell_back"] += fell
                self._fallback_users[user] = self._fallback_users.get(user, False) or fell
            out.append([ids[i] for i in ranked])
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PopularityBaseline(_Baseline):
    """Most-interacted items of all time (every event with an item counts once).

    >>> from recsys.events import Event
    >>> m = PopularityBaseline()
    >>> m.learn([Event("1", "click", "u", "a", 0), Event("2", "click", "v", "b", 1), Event("3", "browse", "w", "b", 2)])
    >>> m.recommend(["x"], k=2, now_ts=3)
    [['b', 'a']]
    """

    reports_fallback = False

    def __init__(self, *, repeat_items: Collection[str] = (), name: str = "popularity") -> None:
        super().__init__(name=name, repeat_items=repeat_items, fill_half_life_h=None)


class RecentPopularityBaseline(_Baseline):
    """Trending: interaction counts decayed with half-life ``half_life_h`` hours.

    >>> from recsys.events import Event
    >>> h = 3_600_000
    >>> m = RecentPopularityBaseline(half_life_h=1.0)
    >>> m.learn([Event("1", "click", "u", "a", 0), Event("2", "click", "v", "a", 0), Event("3", "click", "w", "b", 2 * h)])
    >>> m.recommend(["x"], k=2, now_ts=2 * h)  # a: 2 * 1/4 = 0.5 < b: 1
    [['b', 'a']]
    """

    reports_fallback = False

    def __init__(self, half_life_h: float = 24.0, *, repeat_items: Collection[str] = (), name: str = "recent_popularity") -> None:
        if half_life_h <= 0:
            raise ValueError(f"half_life_h must be > 0, got {half_life_h}")
        super().__init__(name=name, repeat_items=repeat_items, fill_half_life_h=half_life_h)


class CoVisitationBaseline(_Baseline):
    """Item-to-item co-visitation (OTTO style): items a user touches close together.

    When a user touches item ``b`` with an event of type ``t``, every other item ``a`` among
    their last ``window`` distinct items (touched at most ``max_gap_h`` hours ago) gains
    ``EVENT_WEIGHTS[t]`` (time-decayed with ``half_life_h``) in both ``C[a][b]`` and ``C[b][a]``.
    Each row keeps its ``max_neighbours`` strongest entries. A user's score for ``b`` sums
    ``C[a][b] / (1 + r)`` over their ``query_items`` most recent items ``a`` (``r = 0`` for the
    newest); popularity fills the rest.

    >>> from recsys.events import Event
    >>> evs = [Event(str(i), "click", u, it, i) for i, (u, it) in enumerate(
    ...     [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "c"), ("u3", "c"), ("u4", "a")])]
    >>> m = CoVisitationBaseline(); m.learn(evs)
    >>> m.recommend(["u4"], k=1, now_ts=7)
    [['b']]
    """

    def __init__(
        self,
        window: int = 10,
        half_life_h: float | None = 24.0 * 30,
        *,
        max_gap_h: float = 24.0,
        query_items: int = 5,
        max_neighbours: int = 50,
        type_weights: Mapping[str, float] = EVENT_WEIGHTS,
        repeat_items: Collection[str] = (),
        fill_half_life_h: float | None = 24.0,
        name: str = "covisitation",
    ) -> None:
        super().__init__(name=name, repeat_items=repeat_items, fill_half_life_h=fill_half_life_h)
        self.window = window
        self.half_life_ms = None if half_life_h is None else half_life_h * MS_PER_HOUR
        self.max_gap_ms = max_gap_h * MS_PER_HOUR
        self.query_items = query_items
        self.max_neighbours = max_neighbours
        self.type_weights = dict(type_weights)
        self._recent: dict[str, dict[int, int]] = {}  # user -> {item: last ts}, oldest first
        self._co: dict[int, dict[int, float]] = defaultdict(dict)
        self._ref_ts: int | None = None

    def _weight(self, ev: Event) -> float:
        w = self.type_weights.get(ev.type, 0.0)
        if self.half_life_ms is None:
            return w
        if self._ref_ts is None:
            self._ref_ts = ev.ts
        exponent = (ev.ts - self._ref_ts) / self.half_life_ms
        if exponent > _REBASE_EXPONENT:
            scale = 2.0**-exponent
            for row in self._co.values():
                for j in row:
                    row[j] *= scale
            self._ref_ts, exponent = ev.ts, 0.0
        return w * 2.0**exponent

    def _learn_one(self, ev: Event, idx: int) -> None:
        recent = self._recent.get(ev.user_id)
        if recent is None:
            recent = self._recent[ev.user_id] = {}
        w = self._weight(ev)
        co = self._co
        for a, ts in recent.items():
            if a == idx or ev.ts - ts > self.max_gap_ms:
                continue
            for x, y in ((a, idx), (idx, a)):
                row = co[x]
                row[y] = row.get(y, 0.0) + w
                if len(row) > 2 * self.max_neighbours:
                    co[x] = {j: row[j] for j in _top_keys(row, self.max_neighbours)}
        recent.pop(idx, None)
        recent[idx] = ev.ts
        if len(recent) > self.window:
            del recent[next(iter(recent))]

    def _candidates(self, user_ids: list[str], m: int, now_ts: int) -> list[list[int]]:
        out = []
        for user in user_ids:
            recent = self._recent.get(user)
            if not recent:
                out.append([])
                continue
            scores: dict[int, float] = defaultdict(float)
            for r, a in enumerate(reversed(list(recent)[-self.query_items :])):
                wq = 1.0 / (1 + r)
                for b, v in self._co.get(a, {}).items():
                    scores[b] += wq * v
            out.append(_top_keys(scores, m))
        return out


class SessionKNNBaseline(_Baseline):
    """Session-based kNN, V-SKNN style (Ludewig & Jannach 2018).

    Sessions are ``Event.session_id`` when present, else runs of a user's events with gaps
    under ``session_gap_min``. The user's current session (last ``max_session_len`` distinct
    items) is a vector with linearly decaying position weights (newest 1, oldest 1/n). Past
    and ongoing sessions of everyone sharing an item are found through an inverted index
    item -> most recent sessions; the ``sample_size`` most recently active are compared by
    cosine similarity, the ``k`` most similar vote for their items with their similarity.
    The user's own current session is not its own neighbour. Popularity fills the rest.

    >>> from recsys.events import Event
    >>> evs = [Event(str(i), "click", u, it, i, session_id=s) for i, (u, s, it) in enumerate(
    ...     [("u1", "s1", "a"), ("u1", "s1", "b"), ("u1", "s1", "c"), ("u2", "s2", "a"), ("u2", "s2", "b")])]
    >>> m = SessionKNNBaseline(); m.learn(evs)
    >>> m.recommend(["u2"], k=3, now_ts=5)
    [['a', 'b', 'c']]
    """

    def __init__(
        self,
        k: int = 100,
        sample_size: int = 500,
        *,
        session_gap_min: float = 30.0,
        max_session_len: int = 50,
        repeat_items: Collection[str] = (),
        fill_half_life_h: float | None = 24.0,
        name: str = "session_knn",
    ) -> None:
        super().__init__(name=name, repeat_items=repeat_items, fill_half_life_h=fill_half_life_h)
        self.k = k
        self.sample_size = sample_size
        self.session_gap_ms = session_gap_min * 60_000
        self.max_session_len = max_session_len
        self._current: dict[str, tuple[Any, int, int]] = {}  # user -> (session key, sid, last ts)
        self._sessions: list[dict[int, None]] = []  # sid -> ordered set of items, newest last
        self._active = np.zeros(1024, dtype=np.int64)  # sid -> counter of its latest event (recency)
        self._length = np.zeros(1024, dtype=np.float64)  # sid -> number of distinct items
        self._index: dict[int, deque[int]] = {}  # item -> sids, most recent last
        self._clock = 0

    def _learn_one(self, ev: Event, idx: int) -> None:
        self._clock += 1
        cur = self._current.get(ev.user_id)
        if ev.session_id is not None:
            is_new = cur is None or cur[0] != ev.session_id
            key: Any = ev.session_id
        else:
            is_new = cur is None or ev.ts - cur[2] > self.session_gap_ms
            key = None
        if is_new:
            sid = len(self._sessions)
            self._sessions.append({})
            if sid >= len(self._active):
                self._active = np.concatenate([self._active, np.zeros_like(self._active)])
                self._length = np.concatenate([self._length, np.zeros_like(self._length)])
        else:
            sid = cur[1]  # type: ignore[index]
        self._current[ev.user_id] = (key, sid, ev.ts)
        self._active[sid] = self._clock
        items = self._sessions[sid]
        if idx in items:
            del items[idx]
        else:
            postings = self._index.get(idx)
            if postings is None:
                postings = self._index[idx] = deque(maxlen=self.sample_size)
            postings.append(sid)
        items[idx] = None
        self._length[sid] = len(items)

    def _candidates(self, user_ids: list[str], m: int, now_ts: int) -> list[list[int]]:
        out = []
        for user in user_ids:
            cur = self._current.get(user)
            if cur is None:
                out.append([])
                continue
            own = cur[1]
            session = list(self._sessions[own])[-self.max_session_len :]
            n = len(session)
            overlap: dict[int, float] = defaultdict(float)
            for pos, item in enumerate(session, start=1):
                w = pos / n
                for sid in self._index.get(item, ()):
                    overlap[sid] += w
            overlap.pop(own, None)
            if not overlap:
                out.append([])
                continue
            sids = np.fromiter(overlap.keys(), dtype=np.int64, count=len(overlap))
            dots = np.fromiter(overlap.values(), dtype=np.float64, count=len(overlap))
            if len(sids) > self.sample_size:  # the most recently active sessions
                recent = np.argpartition(-self._active[sids], self.sample_size - 1)[: self.sample_size]
                sids, dots = sids[recent], dots[recent]
            sims = dots / np.sqrt(n * self._length[sids])
            top = np.lexsort((sids, -sims))[: self.k]
            scores: dict[int, float] = defaultdict(float)
            for sim, sid in zip(sims[top].tolist(), sids[top].tolist()):
                for item in self._sessions[sid]:
                    scores[item] += sim
            if scores.keys() <= set(session):  # neighbours only re-voted the user's own items
                self._no_evidence.add(len(out))
            out.append(_top_keys(scores, m))
        return out


class ContentBaseline(_Baseline):
    """Nearest items to a user's recency-weighted mean of history item vectors (inner product).

    ``vectors`` is either a dict item id -> vector (every key is recommendable from the start,
    even before anyone touches it) or a callable mapping a list of new item ids to an
    ``(n, d)`` array, called once per ``learn`` batch for items first seen there. A zero row (or
    vector) means there is none: an item without text, such as one a replay admits because its
    catalog lacks it. Such an item is never recommended by content, adds nothing to a profile,
    and is not asked for again. The user's
    vector averages their last ``history`` item vectors with weights halving every
    ``half_life_h`` hours back from their latest event. All users of a ``recommend`` call are
    searched in one faiss query (exact ``IndexFlatIP``; ``hnsw_m`` switches to approximate
    HNSW for large catalogs). Users without history get popularity.

    >>> from recsys.events import Event
    >>> vecs = {"a": [1.0, 0.0], "b": [0.9, 0.1], "c": [0.0, 1.0]}
    >>> m = ContentBaseline(vecs); m.learn([Event("1", "click", "u", "a", 0)])
    >>> m.recommend(["u"], k=3, now_ts=1)
    [['a', 'b', 'c']]
    """

    def __init__(
        self,
        vectors: Callable[[list[str]], np.ndarray] | Mapping[str, Sequence[float] | np.ndarray],
        *,
        half_life_h: float = 24.0 * 7,
        history: int = 20,
        hnsw_m: int | None = None,
        repeat_items: Collection[str] = (),
        fill_half_life_h: float | None = 24.0,
        name: str = "content",
    ) -> None:
        super().__init__(name=name, repeat_items=repeat_items, fill_half_life_h=fill_half_life_h)
        self.half_life_ms = half_life_h * MS_PER_HOUR
        self.history = history
        self.hnsw_m = hnsw_m
        self._fn: Callable[[list[str]], np.ndarray] | None = None
        self._index: Any = None  # faiss index, built at the first vectors (dimension known then)
        self._row_item: list[int] = []  # faiss row -> item index
        self._item_row: dict[int, int] = {}
        self._no_vector: set[int] = set()  # items whose vector was a zero row
        self._matrix: list[np.ndarray] = []  # rows, for the user vectors
        self._history: dict[str, deque[tuple[int, int]]] = {}  # user -> (row, ts)
        if callable(vectors):
            self._fn = vectors
        else:
            ids = list(vectors)
            if ids:
                self._add_vectors(ids, np.asarray([np.asarray(vectors[i], dtype=np.float32) for i in ids]))

    def _add_vectors(self, item_ids: list[str], mat: np.ndarray) -> None:
        import faiss

        mat = np.ascontiguousarray(np.asarray(mat, dtype=np.float32).reshape(len(item_ids), -1))
        if self._index is None:
            d = mat.shape[1]
            if self.hnsw_m:
                self._index = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            else:
                self._index = faiss.IndexFlatIP(d)
        for item_id, row in zip(item_ids, mat):
            idx = self._items.add(item_id)
            if idx in self._item_row or idx in self._no_vector:
                continue
            if not row.any():  # no vector: nothing to find it by, nothing it says about a shopper
                self._no_vector.add(idx)
                continue
            self._item_row[idx] = len(self._row_item)
            self._row_item.append(idx)
            self._matrix.append(row)
        new_rows = np.asarray(self._matrix[self._index.ntotal :], dtype=np.float32)
        if len(new_rows):
            self._index.add(new_rows)

    def learn(self, events: Sequence[Event]) -> None:
        if self._fn is not None:
            new = list(dict.fromkeys(
                ev.item_id for ev in events
                if ev.item_id is not None and (idx := self._items.pos.get(ev.item_id)) not in self._item_row
                and idx not in self._no_vector
            ))
            if new:
                self._add_vectors(new, self._fn(new))
        super().learn(events)

    def _learn_one(self, ev: Event, idx: int) -> None:
        row = self._item_row.get(idx)
        if row is None:
            return
        hist = self._history.get(ev.user_id)
        if hist is None:
            hist = self._history[ev.user_id] = deque(maxlen=self.history)
        hist.append((row, ev.ts))

    def _candidates(self, user_ids: list[str], m: int, now_ts: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in user_ids]
        who, queries = [], []
        for j, user in enumerate(user_ids):
            hist = self._history.get(user)
            if not hist:
                continue
            rows = [r for r, _ in hist]
            last = hist[-1][1]
            w = np.exp2(np.array([ts - last for _, ts in hist], dtype=np.float64) / self.half_life_ms)
            queries.append((w[:, None] * np.asarray([self._matrix[r] for r in rows])).sum(0) / w.sum())
            who.append(j)
        if not who or self._index is None:
            return out
        m = min(m, self._index.ntotal)
        _, found = self._index.search(np.asarray(queries, dtype=np.float32), m)
        for j, rows in zip(who, found):
            out[j] = [self._row_item[r] for r in rows if r >= 0]
        return out


class RiverBiasedMFBaseline(_Baseline):
    """River's ``reco.BiasedMF`` trained online on implicit feedback, ranking a popular pool.

    Each interaction is a positive (``y = 1``) and ``negatives`` items drawn in proportion to
    past popularity (a random earlier event's item, seeded) are negatives (``y = 0``).
    Scoring the whole catalog through river is too slow for a backtest, so ``recommend``
    scores only a candidate pool: the ``candidates`` most popular items (time-decayed, the
    same popularity that fills lists), ranked by item bias + <user factors, item factors>
    read from the river model (global mean and user bias do not change a user's ranking).
    Users river has not seen get the pool in popularity order.

    >>> from recsys.events import Event
    >>> m = RiverBiasedMFBaseline(n_factors=2, seed=1)
    >>> m.learn([Event(str(i), "click", f"u{i % 3}", f"i{i % 5}", i) for i in range(30)])
    >>> recs = m.recommend(["u0", "nobody"], k=3, now_ts=30)
    >>> [len(set(r)) for r in recs]
    [3, 3]
    """

    def __init__(
        self,
        n_factors: int = 10,
        *,
        candidates: int = 300,
        negatives: int = 4,
        learning_rate: float = 0.1,
        l2: float = 0.001,
        seed: int = 0,
        repeat_items: Collection[str] = (),
        fill_half_life_h: float | None = 24.0,
        name: str = "river_biased_mf",
    ) -> None:
        from river import optim, reco

        super().__init__(name=name, repeat_items=repeat_items, fill_half_life_h=fill_half_life_h)
        self.candidates = candidates
        self.negatives = negatives
        self.model = reco.BiasedMF(
            n_factors=n_factors,
            bias_optimizer=optim.SGD(learning_rate),
            latent_optimizer=optim.SGD(learning_rate),
            l2_bias=l2,
            l2_latent=l2,
            seed=seed,
        )
        self.n_factors = n_factors
        self._rng = np.random.default_rng(seed)
        self._seen_items: list[str] = []  # one entry per past interaction: popularity sampling

    def _learn_one(self, ev: Event, idx: int) -> None:
        item = ev.item_id
        self.model.learn_one(ev.user_id, item, 1.0)
        if self._seen_items:
            for _ in range(self.negatives):
                neg = self._seen_items[int(self._rng.random() * len(self._seen_items))]
                if neg != item:
                    self.model.learn_one(ev.user_id, neg, 0.0)
        self._seen_items.append(item)  # type: ignore[arg-type]

    def _candidates(self, user_ids: list[str], m: int, now_ts: int) -> list[list[int]]:
        pool = self._pop.top(self.candidates)
        if len(pool) == 0:
            return [[] for _ in user_ids]
        ids = self._items.ids
        zeros = np.zeros(self.n_factors)
        i_lat = self.model.i_latents
        i_bias = self.model.i_biases
        # .get, not [], so that reading never inserts defaults into river's state
        item_f = np.asarray([i_lat.get(ids[i], zeros) for i in pool])
        bias = np.asarray([i_bias.get(ids[i], 0.0) for i in pool], dtype=np.float64)
        out = []
        for user in user_ids:
            u = self.model.u_latents.get(user)
            if u is None:
                out.append(pool[:m].tolist())
                continue
            scores = bias + item_f @ u
            order = np.lexsort((np.arange(len(pool)), -scores))[:m]
            out.append(pool[order].tolist())
        return out
