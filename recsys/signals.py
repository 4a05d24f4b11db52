"""Global signals learned from every user's events: trending popularity and co-visitation.

Both live in memory and are persisted incrementally through a :class:`recsys.state.KVStore`:
``export_dirty()`` hands back the records changed since the last export (to be written in the
same atomic ``kv.write`` as user state and watermarks), ``load(kv)`` rebuilds from the store.
Everything decays in *event* time (the events' ``ts``, epoch milliseconds), never wall time,
so a replay produces the same numbers as the live run. Neither structure skips re-delivered
events by itself: the caller guards them with per-partition watermarks.

>>> pop = Popularity(half_life_h=1.0)
>>> pop.update("a", 2.0, ts=0); pop.update("b", 1.0, ts=0)
>>> pop.top(2, now_ts=3_600_000)           # one half-life later: halved
[('a', 1.0), ('b', 0.5)]
>>> cov = CoVisitation(half_life_h=1.0, max_neighbours=10, window=5)
>>> cov.update([("a", "browse", 0)], "b", "click", ts=0)
>>> cov.neighbours("a", 5), cov.neighbours("b", 5)
([('b', 2.0, 1)], [('a', 2.0, 1)])
"""

from __future__ import annotations

import heapq
import math
import struct
from typing import TYPE_CHECKING, Iterable

import numpy as np
import orjson

from recsys.feedback import EVENT_WEIGHTS, MS_PER_HOUR, decay_factor  # noqa: F401 - EVENT_WEIGHTS re-exported

if TYPE_CHECKING:
    from recsys.state import KVStore

POP_PREFIX = b"pop:"
COV_PREFIX = b"cov:"
NEXT_PREFIX = b"nxt:"  # directed transitions (CoVisitation(directed=True))

_NO_NEIGHBOURS: tuple = ((), np.zeros(0), ())  # shared empty answer (never modified)
#: How many of an overflowing list's weakest pairs one scan remembers. Each overflow drops the
#: weakest pair; a full ``min`` over ~50 pairs on every overflow was the co-visitation update's
#: largest cost once lists fill, so one scan now serves the next several overflows.
_WEAKEST_KEPT = 8
_POP_RECORD = struct.Struct("<dq")  # score at ref time, ref time (epoch ms)


def _check_half_life(half_life_h: float) -> float:
    if not (half_life_h > 0 and math.isfinite(half_life_h)):
        raise ValueError(f"half_life_h must be a positive finite number of hours, got {half_life_h!r}")
    return half_life_h * MS_PER_HOUR


class Popularity:
    """Time-decayed popularity ("trending") per item, in event time.

    Per item: a score valid at a reference time (the newest event seen for it) and that
    time; everything else is decayed lazily on read. Scores and times sit in numpy arrays so
    ``top`` over ~100k items is one vectorised decay plus an ``argpartition`` (~1-2 ms).

    >>> p = Popularity(half_life_h=24.0)
    >>> p.update("x", 8.0, ts=1_000); p.update("y", 1.0, ts=1_000)
    >>> p.top(5, now_ts=1_000, exclude={"x"})
    [('y', 1.0)]
    """

    def __init__(self, half_life_h: float, *, initial_capacity: int = 1024) -> None:
        self.half_life_h = half_life_h
        self._half_life_ms = _check_half_life(half_life_h)
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        cap = max(16, initial_capacity)
        self._score = np.zeros(cap, dtype=np.float64)
        self._ref = np.zeros(cap, dtype=np.int64)
        self._dirty: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def _slot(self, item_id: str, ts: int) -> int:
        i = self._index.get(item_id)
        if i is not None:
            return i
        i = len(self._ids)
        if i == len(self._score):  # grow by doubling: amortised O(1) inserts
            self._score = np.concatenate([self._score, np.zeros(i, dtype=np.float64)])
            self._ref = np.concatenate([self._ref, np.zeros(i, dtype=np.int64)])
        self._index[item_id] = i
        self._ids.append(item_id)
        self._score[i] = 0.0
        self._ref[i] = ts
        return i

    def update(self, item_id: str, weight: float, ts: int) -> None:
        """Add ``weight`` for ``item_id`` at event time ``ts``; zero weights are ignored.

        A late event (``ts`` before the item's reference time) is added already decayed to
        the reference time, so no decay ever runs with a negative time step.
        """
        if weight == 0:
            return
        i = self._slot(item_id, ts)
        ref = int(self._ref[i])
        score = float(self._score[i])
        if ts >= ref:
            score = score * decay_factor(ts - ref, self._half_life_ms) + weight
            self._ref[i] = ts
        else:
            score += weight * decay_factor(ref - ts, self._half_life_ms)
        self._score[i] = score
        self._dirty.add(item_id)

    def score(self, item_id: str, now_ts: int) -> float:
        """The item's score decayed to ``now_ts`` (0.0 for an unseen item)."""
        i = self._index.get(item_id)
        if i is None:
            return 0.0
        return float(self._score[i]) * decay_factor(now_ts - int(self._ref[i]), self._half_life_ms)

    def top(self, n: int, now_ts: int, exclude: set[str] | frozenset[str] | None = None) -> list[tuple[str, float]]:
        """The ``n`` highest-scoring items at ``now_ts`` as ``(item_id, score)``, best first.

        Items in ``exclude`` and items scoring 0 are left out. Ties are broken by item id,
        so the answer never depends on insertion order (e.g. before and after ``load``).
        """
        m = len(self._ids)
        if n <= 0 or m == 0:
            return []
        exclude = exclude or frozenset()
        dt = np.maximum(now_ts - self._ref[:m], 0).astype(np.float64)
        eff = self._score[:m] * np.exp2(-dt / self._half_life_ms)
        # Enough headroom that excluded items cannot push wanted ones out of the cut.
        k = min(m, n + sum(1 for x in exclude if x in self._index))
        ids = self._ids
        if k < m:
            cut = np.argpartition(-eff, k - 1)[:k]  # cut[k-1] is the k-th best; all better are in cut
            threshold = eff[cut[k - 1]]
            above = cut[eff[cut] > threshold].tolist()
            tied = np.flatnonzero(eff == threshold).tolist()
            if len(above) + len(tied) > k:  # ties at the cut: the smallest ids win, whatever the order
                tied = heapq.nsmallest(k - len(above), tied, key=ids.__getitem__)
            cand = above + tied
        else:
            cand = list(range(m))
        ranked = sorted((j for j in cand if eff[j] > 0), key=lambda j: (-eff[j], ids[j]))
        out: list[tuple[str, float]] = []
        for j in ranked:
            if ids[j] in exclude:
                continue
            out.append((ids[j], float(eff[j])))
            if len(out) == n:
                break
        return out

    def export_dirty(self) -> dict[bytes, bytes]:
        """Records changed since the last export, ``b"pop:"+id -> (score, ref_ts)``; clears them."""
        out: dict[bytes, bytes] = {}
        for item_id in sorted(self._dirty):
            i = self._index[item_id]
            out[POP_PREFIX + item_id.encode()] = _POP_RECORD.pack(float(self._score[i]), int(self._ref[i]))
        self._dirty.clear()
        return out

    def load(self, kv: KVStore) -> None:
        """Replace everything held with the records under ``b"pop:"`` in ``kv``."""
        self._index.clear()
        self._ids.clear()
        self._dirty.clear()
        scores: list[float] = []
        refs: list[int] = []
        for key, value in kv.iter_prefix(POP_PREFIX):
            score, ref = _POP_RECORD.unpack(value)
            item_id = key[len(POP_PREFIX) :].decode()
            self._index[item_id] = len(self._ids)
            self._ids.append(item_id)
            scores.append(score)
            refs.append(ref)
        cap = max(16, 2 * len(scores))
        self._score = np.zeros(cap, dtype=np.float64)
        self._ref = np.zeros(cap, dtype=np.int64)
        self._score[: len(scores)] = scores
        self._ref[: len(refs)] = refs


class CoVisitation:
    """Item-to-item co-visitation (OTTO style), weighted by event type and closeness in time.

    When a user engages with item ``b`` after the recent items ``a1..an`` of their history
    (its last ``window`` entries), each distinct ``a != b`` gains, symmetrically with ``b``,
    ``EVENT_WEIGHTS[type_b] * 0.5 ** ((ts_b - ts_a) / half_life)`` and one raw co-occurrence.
    A repeated ``a`` in the window counts once, at its most recent time. Each item keeps at
    most ``max_neighbours`` neighbours: when a list overflows, its weakest pair is dropped
    from both sides, so the relation stays symmetric. Accumulated weights are not decayed
    over time (``neighbours`` takes no clock); the half-life only discounts distant pairs.

    >>> c = CoVisitation(half_life_h=1.0, max_neighbours=2, window=5)
    >>> hist = [("a", "browse", 0), ("b", "browse", 3_600_000)]
    >>> c.update(hist, "c", "purchase", ts=3_600_000)
    >>> c.neighbours("c", 5)
    [('b', 8.0, 1), ('a', 4.0, 1)]
    """

    def __init__(
        self, half_life_h: float, max_neighbours: int, window: int = 5, *, directed: bool = False, prefix: bytes = b""
    ) -> None:
        if max_neighbours <= 0 or window <= 0:
            raise ValueError(f"max_neighbours and window must be > 0, got {max_neighbours}, {window}")
        # directed: only a -> b ("b came after a"), the transition signal of session data
        self.directed = directed
        self.prefix = prefix or (NEXT_PREFIX if directed else COV_PREFIX)
        self.half_life_h = half_life_h
        self.max_neighbours = max_neighbours
        self.window = window
        self._half_life_ms = _check_half_life(half_life_h)
        # item -> neighbour -> weight, and -> raw count. Two dicts of plain floats/ints rather
        # than one of [weight, count] lists: such dicts are invisible to Python's cyclic
        # garbage collector, whose full passes over ~500k small lists stalled the stream for
        # ~0.5 s (the p99 latency); see benchmarks/README.md.
        self._nbrs: dict[str, dict[str, float]] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._ranked: dict[str, tuple] = {}  # sorted neighbour columns, until they change
        # item -> the lightest ``(weight, neighbour)`` pairs of its list, ascending: exactly the
        # list's first few in that order (every change below keeps it so, or shortens it), so
        # the weakest is at hand when the list overflows. Tuples of plain values: untracked.
        # Anything that changes ``_nbrs`` must go through ``_add_pair``/``_drop_pair`` (or drop
        # the item's entry here), or a stale entry would pick the wrong victim.
        self._weakest: dict[str, tuple[tuple[float, str], ...]] = {}
        self._dirty: set[str] = set()

    def __len__(self) -> int:
        return len(self._nbrs)

    def update(self, history: Iterable[tuple[str | None, str, int]], item_id: str | None, event_type: str, ts: int) -> None:
        """Learn from one engagement with ``item_id`` given the user's history *before* it.

        ``history`` is ``[(item_id, event_type, ts), ...]``, most recent last (as kept by
        :class:`recsys.state.UserState`); entries without an item are ignored.
        """
        w = EVENT_WEIGHTS.get(event_type, 0.0)
        if item_id is None or w == 0:
            return
        recent: dict[str, int] = {}
        for a, _type_a, ts_a in list(history)[-self.window :]:
            if a is None or a == item_id:
                continue
            gap = abs(ts - ts_a)  # out-of-order history: distance in time either way
            if a not in recent or gap < recent[a]:
                recent[a] = gap
        for a in sorted(recent):
            self._add_pair(a, item_id, w * decay_factor(recent[a], self._half_life_ms))

    def _add_pair(self, a: str, b: str, weight: float) -> None:
        weakest = self._weakest
        for x, y in ((a, b),) if self.directed else ((a, b), (b, a)):
            nbrs = self._nbrs.setdefault(x, {})
            counts = self._counts.setdefault(x, {})
            old = nbrs.get(y)
            new = nbrs[y] = (0.0 if old is None else old) + weight
            counts[y] = counts.get(y, 0) + 1
            self._dirty.add(x)
            self._ranked.pop(x, None)
            low = weakest.get(x)
            if low:  # keep the lightest pairs exact: (old, y) leaves them, (new, y) may enter
                if old is not None and (old, y) <= low[-1]:
                    low = low[: low.index((old, y))]  # y's new place is unknown: cut before it
                if (new, y) < low[-1] if low else False:
                    low = tuple(sorted(low + ((new, y),)))[:-1]  # one of the len(low) lightest now
                weakest[x] = low
        for x in (a,) if self.directed else (a, b):
            nbrs = self._nbrs.get(x)
            if nbrs is not None and len(nbrs) > self.max_neighbours:
                # the weakest goes; among equals the smallest id, so the choice is deterministic
                low = weakest.get(x)
                if not low:
                    low = weakest[x] = tuple(heapq.nsmallest(_WEAKEST_KEPT, zip(nbrs.values(), nbrs)))
                self._drop_pair(x, low[0][1])

    def _drop_pair(self, x: str, y: str) -> None:
        for p, q in ((x, y),) if self.directed else ((x, y), (y, x)):
            nbrs = self._nbrs.get(p)
            if nbrs is not None:
                w = nbrs.pop(q, None)
                if w is None:
                    continue
                del self._counts[p][q]
                self._dirty.add(p)
                self._ranked.pop(p, None)
                low = self._weakest.get(p)
                if low and (w, q) <= low[-1]:
                    self._weakest[p] = tuple(pair for pair in low if pair[1] != q)
                if not nbrs:
                    del self._nbrs[p], self._counts[p]
                    self._weakest.pop(p, None)

    def neighbours(self, item_id: str, n: int) -> list[tuple[str, float, int]]:
        """Up to ``n`` neighbours of ``item_id`` as ``(neighbour, weight, raw count)``,
        heaviest first, ties by neighbour id."""
        if n <= 0:
            return []
        names, weights, counts = self.ranked(item_id)
        return list(zip(names[:n], weights[:n].tolist(), counts[:n]))

    def ranked(self, item_id: str) -> tuple[tuple[str, ...], np.ndarray, tuple[int, ...]]:
        """All neighbours, sorted as in :meth:`neighbours`, as columns: names, weights
        (float32 array, for the ranker's vectorised scoring) and raw counts. Sorted once per
        change of the item's neighbours, not per read; do not modify what is returned."""
        ranked = self._ranked.get(item_id)
        if ranked is None:
            nbrs = self._nbrs.get(item_id)
            if not nbrs:
                return _NO_NEIGHBOURS
            # heaviest first, ties by id: two C-level sorts (stable, and reverse keeps stability)
            # instead of one with a Python key function; this runs after every change
            names = sorted(nbrs)
            names.sort(key=nbrs.__getitem__, reverse=True)
            counts = self._counts[item_id]
            # tuples of plain values, untracked by the garbage collector like the dicts above
            # (map over the dicts' __getitem__ runs in C: this is rebuilt for most anchors read)
            ranked = (tuple(names), np.fromiter(map(nbrs.__getitem__, names), dtype=np.float64, count=len(names)),
                      tuple(map(counts.__getitem__, names)))
            self._ranked[item_id] = ranked
        return ranked

    def export_dirty(self) -> dict[bytes, bytes]:
        """Changed lists since the last export, ``b"cov:"+id -> JSON [{nbr: weight}, {nbr: count}]``
        (an empty list for an item that lost all neighbours); clears them. The two maps are
        dumped as they are (orjson, in C): every batch rewrites the lists of every item it
        touched, so this runs for ~10 items per event."""
        out: dict[bytes, bytes] = {}
        nbrs, counts, prefix = self._nbrs, self._counts, self.prefix
        for item_id in sorted(self._dirty):
            if item_id in nbrs:
                out[prefix + item_id.encode()] = orjson.dumps([nbrs[item_id], counts[item_id]])
            else:
                out[prefix + item_id.encode()] = b"[]"
        self._dirty.clear()
        return out

    def load(self, kv: KVStore) -> None:
        """Replace everything held with the records under ``b"cov:"`` in ``kv``."""
        self._nbrs.clear()
        self._counts.clear()
        self._ranked.clear()
        self._weakest.clear()
        self._dirty.clear()
        for key, value in kv.iter_prefix(self.prefix):
            rows = orjson.loads(value)
            if not rows:
                continue
            item_id = key[len(self.prefix):].decode()
            if isinstance(rows[0], dict):  # [{nbr: weight}, {nbr: count}]
                weights, counts = rows
                self._nbrs[item_id] = {y: float(w) for y, w in weights.items()}
                self._counts[item_id] = counts
            else:  # written before 2026-11-30: [[nbr, weight, count], ...]
                self._nbrs[item_id] = {y: float(w) for y, w, _ in rows}
                self._counts[item_id] = {y: int(c) for y, _, c in rows}

