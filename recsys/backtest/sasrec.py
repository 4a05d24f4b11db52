"""SASRec (Kang & McAuley 2018) in torch: a small self-attentive next-item model, CPU-sized.

Trained in batch like :class:`recsys.backtest.trained_baselines.BPRMFBaseline` (leave-last-out: once, on
the training part; prequential: from everything seen so far every ``retrain_every_h`` of
event time, warm-started). Each user's items (consecutive repeats collapsed) form a sequence;
windows of ``max_len`` predict every next item, with the original paper's binary
cross-entropy against one uniformly sampled negative per position. Item embeddings are
learned ids (the standard model; the full system's frozen text vectors are not used).
A user is ranked by the last position's output against every item trained so far; a user
with no trained item in their sequence falls back to popularity.

Trained weights are cached in ``cache_dir`` per ``cache_key`` (name the log, split and seed),
the configuration and the number of events trained on, so a re-run loads instead of training.

>>> from recsys.events import Event
>>> evs = [Event(str(i), "click", f"u{i // 3}", "abc"[i % 3], i) for i in range(60)]
>>> evs += [Event("x", "click", "me", "a", 60), Event("y", "click", "me", "b", 61)]
>>> m = SASRecBaseline(dim=16, epochs=20, max_len=4, batch_size=4, lr=1e-2, seed=0); m.learn(evs)
>>> m.recommend(["me"], k=1, now_ts=62)  # everyone went a, b, c; popularity would say a or b
[['c']]
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np

from recsys.backtest.baselines import _top_indices
from recsys.backtest.trained_baselines import PeriodicallyTrained

__all__ = ["SASRecBaseline"]


def _net(n_items: int, dim: int, max_len: int, blocks: int, heads: int, dropout: float):
    import torch
    from torch import nn

    class SASRec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)  # row 0: padding
            self.pos = nn.Embedding(max_len, dim)
            layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim, dropout=dropout,
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.drop = nn.Dropout(dropout)
            # small initial embeddings: N(0, 1) rows scaled by sqrt(dim) saturate the logits
            # (a 64-d dot product of std 64) and nothing is learned in a few hundred steps
            nn.init.normal_(self.item.weight, std=dim**-0.5 / 4)
            nn.init.normal_(self.pos.weight, std=0.02)
            with torch.no_grad():
                self.item.weight[0].zero_()
            self.register_buffer("causal", torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), 1))

        def forward(self, seq):  # (B, L) item ids, 0 = padding, left-padded
            n = seq.shape[1]
            pad = seq == 0
            h = self.drop(self.item(seq) * dim**0.5 + self.pos(torch.arange(n)))
            # causal, padding keys masked; every position may see itself (no all-masked row: NaN)
            mask = (self.causal[:n, :n].unsqueeze(0) | pad.unsqueeze(1)) & ~torch.eye(n, dtype=torch.bool)
            h = self.encoder(h * ~pad.unsqueeze(-1), mask=mask.repeat_interleave(heads, 0))
            return self.norm(h) * ~pad.unsqueeze(-1)

    return SASRec()


class SASRecBaseline(PeriodicallyTrained):
    """Self-attentive sequential recommendation; see the module doc."""

    def __init__(self, dim: int = 64, *, max_len: int = 50, blocks: int = 2, heads: int = 1, dropout: float = 0.2,
                 epochs: int = 20, batch_size: int = 128, lr: float = 5e-3, retrain_every_h: float | None = None,
                 seed: int = 0, cache_dir: str | None = None, cache_key: str | None = None,
                 repeat_items: Collection[str] = (), fill_half_life_h: float | None = 24.0,
                 name: str = "sasrec") -> None:
        super().__init__(retrain_every_h=retrain_every_h, name=name, repeat_items=repeat_items,
                         fill_half_life_h=fill_half_life_h)
        self.dim, self.max_len, self.blocks, self.heads, self.dropout = dim, max_len, blocks, heads, dropout
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed
        self.cache_dir = Path(cache_dir) if cache_dir and cache_key else None
        self.cache_key = cache_key
        self._seqs: dict[int, list[int]] = {}  # user row -> item ids + 1, consecutive repeats collapsed
        self._net = None
        self._n_trained_items = 0
        self.train_seconds = 0.0

    def _learn_one(self, ev, idx: int) -> None:
        super()._learn_one(ev, idx)
        seq = self._seqs.setdefault(self._log[-1][0], [])
        if not seq or seq[-1] != idx + 1:
            seq.append(idx + 1)

    def _windows(self) -> np.ndarray:
        """Every user's sequence cut into windows of ``max_len + 1`` (left-padded with 0)."""
        rows = []
        for seq in self._seqs.values():
            if len(seq) < 2:
                continue
            for end in range(len(seq), 1, -self.max_len):
                w = seq[max(0, end - self.max_len - 1) : end]
                rows.append([0] * (self.max_len + 1 - len(w)) + w)
        return np.asarray(rows, dtype=np.int64).reshape(-1, self.max_len + 1)

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        config = f"{self.dim}-{self.max_len}-{self.blocks}-{self.heads}-{self.dropout}-{self.epochs}-{self.batch_size}-{self.lr}-{self.seed}"
        digest = hashlib.sha1(f"{self.cache_key}|{config}|{len(self._log)}".encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.cache_key}-{len(self._log)}-{digest}.pt"

    def _train(self) -> None:
        import torch

        n_items = len(self._items)
        old = self._net
        torch.manual_seed(self.seed + self.trainings)
        self._net = _net(n_items, self.dim, self.max_len, self.blocks, self.heads, self.dropout)
        if old is not None:  # warm start: keep what was learned, new items start fresh
            state = old.state_dict()
            fresh = self._net.state_dict()
            fresh["item.weight"][: state["item.weight"].shape[0]] = state["item.weight"]
            state["item.weight"] = fresh["item.weight"]
            self._net.load_state_dict(state)
        self._n_trained_items = n_items
        path = self._cache_path()
        if path is not None and path.exists():
            self._net.load_state_dict(torch.load(path, weights_only=True))
            self._net.eval()
            return
        start = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small matrices: a second thread only adds synchronisation
        windows = self._windows()
        if len(windows):
            rng = np.random.default_rng(self.seed + self.trainings)
            opt = torch.optim.Adam(self._net.parameters(), lr=self.lr, betas=(0.9, 0.98))
            self._net.train()
            for _ in range(self.epochs):
                data = torch.from_numpy(windows[rng.permutation(len(windows))])
                for lo in range(0, len(windows), self.batch_size):
                    batch = data[lo : lo + self.batch_size]
                    inp, pos = batch[:, :-1], batch[:, 1:]
                    neg = torch.from_numpy(rng.integers(1, n_items + 1, size=tuple(pos.shape)))
                    h = self._net(inp)
                    pos_logit = (h * self._net.item(pos)).sum(-1)
                    neg_logit = (h * self._net.item(neg)).sum(-1)
                    mask = (pos > 0).float()
                    loss = (torch.nn.functional.softplus(-pos_logit) + torch.nn.functional.softplus(neg_logit))
                    loss = (loss * mask).sum() / mask.sum().clamp(min=1)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        torch.set_num_threads(threads)
        self._net.eval()
        self.train_seconds += time.perf_counter() - start
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(self._net.state_dict(), tmp)
            tmp.replace(path)

    def _trained_user(self, user_id: str) -> int | None:
        if self._net is None:
            return None
        row = self._users.pos.get(user_id)
        if row is None or not any(0 < i <= self._n_trained_items for i in self._seqs.get(row, ())):
            return None
        return row

    def _scores(self, users: list[int], m: int) -> list[list[int]]:
        import torch

        seqs = []
        for u in users:
            s = [i if i <= self._n_trained_items else 0 for i in self._seqs[u]][-self.max_len :]
            seqs.append([0] * (self.max_len - len(s)) + s)
        out = []
        with torch.no_grad():
            items = self._net.item.weight[1 : self._n_trained_items + 1]
            for lo in range(0, len(seqs), 256):
                h = self._net(torch.tensor(seqs[lo : lo + 256]))[:, -1]
                scores = (h @ items.T).numpy().astype(np.float64)
                out += [_top_indices(row, m).tolist() for row in scores]
        return out
