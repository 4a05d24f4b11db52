"""river in the loop: an online re-ranker learned from what users did next, and a quality monitor.

**Blend.** Each candidate of a recommendation carries a small vector of signals (see
:data:`FEATURES`). The score is the hand-set blend (``base``) plus the logit of a river
``LogisticRegression`` that learns, event by event, which signals predict the item a user
engages with next: when a user acts, the candidates we last showed them become one positive
(the engaged item, if it was among them) and up to ``n_negatives`` negatives (the best-ranked
others). Before it has seen ``min_examples`` examples the learned part is off, so a new system
ranks exactly by the hand-set blend. Scoring reads the model's weights into numpy, so a whole
candidate matrix is scored at once.

**Monitor.** Hit@k of the last shown list against the next event feeds a rolling mean (for
dashboards) and an ADWIN drift detector; on drift the blend forgets what it learned (behaviour
changed, so old evidence misleads) and the engine is told, so other learners can react.

>>> blend = Blend(min_examples=1)
>>> x = np.array([[1.0, 0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0, 0]], dtype=np.float32)
>>> blend.learned(x).tolist()  # nothing learned yet
[0.0, 0.0]
>>> for _ in range(50):
...     _ = blend.learn(x, positive=1)
>>> s = blend.learned(x); bool(s[1] > s[0])  # co-visitation predicted the next item
True
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from river import drift, linear_model, optim, stats, utils

#: Signals per candidate, in column order.
FEATURES = ("content", "covisit", "trending", "seen", "category", "head", "next")


class Blend:
    """Online logistic re-ranker over candidate signals (river), added to the hand-set blend."""

    def __init__(self, *, lr: float = 0.02, l2: float = 1e-4, n_negatives: int = 3, min_examples: int = 500):
        self.lr = lr
        self.l2 = l2
        self.n_negatives = n_negatives
        self.min_examples = min_examples
        self.reset()

    def reset(self) -> None:
        self.model = linear_model.LogisticRegression(optimizer=optim.SGD(self.lr), l2=self.l2)
        self.examples = 0
        self._w: np.ndarray | None = None  # cached weights, refreshed after learning

    def _weights(self) -> tuple[np.ndarray, float]:
        if self._w is None:
            w = self.model.weights
            self._w = np.array([w.get(name, 0.0) for name in FEATURES] + [self.model.intercept], dtype=np.float32)
        return self._w[:-1], float(self._w[-1])

    @property
    def active(self) -> bool:
        """Whether the learned part is on (enough examples seen since the last reset)."""
        return self.examples >= self.min_examples

    def weights(self) -> np.ndarray:
        """Learned weight per signal, in FEATURES order."""
        return self._weights()[0]

    def learned(self, x: np.ndarray) -> np.ndarray:
        """The learned logit per row of ``x`` (n, len(FEATURES)); zeros until warmed up."""
        if not self.active:
            return np.zeros(len(x), dtype=np.float32)
        w, b = self._weights()
        return x @ w + b

    def learn(self, x: np.ndarray, positive: int | None) -> int:
        """Learn from one shown list: row ``positive`` was engaged (None: none of them was).

        Rows are in shown order; negatives are the best-ranked rows other than the positive.
        Returns the number of examples learned.
        """
        n = 0
        if positive is not None:
            self.model.learn_one(dict(zip(FEATURES, x[positive].tolist())), True)
            n += 1
        for row in range(len(x)):
            if n >= self.n_negatives + (positive is not None):
                break
            if row != positive:
                self.model.learn_one(dict(zip(FEATURES, x[row].tolist())), False)
                n += 1
        self.examples += n
        self._w = None
        return n

    def state(self) -> dict:
        w, b = self._weights()
        return {"weights": dict(zip(FEATURES, w.tolist())), "intercept": b, "examples": self.examples}


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
        self._data: OrderedDict[str, Shown] = OrderedDict()

    def put(self, user_id: str, shown: Shown) -> None:
        self._data[user_id] = shown
        self._data.move_to_end(user_id)
        while len(self._data) > self.max_users:
            self._data.popitem(last=False)

    def get(self, user_id: str) -> Shown | None:
        return self._data.get(user_id)

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
        self.adwin = drift.ADWIN(delta=delta)
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
