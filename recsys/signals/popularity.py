"""Trending popularity: every item's engagement, decayed in event time.

Kept in memory and persisted incrementally through a :class:`recsys.store.kv.KVStore`:
``export_dirty()`` hands back the records changed since the last export (to be written in the
same atomic ``kv.write`` as user state and watermarks), ``load(kv)`` rebuilds from the store.
Everything decays in *event* time (the events' ``ts``, epoch milliseconds), never wall time,
so a replay produces the same numbers as the live run. It does not skip re-delivered events by
itself: the caller guards them with per-partition watermarks.

>>> pop = Popularity(half_life_h=1.0)
>>> pop.update("a", 2.0, ts=0); pop.update("b", 1.0, ts=0)
>>> pop.top(2, now_ts=3_600_000)           # one half-life later: halved
[('a', 1.0), ('b', 0.5)]
"""

from __future__ import annotations

import heapq
import itertools
import math
import struct
from typing import TYPE_CHECKING

import numpy as np

from recsys.feedback import decay_factor, half_life_ms
from recsys.signals._popularity_kernels import decayed_scores

if TYPE_CHECKING:
    from collections.abc import Sequence

    from recsys.store.kv import KVStore

POP_PREFIX = b"pop:"
_POP_RECORD = struct.Struct("<dq")  # score at ref time, ref time (epoch ms)

#: :meth:`Popularity.top` reads a pool of the items most likely to lead, not every item: the
#: pool is cut back to its best ``keep`` once it holds four times as many. ``keep`` starts at
#: ``_POOL_KEEP`` and grows to twice the largest answer asked for (with the excluded items
#: counted), up to ``_POOL_KEEP_MAX``.
_POOL_KEEP = 256
_POOL_KEEP_MAX = 1 << 16
#: Slack, in powers of two, between an item's key and its decayed score as computed: the key's
#: and the score's rounding are ~1e-12 of this at epoch-millisecond times.
_KEY_SLACK = 1e-6


class Popularity:
    """Time-decayed popularity ("trending") per item, in event time.

    Per item: a score valid at a reference time (the newest event seen for it) and that
    time; everything else is decayed lazily on read. Scores and times sit in numpy arrays.

    ``top`` decays only a pool of candidates, not every item. Every item decays at the same
    rate, so its decayed score at any time ``t`` (after its reference time) is ``2 ** (key -
    t / half_life)`` with ``key = log2(score) + ref / half_life``, which changes only when the
    item gets an event. The pool holds every item whose key is above a floor (an item whose
    event lifts its key above the floor joins it; a full pool keeps its best keys and raises
    the floor to the best key it let go). No item outside the pool can score
    more than ``2 ** (floor - t / half_life)``: when the pool's answer ends above that, it is
    the answer over every item, the same floats; else ``top`` decays every item as before
    (and refills the pool). ``top(30)`` once per 32 events of a Zipf stream
    (``benchmarks/state_codec.py``): 98 -> 71 µs a call at 10k items, 562 -> 111 µs at 100k,
    5.0 ms -> 128 µs at 1M; ``update`` pays ~0.1-0.3 µs more.

    >>> p = Popularity(half_life_h=24.0)
    >>> p.update("x", 8.0, ts=1_000); p.update("y", 1.0, ts=1_000)
    >>> p.top(5, now_ts=1_000, exclude={"x"})
    [('y', 1.0)]
    """

    def __init__(self, half_life_h: float, *, initial_capacity: int = 1024) -> None:
        self.half_life_h = half_life_h
        self._half_life_ms = half_life_ms(half_life_h)
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        cap = max(16, initial_capacity)
        self._score = np.zeros(cap, dtype=np.float64)
        self._ref = np.zeros(cap, dtype=np.int64)
        self._dirty: set[str] = set()
        self._generation = 0  # bumped by load(), which renumbers the slots
        # top()'s pool: slots (a list, and a flag per slot) and the floor above which every key is in it
        self._pool: list[int] = []
        self._pooled = np.zeros(cap, dtype=bool)
        self._floor = -math.inf
        self._keep = _POOL_KEEP

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
            self._pooled = np.concatenate([self._pooled, np.zeros(i, dtype=bool)])
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
            self._ref[i] = ref = ts
        else:
            score += weight * decay_factor(ref - ts, self._half_life_ms)
        self._score[i] = score
        self._dirty.add(item_id)
        if not self._pooled[i] and score > 0 and math.log2(score) + ref / self._half_life_ms > self._floor:
            self._pooled[i] = True
            self._pool.append(i)
            if len(self._pool) > 4 * self._keep:
                self._cut_pool(np.asarray(self._pool, dtype=np.int64))

    def score(self, item_id: str, now_ts: int) -> float:
        """The item's score decayed to ``now_ts`` (0.0 for an unseen item)."""
        i = self._index.get(item_id)
        if i is None:
            return 0.0
        return float(self._score[i]) * decay_factor(now_ts - int(self._ref[i]), self._half_life_ms)

    def scores(self, item_ids: Sequence[str], now_ts: int) -> np.ndarray:
        """:meth:`score` of each item, as one array (the same floats: ``0.5 ** (dt / half_life)``
        with ``dt`` clamped at 0, as :func:`~recsys.feedback.decay_factor`)."""
        return self.scores_at(self.slots(item_ids), now_ts)

    @property
    def stamp(self) -> tuple[int, int]:
        """``(generation, items held)``: slots from :meth:`slots` stay valid while the generation
        does (only :meth:`load` renumbers); an item unknown then (-1) may have one since if the
        count grew."""
        return self._generation, len(self._ids)

    def slots(self, item_ids: Sequence[str]) -> np.ndarray:
        """Each item's slot (int64; -1: never seen), for :meth:`scores_at`. A caller that scores
        the same items again (search: a query's candidates) keeps them, see :attr:`stamp`."""
        return np.fromiter(map(self._index.get, item_ids, itertools.repeat(-1)), dtype=np.int64, count=len(item_ids))

    def scores_at(self, slots: np.ndarray, now_ts: int) -> np.ndarray:
        """:meth:`scores` of the items at these :meth:`slots` (0.0 at -1)."""
        # the C library's pow per item, as score() and Python's ** (numpy's vectorised power
        # differs in the last bit for ~5% of inputs): see recsys/signals/_popularity_kernels.py
        return decayed_scores(self._score, self._ref, slots, int(now_ts), float(self._half_life_ms), 0.5)

    def top(self, n: int, now_ts: int, exclude: set[str] | frozenset[str] | None = None) -> list[tuple[str, float]]:
        """The ``n`` highest-scoring items at ``now_ts`` as ``(item_id, score)``, best first.

        Items in ``exclude`` and items scoring 0 are left out. Ties are broken by item id,
        so the answer never depends on insertion order (e.g. before and after ``load``).
        """
        m = len(self._ids)
        if n <= 0 or m == 0:
            return []
        exclude = exclude or frozenset()
        excluded = sum(1 for x in exclude if x in self._index)
        pool = np.asarray(self._pool, dtype=np.int64)
        out = self._top_of(pool, n, excluded, now_ts, exclude)
        if self._floor == -math.inf:  # every item that scores is in the pool
            return out
        if len(out) == n and out[-1][1] > 0:
            # the best any item outside the pool can score, against the pool's last answer
            if self._floor + _KEY_SLACK < math.log2(out[-1][1]) + now_ts / self._half_life_ms:
                return out
        self._keep = min(max(self._keep, 2 * (n + excluded)), _POOL_KEEP_MAX)
        self._cut_pool(np.arange(m), every=True)
        return self._top_of(None, n, excluded, now_ts, exclude)

    def _top_of(self, slots: np.ndarray | None, n: int, excluded: int, now_ts: int,
                exclude: set[str] | frozenset[str]) -> list[tuple[str, float]]:
        """:meth:`top` among these slots (None: every item)."""
        score, ref = (self._score[: len(self._ids)], self._ref[: len(self._ids)]) if slots is None else \
            (self._score[slots], self._ref[slots])
        m = len(score)
        if m == 0:
            return []
        dt = np.maximum(now_ts - ref, 0).astype(np.float64)
        eff = score * np.exp2(-dt / self._half_life_ms)
        # Enough headroom that excluded items cannot push wanted ones out of the cut.
        k = min(m, n + excluded)
        ids = self._ids
        if k < m:
            cut = np.argpartition(-eff, k - 1)[:k]  # cut[k-1] is the k-th best; all better are in cut
            threshold = eff[cut[k - 1]]
            above = cut[eff[cut] > threshold].tolist()
            tied = np.flatnonzero(eff == threshold).tolist()
            if len(above) + len(tied) > k:  # ties at the cut: the smallest ids win, whatever the order
                name = ids.__getitem__ if slots is None else (lambda j: ids[slots[j]])
                tied = heapq.nsmallest(k - len(above), tied, key=name)
            cand = np.array(above + tied, dtype=np.int64)
        else:
            cand = np.arange(m)
        cand = cand[eff[cand] > 0]
        names = [ids[j] for j in (cand if slots is None else slots[cand]).tolist()]
        out: list[tuple[str, float]] = []
        for value, item_id in sorted(zip(eff[cand].tolist(), names), key=lambda t: (-t[0], t[1])):
            if item_id in exclude:
                continue
            out.append((item_id, value))
            if len(out) == n:
                break
        return out

    def _cut_pool(self, slots: np.ndarray, *, every: bool = False) -> None:
        """Make the pool the best keys of ``slots`` (as many as the pool keeps): of the pool
        (the floor rises to the best key left out, if higher), or of ``every`` slot (the floor
        becomes it)."""
        keep = self._keep
        with np.errstate(divide="ignore"):  # log2(0) = -inf: an item that scores nothing
            keys = np.log2(np.maximum(self._score[slots], 0.0)) + self._ref[slots] / self._half_life_ms
        if every:
            self._pooled[:] = False
        else:
            self._pooled[slots] = False
        floor = -math.inf
        if len(slots) > keep:
            order = np.argpartition(-keys, keep - 1)
            floor = float(keys[order[keep:]].max())
            slots = slots[order[:keep]]
        self._floor = floor if every else max(self._floor, floor)
        self._pooled[slots] = True
        self._pool = slots.tolist()

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
        self._generation += 1
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
        self._pooled = np.zeros(cap, dtype=bool)
        self._cut_pool(np.arange(len(scores)), every=True)
