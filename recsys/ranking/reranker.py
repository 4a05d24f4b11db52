"""river in the loop: an online re-ranker learned from what users did next, and a quality monitor.

**PairwiseReranker.** Each candidate of a recommendation carries a small vector of signals (see
:data:`FEATURES`). The score is the hand-set blend (``prior``, the recommender's weights) plus
a learned correction ``w``, both linear in the signals. When a user acts, the candidates we
last showed them teach it: if the engaged item was among them, it should outscore
``n_negatives`` others drawn at random from the same list (seeded: same stream, same model),
so each pair takes one SGD step on the logistic loss of ``(prior + w) . (x_pos - x_neg)``.
Pairwise, because what matters is the order within one user's list; on the *total* score,
because a correction learned on its own and added to the prior double-counts what the prior
already says; random negatives, because the best-ranked others are by construction the rows
with the largest signals, and learning only against them drove every weight down (YooChoose
leave-last-out Recall@10 0.259 with top-ranked negatives, 0.280 with random ones; river's
pointwise ``LogisticRegression`` added to the prior: 0.232). The L2 pull towards the prior is
per signal: ``l2`` (1e-2) for the signals that find new items, which keeps them from chasing a
drifting one (trending on Complete Journey, whose leave-last-out lists are all ranked at the
log's end: 1e-4 on every signal took its NDCG@10 from 0.0247 to 0.0081), and ``l2_familiar``
(1e-4) for "seen" and "buy again". Those two only rank items the user already knows (none
where a protocol excludes history), and the prior of "seen" is 0 when the item just viewed is
the likeliest next click: 1e-2 held its learned weight at about half of what 1e-4 lets it reach
(YooChoose 1.7 against 3.3), and the recently seen item below new ones it should lead.
Prequential NDCG@10 with 1e-4 there: REES46 0.2891 -> 0.3029, YooChoose 0.2966 -> 0.3269,
DIGINETICA 0.0630 -> 0.0636, Complete Journey (300k lines) 0.0495 -> 0.0504; leave-last-out
within 0.0004 on all four (issue 14; README, Backtests). Before ``min_examples`` the
correction is off, so a new system ranks exactly by the hand-set blend. Scoring is one
matrix-vector product for a whole candidate matrix.

**Monitor.** Hit@k of the last shown list against the next event feeds a rolling mean (for
dashboards) and an ADWIN drift detector (river); a detected drop is counted and reported. It
triggers no reset: forgetting the re-ranker on each drop, or raising the head's learning rate,
measurably hurt every backtest that had drops (see the engine), and both keep adapting anyway.

>>> reranker = PairwiseReranker(min_examples=1)
>>> x = np.array([[1.0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
>>> reranker.learned(x).tolist()  # nothing learned yet
[0.0, 0.0]
>>> for _ in range(50):
...     _ = reranker.learn(x, positive=1)
>>> s = reranker.learned(x); bool(s[1] > s[0])  # co-visitation predicted the next item
True
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from river import stats, utils

from recsys.ranking.features import FAMILIAR, FEATURES

_FAMILIAR_COLS = np.array([FEATURES.index(f) for f in FAMILIAR])
_FAMILIAR_MASK = np.isin(np.arange(len(FEATURES)), _FAMILIAR_COLS).astype(np.float64)


class PairwiseReranker:
    """Online pairwise re-ranker: a learned correction to the hand-set blend (numpy SGD)."""

    def __init__(
        self,
        prior: np.ndarray | None = None,
        *,
        lr: float = 0.05,
        l2: float = 1e-2,
        l2_familiar: float = 1e-4,
        n_negatives: int = 3,
        min_examples: int = 500,
        seed: int | list[int] = 0,  # anything numpy's default_rng takes (a sharing shard: [seed, shard])
    ):
        self.prior = np.zeros(len(FEATURES)) if prior is None else np.asarray(prior, dtype=np.float64)
        if self.prior.shape != (len(FEATURES),):
            raise ValueError(f"prior must have one weight per feature {FEATURES}, got shape {self.prior.shape}")
        self.lr = lr
        self.l2 = np.where(_FAMILIAR_MASK > 0, l2_familiar, l2)  # per signal (module docstring)
        self.n_negatives = n_negatives
        self.min_examples = min_examples
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        self.w = np.zeros(len(FEATURES), dtype=np.float64)
        self.examples = 0

    @property
    def active(self) -> bool:
        """Whether the learned part is on (enough examples seen since the last reset)."""
        return self.examples >= self.min_examples

    def weights(self) -> np.ndarray:
        """Learned correction per signal, in FEATURES order."""
        return self.w.astype(np.float32)

    def learned(self, x: np.ndarray) -> np.ndarray:
        """The learned correction per row of ``x`` (n, len(FEATURES)); zeros until warmed up."""
        if not self.active:
            return np.zeros(len(x), dtype=np.float32)
        return (x @ self.w).astype(np.float32)

    def learn(self, x: np.ndarray, positive: int | None) -> int:
        """Learn from one shown list: row ``positive`` was engaged (None: none of them was,
        which says nothing about their order, so nothing is learned).

        Returns the number of rows learned from (the positive and its sampled negatives).
        """
        rows = self.sample_pair(x, positive)
        return 0 if rows is None else self.learn_pair(rows)

    def sample_pair(self, x: np.ndarray, positive: int | None) -> np.ndarray | None:
        """The rows one :meth:`learn` step learns from: row ``positive`` of ``x`` first, then its
        ``n_negatives`` others drawn with this re-ranker's generator (None when nothing is
        learned). Split from :meth:`learn_pair` so that shards sharing the models (issue 11)
        can draw at the shard that showed the list and learn on every shard alike."""
        if positive is None or len(x) < 2:
            return None
        others = np.delete(np.arange(len(x)), positive)
        negatives = self.rng.choice(others, size=min(self.n_negatives, len(others)), replace=False)
        return x[np.concatenate(([positive], negatives))]

    def learn_pair(self, rows: np.ndarray) -> int:
        """One SGD step: ``rows[0]`` (engaged) against each of ``rows[1:]`` (its negatives).
        Returns the number of rows learned from."""
        d = rows[0].astype(np.float64) - rows[1:].astype(np.float64)  # (negatives, features)
        margin = d @ (self.prior + self.w)
        g = 1.0 / (1.0 + np.exp(np.clip(margin, -30.0, 30.0)))  # d loss / d margin, negated
        # A familiar item against a new one teaches only the familiarity weights: otherwise the
        # frequent re-visits (the last item again; a grocery staple) push every source that
        # finds *new* items below zero, and new items come out ranked worse than at random.
        familiar = rows[:, _FAMILIAR_COLS].max(axis=1) > 0
        mask = np.where((familiar[1:] == familiar[0])[:, None], 1.0, _FAMILIAR_MASK)
        self.w += self.lr * ((g[:, None] * d * mask).mean(axis=0) - self.l2 * self.w)
        n = len(rows)
        self.examples += n
        return n

    def state(self) -> dict:
        return {"weights": dict(zip(FEATURES, self.w.tolist())), "prior": dict(zip(FEATURES, self.prior.tolist())),
                "examples": self.examples}


@dataclass(slots=True)
class Shown:
    """What a user was last shown, and every candidate it was ranked from.

    ``candidates``/``features`` hold all candidates in ranked order (the first ``len(items)``
    were shown). The re-ranker learns from all of them: learning only from what was shown
    would never give a signal that rarely reaches the top (say, trending) a positive example.
    Tuples and slots: tens of thousands of these are kept, and tuples of strings drop out of
    the garbage collector's view (its full passes are the stream's worst pauses).
    """

    items: Sequence[str]
    features: np.ndarray  # (len(candidates), len(FEATURES)), ranked order
    candidates: Sequence[str] | None = None

    def position(self, item_id: str) -> int | None:
        """Rank of ``item_id`` among all candidates (None if it was not a candidate)."""
        try:
            return (self.candidates or self.items).index(item_id)
        except ValueError:
            return None


class ShownCache:
    """The last shown list per user, bounded (least recently shown users are forgotten).

    Kept in memory only: after a crash it starts empty, so a re-delivered event can never
    teach the blend twice.
    """

    def __init__(self, max_users: int = 50_000):  # ~3 KB a user (all candidates)
        self.max_users = max_users
        # user -> (items, candidates, feature bytes, shape, dtype): a plain tuple of strings,
        # bytes and ints, which the garbage collector stops tracking after its first passes over it.
        # A ``Shown`` (or any tuple holding an array) it tracks for as long as it is kept: tens
        # of thousands of them, rescanned by every full pass.
        self._data: OrderedDict[str, tuple] = OrderedDict()

    def put(self, user_id: str, shown: Shown) -> None:
        x = shown.features
        self._data[user_id] = (tuple(shown.items), None if shown.candidates is None else tuple(shown.candidates),
                               x.tobytes(), x.shape, x.dtype.str)
        self._data.move_to_end(user_id)
        while len(self._data) > self.max_users:
            self._data.popitem(last=False)

    def get(self, user_id: str) -> Shown | None:
        """What ``user_id`` was last shown (its features a read-only array), or None."""
        held = self._data.get(user_id)
        if held is None:
            return None
        items, candidates, raw, shape, dtype = held
        return Shown(items, np.frombuffer(raw, dtype=dtype).reshape(shape), candidates)

    def discard(self, user_id: str) -> None:
        """Forget what ``user_id`` was shown (an erasure)."""
        self._data.pop(user_id, None)

    def __len__(self) -> int:
        return len(self._data)


class QualityMonitor:
    """Rolling hit rate of shown lists against the next event, with ADWIN drift detection.

    >>> m = QualityMonitor(window=4)
    >>> for hit in (1, 1, 0, 1):
    ...     _ = m.update(hit)
    >>> m.hit_rate
    0.75
    >>> m = QualityMonitor()
    >>> rises = [m.update(i % 10 < (2 if i < 2000 else 8)) for i in range(4000)]
    >>> drops = [m.update(i % 10 < 1) for i in range(2000)]
    >>> any(rises), any(drops)  # learning that works is no drift; a collapse is
    (False, True)
    """

    def __init__(self, window: int = 1000, delta: float = 0.002):
        self.rolling = utils.Rolling(stats.Mean, window_size=window)
        # imported here: river.drift's package imports its datasets, and with them scikit-learn and
        # scipy.stats (~1 s), which a process that never builds an engine (a refusal before the
        # broker's check, `recsys search`, a popularity replay) need not pay
        from river.drift import ADWIN

        self.adwin = ADWIN(delta=delta)
        self.n = 0
        self.changes = 0  # any change ADWIN saw
        self.drifts = 0  # drops in the hit rate

    def update(self, hit: bool | int) -> bool:
        """Add one outcome; True when ADWIN detects that the hit rate DROPPED.

        ADWIN flags any change of the mean; a rise is what learning is for, so only a drop
        (the estimate after the cut below the one before it) counts as drift to react to.
        """
        self.n += 1
        self.rolling.update(float(hit))
        before = self.adwin.estimation
        self.adwin.update(float(hit))
        if self.adwin.drift_detected:
            self.changes += 1
            if self.adwin.estimation < before:
                self.drifts += 1
                return True
        return False

    @property
    def hit_rate(self) -> float:
        return float(self.rolling.get() or 0.0)


def learn_from_next_item(reranker: PairwiseReranker, monitor: QualityMonitor, cache: ShownCache, user_id: str,
                         item_id: str, top_k: int, record: Callable[[np.ndarray], None] | None = None) -> bool:
    """Teach the re-ranker with the item a user engaged with next, against the list they were
    last shown (``cache`` holds it; it must be there); that list then teaches nothing more.
    With ``record`` (shards sharing the models, issue 11) the step's rows
    (:meth:`PairwiseReranker.sample_pair`) go to ``record`` instead of being learned here. Returns whether the monitor detected a drop in the hit rate.

    A drop is counted (dashboards), and nothing else: resetting the re-ranker to the hand-set
    blend on each detected drop cost REES46 leave-last-out Recall@10 0.142 -> 0.126 and left
    DIGINETICA's (8 drops) almost untrained, and the head's 5x learning-rate boost after a drop
    cost REES46 as much again; both learners keep adapting at their constant rates anyway.
    """
    shown = cache.get(user_id)
    position = shown.position(item_id)
    if record is None:
        reranker.learn(shown.features, position)
    elif (rows := reranker.sample_pair(shown.features, position)) is not None:
        record(rows)  # shared models (issue 11): learned when the exchange log comes back
    drop = monitor.update(position is not None and position < top_k)
    cache.put(user_id, Shown((), shown.features[:0], ()))  # learned once
    return drop
