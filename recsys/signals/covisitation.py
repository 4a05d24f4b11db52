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

import itertools
from typing import TYPE_CHECKING, Iterable

import numpy as np
import orjson

from recsys.feedback import EVENT_WEIGHTS, decay_factor, half_life_ms
from recsys.signals._covisit_kernels import IdBytes, apply_pairs, pack_rows, ranked_order, top_many
from recsys.signals.coderows import CodeRows, RowIndex

if TYPE_CHECKING:
    from recsys.store.kv import KVStore

COV_PREFIX = b"cov:"
NEXT_PREFIX = b"nxt:"  # directed transitions (CoVisitation(directed=True))

_NO_NEIGHBOURS: tuple = ((), np.zeros(0), ())  # shared empty answer (never modified)
#: Pairs learned by :meth:`CoVisitation.update` are applied in one compiled call once this many
#: wait (and before anything reads the lists).
_PENDING_PAIRS = 8192


class CoVisitation:
    """Item-to-item co-visitation (OTTO style), weighted by event type and closeness in time.

    When a user engages with item ``b`` after the recent items ``a1..an`` of their history
    (its last ``window`` entries), each distinct ``a != b`` gains, symmetrically with ``b``,
    ``EVENT_WEIGHTS[type_b] * 0.5 ** ((ts_b - ts_a) / half_life)`` and one raw co-occurrence.
    A repeated ``a`` in the window counts once, at its most recent time. Each item keeps at
    most ``max_neighbours`` neighbours: when a list overflows, its weakest pair is dropped
    from both sides (among equal weights the smallest id), so the relation stays symmetric. A
    new pair that would be the one its own overflow drops is not added at all (the same lists).
    Accumulated weights are not decayed over time (``neighbours`` takes no clock); the
    half-life only discounts distant pairs.

    Held as flat arrays: every item with a code (``_code``), its list as one row of neighbour
    codes, weights and raw counts in insertion order (``_nb``, ``_wt``, ``_ct``; ``_ln`` pairs
    held), changed by the compiled loops of :mod:`recsys.signals._covisit_kernels`. The rows
    hold what the dicts of item -> neighbour -> weight held before (issue 12), in the same
    order, so the stored lists are the same. Memory: ``(max_neighbours + 1) x 20`` bytes for
    every item that ever took part in a pair (~1 KB at 50), full list or not; the dicts and heaps
    before took ~12 KB per full list of 50 (tracemalloc, 2,000 items). Numpy arrays are also
    invisible to
    Python's cyclic garbage collector, whose full passes over ~500k small containers once
    stalled the stream (benchmarks/README.md).

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
        self._clear()

    def _clear(self) -> None:
        self._code: dict[str, int] = {}  # item id -> row (and the code it is known by in other rows)
        self._names: list[str] = []  # code -> item id
        self._ids = IdBytes()  # the ids' UTF-8 bytes, for comparing ids inside the compiled loops
        self._rows = CodeRows()  # code -> row of the ranker's item index
        width = self.max_neighbours + 1  # room for the pair that overflows, until it is dropped
        self._nb = np.full((1024, width), -1, dtype=np.int32)
        self._wt = np.zeros((1024, width), dtype=np.float64)
        self._ct = np.zeros((1024, width), dtype=np.int64)
        self._ln = np.zeros(1024, dtype=np.int64)
        self._dirty = np.zeros(1024, dtype=np.bool_)  # rows to export
        self._stale = np.zeros(1024, dtype=np.bool_)  # rows changed since their ``ranked`` answer
        self._ranked: dict[int, tuple] = {}  # sorted neighbour columns, until they change
        self._pa: list[int] = []  # pairs learned, not yet applied to the rows
        self._pb: list[int] = []
        self._pw: list[float] = []

    def __len__(self) -> int:
        """Items that have at least one neighbour."""
        self._apply()
        return int(np.count_nonzero(self._ln))

    # ------------------------------------------------------------------ learning

    def update(self, history: Iterable[tuple[str | None, str, int]], item_id: str | None, event_type: str, ts: int) -> None:
        """Learn from one engagement with ``item_id`` given the user's history *before* it.

        ``history`` is ``[(item_id, event_type, ts), ...]``, most recent last (as kept by
        :class:`recsys.store.users.UserState`); entries without an item are ignored.
        """
        w = EVENT_WEIGHTS.get(event_type, 0.0)
        if item_id is None or w == 0:
            return
        # the last ``window`` entries (a list, as UserState keeps it, is sliced without a copy of it all)
        tail = history[-self.window :] if type(history) is list else list(history)[-self.window :]
        recent: dict[str, int] = {}
        for a, _type_a, ts_a in tail:
            if a is None or a == item_id:
                continue
            gap = abs(ts - ts_a)  # out-of-order history: distance in time either way
            seen = recent.get(a)
            if seen is None or gap < seen:
                recent[a] = gap
        if not recent:
            return
        b = self._intern(item_id)
        for a in sorted(recent):
            self._pa.append(self._intern(a))
            self._pb.append(b)
            self._pw.append(w * decay_factor(recent[a], self._half_life_ms))
        if len(self._pa) >= _PENDING_PAIRS:
            self._apply()

    def _apply(self) -> None:
        """Apply the pending pairs, in the order learned (one compiled call)."""
        if not self._pa:
            return
        pa = np.asarray(self._pa, dtype=np.int64)
        pb = np.asarray(self._pb, dtype=np.int64)
        pw = np.asarray(self._pw, dtype=np.float64)
        self._pa, self._pb, self._pw = [], [], []
        apply_pairs(pa, pb, pw, self._nb, self._wt, self._ct, self._ln, self._dirty, self._stale,
                    self._ids.buf, self._ids.offset, self._ids.length, self.max_neighbours, self.directed)

    def _intern(self, item_id: str) -> int:
        code = self._code.get(item_id)
        if code is not None:
            return code
        code = self._code[item_id] = len(self._names)
        self._names.append(item_id)
        if code == len(self._ln):  # double every per-row array
            self._nb = np.concatenate([self._nb, np.full_like(self._nb, -1)])
            self._wt = np.concatenate([self._wt, np.zeros_like(self._wt)])
            self._ct = np.concatenate([self._ct, np.zeros_like(self._ct)])
            self._ln = np.concatenate([self._ln, np.zeros_like(self._ln)])
            self._dirty = np.concatenate([self._dirty, np.zeros_like(self._dirty)])
            self._stale = np.concatenate([self._stale, np.zeros_like(self._stale)])
        self._ids.add(code, item_id)
        return code

    # ------------------------------------------------------------------ reading

    def neighbours(self, item_id: str, n: int) -> list[tuple[str, float, int]]:
        """Up to ``n`` neighbours of ``item_id`` as ``(neighbour, weight, raw count)``,
        heaviest first, ties by neighbour id."""
        if n <= 0:
            return []
        names, weights, counts = self.ranked(item_id)
        return list(zip(names[:n], weights[:n].tolist(), counts[:n]))

    def ranked(self, item_id: str) -> tuple[tuple[str, ...], np.ndarray, tuple[int, ...]]:
        """All neighbours, sorted as in :meth:`neighbours`, as columns: names, weights
        (float64 array, for the ranker's vectorised scoring) and raw counts. Sorted once per
        change of the item's neighbours, not per read; do not modify what is returned."""
        if self._pa:
            self._apply()
        x = self._code.get(item_id)
        if x is None or not self._ln[x]:
            return _NO_NEIGHBOURS
        ranked = self._ranked.get(x)
        if ranked is None or self._stale[x]:
            order = ranked_order(self._nb, self._wt, self._ln, x, self._ids.buf, self._ids.offset, self._ids.length)
            names = self._names
            # tuples of plain values, untracked by the garbage collector like the arrays
            ranked = (tuple(map(names.__getitem__, self._nb[x, order].tolist())), self._wt[x, order],
                      tuple(self._ct[x, order].tolist()))
            self._ranked[x] = ranked
            self._stale[x] = False
        return ranked

    def top(self, item_ids: list[str], n: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The first ``n`` neighbours of each of ``item_ids`` in :meth:`ranked` order, for a
        whole batch of anchors in one compiled call: ``(neighbours per anchor, neighbour ids,
        weights)``, anchors one after another (what ``ranked(i)[0][:n]`` and ``[1][:n]`` give,
        concatenated)."""
        counts, codes, weights = self._top_codes(item_ids, n)
        return counts, list(map(self._names.__getitem__, codes.tolist())), weights

    def top_rows(self, item_ids: list[str], n: int, index: RowIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`top` with each neighbour as its row in ``index`` (-1: not in it) instead of
        its id: what ``index.rows`` of :meth:`top`'s ids gives, from an array (:class:`CodeRows`)."""
        counts, codes, weights = self._top_codes(item_ids, n)
        return counts, self._rows.rows(codes, self._names, index), weights

    def _top_codes(self, item_ids: list[str], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._pa:
            self._apply()
        xs = np.fromiter(map(self._code.get, item_ids, itertools.repeat(-1)), dtype=np.int64, count=len(item_ids))
        return top_many(xs, max(n, 0), self._nb, self._wt, self._ln, self._ids.buf, self._ids.offset, self._ids.length)

    def items(self) -> list[str]:
        """Ids of the items that have at least one neighbour, in code order."""
        self._apply()
        return [self._names[x] for x in np.flatnonzero(self._ln).tolist()]

    def lists(self) -> dict[str, tuple[dict[str, float], dict[str, int]]]:
        """Every item's list as it is stored: ``{item: ({nbr: weight}, {nbr: raw count})}``,
        neighbours in insertion order (for tests and tools; the engine reads :meth:`ranked`)."""
        self._apply()
        return {self._names[x]: self._row(x) for x in np.flatnonzero(self._ln).tolist()}

    def _row(self, x: int) -> tuple[dict[str, float], dict[str, int]]:
        n = int(self._ln[x])
        nbrs = list(map(self._names.__getitem__, self._nb[x, :n].tolist()))
        return dict(zip(nbrs, self._wt[x, :n].tolist())), dict(zip(nbrs, self._ct[x, :n].tolist()))

    # ------------------------------------------------------------------ persistence

    def export_dirty(self) -> dict[bytes, bytes]:
        """Changed lists since the last export, ``b"cov:"+id ->`` the list's binary record (its
        neighbours in the order they joined it, see :func:`decode_record`; ``[]`` for an item
        that lost all neighbours); clears them. Every batch rewrites the list of every item it
        touched, so the records are packed by one compiled call from the rows as they are held
        (``pack_rows``): only the keys are built in Python. JSON records of earlier versions
        (2026-11-30 to 2026-12-03) cost ~7x as much to write; :meth:`load` reads them all."""
        self._apply()
        dirty = np.flatnonzero(self._dirty)
        if not len(dirty):
            return {}
        prefix, names = self.prefix, self._names
        rows = sorted(dirty.tolist(), key=names.__getitem__)
        buf, starts, ends = pack_rows(np.asarray(rows, dtype=np.int64), self._nb, self._wt, self._ct, self._ln,
                                      self._ids.buf, self._ids.offset, self._ids.length)
        data = buf.tobytes()
        out: dict[bytes, bytes] = {}
        for x, lo, hi in zip(rows, starts.tolist(), ends.tolist()):
            out[prefix + names[x].encode()] = data[lo:hi] if hi > lo else b"[]"
        self._dirty[dirty] = False
        return out

    def load(self, kv: KVStore) -> None:
        """Replace everything held with the records under ``b"cov:"`` in ``kv`` (any of the
        formats :func:`decode_record` reads). A list stored under a larger ``max_neighbours``
        is held whole, and loses one pair per overflow after, as the dicts of the version
        before the arrays did."""
        self._clear()
        stored = []
        for key, value in kv.iter_prefix(self.prefix):
            try:
                pairs = decode_record(value)
            except ValueError as exc:  # orjson's error is one too
                raise ValueError(f"stored list {key!r}: {exc}") from None
            if pairs:
                stored.append((key[len(self.prefix):].decode(), pairs))
        longest = max((len(pairs) for _, pairs in stored), default=0)
        if longest > self.max_neighbours:  # rows as wide as the longest list, and one more
            width = longest + 1
            self._nb = np.full((len(self._ln), width), -1, dtype=np.int32)
            self._wt = np.zeros((len(self._ln), width), dtype=np.float64)
            self._ct = np.zeros((len(self._ln), width), dtype=np.int64)
        for item_id, pairs in stored:
            x = self._intern(item_id)
            codes = [self._intern(y) for y, _, _ in pairs]
            n = len(pairs)
            self._nb[x, :n] = codes
            self._wt[x, :n] = [w for _, w, _ in pairs]
            self._ct[x, :n] = [c for _, _, c in pairs]
            self._ln[x] = n


def decode_record(value: bytes) -> list[tuple[str, float, int]]:
    """A stored list as ``[(neighbour, weight, raw count), ...]`` in the order the neighbours
    joined it, from any format written so far. Since 2026-12-03 (second change that day) a
    binary record (:func:`recsys.signals._covisit_kernels.pack_rows`: a header with the count,
    then weights, counts, id lengths and ids); before, JSON:

    >>> import struct
    >>> decode_record(struct.pack("<B3xI2d2q2I", 1, 2, 2.5, 1.0, 3, 1, 1, 2) + "bć".encode())
    [('b', 2.5, 3), ('ć', 1.0, 1)]
    >>> decode_record(b'{"n":["b","c"],"w":[2.5,1.0],"c":[3,1]}')  # 2026-12-03
    [('b', 2.5, 3), ('c', 1.0, 1)]
    >>> decode_record(b'[{"b":2.5,"c":1.0},{"b":3,"c":1}]')  # 2026-11-30 to 2026-12-03
    [('b', 2.5, 3), ('c', 1.0, 1)]
    >>> decode_record(b'[["b",2.5,3],["c",1.0,1]]'), decode_record(b"[]")  # before; no neighbours
    ([('b', 2.5, 3), ('c', 1.0, 1)], [])
    >>> decode_record(b"\\x01\\x00\\x00\\x00\\x05\\x00\\x00\\x00")
    Traceback (most recent call last):
    ...
    ValueError: co-visitation record: 8 bytes, too short for its 5 pairs
    """
    if value[:1] == b"\x01":
        return _decode_binary(value)
    rows = orjson.loads(value)
    if isinstance(rows, dict):
        return [(y, float(w), int(c)) for y, w, c in zip(rows["n"], rows["w"], rows["c"], strict=True)]
    if not rows:
        return []
    if isinstance(rows[0], dict):
        weights, counts = rows
        return [(y, float(w), int(counts[y])) for y, w in weights.items()]
    return [(y, float(w), int(c)) for y, w, c in rows]


def _decode_binary(value: bytes) -> list[tuple[str, float, int]]:
    n = int.from_bytes(value[4:8], "little")
    ids_at = 8 + 20 * n
    if len(value) < ids_at:
        raise ValueError(f"co-visitation record: {len(value)} bytes, too short for its {n} pairs")
    weights = np.frombuffer(value, dtype="<f8", count=n, offset=8).tolist()
    counts = np.frombuffer(value, dtype="<i8", count=n, offset=8 + 8 * n).tolist()
    ends = (ids_at + np.cumsum(np.frombuffer(value, dtype="<u4", count=n, offset=8 + 16 * n), dtype=np.int64)).tolist()
    if (ends[-1] if n else ids_at) != len(value):
        raise ValueError(f"co-visitation record: {len(value)} bytes, but its {n} pairs take {ends[-1] if n else ids_at}")
    ids = [value[lo:hi].decode("utf-8", "surrogatepass") for lo, hi in zip([ids_at, *ends[:-1]], ends)]
    return list(zip(ids, weights, counts))
