"""The search re-ranker: an online pairwise correction to the hand-set search weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import orjson

if TYPE_CHECKING:
    from recsys.store.kv import KVStore

RERANK_KEY = b"sqr:weights"


class SearchReranker:
    """Online pairwise correction to the hand-set search weights, learned from what shoppers
    engage with after a search (the rule of :mod:`recsys.search.learned`).

    Like :class:`recsys.ranking.reranker.PairwiseReranker` for recommendations, on the search signals: when the
    engaged item was among a search's candidates, it should outscore ``n_negatives`` others of
    the same list, one logistic SGD step on the total score ``(prior + w) . (x_pos - x_neg)``
    per pair. The negatives are the engaged item's strongest competitors under the current
    score (``hard=True``, the default: the items a top-10 is decided between), or drawn at
    random from the candidates (``hard=False``, seeded: most of them are far below the top, so
    the weights learn to separate the engaged item from the tail, not from its neighbours).
    Off until ``min_examples`` rows were learned. Persisted as one record (``b"sqr:weights"``)
    in the engine's atomic write.

    >>> r = SearchReranker(np.zeros(2), min_examples=1, lr=0.5)
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> for _ in range(20):
    ...     _ = r.learn(x, positive=1)
    >>> bool(r.correction(x)[1] > r.correction(x)[0])
    True
    """

    def __init__(self, prior: np.ndarray, *, lr: float = 0.05, l2: float = 1e-3, n_negatives: int = 3,
                 min_examples: int = 200, hard: bool = True, seed: int = 0) -> None:
        self.prior = np.asarray(prior, dtype=np.float64)
        self.lr, self.l2, self.n_negatives, self.min_examples, self.hard = lr, l2, n_negatives, min_examples, hard
        self.rng = np.random.default_rng(seed)
        self.w = np.zeros(len(self.prior))
        self.examples = 0
        self._dirty = False

    @property
    def active(self) -> bool:
        return self.examples >= self.min_examples

    def correction(self, x: np.ndarray) -> np.ndarray:
        return x @ self.w if self.active else np.zeros(len(x))

    def learn(self, x: np.ndarray, positive: int) -> int:
        """One step: candidate ``positive`` of the feature rows ``x`` was engaged with; returns
        the rows learned (0 for fewer than two candidates)."""
        rows = self.sample(x, positive)
        return 0 if rows is None else self.learn_rows(rows)

    def sample(self, x: np.ndarray, positive: int) -> np.ndarray | None:
        """One step's rows: the engaged candidate's features, then its negatives' (None: fewer
        than two candidates). With shards sharing learning, the shard that showed the list
        samples them and every shard learns them (:meth:`learn_rows`) from the exchange log."""
        if len(x) < 2:
            return None
        others = np.delete(np.arange(len(x)), positive)
        n = min(self.n_negatives, len(others))
        if self.hard:  # the strongest competitors now (ties: candidate order)
            scores = x[others] @ (self.prior + self.w)
            negatives = others[np.argsort(-scores, kind="stable")[:n]]
        else:
            negatives = self.rng.choice(others, size=n, replace=False)
        return x[np.concatenate(([positive], negatives))]

    def learn_rows(self, rows: np.ndarray) -> int:
        """The logistic step for ``rows`` (:meth:`sample`'s: row 0 the engaged candidate)."""
        d = rows[0] - rows[1:]
        g = 1.0 / (1.0 + np.exp(np.clip(d @ (self.prior + self.w), -30.0, 30.0)))
        self.w += self.lr * ((g[:, None] * d).mean(axis=0) - self.l2 * self.w)
        self.examples += len(rows)
        self._dirty = True
        return len(rows)

    def export_dirty(self) -> dict[bytes, bytes]:
        if not self._dirty:
            return {}
        self._dirty = False
        return {RERANK_KEY: orjson.dumps([self.w.tolist(), self.examples])}

    def load(self, kv: KVStore) -> None:
        raw = kv.get(RERANK_KEY)
        if raw:
            w, self.examples = orjson.loads(raw)
            if len(w) == len(self.w):
                self.w = np.array(w, dtype=np.float64)
