"""The learned head: a small adaptor over FROZEN item vectors, trained online in micro-batches.

UniSRec-style: item text is embedded once elsewhere; the head only learns how a shopper's
recent history maps to what they engage with next. Items are never re-embedded and the
faiss index is never rebuilt, because the item side is linear:

- user tower: per history item ``x_j = e_j + type_emb[type_j]``, attention
  ``a = softmax(w_pos[rank] + w_type[type] - softplus(tau) * log1p(age_h))``,
  ``h = sum_j a_j x_j``, ``u = A h / |A h|``;
- item tower: ``B e`` with ``B`` linear, so ``score(u, i) = <u, B e_i> = <B^T u, e_i>`` and
  :meth:`Head.query_vectors` hands the caller ``B^T u`` to search the frozen index with.

``A`` and ``B`` start at the identity, ``type_emb``, ``w_pos`` and ``w_type`` at zero and
``softplus(tau)`` at ``HeadConfig.recency_power``, so an untrained head is the content model
"nearest items to the recency-weighted mean of the history", weights ``(1 + age_h) ** -p``.

Training (:meth:`Head.learn`): sampled softmax over the batch's positives plus ``n_neg``
negatives drawn from the popularity of past positives (``count ** pop_alpha``), every logit
corrected by ``-log Q`` of its item, each example weighted by
:data:`recsys.feedback.EVENT_WEIGHTS` of its event type (search: skipped); Adam with gradient
clipping; at most ``max_steps_per_call`` optimizer steps per call (a bounded cost per batch).
Deterministic for a seed: parameters start at fixed values and the only randomness is the
head's own numpy Generator, saved with the rest of its state.

Shapes: a history is ``[(item_id, event_type, ts_ms), ...]`` most recent last (as in
:class:`recsys.store.users.UserState`); ``vectors(ids) -> (len(ids), dim)`` float32 comes from
the caller (e.g. :meth:`recsys.items.catalog.VectorIndex.vectors`) and must know every id in the
histories and candidates passed in (the head does not filter; ``VectorIndex`` raises KeyError).

>>> vecs = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.6, 0.8]}
>>> head = Head(HeadConfig(dim=2, batch_size=4, n_neg=4), lambda ids: np.array([vecs[i] for i in ids], np.float32))
>>> head.query_vectors([[("a", "click", 0)], []], now_ts=[3_600_000, 0]).round(3).tolist()
[[1.0, 0.0], [0.0, 0.0]]
>>> stats = head.learn([Example([("a", "click", 0)], "b", "purchase", 60_000)])
>>> stats["steps"], stats["examples"], head.version
(1, 1, 'head-1')
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.events import Event
from recsys.feedback import EVENT_WEIGHTS, MS_PER_HOUR
from recsys.items.catalog import VectorIndex

__all__ = ["HeadConfig", "Example", "Head", "HeadOnly"]

History = Sequence[tuple[str, str, int]]
VectorFn = Callable[[list[str]], np.ndarray]

_TYPES = tuple(EVENT_WEIGHTS)  # browse, click, add_to_cart, purchase, search
_TYPE_INDEX = {t: i for i, t in enumerate(_TYPES)}
_OTHER_TYPE = len(_TYPES)  # unknown event types (and padding) share the last slot
_STATE_FORMAT = 1
# Masked attention logits: far below any real one, yet finite so empty rows give 0, not NaN.
_MASKED = -1e9


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters; ``recency_power``: the untrained head weighs history by ``(1 + age_h) ** -p``."""

    dim: int = 384
    history_len: int = 20
    batch_size: int = 256
    n_neg: int = 256
    lr: float = 1e-3
    max_steps_per_call: int = 4
    temperature: float = 0.05
    seed: int = 0
    clip_norm: float = 1.0
    pop_alpha: float = 0.75
    recency_power: float = 1.0

    def __post_init__(self) -> None:
        for name in ("dim", "history_len", "batch_size", "max_steps_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_neg < 0:
            raise ValueError(f"HeadConfig.n_neg must be >= 0, got {self.n_neg}")
        for name in ("lr", "temperature", "clip_norm", "recency_power"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HeadConfig.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class Example:
    """One engagement to learn: the user's history before it, the item, its event type and time."""

    history: list[tuple[str, str, int]]
    target: str
    target_type: str
    ts: int


class _Towers(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.type_emb = nn.Parameter(torch.zeros(_OTHER_TYPE + 1, d))
        self.w_type = nn.Parameter(torch.zeros(_OTHER_TYPE + 1))
        self.w_pos = nn.Parameter(torch.zeros(cfg.history_len))
        # softplus(tau) = recency_power: tau = log(exp(p) - 1)
        self.tau = nn.Parameter(torch.tensor(math.log(math.expm1(cfg.recency_power)), dtype=torch.float32))
        self.A = nn.Parameter(torch.eye(d))
        self.B = nn.Parameter(torch.eye(d))

    def query(self, e: torch.Tensor, types: torch.Tensor, rank: torch.Tensor, age_h: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
        """``(m, L, d)`` history vectors and ``(m, L)`` features -> ``(m, d)`` rows ``B^T u``."""
        logit = self.w_pos[rank] + self.w_type[types] - F.softplus(self.tau) * torch.log1p(age_h)
        a = torch.softmax(logit.masked_fill(~mask, _MASKED), dim=1) * mask  # empty history: all 0
        # sum_j a_j (e_j + type_emb[type_j]) without materialising (m, L, d) type embeddings:
        # the type part is (attention mass per type) @ type_emb, far cheaper forward and backward
        mass = torch.zeros(a.shape[0], self.type_emb.shape[0]).scatter_add_(1, types, a)
        h = torch.bmm(a.unsqueeze(1), e).squeeze(1) + mass @ self.type_emb
        u = F.normalize(h @ self.A.T, dim=1)  # A h, unit length (zero stays zero)
        return u @ self.B  # row form of B^T u


class Head:
    """The learned head; see the module docstring. One caller's thread at a time; the steps of
    ``learn(..., background=True)`` run on the head's own thread (see :meth:`learn`)."""

    def __init__(self, config: HeadConfig, vectors: VectorFn) -> None:
        self.config = config
        self._vectors = vectors
        self._towers = _Towers(config)  # the parameters learned
        self._opt = torch.optim.Adam(self._towers.parameters(), lr=config.lr)
        self._rng = np.random.default_rng(config.seed)
        self.n_updates = 0  # optimizer steps taken (a background one counts once it has run)
        # the parameters queries and scores read: the learned ones, or, once steps have run in the
        # background, a copy that :meth:`publish` brings up to date (each later ``learn`` first)
        self._served = self._towers
        self._served_updates = 0
        # steps to serve from the next read on (:meth:`serve_at_next_read`): None, or the count of
        # optimizer steps the learned parameters hold once the steps in flight have run
        self._due: int | None = None
        self._pop_index: dict[str, int] = {}
        self._pop_ids: list[str] = []
        self._pop_counts = np.zeros(1024, dtype=np.float64)
        self._pop_q = np.zeros(0, dtype=np.float64)  # sampling probabilities, with the CDF below
        self._pop_cdf: np.ndarray | None = None  # cached sampling CDF; None after counts change
        self._steps: ThreadPoolExecutor | None = None  # one thread for background steps, made on first use
        self._in_flight: Future | None = None  # the background steps not yet waited for
        self._learned_after = 0  # n_updates once it has run (set when it starts: the thread moves n_updates)

    @property
    def version(self) -> str:
        """``"head-<optimizer steps in the parameters served>"``: changes exactly when they do
        (steps due at the next read count as served: any read serves them first)."""
        return f"head-{self._served_updates if self._due is None else self._due}"

    def wait(self) -> None:
        """Return once no step is in flight (re-raising what a background step raised). What
        queries read does not change: that is :meth:`learn`'s (or :meth:`publish`'s) to do."""
        job = self._in_flight
        if job is not None:
            try:
                job.result()
            finally:
                if self._in_flight is job:
                    self._in_flight = None

    def publish(self) -> None:
        """Wait for the steps in flight and serve every step taken so far (a step that failed
        raises here, and the parameters served stay as they were)."""
        self._due = None
        self.wait()
        if self._served is not self._towers and self._served_updates != self.n_updates:
            with torch.no_grad():
                for served, learned in zip(self._served.parameters(), self._towers.parameters()):
                    served.copy_(learned)
        self._served_updates = self.n_updates

    def serve_at_next_read(self) -> None:
        """Serve every step taken so far, as :meth:`publish` does, but wait for the steps in
        flight only at the next read (a query, a score, or the next :meth:`learn`): to anyone
        reading, the same parameters from now on (and :attr:`version` says so at once), while
        the steps go on overlapping whatever the caller does before that read. In a replay the
        engine serves a step at the end of the batch that started it, and the next batch reads
        the head only once it ranks (until 2026-12-05's thirty-first session the wait was at the
        end of the batch)."""
        self._due = self._learned_after if self._in_flight is not None else self.n_updates

    def _serving(self) -> _Towers:
        """The parameters a read uses: the served copy, brought up to date if steps are due."""
        if self._due is not None:
            self.publish()
        return self._served

    def close(self) -> None:
        """Wait for a step in flight and stop the background thread (a later background step starts another)."""
        try:
            self.wait()
        finally:
            if self._steps is not None:
                self._steps.shutdown(wait=True)
                self._steps = None

    # ------------------------------------------------------------------ features

    def _features(self, histories: Sequence[History], now_ts: Sequence[int], extra_ids: Sequence[str] = ()):
        """Padded ``(m, L)`` feature tensors plus one ``vectors`` call for every id needed.

        Returns ``(mat, idx, types, rank, age_h, mask, pos)``: ``mat`` is ``(U + 1, d)`` with a
        zero last row for padding, ``idx`` indexes it, ``pos`` maps id -> row.
        """
        m, L = len(histories), self.config.history_len
        if len(now_ts) != m:
            raise ValueError(f"{len(now_ts)} now_ts for {len(histories)} histories")
        recent = [h[-L:] for h in histories]
        lengths = np.fromiter(map(len, recent), dtype=np.int64, count=m)
        flat = [entry for h in recent for entry in h]
        unique = dict.fromkeys(entry[0] for entry in flat)
        unique.update(dict.fromkeys(extra_ids))
        pos = {item_id: i for i, item_id in enumerate(unique)}
        # scatter the flat entries into (m, L): row r holds its entries oldest first from column 0
        rows = np.repeat(np.arange(m), lengths)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        idx = np.full((m, L), len(pos), dtype=np.int64)  # padding -> the zero row
        types = np.full((m, L), _OTHER_TYPE, dtype=np.int64)
        rank = np.zeros((m, L), dtype=np.int64)
        age_h = np.zeros((m, L), dtype=np.float32)
        mask = np.zeros((m, L), dtype=bool)
        if flat:
            idx[rows, cols] = [pos[entry[0]] for entry in flat]
            types[rows, cols] = [_TYPE_INDEX.get(entry[1], _OTHER_TYPE) for entry in flat]
            rank[rows, cols] = lengths[rows] - 1 - cols
            ts = np.fromiter((entry[2] for entry in flat), dtype=np.int64, count=len(flat))
            now = np.asarray(now_ts, dtype=np.int64)[rows]
            age_h[rows, cols] = np.maximum(now - ts, 0) / MS_PER_HOUR
            mask[rows, cols] = True
        mat = np.zeros((len(pos) + 1, self.config.dim), dtype=np.float32)
        if pos:
            got = np.asarray(self._vectors(list(pos)), dtype=np.float32)
            if got.shape != (len(pos), self.config.dim):
                raise ValueError(f"vectors() returned shape {got.shape}, expected {(len(pos), self.config.dim)}")
            mat[: len(pos)] = got
        t = torch.from_numpy
        return t(mat), t(idx), t(types), t(rank), t(age_h), t(mask), pos

    @staticmethod
    def _query(towers: _Towers, mat, idx, types, rank, age_h, mask) -> torch.Tensor:
        # F.embedding: the same gather as mat[idx], ~10x faster than advanced indexing on CPU
        return towers.query(F.embedding(idx, mat), types, rank, age_h, mask)

    # ------------------------------------------------------------------ serving

    def query_vectors(self, histories: Sequence[History], now_ts: Sequence[int]) -> np.ndarray:
        """``(m, dim)`` float32 queries ``B^T u`` for the frozen index (rank by inner product).

        An empty history gives a zero row (``VectorIndex.search`` returns ``[]`` for it).
        """
        if not histories:
            return np.zeros((0, self.config.dim), dtype=np.float32)
        mat, idx, types, rank, age_h, mask, _ = self._features(histories, now_ts)
        with torch.no_grad():
            return self._query(self._serving(), mat, idx, types, rank, age_h, mask).numpy().astype(np.float32, copy=False)

    def score(self, histories: Sequence[History], now_ts: Sequence[int],
              candidate_ids: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Per user, ``<u, B e_c>`` for each of their candidates (float32, in the given order)."""
        if len(candidate_ids) != len(histories):
            raise ValueError(f"{len(candidate_ids)} candidate lists for {len(histories)} histories")
        if not histories:
            return []
        extra = [c for cands in candidate_ids for c in cands]
        mat, idx, types, rank, age_h, mask, pos = self._features(histories, now_ts, extra)
        with torch.no_grad():
            q = self._query(self._serving(), mat, idx, types, rank, age_h, mask).numpy()
        m = mat.numpy()
        return [m[[pos[c] for c in cands]] @ q[r] if len(cands) else np.zeros(0, np.float32)
                for r, cands in enumerate(candidate_ids)]

    # ------------------------------------------------------------------ learning

    def _count_positives(self, targets: list[str]) -> None:
        for item_id in targets:
            i = self._pop_index.get(item_id)
            if i is None:
                i = self._pop_index[item_id] = len(self._pop_ids)
                self._pop_ids.append(item_id)
                if i == len(self._pop_counts):
                    self._pop_counts = np.concatenate([self._pop_counts, np.zeros(i)])
            self._pop_counts[i] += 1.0
        self._pop_cdf = None

    def _sampling_cdf(self) -> np.ndarray:
        if self._pop_cdf is None:
            p = self._pop_counts[: len(self._pop_ids)] ** self.config.pop_alpha
            self._pop_q = p / p.sum()
            self._pop_cdf = np.cumsum(self._pop_q)
        return self._pop_cdf

    def learn(self, examples: Sequence[Example], *, background: bool = False) -> dict[str, Any]:
        """One bounded round of training; returns ``{"steps", "loss" (mean, None if no step), "examples"}``.

        Examples of weight 0 (search) are skipped; the others count toward the popularity that
        negatives are drawn from. Those with a history are trained on in the given order, in
        micro-batches of ``batch_size``; beyond ``max_steps_per_call * batch_size`` of them a
        deterministic random subset (kept in order) is used. Inputs are not modified.

        Every call first serves the steps of the calls before it (:meth:`publish`). With
        ``background`` the steps' inputs (negatives, vectors, padded tensors) are made here and
        the steps themselves (forward, backward, Adam: ~2/3 of a step's time, in torch, which
        lets go of the interpreter) run on this head's own thread, and ``loss`` is None; queries
        and scores read the parameters as they were before them until the next call (or
        :meth:`publish`). What is served therefore changes at the same calls however long the
        thread takes, and the learned parameters are bit for bit those of steps run inline.
        """
        self.publish()
        cfg = self.config
        weighted = [ex for ex in examples if EVENT_WEIGHTS.get(ex.target_type, 0.0) > 0]
        if weighted:
            self._count_positives([ex.target for ex in weighted])
        train = [ex for ex in weighted if ex.history]
        cap = cfg.max_steps_per_call * cfg.batch_size
        if len(train) > cap:
            keep = np.sort(self._rng.choice(len(train), size=cap, replace=False))
            train = [train[i] for i in keep.tolist()]
        inputs = [self._step_inputs(train[lo : lo + cfg.batch_size]) for lo in range(0, len(train), cfg.batch_size)]
        if background and inputs:
            if self._steps is None:
                self._steps = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head-step")
            if self._served is self._towers:  # from now on the thread changes the learned copy only
                self._served = copy.deepcopy(self._towers)
            self._learned_after = self.n_updates + len(inputs)
            self._in_flight = self._steps.submit(self._run_steps, inputs)
            return {"steps": len(inputs), "loss": None, "examples": len(train)}
        losses = self._run_steps(inputs)
        self.publish()
        return {"steps": len(losses), "loss": float(np.mean(losses)) if losses else None, "examples": len(train)}

    def _step_inputs(self, batch: list[Example]) -> tuple:
        """Everything one optimizer step needs that is not a parameter: the negatives (this
        head's generator), the vectors (the caller's ``vectors``, read here, on the caller's
        thread) and the padded tensors."""
        cfg = self.config
        cdf = self._sampling_cdf()
        draws = np.searchsorted(cdf, self._rng.random(cfg.n_neg) * cdf[-1], side="right")
        negatives = [self._pop_ids[i] for i in np.minimum(draws, len(cdf) - 1).tolist()]
        candidates = list(dict.fromkeys([ex.target for ex in batch] + negatives))  # unique: no accidental hits
        mat, idx, types, rank, age_h, mask, pos = self._features(
            [ex.history for ex in batch], [ex.ts for ex in batch], candidates
        )
        cand_rows = torch.tensor([pos[c] for c in candidates])
        log_q = torch.from_numpy(np.log(self._pop_q[[self._pop_index[c] for c in candidates]]).astype(np.float32))
        cand_at = {c: j for j, c in enumerate(candidates)}
        labels = torch.tensor([cand_at[ex.target] for ex in batch])
        weights = torch.tensor([EVENT_WEIGHTS[ex.target_type] for ex in batch], dtype=torch.float32)
        return mat, idx, types, rank, age_h, mask, cand_rows, log_q, labels, weights

    def _run_steps(self, inputs: list[tuple]) -> list[float]:
        return [self._step(*step) for step in inputs]

    def _step(self, mat, idx, types, rank, age_h, mask, cand_rows, log_q, labels, weights) -> float:
        q = self._query(self._towers, mat, idx, types, rank, age_h, mask)
        logits = q @ mat.index_select(0, cand_rows).T / self.config.temperature - log_q
        loss = (F.cross_entropy(logits, labels, reduction="none") * weights).sum() / weights.sum()
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self._towers.parameters(), self.config.clip_norm)
        self._opt.step()
        self.n_updates += 1
        return float(loss.detach())

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """A deep copy of everything that determines future scores and learning."""
        self.wait()
        n = len(self._pop_ids)
        return {
            "format": _STATE_FORMAT,
            "config": asdict(self.config),
            "model": {k: v.detach().clone() for k, v in self._towers.state_dict().items()},
            "optimizer": copy.deepcopy(self._opt.state_dict()),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "pop_ids": list(self._pop_ids),
            "pop_counts": torch.from_numpy(self._pop_counts[:n].copy()),
            "n_updates": self.n_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the config must equal this head's."""
        self.wait()
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown head state format {state.get('format')!r}")
        if state["config"] != asdict(self.config):
            raise ValueError(f"head state has config {state['config']}, this head has {asdict(self.config)}")
        self._towers.load_state_dict(state["model"])
        self._served = self._towers
        self._due = None
        self._opt.load_state_dict(copy.deepcopy(state["optimizer"]))
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self._pop_ids = list(state["pop_ids"])
        self._pop_index = {item_id: i for i, item_id in enumerate(self._pop_ids)}
        counts = np.asarray(state["pop_counts"], dtype=np.float64)
        self._pop_counts = np.zeros(max(1024, 2 * len(counts)), dtype=np.float64)
        self._pop_counts[: len(counts)] = counts
        self._pop_cdf = None
        self.n_updates = self._served_updates = int(state["n_updates"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(self.state_dict(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str], vectors: VectorFn) -> "Head":
        """A head restored from :meth:`save` output (plain tensors and builtins only: ``weights_only``)."""
        state = torch.load(path, weights_only=True)
        head = cls(HeadConfig(**state["config"]), vectors)
        head.load_state_dict(state)
        return head


class HeadOnly:
    """:class:`recsys.backtest.protocols.BacktestModel` adapter: the head's queries searched over a frozen index.

    ``index`` is an :class:`~recsys.items.catalog.VectorIndex` (or anything with ``vectors``, ``search``
    and ``in``) and also feeds the head its vectors. Each user keeps their last
    ``history_len`` events with an indexed item; ``learn`` turns every such event into an
    :class:`Example` (history before it) and trains once per call. Purchased items are
    excluded unless in ``repeat_items``; users without history get all-time popularity.
    """

    def __init__(self, head: Head, index: VectorIndex, *, repeat_items: Collection[str] = (), name: str = "head") -> None:
        self.name = name
        self.head = head
        self.index = index
        self.repeat_items = frozenset(repeat_items)
        self.last_stats: dict[str, Any] = {}
        self._history: dict[str, list[tuple[str, str, int]]] = {}
        self._purchased: dict[str, set[str]] = {}
        self._counts: dict[str, int] = {}  # insertion order = first sight: popularity ties
        self._popular: list[str] | None = None

    def learn(self, events: Sequence[Event]) -> None:
        L = self.head.config.history_len
        examples = []
        for ev in events:
            if ev.item_id is None or ev.item_id not in self.index:
                continue
            self._counts[ev.item_id] = self._counts.get(ev.item_id, 0) + 1
            if ev.type == "purchase" and ev.item_id not in self.repeat_items:
                self._purchased.setdefault(ev.user_id, set()).add(ev.item_id)
            hist = self._history.setdefault(ev.user_id, [])
            examples.append(Example(list(hist), ev.item_id, ev.type, ev.ts))
            hist.append((ev.item_id, ev.type, ev.ts))
            del hist[:-L]
        self._popular = None
        self.last_stats = self.head.learn(examples)

    def recommend(self, user_ids: list[str], k: int, now_ts: int) -> list[list[str]]:
        if not user_ids:
            return []
        excluded = [self._purchased.get(u, set()) for u in user_ids]
        queries = self.head.query_vectors([self._history.get(u, []) for u in user_ids], [now_ts] * len(user_ids))
        found = self.index.search(queries, k, exclude=excluded)
        out = []
        for hits, excl in zip(found, excluded):
            ranked = [item_id for item_id, _ in hits]
            if len(ranked) < k:
                if self._popular is None:
                    self._popular = sorted(self._counts, key=lambda i: -self._counts[i])  # stable: first seen wins
                taken = set(ranked)
                for item_id in self._popular:
                    if item_id not in excl and item_id not in taken:
                        ranked.append(item_id)
                        if len(ranked) == k:
                            break
            out.append(ranked)
        return out

    def __repr__(self) -> str:
        return f"HeadOnly(name={self.name!r}, version={self.head.version!r})"
