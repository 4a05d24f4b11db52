"""Baselines trained in batch, as a shop would run them nightly: BPR-MF (numpy).

A batch-trained model does not learn per event. In leave-last-out it is trained once on
everything learned (the training part) when first asked to rank. In prequential it is
retrained from everything seen so far whenever event time enters a new ``retrain_every_h``
period (default one day: the nightly job), and ranks with the model of the last training in
between; users and items that arrived since are not in it (counted as fallback). Training
continues from the previous factors (warm start), ``epochs`` passes over all interactions.

>>> from recsys.events import Event
>>> evs = [Event(str(i), "click", f"u{i % 4}", f"i{(i % 4) // 2 * 2 + i % 2}", i) for i in range(40)]
>>> m = BPRMFBaseline(factors=4, epochs=30, seed=0); m.learn(evs)
>>> sorted(m.recommend(["u0"], k=2, now_ts=40)[0])  # u0 and u2 share i0, i1
['i0', 'i1']
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from recsys.backtest.baselines import _Baseline, _IdMap, _top_indices
from recsys.events import Event
from recsys.feedback import MS_PER_HOUR

__all__ = ["BPRMFBaseline", "PeriodicallyTrained"]



class PeriodicallyTrained(_Baseline):
    """Plumbing of batch-trained baselines: the interaction log, and when to (re)train.

    Subclasses implement ``_train()`` (from ``self._log``: ``(user index, item index, ts)``
    per learned event with an item, in order) and ``_scores(user_rows, m)``.
    """

    def __init__(self, *, retrain_every_h: float | None, name: str, repeat_items: Collection[str],
                 fill_half_life_h: float | None) -> None:
        super().__init__(name=name, repeat_items=repeat_items, fill_half_life_h=fill_half_life_h)
        if retrain_every_h is not None and retrain_every_h <= 0:
            raise ValueError(f"retrain_every_h must be > 0 or None, got {retrain_every_h}")
        self.period_ms = None if retrain_every_h is None else retrain_every_h * MS_PER_HOUR
        self._users = _IdMap()
        self._log: list[tuple[int, int, int]] = []
        self._trained_upto = 0  # len(self._log) at the last training
        self._trained_period: int | None = None
        self.trainings = 0

    def _learn_one(self, ev: Event, idx: int) -> None:
        self._log.append((self._users.add(ev.user_id), idx, ev.ts))

    def _maybe_train(self, now_ts: int) -> None:
        if self.period_ms is None:
            due = len(self._log) > self._trained_upto
        else:
            period = int(now_ts // self.period_ms)
            # the first ask only fixes the period: no job has run before the stream began
            due = self._trained_period is not None and period != self._trained_period and len(self._log) > self._trained_upto
            if due or self._trained_period is None:
                self._trained_period = period
        if due:
            self._train()
            self._trained_upto = len(self._log)
            self.trainings += 1

    def _train(self) -> None:
        raise NotImplementedError

    def _scores(self, users: list[int], m: int) -> list[list[int]]:
        raise NotImplementedError

    def _trained_user(self, user_id: str) -> int | None:
        """The user's row if the last training knew them, else None."""
        raise NotImplementedError

    def _candidates(self, user_ids: list[str], m: int, now_ts: int) -> list[list[int]]:
        self._maybe_train(now_ts)
        rows = [self._trained_user(u) for u in user_ids]
        known = [j for j, r in enumerate(rows) if r is not None]
        out: list[list[int]] = [[] for _ in user_ids]
        if known:
            for j, ranked in zip(known, self._scores([rows[j] for j in known], m)):  # type: ignore[misc]
                out[j] = ranked
        return out


class BPRMFBaseline(PeriodicallyTrained):
    """Matrix factorisation with the BPR pairwise loss (Rendle et al. 2009), numpy, seeded.

    Positives are the distinct (user, item) pairs learned; each SGD step takes a batch of
    positives and one uniformly drawn negative item per positive. Scores ``P_u . Q_i + b_i``.
    """

    def __init__(self, factors: int = 32, *, epochs: int = 20, lr: float = 0.05, reg: float = 0.0025,
                 batch_size: int = 1024, retrain_every_h: float | None = None, seed: int = 0,
                 repeat_items: Collection[str] = (), fill_half_life_h: float | None = 24.0,
                 name: str = "bpr_mf") -> None:
        super().__init__(retrain_every_h=retrain_every_h, name=name, repeat_items=repeat_items,
                         fill_half_life_h=fill_half_life_h)
        self.factors, self.epochs, self.lr, self.reg, self.batch_size = factors, epochs, lr, reg, batch_size
        self._rng = np.random.default_rng(seed)
        self.P = np.zeros((0, factors), dtype=np.float32)
        self.Q = np.zeros((0, factors), dtype=np.float32)
        self.b = np.zeros(0, dtype=np.float32)

    def _grow(self, a: np.ndarray, n: int) -> np.ndarray:
        if len(a) >= n:
            return a
        extra = (self._rng.normal(0.0, 0.1, size=(n - len(a),) + a.shape[1:])
                 if a.ndim == 2 else np.zeros(n - len(a)))
        return np.concatenate([a, extra.astype(np.float32)])

    def _train(self) -> None:
        log = np.asarray([(u, i) for u, i, _ in self._log], dtype=np.int64)
        pairs = np.unique(log, axis=0)
        n_users, n_items = len(self._users), len(self._items)
        self.P, self.Q, self.b = self._grow(self.P, n_users), self._grow(self.Q, n_items), self._grow(self.b, n_items)
        P, Q, b, lr, reg = self.P, self.Q, self.b, self.lr, self.reg
        for _ in range(self.epochs):
            order = self._rng.permutation(len(pairs))
            for lo in range(0, len(order), self.batch_size):
                u, i = pairs[order[lo : lo + self.batch_size]].T
                j = self._rng.integers(0, n_items, size=len(u))
                pu, qi, qj = P[u], Q[i], Q[j]
                x = np.einsum("nd,nd->n", pu, qi - qj) + b[i] - b[j]
                g = (1.0 / (1.0 + np.exp(np.clip(x, -30, 30)))).astype(np.float32)  # sigmoid(-x)
                np.add.at(P, u, lr * (g[:, None] * (qi - qj) - reg * pu))
                np.add.at(Q, i, lr * (g[:, None] * pu - reg * qi))
                np.add.at(Q, j, lr * (-g[:, None] * pu - reg * qj))
                np.add.at(b, i, lr * (g - reg * b[i]))
                np.add.at(b, j, lr * (-g - reg * b[j]))
        self._n_trained_users, self._n_trained_items = n_users, n_items

    def _trained_user(self, user_id: str) -> int | None:
        row = self._users.pos.get(user_id)
        return row if row is not None and row < getattr(self, "_n_trained_users", 0) else None

    def _scores(self, users: list[int], m: int) -> list[list[int]]:
        n_items = self._n_trained_items
        scores = self.P[users] @ self.Q[:n_items].T + self.b[:n_items]
        return [_top_indices(row.astype(np.float64), m).tolist() for row in scores]
