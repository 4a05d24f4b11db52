"""Candidate generation and ranking with reasons taken from the actual scoring.

Three candidate sources, scored together for a whole batch of users at once:

- **content**: the user's decayed interest vector against the faiss item index (one batched
  search for all users of a batch); reason ``similar to <history item>`` names the recent
  history item whose vector is closest to the candidate.
- **co-visitation**: neighbours of the user's most recent items, weighted by how recent the
  anchor item is; reason ``bought together with <item>`` / ``viewed together with <item>``.
- **trending**: time-decayed popularity, the whole answer for a user with no history.

Each source's scores are normalised to [0, 1] per user into a row of signals (plus whether the
user saw the item recently and whether it shares a category with their recent items); the score
is a hand-set blend of the signals plus what the online re-ranker (:mod:`recsys.blend`) learned
from what users did next, and the source with the largest contribution names the reason. Purchased items (unless the catalog
marks them ``repeat_purchase``) and unavailable items are never recommended.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.blend import FEATURES, Blend, Shown
from recsys.events import RecommendedItem
from recsys.head import Head
from recsys.items import ItemSpace
from recsys.signals import CoVisitation, Popularity
from recsys.state import UserState

MODEL_VERSION = "blend-v1"
N_FEATURES = len(FEATURES)


@dataclass(frozen=True)
class BlendWeights:
    """How much each normalised source counts before the re-ranker has learned anything.
    Co-visitation is the strongest single signal on session data (OTTO, session-kNN
    literature); content carries cold items and sparse users; trending starts level with
    content (grocery logs are popularity-driven; at 0.25 the re-ranker could not lift it
    fast enough: Complete Journey HR@10 0.026 vs 0.032 at 1.0 on 100k events, REES46 up too)."""

    content: float = 1.0
    covisit: float = 1.2
    trending: float = 1.0
    next: float = 1.0  # directed transitions: what people engaged with right after the last items


@dataclass(frozen=True)
class RecommenderConfig:
    k: int = 10
    content_candidates: int = 30
    covisit_anchors: int = 3  # most recent distinct history items used as co-visitation anchors
    covisit_per_anchor: int = 20
    trending_candidates: int = 20
    weights: BlendWeights = BlendWeights()


class Recommender:
    """Ranks items for many users at once. Pure reads: never changes state or signals.

    Shape: ``recommend([UserState, ...], now_ts) -> [[RecommendedItem, ...], ...]``.
    """

    def __init__(
        self,
        items: ItemSpace,
        popularity: Popularity,
        covisit: CoVisitation,
        config: RecommenderConfig,
        blend: Blend | None = None,
        head: Head | None = None,
        transitions: CoVisitation | None = None,
    ):
        self.items = items
        self.head = head
        self.transitions = transitions
        self.popularity = popularity
        self.covisit = covisit
        self.config = config
        self.blend = blend or Blend(min_examples=10**12)  # none given: the hand-set blend only
        w = config.weights
        self._base = np.array([w.content, w.covisit, w.trending, 0.0, 0.0, 0.0, w.next], dtype=np.float32)

    def excluded(self, state: UserState) -> set[str]:
        """Items this user must not be shown: purchased ones that are not repeat purchases."""
        out = set()
        for item_id in state.purchased:
            item = self.items.catalog.get(item_id)
            if item is None or not item.repeat_purchase:
                out.add(item_id)
        return out

    def recommend(
        self, states: list[UserState], now_ts: int, k: int | None = None, *, explain: bool = True
    ) -> list[list[RecommendedItem]]:
        """Top-``k`` items per user; ``explain=False`` (backtest scoring) skips the reason texts."""
        return [items for items, _ in self.rank(states, now_ts, k, explain=explain)]

    def rank(
        self, states: list[UserState], now_ts: int, k: int | None = None, *, explain: bool = True
    ) -> list[tuple[list[RecommendedItem], Shown]]:
        """Like :meth:`recommend`, with each list's signal rows (what the blend learns from)."""
        cfg = self.config
        k = k or cfg.k
        exclusions = [self.excluded(s) for s in states]
        # Trending is the same for everyone in a batch: filter it once.
        trending = [
            (item_id, pop)
            for item_id, pop in self.popularity.top(cfg.trending_candidates + k, now_ts)
            if self.items.recommendable(item_id)
        ]
        queries = self._queries(states, now_ts)
        content = self._content_candidates(queries, exclusions)
        return [
            self._rank_one(s, excl, hits, trending, k, explain, q)
            for s, excl, hits, q in zip(states, exclusions, content, queries)
        ]

    # ------------------------------------------------------------------ sources

    def _queries(self, states: list[UserState], now_ts: int) -> np.ndarray:
        """One query vector per user for the frozen index: the learned head's ``B^T A h`` when
        there is a head (retrieval follows learning without re-indexing), else the user's
        decayed interest vector. Zero rows for users with no history."""
        dim = self.items.index.dim
        if self.head is not None:
            return self.head.query_vectors([s.history for s in states], [now_ts] * len(states))
        q = np.zeros((len(states), dim), dtype=np.float32)
        for i, state in enumerate(states):
            if state.interest is not None:
                q[i] = state.interest
        return q

    def _content_candidates(self, queries: np.ndarray, exclusions: list[set[str]]) -> list[list[tuple[str, float]]]:
        out: list[list[tuple[str, float]]] = [[] for _ in range(len(queries))]
        rows = np.flatnonzero(np.abs(queries).sum(axis=1) > 0)
        if len(rows) == 0 or len(self.items.index) == 0:
            return out
        q = queries[rows].astype(np.float32, copy=True)
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        hits = self.items.search(q, self.config.content_candidates, exclude=[exclusions[i] for i in rows])
        for row, h in zip(rows.tolist(), hits):
            out[row] = h
        return out

    def _rank_one(
        self, state: UserState, excl: set[str], content_hits, trending, k: int, explain: bool, query: np.ndarray
    ) -> tuple[list[RecommendedItem], Shown]:
        """Score one user's candidates: signal rows, hand-set blend + learned logit, top ``k``."""
        recent = _recent_distinct(state.history, 10)
        # co-visitation: neighbours of the most recent items, anchors weighted by recency
        covisit: dict[str, list] = {}  # item -> [summed weight, strongest anchor's weight, anchor, anchor type]
        for rank, (anchor, anchor_type) in enumerate(recent[: self.config.covisit_anchors]):
            recency = 1.0 / (1 + rank)
            for item_id, weight, _count in self.covisit.neighbours(anchor, self.config.covisit_per_anchor):
                value = weight * recency
                entry = covisit.get(item_id)
                if entry is None:
                    covisit[item_id] = [value, value, anchor, anchor_type]
                else:
                    entry[0] += value
                    if value > entry[1]:
                        entry[1:] = [value, anchor, anchor_type]
        indexed = self.items.index  # holds exactly the recommendable items (unavailable ones are removed)
        cov_ids = [i for i in covisit if i not in excl and i in indexed]
        # transitions: what came right after the last two items (the last counts double)
        nxt: dict[str, float] = {}
        nxt_anchor: dict[str, str] = {}
        if self.transitions is not None:
            for weight_of_anchor, (anchor, _) in zip((1.0, 0.5), recent[:2]):
                for item_id, weight, _count in self.transitions.neighbours(anchor, self.config.covisit_per_anchor):
                    if item_id not in excl and item_id in indexed:
                        nxt[item_id] = nxt.get(item_id, 0.0) + weight * weight_of_anchor
                        nxt_anchor.setdefault(item_id, anchor)
        nxt_ids = list(nxt)
        tr_ids = [i for i, _ in trending if i not in excl]

        # the union of candidates, in a deterministic order: content, co-visitation, trending
        ids = list(dict.fromkeys([i for i, _ in content_hits] + cov_ids + nxt_ids + tr_ids))
        if not ids:
            return [], Shown([], np.zeros((0, N_FEATURES), dtype=np.float32))
        pos = {item_id: j for j, item_id in enumerate(ids)}
        x = np.zeros((len(ids), N_FEATURES), dtype=np.float32)
        if content_hits:  # the index holds only available items; exclusions were applied there
            sims = np.fromiter((sim for _, sim in content_hits), dtype=np.float32, count=len(content_hits))
            low = sims[-1]
            x[: len(content_hits), 0] = 0.5 + 0.5 * (sims - low) / max(float(sims[0] - low), 1e-6)
        if cov_ids:
            vals = np.fromiter((covisit[i][0] for i in cov_ids), dtype=np.float32, count=len(cov_ids))
            x[[pos[i] for i in cov_ids], 1] = vals / max(float(vals.max()), 1e-12)
        if nxt_ids:
            vals = np.fromiter((nxt[i] for i in nxt_ids), dtype=np.float32, count=len(nxt_ids))
            x[[pos[i] for i in nxt_ids], 6] = vals / max(float(vals.max()), 1e-12)
        if tr_ids:
            top = trending[0][1] or 1.0
            pops = dict(trending)
            x[[pos[i] for i in tr_ids], 2] = [pops[i] / top for i in tr_ids]
        seen_rows = [pos[i] for i, _ in recent if i in pos]
        if seen_rows:
            x[seen_rows, 3] = 1.0
        code = self.items.category_code
        categories = {code.get(i, -1) for i, _ in recent} - {-1}
        if categories:
            x[:, 4] = np.isin(np.fromiter((code.get(i, -1) for i in ids), dtype=np.int64, count=len(ids)), list(categories))
        scores = x @ self._base + self.blend.learned(x)
        ranking = np.argsort(-scores, kind="stable")  # ties keep the candidate order
        order = ranking[:k].tolist()
        shown = Shown([ids[j] for j in order], x[ranking], [ids[j] for j in ranking.tolist()])
        if not explain:
            return [RecommendedItem(ids[j], float(scores[j]), "") for j in order], shown
        # The reason is the source whose signal contributed most to this item's final score
        # (hand-set weight + what the blend learned for that signal).
        sources = (0, 1, 2, 6)  # content, co-visitation, trending, transitions
        w_eff = self._base[list(sources)] + (self.blend.weights()[list(sources)] if self.blend.active else 0.0)
        evidence = []
        for j in order:
            signals = x[j, list(sources)]
            # only sources this item actually came from can explain it (learned weights may be
            # negative, so a zero signal could otherwise out-"contribute" a real one)
            contributions = np.where(signals > 0, signals * w_eff, -np.inf)
            source = ("content", "covisit", "trending", "next")[int(np.argmax(contributions))]
            anchor, anchor_type = covisit[ids[j]][2:] if ids[j] in covisit else ("", "")
            if source == "covisit" and anchor_type == "purchase":
                source = "covisit_buy"
            elif source == "next":
                anchor = nxt_anchor.get(ids[j], "")
            evidence.append((ids[j], (float(signals.max()), source, anchor)))
        reasons = self._reasons(state, evidence)
        return [RecommendedItem(ids[j], round(float(scores[j]), 6), reason) for j, reason in zip(order, reasons)], shown

    # ------------------------------------------------------------------ reasons

    def _reasons(self, state: UserState, ranked: list[tuple[str, tuple[float, str, str]]]) -> list[str]:
        """One reason per item, from the evidence that contributed most to its score."""
        content_items = [item_id for item_id, (_, source, _) in ranked if source == "content"]
        closest = self._closest_history_items(state, content_items)
        out = []
        for item_id, (_, source, anchor) in ranked:
            if source == "covisit_buy":
                out.append(f"bought together with {self._title(anchor)}")
            elif source == "covisit":
                out.append(f"viewed together with {self._title(anchor)}")
            elif source == "next":
                out.append(f"often chosen right after {self._title(anchor)}")
            elif source == "content":
                anchor, sim = closest.get(item_id, (None, 0.0))
                if anchor is None:
                    out.append("matches your interests")
                elif anchor == item_id:
                    out.append("you bought this before" if item_id in state.purchased else "you viewed this recently")
                else:
                    out.append(f"similar to {self._title(anchor)} you viewed (similarity {sim:.2f})")
            else:
                out.append("trending")
        return out

    def _closest_history_items(self, state: UserState, item_ids: list[str]) -> dict[str, tuple[str, float]]:
        """For each item, the recent history item with the most similar vector (one matmul)."""
        index = self.items.index
        recent = [i for i, _ in _recent_distinct(state.history, 10) if i in index]
        targets = [i for i in item_ids if i in index]
        if not recent or not targets:
            return {}
        sims = index.vectors(targets) @ index.vectors(recent).T  # (targets, recent)
        best = sims.argmax(axis=1)
        return {t: (recent[j], float(sims[row, j])) for row, (t, j) in enumerate(zip(targets, best))}

    def _title(self, item_id: str) -> str:
        item = self.items.catalog.get(item_id)
        title = item.title if item is not None else item_id
        return title if len(title) <= 60 else title[:57] + "..."


def _recent_distinct(history: list[tuple[str, str, int]], n: int) -> list[tuple[str, str]]:
    """The ``n`` most recent distinct items of a history, newest first, with their event type."""
    seen: set[str] = set()
    out = []
    for item_id, etype, _ts in reversed(history):
        if item_id not in seen:
            seen.add(item_id)
            out.append((item_id, etype))
            if len(out) == n:
                break
    return out
