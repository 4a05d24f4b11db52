"""A signal's item codes -> rows of the item index, for the ranker (issue 12).

Co-visitation, transitions and session neighbours hand the ranker their candidates as their
own small-int item codes. The ranker needs the candidates' rows in the vector index
(:class:`recsys.items.catalog.VectorIndex`): turning ~100k codes a batch into ids and the ids
into rows cost a string list and a dict lookup per candidate. :class:`CodeRows` keeps the
answer as one array per signal, so a batch's candidates are mapped by one ``take``.

The array follows both sides: codes the signal added since the last call are looked up then,
and the whole array is read again whenever the index changed (its ``version`` moves on every
upsert and removal: an upserted item gets a new row, a removed or unavailable one has none),
so a row is always what ``index.rows`` would answer now.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class RowIndex(Protocol):
    """What :class:`CodeRows` reads from the index (:class:`recsys.items.catalog.VectorIndex`)."""

    @property
    def version(self) -> int: ...

    def rows(self, item_ids: Sequence[str]) -> np.ndarray: ...


class CodeRows:
    """``rows(codes, names, index)``: ``index.rows([names[c] for c in codes])``, from an array.

    ``names`` is the signal's code -> id list; codes are given in order (0, 1, 2, ...) and never
    change meaning, until the signal starts over with a new :class:`CodeRows`.

    >>> class Index:  # the two things read from the real VectorIndex
    ...     version, at = 0, {"a": 5, "b": 7}
    ...     def rows(self, ids): return np.array([self.at.get(i, -1) for i in ids], dtype=np.int64)
    >>> index, names, cr = Index(), ["a", "b", "gone"], CodeRows()
    >>> cr.rows(np.array([1, 0, 2, 1]), names, index).tolist()
    [7, 5, -1, 7]
    >>> index.at, index.version = {"a": 9, "gone": 3}, 1  # "a" upserted, "gone" back, "b" removed
    >>> names.append("new"); index.at["new"] = 11
    >>> cr.rows(np.array([0, 1, 2, 3]), names, index).tolist()
    [9, -1, 3, 11]
    """

    __slots__ = ("_rows", "_known", "_index", "_version")

    def __init__(self) -> None:
        self._rows = np.zeros(0, dtype=np.int64)
        self._known = 0  # codes below this have their row in _rows
        self._index: RowIndex | None = None
        self._version = -1

    def rows(self, codes: np.ndarray, names: Sequence[str], index: RowIndex) -> np.ndarray:
        if index is not self._index or index.version != self._version:
            self._index, self._version, self._known = index, index.version, 0
        n = len(names)
        if n > self._known:
            if n > len(self._rows):
                grown = np.empty(max(n, 2 * len(self._rows), 1024), dtype=np.int64)
                grown[: self._known] = self._rows[: self._known]
                self._rows = grown
            self._rows[self._known : n] = index.rows(names[self._known : n])
            self._known = n
        return self._rows[codes]
