"""The vectorised hot paths give bit-identical answers to the per-user code they replaced.

Each reference below is the code as it stood before the speed-up (issue 12), kept here as the
specification: the batched versions must produce the same items, in the same order, with the
same floats (``==``, never ``approx``), because recommendations and backtest metrics must not
move by a bit.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from operator import itemgetter
from typing import Iterable

import numpy as np
import orjson
import pytest

from recsys.events import CatalogItem
from recsys.feedback import EVENT_WEIGHTS, decay_factor, half_life_ms
from recsys.items.catalog import ItemSpace
from recsys.ranking import recommender as R
from recsys.ranking.recommender import Recommender, RecommenderConfig
from recsys.signals.covisitation import CoVisitation, decode_record
from recsys.signals.popularity import Popularity
from recsys.signals.sessions import SessionNeighbours
from recsys.store.kv import KVStore, MemoryKV
from recsys.store.users import UserState

MIN = 60_000


def _score_one_reference(s: SessionNeighbours, own: int, items: dict[str, int], n: int) -> list[tuple[str, float]]:
    """``SessionNeighbours._score_one`` before the batch version (one user at a time)."""
    query = list(items)[-min(s.query_items or s.max_session_len, s.max_session_len) :]
    m = len(query)
    lists = [list(s._postings.get(item, ()))[-s.postings_scanned:] if s.postings_scanned else s._postings.get(item, ())
             for item in query]
    sizes = np.fromiter((len(p) for p in lists), dtype=np.int64, count=m)
    if sizes.sum() == 0:
        return []
    slots = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(sizes.sum()))
    weights = np.repeat(np.arange(1, m + 1, dtype=np.float64) / m, sizes)
    if len(slots) > 4096:
        dots = np.bincount(slots, weights=weights, minlength=len(s._active))
        sids = np.flatnonzero(dots)
        dots = dots[sids]
    else:
        sids, inverse = np.unique(slots, return_inverse=True)
        dots = np.bincount(inverse, weights=weights)
    keep = sids != own
    sids, dots = sids[keep], dots[keep]
    if len(sids) == 0:
        return []
    if len(sids) > s.sample_size:
        recent = np.argpartition(-s._active[sids], s.sample_size - 1)[: s.sample_size]
        sids, dots = sids[recent], dots[recent]
    sims = dots / np.sqrt(m * s._length[sids])
    top = np.lexsort((sids, -sims))[: s.k]
    held = s._held[sids[top]]
    voters = held >= 0
    if s.vote_items:  # each neighbour's last vote_items items (rows hold them oldest first)
        for r, length in enumerate(s._length[sids[top]].astype(int)):
            voters[r, : max(length - s.vote_items, 0)] = False
    voted, inverse = np.unique(held[voters], return_inverse=True)
    votes = np.bincount(inverse, weights=np.broadcast_to(sims[top, None], held.shape)[voters])
    if len(votes) > n:
        keep = np.flatnonzero(votes >= -np.partition(-votes, n - 1)[n - 1])
        voted, votes = voted[keep], votes[keep]
    ranked = sorted(zip(map(s._names.__getitem__, voted.tolist()), votes.tolist()))
    ranked.sort(key=itemgetter(1), reverse=True)
    return ranked[:n]


def _reference_scores(s: SessionNeighbours, user_ids: list[str], n: int) -> list[list[tuple[str, float]]]:
    out = []
    for user_id in user_ids:
        slot = s._current.get(user_id)
        items = s._items.get(slot) if slot is not None else None
        out.append(_score_one_reference(s, slot, items, n) if items is not None else [])
    return out


@pytest.mark.parametrize(
    "bounds, users, items, events",
    [
        (dict(), 300, 400, 6000),  # nothing cut
        (dict(k=7, sample_size=15, max_session_len=6, max_sessions=120), 200, 60, 5000),  # every cut, evictions
        (dict(k=50, sample_size=400, max_session_len=50), 150, 40, 12000),  # > 4096 postings per query
        (dict(k=20, sample_size=30), 400, 12, 4000),  # few items: many tied votes
        # the read-time bounds of issue 12 (settings, off by default)
        (dict(query_items=3, postings_scanned=7, vote_items=2), 300, 400, 6000),
        (dict(k=7, sample_size=15, max_session_len=6, max_sessions=120, query_items=4, vote_items=5), 200, 60, 5000),
        (dict(k=50, sample_size=400, max_session_len=50, postings_scanned=40), 150, 40, 12000),
        (dict(query_items=60, postings_scanned=1000, vote_items=60), 300, 400, 6000),  # bounds above the sizes
    ],
)
def test_batched_session_votes_equal_the_per_user_reference(bounds, users, items, events):
    rng = random.Random(len(bounds) + users)
    s = SessionNeighbours(**bounds)
    ts = 0
    for t in range(events):
        ts += 1000 if rng.random() < 0.999 else 45 * MIN  # long sessions, now and then all cut by the gap
        user = f"u{rng.randrange(users)}"
        session = f"{user}-s{t // 3000}" if user.endswith("7") else None  # some shoppers send session ids
        s.update(user, session, f"i{rng.randrange(items)}", ts)
    everyone = [f"u{u}" for u in range(users)] + ["nobody"]
    rng.shuffle(everyone)
    for n in (1, 5, 40, 10_000):
        assert s.scores(everyone, n) == _reference_scores(s, everyone, n)
        assert s.scores(everyone[:1], n) == _reference_scores(s, everyone[:1], n)


class _DictCoVisitation:
    """``CoVisitation`` as it stood before its lists became rows of flat arrays (d53a691): dicts of
    item -> neighbour -> weight and -> raw count, a heap of pairs per overflowed list.

    When a user engages with item ``b`` after the recent items ``a1..an`` of their history
    (its last ``window`` entries), each distinct ``a != b`` gains, symmetrically with ``b``,
    ``EVENT_WEIGHTS[type_b] * 0.5 ** ((ts_b - ts_a) / half_life)`` and one raw co-occurrence.
    A repeated ``a`` in the window counts once, at its most recent time. Each item keeps at
    most ``max_neighbours`` neighbours: when a list overflows, its weakest pair is dropped
    from both sides, so the relation stays symmetric. Accumulated weights are not decayed
    over time (``neighbours`` takes no clock); the half-life only discounts distant pairs.

    [('b', 8.0, 1), ('a', 4.0, 1)]
    """

    def __init__(
        self, half_life_h: float, max_neighbours: int, window: int = 5, *, directed: bool = False, prefix: bytes = b""
    ) -> None:
        if max_neighbours <= 0 or window <= 0:
            raise ValueError(f"max_neighbours and window must be > 0, got {max_neighbours}, {window}")
        # directed: only a -> b ("b came after a"), the transition signal of session data
        self.directed = directed
        self.prefix = prefix or (b"nxt:" if directed else b"cov:")
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
        # is 16 entries longer. It replaces a remembered "lightest 8" that every change
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
        heaps, limit = self._heaps, self.max_neighbours + 16
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
                return ((), np.zeros(0), ())
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


class _CoVisitationReference(_DictCoVisitation):
    """``CoVisitation`` before the remembered weakest pairs: a full ``min`` on every overflow."""

    def _add_pair(self, a: str, b: str, weight: float) -> None:
        for x, y in ((a, b),) if self.directed else ((a, b), (b, a)):
            nbrs = self._nbrs.setdefault(x, {})
            counts = self._counts.setdefault(x, {})
            nbrs[y] = nbrs.get(y, 0.0) + weight
            counts[y] = counts.get(y, 0) + 1
            self._dirty.add(x)
            self._ranked.pop(x, None)
        for x in (a,) if self.directed else (a, b):
            nbrs = self._nbrs.get(x)
            if nbrs is not None and len(nbrs) > self.max_neighbours:
                victim = min(nbrs.items(), key=itemgetter(1, 0))[0]
                self._drop_pair(x, victim)

    def _drop_pair(self, x: str, y: str) -> None:
        for p, q in ((x, y),) if self.directed else ((x, y), (y, x)):
            nbrs = self._nbrs.get(p)
            if nbrs is not None and nbrs.pop(q, None) is not None:
                del self._counts[p][q]
                self._dirty.add(p)
                self._ranked.pop(p, None)
                if not nbrs:
                    del self._nbrs[p], self._counts[p]


def _decoded(records: dict[bytes, bytes]) -> dict[bytes, list[tuple[str, float, int]]]:
    """Stored records as the lists they hold, in order (the dict version wrote another format)."""
    return {key: decode_record(value) for key, value in records.items()}


def _names(items: int) -> list[str]:
    """Item ids whose str order differs from naive byte order where it could: ASCII, Latin-1,
    other planes, prefixes of each other."""
    extra = ["é", "e", "ea", "Z", "z", "ä1", "a1", "日本", "日", "😀", "\U0010ffff", "a", "ab"]
    return [f"i{n}" for n in range(items)] + extra


@pytest.mark.parametrize("directed", [False, True])
@pytest.mark.parametrize("max_neighbours, items", [(3, 30), (10, 200), (50, 400)])
def test_co_visitation_lists_equal_the_dict_version_and_a_full_scan(directed, max_neighbours, items):
    """The arrays (``CoVisitation``) against the dicts they replaced (``_DictCoVisitation``,
    which skipped the same pairs: the same exports, key for key) and against a full scan for
    every victim (no skipping: the same store, the same lists, in the same order)."""
    rng = random.Random(max_neighbours * 7 + directed)
    fast = CoVisitation(half_life_h=0.5, max_neighbours=max_neighbours, window=5, directed=directed)
    dicts = _DictCoVisitation(half_life_h=0.5, max_neighbours=max_neighbours, window=5, directed=directed)
    slow = _CoVisitationReference(half_life_h=0.5, max_neighbours=max_neighbours, window=5, directed=directed)
    names = _names(items)
    histories: dict[str, list] = {}
    types = ["browse", "click", "add_to_cart", "purchase", "search"]
    ts = 0
    fast_store: dict[bytes, bytes] = {}
    slow_store: dict[bytes, bytes] = {}
    writes = [0, 0]

    def export_all() -> None:
        f, d, s = _decoded(fast.export_dirty()), _decoded(dicts.export_dirty()), _decoded(slow.export_dirty())
        assert f == d  # the same lists as the dict version, key for key, in the same order
        assert f.items() <= s.items()  # what it writes, the full scan writes too, the same lists
        fast_store.update(f)
        slow_store.update(s)
        writes[0] += len(f)
        writes[1] += len(s)
        assert fast_store == slow_store  # and what it leaves out, the full scan rewrote unchanged

    for n in range(20_000):
        ts += rng.choice([0, 1, 1000, 60_000, 3_600_000])  # equal weights (ties by id) and decayed ones
        user = f"u{rng.randrange(40)}"
        hist = histories.setdefault(user, [])
        item, etype = names[int(rng.paretovariate(1.2)) % len(names)], rng.choice(types)
        for c in (fast, dicts, slow):
            c.update(hist, item, etype, ts)
        hist.append((item, etype, ts))
        del hist[:-5]
        if n % 997 == 0:
            export_all()
        if n % 613 == 0:  # the same sorted answers, read as the ranker reads them
            for i in (item, hist[0][0]):
                fr, sr = fast.ranked(i), slow.ranked(i)
                assert fr[0] == sr[0] and fr[1].tolist() == sr[1].tolist() and fr[2] == sr[2]
                assert fast.neighbours(i, 7) == dicts.neighbours(i, 7)
    export_all()
    # the skip happened (directed lists here: some overflows drop their own new pair, but every
    # such list is changed by another pair before the next export, so no write is saved)
    assert writes[0] < writes[1] or directed
    held = fast.lists()
    assert {i: (w, c) for i, (w, c) in held.items()} == {i: (slow._nbrs[i], slow._counts[i]) for i in slow._nbrs}
    assert all(list(held[i][0].items()) == list(slow._nbrs[i].items()) for i in slow._nbrs)  # insertion order
    assert len(fast) == len(slow._nbrs)
    assert sum(len(n) > max_neighbours - 1 for n in slow._nbrs.values()) >= 5  # lists really overflowed


@pytest.mark.parametrize("directed", [False, True])
def test_co_visitation_loaded_from_the_store_goes_on_as_the_dict_version(directed):
    """Stored records (written by the dict version), loaded into the arrays, go on to the same
    lists; a list stored under a larger bound is held whole and shrinks one pair per overflow."""
    rng = random.Random(11 + directed)
    names = _names(120)
    wide = _DictCoVisitation(half_life_h=0.5, max_neighbours=12, window=5, directed=directed)
    histories: dict[str, list] = {}
    events = []
    ts = 0
    for _ in range(8_000):
        ts += rng.choice([0, 1000, 60_000])
        user = f"u{rng.randrange(30)}"
        events.append((user, names[int(rng.paretovariate(1.1)) % len(names)], rng.choice(["browse", "click", "purchase"]), ts))
    for user, item, etype, t in events[:4_000]:
        hist = histories.setdefault(user, [])
        wide.update(hist, item, etype, t)
        hist.append((item, etype, t))
        del hist[:-5]
    kv = MemoryKV()
    kv.write(wide.export_dirty())
    fast = CoVisitation(half_life_h=0.5, max_neighbours=8, window=5, directed=directed)
    dicts = _DictCoVisitation(half_life_h=0.5, max_neighbours=8, window=5, directed=directed)
    fast.load(kv)
    dicts.load(kv)
    assert fast.lists() == {i: (dicts._nbrs[i], dicts._counts[i]) for i in dicts._nbrs}
    assert any(len(w) > 8 for w, _ in fast.lists().values())  # held whole
    for user, item, etype, t in events[4_000:]:
        hist = histories[user] if user in histories else histories.setdefault(user, [])
        fast.update(hist, item, etype, t)
        dicts.update(hist, item, etype, t)
        hist.append((item, etype, t))
        del hist[:-5]
    assert _decoded(fast.export_dirty()) == _decoded(dicts.export_dirty())
    assert all(list(fast.lists()[i][0].items()) == list(dicts._nbrs[i].items()) for i in dicts._nbrs)


def _closest_history_items_reference(rec: Recommender, rows, users, wanted, recents) -> dict[int, tuple[str, float]]:
    """``Recommender._closest_history_items`` one user and one pick at a time, each similarity
    the exactly rounded sum of the float64 products (``math.fsum``)."""
    picks = np.flatnonzero(wanted)
    if len(picks) == 0:
        return {}
    index = rec.items.index
    out = {}
    bounds = np.flatnonzero(np.diff(users[picks])) + 1  # picks are grouped by user
    for group in np.split(picks, bounds):
        recent = [i for i, _ in recents[int(users[group[0]])] if i in index]
        if not recent:
            continue
        hist = index.vectors_of_rows(index.rows(recent)).astype(np.float64)
        for p in group.tolist():
            cand = index.vectors_of_rows(rows[p : p + 1])[0].astype(np.float64)
            sims = [math.fsum(cand * h) for h in hist]
            best = int(np.argmax(sims))
            mine = index.names(rows[p : p + 1])[0]  # an exact tie goes to the shown item itself
            if mine in recent and sims[recent.index(mine)] == sims[best]:
                best = recent.index(mine)
            out[p] = (recent[best], sims[best])
    return out


class _RandomEmbedder:
    """Production-sized vectors (384 dims, so BLAS takes the paths it takes in the engine),
    with near-duplicates so that argmax meets near-ties."""

    dim = 384

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        out = []
        for text in texts:
            n = int(text.split()[1])
            base = np.random.default_rng(n // 3).normal(size=self.dim)  # every 3 items share a base
            out.append(base + 1e-4 * np.random.default_rng(n).normal(size=self.dim))
        return np.asarray(out, dtype=np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_closest_history_items_equal_the_per_user_reference(seed):
    rng = np.random.default_rng(seed)
    items = ItemSpace(_RandomEmbedder())
    items.upsert([CatalogItem(f"i{i}", f"item {i}") for i in range(3000)])
    items.index.remove([f"i{i}" for i in range(0, 3000, 11)])  # history items no longer indexed
    rec = Recommender(items, Popularity(half_life_h=1.0), CoVisitation(half_life_h=1.0, max_neighbours=20), RecommenderConfig())
    n_users = 400
    recents = []
    for u in range(n_users):  # 0..10 distinct recent items, some unindexed, some users none at all
        n = int(rng.integers(0, 11)) if u % 9 else 0
        recents.append([(f"i{i}", "click") for i in rng.choice(3000, size=n, replace=False).tolist()])
    per_user = rng.integers(0, 12, size=n_users)  # shown positions per user, grouped by user
    users = np.repeat(np.arange(n_users), per_user)
    indexed = np.flatnonzero(np.arange(3000) % 11 != 0)
    rows = items.index.rows([f"i{i}" for i in rng.choice(indexed, size=len(users)).tolist()])
    for wanted in (rng.random(len(users)) < 0.6, np.ones(len(users), bool), np.zeros(len(users), bool)):
        fast = rec._closest_history_items(rows, users, wanted, recents)
        slow = _closest_history_items_reference(rec, rows, users, wanted, recents)
        assert list(fast) == list(slow)  # the same picks answered, in order
        for p, (anchor, sim) in slow.items():  # near-duplicate vectors: ties within 1e-12 may go either way
            assert abs(fast[p][1] - sim) < 1e-12
            assert fast[p][0] == anchor or _sim(rec, rows[p], fast[p][0]) > sim - 1e-12
    assert len(slow) == 0 and len(fast) == 0  # the last round wanted nothing


def _sim(rec: Recommender, row: int, item_id: str) -> float:
    index = rec.items.index
    return math.fsum(index.vectors_of_rows(np.array([row]))[0].astype(np.float64)
                     * index.vectors_of_rows(index.rows([item_id]))[0].astype(np.float64))


def test_closest_history_item_on_an_exact_tie_is_the_shown_item_itself():
    """Items with the same text have the same vector: among recent items tied exactly, the shown
    item itself is named ("you viewed this recently"), wherever it stands in the history."""
    items = ItemSpace(_RandomEmbedder())
    items.upsert([CatalogItem("a", "item 3"), CatalogItem("b", "item 3"), CatalogItem("c", "item 3"),
                  CatalogItem("z", "item 90")])
    rec = Recommender(items, Popularity(half_life_h=1.0), CoVisitation(half_life_h=1.0, max_neighbours=20), RecommenderConfig())
    rows = items.index.rows(["b", "b", "z", "a"])
    users = np.array([0, 1, 2, 3])
    recents = [[("a", "click"), ("b", "click"), ("c", "click")], [("a", "click"), ("c", "click")],
               [("a", "click"), ("z", "click")], [("b", "click"), ("c", "click")]]
    got = rec._closest_history_items(rows, users, np.ones(4, bool), recents)
    assert [anchor for anchor, _ in got.values()] == ["b", "a", "z", "b"]  # itself; else the most recent
    assert got[0][1] == got[1][1] == got[3][1] and abs(got[0][1] - 1.0) < 1e-6


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ivf_search_by_cell_equals_faiss_search(threads):
    """The cell-ordered scan gives faiss's own answer bit for bit, through the engine's entry
    point (one thread below faiss's BLAS threshold) and directly at 1-3 OpenMP threads (the
    quantizer then runs once per thread's slice, as inside ``IndexIVF::search``)."""
    import faiss

    from recsys.items.catalog import VectorIndex, _faiss_search, _ivf_search_by_cell

    rng = np.random.default_rng(threads)
    centres = rng.normal(size=(40, 384))
    vecs = centres[rng.integers(0, 40, 6000)] + 0.3 * rng.normal(size=(6000, 384))
    vecs[5000:5100] = vecs[4000:4100]  # exact duplicates: tied scores, so the heap's tie order counts
    index = VectorIndex(384, ivf_threshold=5000)
    index.upsert([f"i{i}" for i in range(6000)], vecs.astype(np.float32))
    assert index.approximate
    ivf = index._index
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        for m in (2, 5, 21, 257, 1000):
            q = (centres[rng.integers(0, 40, m)] + 0.5 * rng.normal(size=(m, 384))).astype(np.float32)
            q[: m // 4] = vecs[rng.integers(4000, 4100, m // 4)]  # queries on the duplicates
            faiss.normalize_L2(q)
            for k in (1, 30, 130):
                want_s, want_i = ivf.search(q, k)
                for got_s, got_i in (_faiss_search(ivf, q, k), _ivf_search_by_cell(ivf, q, k)):
                    assert np.array_equal(got_i, want_i)
                    assert got_s.tobytes() == want_s.tobytes()
        assert ivf.parallel_mode == 0 and faiss.omp_get_max_threads() == threads  # both restored
    finally:
        faiss.omp_set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_ivf_search_by_products_equals_faiss_search(threads, monkeypatch):
    """The search by one matrix product per cell gives faiss's own answer bit for bit, through
    the engine's entry point (given the vectors, from IVF_PRODUCT_MIN_QUERIES queries) and
    directly: with exact duplicates among the items (tied scores: their queries go to faiss),
    after removals and re-upserts (cells with holes, labels past the first rows), and with a
    k larger than a query's cells hold. Queries without ties are answered by the products."""
    import faiss

    from recsys.items import catalog as C

    rng = np.random.default_rng(10 + threads)
    centres = rng.normal(size=(40, 384))
    vecs = centres[rng.integers(0, 40, 6000)] + 0.3 * rng.normal(size=(6000, 384))
    vecs[5000:5100] = vecs[4000:4100]  # exact duplicates
    index = C.VectorIndex(384, ivf_threshold=5000)
    index.upsert([f"i{i}" for i in range(6000)], vecs.astype(np.float32))
    index.remove([f"i{i}" for i in range(0, 6000, 7)])
    index.upsert([f"i{i}" for i in range(0, 3000, 14)], vecs[0:3000:14].astype(np.float32) + 0.01)
    ivf = index._index
    assert index.approximate and C._products_apply(ivf)
    to_faiss = []
    original = faiss.IndexIVFFlat.search_preassigned
    monkeypatch.setattr(faiss.IndexIVFFlat, "search_preassigned",
                        lambda self, x, *a, **kw: to_faiss.append(len(x)) or original(self, x, *a, **kw))
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        for m in (2, 5, 64, 257, 1000):
            q = (centres[rng.integers(0, 40, m)] + 0.5 * rng.normal(size=(m, 384))).astype(np.float32)
            ties = m // 4
            q[:ties] = vecs[rng.integers(4000, 4100, ties)]  # queries on the duplicates
            faiss.normalize_L2(q)
            q[-1] *= 3.0  # a query of another norm (the head's queries are not normalised)
            for k in (1, 30, 130):
                want_s, want_i = ivf.search(q, k)
                to_faiss.clear()
                for got_s, got_i in (C._faiss_search(ivf, q, k, index._store),
                                     C._ivf_search_by_products(ivf, index._store, q, k)):
                    assert np.array_equal(got_i, want_i)
                    assert got_s.tobytes() == want_s.tobytes()
                if m >= C.IVF_PRODUCT_MIN_QUERIES:
                    # at most the tied queries (and a rare near-tie) went to faiss, in both calls
                    assert sum(to_faiss) <= 2 * (ties + max(1, m // 50)), (m, k, to_faiss)
        ivf.nprobe = 1  # one cell of ~40 items: fewer than k + the spare candidates
        q = np.ascontiguousarray(vecs[rng.integers(0, 6000, 100)].astype(np.float32))
        faiss.normalize_L2(q)
        want_s, want_i = ivf.search(q, 130)
        got_s, got_i = C._ivf_search_by_products(ivf, index._store, q, 130)
        assert (want_i == -1).any() and np.array_equal(got_i, want_i) and got_s.tobytes() == want_s.tobytes()
        assert ivf.parallel_mode == 0 and faiss.omp_get_max_threads() == threads
    finally:
        faiss.omp_set_num_threads(before)


def _add_neighbours_reference(rec: Recommender, parts, source, signal, recents, anchor_weights) -> None:
    """``Recommender._add_neighbours`` before the one-pass read (a loop per user and anchor)."""
    names, vals, lengths, owners, slots = [], [], [], [], []
    n = rec.config.covisit_per_anchor
    for u, recent in enumerate(recents):
        for a, (anchor, _) in enumerate(recent[: len(anchor_weights)]):
            nbr_names, nbr_weights, _ = signal.ranked(anchor)
            if nbr_names:
                names += nbr_names[:n]
                vals.append(nbr_weights[:n])
                lengths.append(min(n, len(nbr_names)))
                owners.append(u)
                slots.append(a)
    if names:
        rows = rec.items.index.rows(names)
        anchors = np.repeat(slots, lengths)
        values = np.concatenate(vals) * np.asarray(anchor_weights)[anchors]
        keep = rows >= 0
        parts.add(source, np.repeat(owners, lengths)[keep], rows[keep], values[keep], anchors[keep])


@pytest.mark.parametrize("seed", [3, 4])
def test_one_pass_neighbour_entries_equal_the_per_user_reference(seed):
    from test_recommender import _world

    from recsys.ranking.recommender import _Entries, _recent_distinct

    rec, states, _now = _world(n_items=150, n_users=60, n_events=2500, seed=seed)
    rec.items.index.remove(["i3", "i10", "i25"])  # neighbours and anchors that left the index
    users = list(states.values()) + [UserState("nobody")]
    recents = [_recent_distinct(s.history, 10) for s in users]
    for signal, weights in ((rec.covisit, [1.0, 0.5, 1 / 3]), (rec.transitions, [1.0, 0.5])):
        for batch in (recents, recents[:1], recents[-1:], []):
            fast, slow = _Entries(), _Entries()
            rec._add_neighbours(fast, 1, signal, batch, weights)
            _add_neighbours_reference(rec, slow, 1, signal, batch, weights)
            assert len(fast.parts) == len(slow.parts) == (1 if batch is recents else len(fast.parts))
            for a, b in zip(fast.parts, slow.parts):
                assert a[0] == b[0] and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a[1:], b[1:]))
    assert len(fast.parts) == 0 and any(len(r) > 3 for r in recents)


def test_rank_order_equals_the_three_key_lexsort():
    """The ranking's one-sort order is ``np.lexsort((first_seen, -scores, user))`` exactly: ties in
    score (many, with -0.0 against +0.0, subnormals and infinities), users in any order."""
    from recsys.ranking.recommender import _rank_order

    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 1e-40, -1e-40, np.inf, -np.inf, 3.5, -3.5, 1.0], dtype=np.float32)
    for trial in range(400):
        n = int(rng.integers(0, 2000))
        user = rng.integers(0, int(rng.integers(1, 60)), n).astype(np.int64)
        if trial % 2:
            user = np.sort(user)  # as the grouped batch gives them
        kind = trial % 4
        if kind == 0:
            scores = (rng.integers(-3, 4, n) * 0.5).astype(np.float32)
        elif kind == 1:
            scores = rng.normal(size=n).astype(np.float32)
        elif kind == 2:
            scores = np.where(rng.random(n) < 0.3, np.float32(-0.0), rng.normal(size=n)).astype(np.float32)
        else:
            scores = rng.choice(special, n)
        first_seen = rng.permutation(n * 5)[:n].astype(np.int64)
        assert np.array_equal(_rank_order(user, scores, first_seen), np.lexsort((first_seen, -scores, user)))
    with_nan = np.array([1.0, np.nan, 1.0], dtype=np.float32)  # never produced; lexsort's answer
    assert _rank_order(np.zeros(3, np.int64), with_nan, np.arange(3)).tolist() == np.lexsort((np.arange(3), -with_nan, np.zeros(3))).tolist()


class _LexsortEntries:
    """``_Entries`` grouping with the two-key lexsort it used before (the reference)."""

    @staticmethod
    def make():
        from recsys.ranking.recommender import _Entries

        class Reference(_Entries):
            def _order(self, key, seq, attach):
                return np.lexsort((seq, key))

        return Reference()


@pytest.mark.parametrize("seed", range(6))
def test_entries_group_equals_the_lexsort_grouping(seed):
    import recsys.ranking.recommender as r

    _AGAIN, _CONTENT, _COVISIT, _NEXT, _SESSION, _TRENDING, _Entries = (
        r._AGAIN, r._CONTENT, r._COVISIT, r._NEXT, r._SESSION, r._TRENDING, r._Entries)
    rng = np.random.default_rng(seed)
    n_users, cap = int(rng.integers(1, 40)), 64
    fast, slow = _Entries(), _LexsortEntries.make()
    sources = [_CONTENT, _COVISIT, _NEXT, _SESSION, _AGAIN, _TRENDING]
    if seed == 5:  # a source added twice and out of order: the lexsort path, still the same answer
        sources = [_COVISIT, _CONTENT, _COVISIT, _SESSION]
    for src in sources:
        m = int(rng.integers(0, 400))
        args = (rng.integers(0, n_users, m), rng.integers(0, cap - 1, m), rng.integers(1, 4, m) * 0.25)
        anchors = rng.integers(0, 3, m) if src in (_COVISIT, _NEXT) else None
        attach = rng.random(m) < 0.4 if src == _SESSION else None
        for entries in (fast, slow):
            entries.add(src, *args, anchors=anchors, attach_only=attach)
    excl_owner = rng.integers(0, n_users, 30)
    excl_rows = rng.integers(0, cap - 1, 30)
    excluded = np.unique(excl_owner * cap + excl_rows)
    a, b = fast.group(cap, excluded), slow.group(cap, excluded)
    for x, y in ((a.key, b.key), (a.user, b.user), (a.row, b.row), (a.features, b.features), (a.first_seen, b.first_seen)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    assert a.anchor.keys() == b.anchor.keys() and all(a.anchor[s].tobytes() == b.anchor[s].tobytes() for s in a.anchor)


def _group_reference(self, cap: int, excluded_keys: np.ndarray) -> R._Batch:
    """``_Entries.group`` as numpy passes over all entries, before the compiled pass (2026-12-03)."""
    if not self.parts:
        return R._Batch.empty()
    src = np.concatenate([np.full(len(p[1]), p[0], dtype=np.int64) for p in self.parts])
    user = np.concatenate([p[1] for p in self.parts])
    row = np.concatenate([p[2] for p in self.parts])
    val = np.concatenate([p[3] for p in self.parts])
    anchor = np.concatenate([p[4] for p in self.parts])
    attach = np.concatenate([p[5] for p in self.parts])
    seq = src * self._SEQ_STRIDE + np.concatenate([np.arange(len(p[1])) for p in self.parts])
    seq[attach] = np.iinfo(np.int64).max  # never a candidate's position
    key = user * cap + row
    if len(excluded_keys):
        keep = ~np.isin(key, excluded_keys)
        src, user, row, val, anchor, seq, key, attach = (a[keep] for a in (src, user, row, val, anchor, seq, key, attach))
    order = self._order(key, seq, attach)
    src, user, row, val, anchor, seq, key, attach = (a[order] for a in (src, user, row, val, anchor, seq, key, attach))
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    gid = np.cumsum(first) - 1
    n = int(first.sum())
    g_user = user[first]
    features = np.zeros((n, R.N_FEATURES), dtype=np.float32)
    anchors = {}
    for source, column in R._COLUMN.items():
        m = src == source
        if not m.any():
            continue
        features[:, column] = np.bincount(gid[m], weights=val[m], minlength=n)
        if source in R._PER_USER_SCALED:  # scale to [0, 1] per user
            top = np.zeros(int(g_user.max()) + 1, dtype=np.float32)
            np.maximum.at(top, g_user, features[:, column])
            features[:, column] /= np.maximum(top[g_user], 1e-12)
            # the anchor behind each candidate: for co-visitation the strongest single
            # contribution (earliest on ties), for transitions the earliest one
            g, v, a, q = gid[m], val[m], anchor[m], seq[m]
            if source not in (R._COVISIT, R._NEXT):
                continue
            pick = np.lexsort((q, -v, g)) if source == R._COVISIT else np.arange(len(g))
            g, a = g[pick], a[pick]
            lead = np.ones(len(g), dtype=bool)
            lead[1:] = g[1:] != g[:-1]
            anchors[source] = np.full(n, -1, dtype=np.int64)
            anchors[source][g[lead]] = a[lead]
    batch = R._Batch(key[first], g_user, row[first], features, seq[first], anchors)
    if attach.any():  # drop candidates that only attach-only entries named
        real = np.bincount(gid[~attach], minlength=n) > 0
        batch = batch.subset(real)
    return batch


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_compiled_grouping_equals_the_numpy_passes(seed):
    """Random entries of every source for a batch, with repeated (user, item)s, tied values,
    attach-only entries and excluded rows: the same matrix (every bit), keys, first positions,
    anchors and attach-only drop as the numpy version."""
    rng = np.random.default_rng(seed)
    n_users, cap = 60, 400
    entries = R._Entries()
    for source in (R._CONTENT, R._COVISIT, R._NEXT, R._SESSION, R._AGAIN, R._TRENDING, R._SEEN):
        if source == R._SEEN and seed == 3:
            continue  # a source absent from the batch
        n = int(rng.integers(50, 600))
        values = rng.choice([0.25, 0.5, 1.0, 3.0], size=n) if seed % 2 else rng.random(n) * 5
        anchors = rng.integers(0, 5, size=n) if source in (R._COVISIT, R._NEXT) else None
        attach = rng.random(n) < 0.3 if source == R._SESSION else None
        entries.add(source, rng.integers(0, n_users, size=n), rng.integers(0, cap - 1, size=n),
                    values.astype(np.float32), anchors, attach)
    excluded_owner = rng.integers(0, n_users, size=40)
    excluded_rows = rng.integers(0, cap - 1, size=40)
    excluded = np.unique(excluded_owner * cap + excluded_rows)
    fast = entries.group(cap, excluded)
    slow = _group_reference(entries, cap, excluded)
    for field in ("key", "user", "row", "first_seen"):
        assert np.array_equal(getattr(fast, field), getattr(slow, field)), field
    assert fast.features.dtype == slow.features.dtype and np.array_equal(fast.features.view(np.int32), slow.features.view(np.int32))
    assert fast.anchor.keys() == slow.anchor.keys() and all(np.array_equal(fast.anchor[s], slow.anchor[s]) for s in slow.anchor)


# ---------------------------------------------------------------- compiled ahead of the first batch

_COMPILED_BY_A_RUN = r"""
import dataclasses, json, pathlib, sys, tempfile
from recsys.events import Envelope, encode
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.signals.compile_kernels import KERNEL_MODULES, compile_kernels, compiled_signatures
from recsys.synthetic import generate_catalog, generate_events

modules = sorted(".".join(p.with_suffix("").parts) for p in pathlib.Path("recsys").rglob("_*kernels.py"))
assert modules == sorted(KERNEL_MODULES), (modules, KERNEL_MODULES)  # a new module of loops is listed

def compiled():
    return {name: sorted(sigs) for name, sigs in compiled_signatures().items()}

compile_kernels()
before = compiled()
catalog = generate_catalog(200, seed=0)
words = [c.text.split()[0] for c in catalog]
events = [dataclasses.replace(e, type="search", item_id=None, query=words[i % len(words)]) if i % 5 == 0 else e
          for i, e in enumerate(generate_events(2000, catalog, n_users=100, seed=1))]
with tempfile.TemporaryDirectory() as tmp:
    engine = Shard.open(Settings(state_dir=tmp, embed_cache_dir=sys.argv[1]))
    engine.upsert_catalog(catalog)
    for i in range(0, len(events), 100):
        engine.process([Envelope("events", 0, i + j, e.user_id.encode(), encode(e), e.ts)
                        for j, e in enumerate(events[i : i + 100])])
    totals = dict(engine.totals)
    engine.close()
after = compiled()
print(json.dumps({"modules": modules, "before": before, "after": after, "totals": totals}))
"""


def test_compile_kernels_compiles_every_loop_the_engine_calls(tmp_path):
    """``compile_kernels`` (run by ``recsys run`` before its first batch, and by the image build)
    leaves nothing for a run to compile: on a fresh machine each loop not compiled ahead costs
    its first batch seconds (the ranker's closest-rows loop on the index's read-only vectors,
    search's price loop). Run in a fresh process, so no other test has compiled them."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", _COMPILED_BY_A_RUN, str(tmp_path / "emb")], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(found["modules"]) >= 5, found["modules"]
    assert found["totals"]["search_results"] > 0 and found["totals"]["recommendations"] > 0, found["totals"]
    assert found["before"]["recsys.ranking._kernels.closest_rows"], "compiled ahead"
    # every loop the engine calls compiled ahead (the helpers, named with "_", are compiled
    # inside their callers), also those the tiny run does not reach (a session-kNN query with
    # more candidate sessions than its sample: most_active_per_query)
    assert not [name for name, sigs in found["before"].items() if not sigs and not name.rsplit(".", 1)[1].startswith("_")]
    compiled_by_the_run = {name: sorted(set(sigs) - set(found["before"][name])) for name, sigs in found["after"].items()}
    assert not {name: sigs for name, sigs in compiled_by_the_run.items() if sigs}


@pytest.mark.parametrize("seed", range(4))
def test_most_active_sessions_per_query_equal_the_lexsort_cut(seed):
    """The compiled cut of session-kNN's sample (``most_active_per_query``) keeps the entries
    that sorting every (query, session) pair by query, then most recent activity, and cutting
    each query at ``sample_size`` keeps (the code before it), ties included."""
    from recsys.signals._session_kernels import most_active_per_query

    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 60, size=40)
    q = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    active = rng.integers(0, 30 if seed % 2 else 10**9, size=len(q)).astype(np.int64)  # odd seeds: many ties
    for sample_size in (1, 5, 17, 59, 100):
        per_q = np.bincount(q)
        pick = np.lexsort((-active, q))
        rank = np.arange(len(q)) - np.repeat(np.cumsum(per_q) - per_q, per_q)
        expected = np.sort(pick[rank < sample_size])
        assert np.array_equal(most_active_per_query(q, active, sample_size), expected)


def _buy_again_per_user(index, n: int, states: list[UserState], exclusions: list[set[str]]):
    """The per-user buy-again candidates ``Recommender._add_buy_again`` gave before it became
    one pass over the batch (2026-12-05): each user's purchases newest first, filtered, sorted
    by count (stable, so ties stay newest first), cut at ``n``."""
    users, names, counts = [], [], []
    for u, (state, excl) in enumerate(zip(states, exclusions)):
        ids = [i for i in reversed(state.purchased) if i not in excl and i in index]
        ids.sort(key=lambda i: -state.bought.get(i, 1))
        top = ids[:n]
        users += [u] * len(top)
        names += top
        counts += [state.bought.get(i, 1) for i in top]
    return users, index.rows(names).tolist(), [float(np.float32(c)) for c in counts]


def test_buy_again_in_one_pass_equals_the_per_user_sort():
    """Many ties, excluded items, items not in the index, users past the cut."""
    from collections import Counter
    from types import SimpleNamespace

    from recsys.items.catalog import VectorIndex

    rng = random.Random(5)
    vectors = VectorIndex(4)
    ids = [f"i{j}" for j in range(300)]
    vectors.upsert(ids[:250], np.eye(4, dtype=np.float32)[np.arange(250) % 4] + 0.1)  # i250.. unknown
    cap = vectors.row_capacity + 1
    for n in (1, 5, 30):
        fake = SimpleNamespace(items=SimpleNamespace(index=vectors), config=SimpleNamespace(again_candidates=n))
        states, exclusions = [], []
        for u in range(60):
            bought = rng.sample(ids, rng.choice([0, 1, 3, 40, 200]))
            states.append(UserState(user_id=f"u{u}", purchased=list(bought),
                                    bought={i: rng.choice([1, 1, 2, 3]) for i in bought if rng.random() < 0.9}))
            exclusions.append({i for i in bought if rng.random() < 0.2})
        rows = [vectors.rows(sorted(e)) for e in exclusions]
        keys = np.unique(np.concatenate([u * cap + r[r >= 0] for u, r in enumerate(rows)] + [np.zeros(0, np.int64)]))
        parts = R._Entries()
        Recommender._add_buy_again(fake, parts, states, keys, cap)
        got: tuple[list, list, list] = ([], [], [])
        for _, users, rws, values, _, _ in parts.parts:
            got[0].extend(users.tolist())
            got[1].extend(rws.tolist())
            got[2].extend(values.tolist())
        assert got == _buy_again_per_user(vectors, n, states, exclusions), n
        assert max(Counter(got[0]).values()) == n  # lists were cut
