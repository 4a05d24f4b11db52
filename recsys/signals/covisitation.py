"""Item-to-item co-visitation and directed transitions (one class, ``directed=True`` for the
latter), weighted by event type and closeness in event time.

Persisted like :mod:`recsys.signals.popularity` (``export_dirty`` / ``load``); re-delivered
events are the caller's to skip.

>>> cov = CoVisitation(half_life_h=1.0, max_neighbours=10, window=5)
>>> cov.update([("a", "browse", 0)], "b", "click", ts=0)
>>> cov.neighbours("a", 5), cov.neighbours("b", 5)
([('b', 2.0, 1)], [('a', 2.0, 1)])
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Iterable

import numpy as np
import orjson

from recsys.feedback import EVENT_WEIGHTS, decay_factor, half_life_ms

if TYPE_CHECKING:
    from recsys.store.kv import KVStore

COV_PREFIX = b"cov:"
NEXT_PREFIX = b"nxt:"  # directed transitions (CoVisitation(directed=True))

_NO_NEIGHBOURS: tuple = ((), np.zeros(0), ())  # shared empty answer (never modified)
#: Stale entries an item's heap of pairs may hold beyond its list's length before it is rebuilt
#: from the list (see ``CoVisitation._heaps``).
_HEAP_SLACK = 16


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
        self._half_life_ms = half_life_ms(half_life_h)
        # item -> neighbour -> weight, and -> raw count. Two dicts of plain floats/ints rather
        # than one of [weight, count] lists: such dicts are invisible to Python's cyclic
        # garbage collector, whose full passes over ~500k small lists stalled the stream for
        # ~0.5 s (the p99 latency); see benchmarks/README.md.
        self._nbrs: dict[str, dict[str, float]] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._ranked: dict[str, tuple] = {}  # sorted neighbour columns, until they change
        # item -> a heap of ``(weight, neighbour)`` pairs, made at the list's first overflow: it
        # holds every current pair of the list, and stale ones (a pair whose weight has grown
        # since, or that left the list), so the weakest current pair, the one an overflow drops,
        # is the first heap entry that still matches the list (stale ones are popped on the way).
        # Weights only grow, so a change is one push; the heap is rebuilt from the list once it
        # is _HEAP_SLACK entries longer. It replaces a remembered "lightest 8" that every change
        # had to patch and that ran out after a few overflows (then a scan of the whole list):
        # once lists were full that was 60-70% of the update's cost (benchmarks/README.md).
        # Anything that changes ``_nbrs`` must go through ``_add_pair``/``_drop_pair``.
        self._heaps: dict[str, list[tuple[float, str]]] = {}
        self._dirty: set[str] = set()

    def __len__(self) -> int:
        return len(self._nbrs)

    def update(self, history: Iterable[tuple[str | None, str, int]], item_id: str | None, event_type: str, ts: int) -> None:
        """Learn from one engagement with ``item_id`` given the user's history *before* it.

        ``history`` is ``[(item_id, event_type, ts), ...]``, most recent last (as kept by
        :class:`recsys.store.users.UserState`); entries without an item are ignored.
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
        if self._dropped_at_once(a, b, weight):
            return
        heaps, limit = self._heaps, self.max_neighbours + _HEAP_SLACK
        for x, y in ((a, b),) if self.directed else ((a, b), (b, a)):
            nbrs = self._nbrs.setdefault(x, {})
            counts = self._counts.setdefault(x, {})
            old = nbrs.get(y)
            new = nbrs[y] = (0.0 if old is None else old) + weight
            counts[y] = counts.get(y, 0) + 1
            self._dirty.add(x)
            self._ranked.pop(x, None)
            heap = heaps.get(x)
            if heap is not None:  # (old, y), if there, is stale now; (new, y) is the pair
                if len(heap) < limit:
                    heapq.heappush(heap, (new, y))
                else:
                    heap[:] = zip(nbrs.values(), nbrs)
                    heapq.heapify(heap)
        for x in (a,) if self.directed else (a, b):
            nbrs = self._nbrs.get(x)
            if nbrs is not None and len(nbrs) > self.max_neighbours:
                # the weakest goes; among equals the smallest id, so the choice is deterministic
                heap = heaps.get(x)
                if heap is None:
                    heap = heaps[x] = list(zip(nbrs.values(), nbrs))
                    heapq.heapify(heap)
                while nbrs.get(heap[0][1]) != heap[0][0]:
                    heapq.heappop(heap)  # stale
                self._drop_pair(x, heapq.heappop(heap)[1])

    def _dropped_at_once(self, a: str, b: str, weight: float) -> bool:
        """Whether the new pair ``a``-``b`` would be the one its own overflow drops, leaving every
        list as it was: then adding it is skipped (and the lists are neither marked changed nor
        re-sorted). Exact: the same lists, in the same insertion order, as adding and dropping.

        Once lists are full, about half of all overflows drop the pair that caused them (its
        weight is one event's, below most pairs that have lasted): ~50k of 95k drops per 20k
        events late in the engine benchmark (benchmarks/README.md, issue 12).
        """
        m, nbrs = self.max_neighbours, self._nbrs
        nbrs_a = nbrs.get(a)
        if nbrs_a is not None and b in nbrs_a:
            return False  # an existing pair grows
        if nbrs_a is not None and len(nbrs_a) >= m:  # a's list overflows first: (weight, b) is its weakest?
            if not self._weakest_is(a, nbrs_a, weight, b):
                return False
            if not self.directed and b not in nbrs:
                self._dirty.add(b)  # as for a below: b's list would have been made and emptied
            return True
        if self.directed:
            return False
        nbrs_b = nbrs.get(b)
        if nbrs_b is None or len(nbrs_b) < m or a in nbrs_b or not self._weakest_is(b, nbrs_b, weight, a):
            return False
        if nbrs_a is None:
            # adding would have made a's list and emptied it again; its export writes ``[]``, so
            # the stored records stay exactly what adding and dropping wrote
            self._dirty.add(a)
        return True

    def _weakest_is(self, x: str, nbrs: dict[str, float], weight: float, y: str) -> bool:
        """Whether a new pair ``(weight, y)`` would be the weakest of ``x``'s full list (ties by
        the smaller id, as an overflow drops)."""
        heap = self._heaps.get(x)
        if heap is None:
            heap = self._heaps[x] = list(zip(nbrs.values(), nbrs))
            heapq.heapify(heap)
        while nbrs.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # stale
        return (weight, y) < heap[0]

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
                if not nbrs:  # its heap entries, if any, are all stale: (w, q) too
                    del self._nbrs[p], self._counts[p]
                    self._heaps.pop(p, None)

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
        self._heaps.clear()
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

