"""Candidate generation and ranking with reasons taken from the actual scoring.

Six candidate sources, scored together for a whole batch of users at once:

- **content**: the user's query vector (the learned head's, else the decayed interest vector)
  against the faiss item index, one batched search; reason ``similar to <history item>``
  names the recent history item whose vector is closest to the candidate.
- **co-visitation**: neighbours of the user's most recent items, weighted by how recent the
  anchor item is; reason ``bought together with <item>`` / ``viewed together with <item>``
  names the anchor that contributed most.
- **transitions**: what people engaged with right after the user's last two items.
- **session neighbours**: items that sessions like the user's current one went on to
  (:mod:`recsys.signals.sessions`, V-SKNN); reason ``chosen in sessions like yours``.
- **buy again**: the user's own most-bought items that the catalog marks ``repeat_purchase``;
  reason ``you buy this often``.
- **trending**: time-decayed popularity, the whole answer for a user with no history.

Each source's scores are normalised to [0, 1] per user into a row of signals (plus whether the
user saw the item recently, graded by how recently, and whether it shares a category with their
recent items); the score is a hand-set blend of the signals plus the correction the online
re-ranker (:mod:`recsys.ranking.reranker`) learned from what users did next, and the source with the largest contribution names the reason.
Purchased items (unless the catalog marks them ``repeat_purchase``) and unavailable items are
never recommended.

**Why batched.** Per user and per candidate Python (dicts of string ids, small numpy calls)
was two thirds of the engine's time. Items are addressed by their faiss index row instead;
every candidate of every user in a batch is one ``(user, row, source, value)`` entry; entries
are grouped by ``user * capacity + row`` into one feature matrix and one ``lexsort`` ranks all
users. ``tests/test_recommender.py`` proves a batch ranks each user exactly as if alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from recsys.events import RecommendedItem
from recsys.items.catalog import ItemSpace
from recsys.ranking._kernels import closest_rows, group_entries
from recsys.ranking.features import COLUMN, FEATURES, PriorWeights
from recsys.ranking.head import Head
from recsys.ranking.reranker import PairwiseReranker, Shown
from recsys.signals.covisitation import CoVisitation
from recsys.signals.popularity import Popularity
from recsys.signals.sessions import SessionNeighbours
from recsys.store.users import UserState

MODEL_VERSION = "blend-v1"
N_FEATURES = len(FEATURES)

# Candidate sources, in tie-break order, and the feature column each one fills.
_CONTENT, _COVISIT, _NEXT, _SESSION, _AGAIN, _TRENDING, _SEEN = 0, 1, 2, 3, 4, 5, 6
_SOURCES = (_CONTENT, _COVISIT, _TRENDING, _NEXT, _SESSION, _AGAIN)  # the ones that can explain an item
_COLUMN = {_CONTENT: COLUMN["content"], _COVISIT: COLUMN["covisit"], _NEXT: COLUMN["next"],
           _SESSION: COLUMN["session"], _AGAIN: COLUMN["again"], _TRENDING: COLUMN["trending"],
           _SEEN: COLUMN["seen"]}  # seen: set again from the user's recent items (_context_features)
_PER_USER_SCALED = (_COVISIT, _NEXT, _SESSION, _AGAIN)  # divided by the user's largest value
# the same, as arrays indexed by source, for the compiled grouping
_GROUP_COLUMNS = np.array([_COLUMN.get(s, -1) for s in range(max(_COLUMN) + 1)], dtype=np.int64)
_GROUP_SCALED = np.isin(np.arange(max(_COLUMN) + 1), _PER_USER_SCALED)
_NO_ROWS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class RecommenderConfig:
    k: int = 10
    content_candidates: int = 30
    covisit_anchors: int = 3  # most recent distinct history items used as co-visitation anchors
    covisit_per_anchor: int = 20
    trending_candidates: int = 20
    session_candidates: int = 30
    again_candidates: int = 30
    # the user's most recent distinct items brought in as candidates themselves, so that the
    # re-ranker's "seen" column can rank them (0: a seen item is ranked only when another
    # source brings it; the default: figures in README "Backtests")
    seen_candidates: int = 0
    # "seen" of the r-th most recent distinct item (r = 0, 1, ...) is 1 / (1 + r) ** power
    seen_grade_power: float = 1.0
    weights: PriorWeights = PriorWeights()


class Recommender:
    """Ranks items for many users at once. Pure reads: never changes state or signals.

    Shape: ``rank([UserState, ...], now_ts) -> [([RecommendedItem, ...], Shown), ...]``.
    """

    def __init__(
        self,
        items: ItemSpace,
        popularity: Popularity,
        covisit: CoVisitation,
        config: RecommenderConfig,
        reranker: PairwiseReranker | None = None,
        head: Head | None = None,
        transitions: CoVisitation | None = None,
        sessions: SessionNeighbours | None = None,
    ):
        self.items = items
        self.head = head
        self.transitions = transitions
        self.sessions = sessions
        self.popularity = popularity
        self.covisit = covisit
        self.config = config
        self._base = config.weights.vector()
        self.reranker = reranker or PairwiseReranker(self._base, min_examples=10**12)  # none given: the hand-set blend only
        self._titles: dict[str, str] = {}  # item id -> title as shown in reasons (see ``_title``)
        self._titles_at: tuple[int, int] = (0, -1)  # (catalog, its version) they were read from

    def excluded(self, state: UserState) -> set[str]:
        """Items this user must not be shown: purchased ones that are not repeat purchases
        (one set difference: grocery shoppers have bought hundreds of items; when every one of
        them may be bought again, as on a grocery log, no set of them is built at all)."""
        repeatable = self.items.catalog.repeatable
        if repeatable.issuperset(state.purchased):
            return set()
        return set(state.purchased).difference(repeatable)

    def rank(
        self, states: list[UserState], now_ts: int, k: int | None = None, *, explain: bool = True
    ) -> list[tuple[list[RecommendedItem], Shown]]:
        """Top-``k`` items per user (``explain=False``, for backtest scoring, skips the reason
        texts), each list with its signal rows (what the re-ranker learns from).

        The whole batch is scored at once: every candidate of every user becomes one
        ``(user, item row, source, value)`` entry, entries are grouped by ``user * capacity +
        row`` into one feature matrix, and one sort ranks all users. Python touches each user
        only to collect their anchors' neighbour arrays and, for the shown items, reasons.
        """
        if not states:
            return []
        cfg = self.config
        k = k or cfg.k
        # Candidates come from a fixed depth (the configured list length), never from the length
        # asked for: what is ranked, shown and learned from must not depend on how deep a
        # backtest scores (issue 14). Lists asked deeper than the candidates reach are padded
        # with trending items after them (``_pad``), outside what the re-ranker learns from.
        depth = cfg.k
        index = self.items.index
        n = len(states)
        cap = index.row_capacity + 1
        recents = [_recent_distinct(s.history, 10) for s in states]
        exclusions = [self.excluded(s) for s in states]
        excl_rows = [_valid(index.rows(list(e))) if e else _NO_ROWS for e in exclusions]
        # every user's excluded rows as sorted keys ``user * cap + row``, for the candidates' filters
        excl_keys = np.unique(np.repeat(np.arange(n), [len(e) for e in excl_rows]) * cap
                              + np.concatenate(excl_rows + [_NO_ROWS]))
        parts = _Entries()

        # co-visitation: neighbours of the most recent items, anchors weighted by recency
        self._add_neighbours(parts, _COVISIT, self.covisit, recents, [1.0 / (1 + r) for r in range(cfg.covisit_anchors)])
        # transitions: what came right after the last two items (the last counts double)
        if self.transitions is not None:
            self._add_neighbours(parts, _NEXT, self.transitions, recents, [1.0, 0.5])

        # session neighbours: what sessions like the user's current one went on to. The first
        # ``session_candidates`` votes bring candidates in; the rest only mark candidates that
        # other sources brought (a vote is evidence either way)
        if self.sessions is not None:
            self._add_session_votes(parts, states, excl_keys, cap, depth)
        # buy again: the user's own most-bought items that may be bought again
        self._add_buy_again(parts, states, excl_keys, cap)
        if cfg.seen_candidates:
            self._add_seen(parts, recents, cfg.seen_candidates)

        # trending is the same for everyone in a batch
        trending = [
            (item_id, pop)
            for item_id, pop in self.popularity.top(cfg.trending_candidates + depth, now_ts)
            if self.items.recommendable(item_id)
        ]
        if trending:
            t_rows = index.rows([i for i, _ in trending])
            t_vals = np.array([p for _, p in trending], dtype=np.float32) / (trending[0][1] or 1.0)
            parts.add(_TRENDING, np.repeat(np.arange(n), len(t_rows)), np.tile(t_rows, n), np.tile(t_vals, n))

        # content, computed last and placed first (the first source in candidate order): the
        # learned head is read here only, so a training step still running on the head's thread
        # overlaps every other source (``Head.serve_at_next_read``)
        self._add_content(parts, states, now_ts, excl_rows)

        batch = parts.group(cap, excl_keys)
        x = batch.features
        if len(x):
            self._context_features(batch, recents, cap)
        scores = x @ self._base + self.reranker.learned(x)
        # rank: by user, best score first, ties in candidate order (content, co-visitation, ...)
        order = _rank_order(batch.user, scores, batch.first_seen)
        user, rows, x, scores = batch.user[order], batch.row[order], x.take(order, axis=0), scores[order]
        bounds = np.searchsorted(user, np.arange(n + 1))
        names = index.names(rows).tolist()
        reasons = self._reasons_for(batch, order, bounds, k, recents, states) if explain else None
        shown_scores = (np.round(scores.astype(np.float64), 6) if explain else scores).tolist()
        out = []
        short = [u for u in range(n) if bounds[u + 1] - bounds[u] < k]
        pads = self._pad([names[bounds[u]:bounds[u + 1]] for u in short], [exclusions[u] for u in short], k, now_ts)
        pad_of = dict(zip(short, pads))
        for u in range(n):
            lo, hi = int(bounds[u]), int(bounds[u + 1])
            top = min(hi, lo + k)
            why = reasons[lo:top] if reasons is not None else [""] * (top - lo)
            items = list(map(RecommendedItem, names[lo:top], shown_scores[lo:top], why))
            items += [RecommendedItem(i, 0.0, "trending" if explain else "") for i in pad_of.get(u, ())]
            out.append((items, Shown(tuple(names[lo:top]), x[lo:hi].copy(), tuple(names[lo:hi]))))
        return out

    def _pad(self, ranked: list[list[str]], exclusions: list[set[str]], k: int, now_ts: int) -> list[list[str]]:
        """Per short list, the trending items that follow it up to ``k``: recommendable, not
        excluded, not ranked already; in trending order, so a deeper ask only appends."""
        if not ranked:
            return []
        need = k + max(len(r) + len(e) for r, e in zip(ranked, exclusions))
        pool = [i for i, _ in self.popularity.top(need, now_ts) if self.items.recommendable(i)]
        out = []
        for names, excl in zip(ranked, exclusions):
            taken = set(names)
            out.append([i for i in pool if i not in taken and i not in excl][: k - len(names)])
        return out

    # ------------------------------------------------------------------ sources

    def _add_content(self, parts: "_Entries", states: list[UserState], now_ts: int, excl_rows: list[np.ndarray]) -> None:
        """Content entries, first in ``parts``: one faiss search for the batch (the index holds
        only recommendable items) with each user's query vector, scores scaled to [0.5, 1] per
        user, from the user's worst hit to the best."""
        n = len(states)
        queries = self._queries(states, now_ts)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        c_scores, c_rows = self.items.index.search_rows(queries, self.config.content_candidates, excl_rows)
        found = c_rows >= 0
        if found.any():
            top = c_scores[:, :1]
            low = np.take_along_axis(c_scores, np.maximum(found.sum(axis=1) - 1, 0)[:, None], axis=1)
            with np.errstate(invalid="ignore"):  # rows without hits (-inf) are dropped below
                norm = 0.5 + 0.5 * (c_scores - low) / np.maximum(top - low, 1e-6)
            users = np.broadcast_to(np.arange(n)[:, None], c_rows.shape)
            parts.add(_CONTENT, users[found], c_rows[found], norm[found], front=True)

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

    def _add_neighbours(self, parts: "_Entries", source: int, signal: CoVisitation,
                        recents: list[list[tuple[str, str]]], anchor_weights: list[float]) -> None:
        """Entries for the neighbours of each user's most recent items (anchor ``a`` of a user
        contributes ``weight * anchor_weights[a]``), remembering which anchor each came from.
        Every (user, anchor) pair of the batch is read in one compiled call
        (:meth:`CoVisitation.top`: each anchor's first ``covisit_per_anchor`` neighbours)."""
        n, m = self.config.covisit_per_anchor, len(anchor_weights)
        heads = [recent[:m] for recent in recents]
        per_user = np.fromiter(map(len, heads), dtype=np.int64, count=len(heads))
        anchors_read = [anchor for head in heads for anchor, _ in head]
        if not anchors_read:
            return
        lengths, rows, weights = signal.top_rows(anchors_read, n, self.items.index)
        if not lengths.any():
            return
        slots = np.arange(len(anchors_read)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
        anchors = np.repeat(slots, lengths)
        values = weights * np.asarray(anchor_weights)[anchors]
        keep = rows >= 0  # neighbours that are not recommendable are no candidates
        owners = np.repeat(np.repeat(np.arange(len(heads)), per_user), lengths)
        parts.add(source, owners[keep], rows[keep], values[keep], anchors[keep])

    def _add_session_votes(self, parts: "_Entries", states: list[UserState], excl_keys: np.ndarray, cap: int,
                           k: int) -> None:
        n = self.config.session_candidates
        users, codes, values = self.sessions.ranked_votes([s.user_id for s in states], n + k)
        if not len(users):
            return
        rows = self.sessions.item_rows(codes, self.items.index)
        # an excluded item that is in the index is one of the user's excluded rows
        ok = rows >= 0
        if len(excl_keys):
            ok &= ~np.isin(users * cap + rows, excl_keys)
        # each usable vote's rank among the user's usable votes, for the cut at n
        per_user = np.bincount(users[ok], minlength=len(states))
        rank = np.cumsum(ok) - 1 - (np.cumsum(per_user) - per_user)[users]
        parts.add(_SESSION, users[ok], rows[ok], values[ok].astype(np.float32), attach_only=rank[ok] >= n)

    def _add_buy_again(self, parts: "_Entries", states: list[UserState], excl_keys: np.ndarray, cap: int) -> None:
        """The user's ``again_candidates`` most-bought purchasable-again items with their
        purchase counts, ties to the most recently bought (``UserState.bought``).

        One pass over the batch. Every user's purchases, newest first, go through one stable
        sort by (user, count descending), which keeps each user's ties in recency order; then
        only the head of each user's sorted list is looked up in the index and checked against
        the exclusions: its first ``again_candidates`` plus as many as the user has excluded
        items. A user with fewer usable items there than the cut (items out of the index) has
        the rest of their list checked too. Grocery shoppers hold up to ``MAX_PURCHASED``
        purchases: looking them all up was half of the cost, a sort per user in Python before.
        """
        index, n = self.items.index, self.config.again_candidates
        flat: list[str] = []
        counts: list[int] = []
        lens = []
        for state in states:
            ids = state.purchased[::-1]
            lens.append(len(ids))
            if ids:
                flat += ids
                counts += map(state.bought.get, ids, itertools.repeat(1))
        if not flat or n <= 0:
            return
        n_users = len(states)
        users = np.repeat(np.arange(n_users), lens)  # non-decreasing, and stays so in ``order``
        count = np.asarray(counts, dtype=np.int64)
        order = np.lexsort((-count, users))  # stable: equal counts stay newest first
        rank = np.arange(len(order)) - np.searchsorted(users, users)  # position in the user's sorted list
        excluded = np.diff(np.searchsorted(excl_keys, np.arange(n_users + 1) * cap))  # per user
        look = rank < n + excluded[users]
        held = np.bincount(users, minlength=n_users)
        while True:
            at = order[look]  # flat positions, by user then sorted
            u, c = users[look], count[at]
            rows = index.rows([flat[i] for i in at.tolist()])
            ok = rows >= 0
            if len(excl_keys):
                ok &= ~np.isin(u * cap + rows, excl_keys)
            short = (np.bincount(u[ok], minlength=n_users) < n) & (held > np.bincount(u, minlength=n_users))
            if not short.any():
                break
            look |= short[users]  # those users' whole lists (rare: items out of the index)
        u, rows, c = u[ok], rows[ok], c[ok]
        keep = np.arange(len(u)) - np.searchsorted(u, u) < n
        if keep.any():
            parts.add(_AGAIN, u[keep], rows[keep], c[keep].astype(np.float32))

    def _add_seen(self, parts: "_Entries", recents: list[list[tuple[str, str]]], m: int) -> None:
        """The user's ``m`` most recent distinct items as candidates, graded by recency as the
        "seen" column is (excluded ones are dropped when the entries are grouped)."""
        heads = [recent[:m] for recent in recents]
        counts = [len(h) for h in heads]
        if not sum(counts):
            return
        users = np.repeat(np.arange(len(heads)), counts)
        rows = self.items.index.rows([i for h in heads for i, _ in h])
        grade = _seen_grade(np.concatenate([np.arange(c) for c in counts]), self.config.seen_grade_power)
        ok = rows >= 0
        parts.add(_SEEN, users[ok], rows[ok], grade[ok].astype(np.float32))

    def _context_features(self, batch: "_Batch", recents: list[list[tuple[str, str]]], cap: int) -> None:
        """Columns that depend on the user's recent items: seen recently, shares a category."""
        index, code = self.items.index, self.items.category_code
        counts = [len(r) for r in recents]
        owner = np.repeat(np.arange(len(recents)), counts)
        recent_ids = [i for r in recents for i, _ in r]
        recent_rows = index.rows(recent_ids)
        ok = recent_rows >= 0
        # seen, graded by recency (1, 1/2, 1/3 ...): the next click is the last item again far
        # more often than an older one (YooChoose 26% vs 6% for the one before, REES46 33% vs 5%)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        grade = _seen_grade(np.arange(len(recent_ids)) - starts, self.config.seen_grade_power)
        seen_keys = owner[ok] * cap + recent_rows[ok]
        order = np.argsort(seen_keys)
        seen_keys, grade = seen_keys[order], grade[ok][order]
        at = np.minimum(np.searchsorted(seen_keys, batch.key), max(len(seen_keys) - 1, 0))
        if len(seen_keys):
            batch.features[:, COLUMN["seen"]] = np.where(seen_keys[at] == batch.key, grade[at], 0.0)
        recent_cats = np.fromiter((code.get(i, -1) for i in recent_ids), dtype=np.int64, count=len(recent_ids))
        has = recent_cats >= 0
        if has.any():
            n_cat = self.items.n_categories + 1
            cand_cats = self.items.category_rows()[batch.row]
            batch.features[:, COLUMN["category"]] = (cand_cats >= 0) & np.isin(batch.user * n_cat + cand_cats, owner[has] * n_cat + recent_cats[has])

    # ------------------------------------------------------------------ reasons

    def _reasons_for(self, batch: "_Batch", order: np.ndarray, bounds: np.ndarray, k: int,
                     recents: list[list[tuple[str, str]]], states: list[UserState]) -> list[str]:
        """Reason per shown position (index into the ranked batch): the source whose signal
        contributed most to the item's score (hand-set weight + what the blend learned)."""
        rank_in_user = np.arange(len(order)) - np.repeat(bounds[:-1], np.diff(bounds))
        shown = np.flatnonzero(rank_in_user < k)
        out = [""] * len(order)  # only shown positions get a reason
        if len(shown) == 0:
            return out
        entry = order[shown]  # grouped-candidate index of each shown position
        cols = [_COLUMN[s] for s in _SOURCES]
        signals = batch.features[entry][:, cols]
        w_eff = self._base[cols] + (self.reranker.weights()[cols] if self.reranker.active else 0.0)
        # only sources an item actually came from can explain it (learned weights may be
        # negative, so a zero signal could otherwise out-"contribute" a real one)
        source = np.argmax(np.where(signals > 0, signals * w_eff, -np.inf), axis=1)
        users = batch.user[entry]
        closest = self._closest_history_items(batch.row[entry], users, source == _SOURCES.index(_CONTENT), recents)
        names = self.items.index.names(batch.row[entry]).tolist()
        # anchors as plain lists, read once (indexing numpy per shown item costs more than the rest)
        no_anchor = [-1] * len(entry)
        cov_anchor = batch.anchor[_COVISIT][entry].tolist() if _COVISIT in batch.anchor else no_anchor
        next_anchor = batch.anchor[_NEXT][entry].tolist() if _NEXT in batch.anchor else no_anchor
        titles, title = self._titles_now(), self._title  # checked against the catalog once per batch
        for i, (pos, u, src) in enumerate(zip(shown.tolist(), users.tolist(), source.tolist())):
            kind, item_id = _SOURCES[src], names[i]
            if kind == _COVISIT:
                anchor, anchor_type = recents[u][cov_anchor[i]]
                verb = "bought" if anchor_type == "purchase" else "viewed"
                out[pos] = f"{verb} together with {titles.get(anchor) or title(anchor)}"
            elif kind == _NEXT:
                anchor = recents[u][next_anchor[i]][0]
                out[pos] = f"often chosen right after {titles.get(anchor) or title(anchor)}"
            elif kind == _SESSION:
                out[pos] = "chosen in sessions like yours"
            elif kind == _AGAIN:
                out[pos] = "you buy this often"
            elif kind == _CONTENT:
                anchor, sim = closest.get(i, (None, 0.0))
                if anchor is None:
                    out[pos] = "matches your interests"
                elif anchor == item_id:
                    out[pos] = "you bought this before" if item_id in states[u].purchased else "you viewed this recently"
                else:  # named by what the shopper did with it (until 2026-12-07 "viewed" whatever it was)
                    done = _DID.get(next((t for it, t in recents[u] if it == anchor), ""), "viewed")
                    out[pos] = f"similar to {titles.get(anchor) or title(anchor)} you {done} (similarity {sim:.2f})"
            else:
                out[pos] = "trending"
        return out

    def _closest_history_items(self, rows: np.ndarray, users: np.ndarray, wanted: np.ndarray,
                               recents: list[list[tuple[str, str]]]) -> dict[int, tuple[str, float]]:
        """For the wanted candidates (positions in ``rows``), the user's recent item with the
        most similar vector: ``{position: (history item, similarity)}``.

        The recent items' rows in one lookup, and every similarity of the batch in one compiled
        loop over the index's vectors (:mod:`recsys.ranking._kernels`:
        float64 sums of the float32 vectors, exact to ~1e-16 and the same on every machine, an
        exact tie going to the shown item itself; before 2026-12-03 one small BLAS product per
        user, whose last float32 bit depended on the CPU and the operands' shapes and picked
        among items with the same text).
        """
        picks = np.flatnonzero(wanted)
        if len(picks) == 0:
            return {}
        index = self.items.index
        owner = users[picks]  # picks are grouped by user
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        ends = np.r_[starts[1:], len(picks)]
        group_recents = [recents[u] for u in owner[starts].tolist()]
        recent_ids = [i for recent in group_recents for i, _ in recent]
        recent_rows = index.rows(recent_ids)  # -1: not in the index
        in_index = recent_rows >= 0
        lengths = np.fromiter(map(len, group_recents), dtype=np.int64, count=len(group_recents))
        kept = np.bincount(np.repeat(np.arange(len(lengths)), lengths)[in_index], minlength=len(lengths))
        has = kept > 0  # users with recent items in the index: the only ones answered
        if not has.any():
            return {}
        kept_ids = np.asarray(recent_ids, dtype=object)[in_index]
        r_start = np.cumsum(kept) - kept
        answered = picks[np.repeat(has, ends - starts)]
        pick_len = (ends - starts)[has]
        pick_lo = np.cumsum(pick_len) - pick_len
        best, sims = closest_rows(index.vector_table(), rows[answered], recent_rows[in_index], pick_lo,
                                  pick_lo + pick_len, r_start[has], (r_start + kept)[has])
        return dict(zip(answered.tolist(), zip(kept_ids[best].tolist(), sims.tolist())))

    def _title(self, item_id: str) -> str:
        """The item's title as reasons show it (at most 60 characters); remembered until the
        catalog changes (its version), since the same anchors explain many lists."""
        titles = self._titles_now()
        title = titles.get(item_id)
        if title is None:
            item = self.items.catalog.get(item_id)
            title = item.title if item is not None else item_id
            title = titles[item_id] = title if len(title) <= 60 else title[:57] + "..."
        return title

    def _titles_now(self) -> dict[str, str]:
        """The remembered titles, emptied first if the catalog changed since (or they grew past
        their bound)."""
        catalog = self.items.catalog
        if self._titles_at != (id(catalog), catalog.version) or len(self._titles) > _MAX_TITLES:
            self._titles.clear()
            self._titles_at = (id(catalog), catalog.version)
        return self._titles


#: Titles ``Recommender._title`` remembers before starting over (a bound on its memory).
_MAX_TITLES = 100_000


#: What a content reason says the shopper did with the history item it names, by the event type
#: of their latest event on it ("similar to <item> you bought"); any other type: "viewed".
_DID = {"purchase": "bought", "add_to_cart": "put in your cart"}


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


def _rank_order(user: np.ndarray, scores: np.ndarray, first_seen: np.ndarray) -> np.ndarray:
    """``np.lexsort((first_seen, -scores, user))``, the ranking's order, in one sort instead of three.

    ``user`` and ``-scores`` (float32) are packed into one int64 key: the user in the high 32
    bits, the score's bits mapped to an order-preserving unsigned integer in the low 32 (-0.0 is
    made +0.0 first, as the float comparison treats them as equal). One unstable sort of that
    key puts every user's candidates best first; only runs of equal keys (tied scores) are then
    re-sorted by ``first_seen`` (unique per candidate), so the result is lexsort's, position
    for position (``tests/test_speed_equivalence.py``). A lexsort over three keys of ~110k
    candidates cost ~35 ms per 1,000-user batch (three stable passes), ~8% of the engine; this is
    ~10 ms. Scores with a NaN (never produced by the blend) take lexsort itself.
    """
    neg = np.negative(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 + 0.0 == +0.0
    if len(neg) == 0 or len(user) and int(user.max()) >= 1 << 31 or np.isnan(neg).any():
        return np.lexsort((first_seen, -scores, user))
    bits = neg.view(np.int32).astype(np.int64)
    # negative floats: larger magnitude is smaller, so flip the magnitude bits; then shift to >= 0
    bits = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)
    key = (user.astype(np.int64) << 32) | bits
    order = np.argsort(key)
    ranked = key[order]
    tied = ranked[1:] == ranked[:-1]
    if tied.any():
        in_run = np.zeros(len(ranked), dtype=bool)
        in_run[1:] |= tied
        in_run[:-1] |= tied
        at = np.flatnonzero(in_run)
        sub = order[at]
        order[at] = sub[np.lexsort((first_seen[sub], ranked[at]))]
    return order


def _seen_grade(recency: np.ndarray, power: float) -> np.ndarray:
    """The "seen" grade of the item ``recency`` places behind the user's most recent one: 1, 1/2, 1/3 ...
    at ``power`` 1 (computed as before, exactly), steeper above."""
    return 1.0 / (1.0 + recency) if power == 1.0 else (1.0 + recency) ** -power


def _valid(rows: np.ndarray) -> np.ndarray:
    return rows[rows >= 0]


class _Entries:
    """Candidate entries of a batch, appended per source: ``(user, row, value)`` plus, for the
    neighbour sources, which anchor (recent item) produced each. The position of an entry
    within its source is its candidate order (``seq``) for tie-breaking."""

    _SEQ_STRIDE = 1 << 40  # sources never overlap in seq: content < co-visitation < next < trending

    def __init__(self) -> None:
        self.parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, source: int, users, rows, values, anchors=None, attach_only=None, *, front: bool = False) -> None:
        """``attach_only`` (bool per entry): the entry sets its signal on a candidate that
        another entry brings, but does not make one by itself. ``front``: before the sources
        added so far (a source computed late that comes first in candidate order)."""
        users = np.asarray(users, dtype=np.int64)
        anchors = np.full(len(users), -1, dtype=np.int64) if anchors is None else np.asarray(anchors, dtype=np.int64)
        attach = np.zeros(len(users), dtype=bool) if attach_only is None else np.asarray(attach_only, dtype=bool)
        part = (source, users, np.asarray(rows, dtype=np.int64), np.asarray(values, dtype=np.float32), anchors, attach)
        if front:
            self.parts.insert(0, part)
        else:
            self.parts.append(part)

    def group(self, cap: int, excluded_keys: np.ndarray) -> "_Batch":
        """One row per distinct (user, item): summed values per source column, the earliest
        candidate order, the strongest co-visitation anchor and the first transition anchor.
        Entries whose key ``user * cap + row`` is in ``excluded_keys`` (sorted, distinct: a
        user's excluded items) are dropped."""
        if not self.parts:
            return _Batch.empty()
        src = np.concatenate([np.full(len(p[1]), p[0], dtype=np.int64) for p in self.parts])
        user = np.concatenate([p[1] for p in self.parts])
        row = np.concatenate([p[2] for p in self.parts])
        val = np.concatenate([p[3] for p in self.parts])
        anchor = np.concatenate([p[4] for p in self.parts])
        attach = np.concatenate([p[5] for p in self.parts])
        seq = src * self._SEQ_STRIDE + np.concatenate([np.arange(len(p[1])) for p in self.parts])
        seq[attach] = np.iinfo(np.int64).max  # never a candidate's position
        key = user * cap + row
        order = self._order(key, seq, attach)
        # one compiled pass over the sorted entries (recsys/ranking/_kernels.py: group_entries),
        # which leaves out the excluded keys as it goes: a merge with them sorted (a filter of
        # every entry before the sort, np.isin, was ~11 of the ~35 ms a late batch's grouping took)
        g_key, g_user, g_row, features, first_seen, cov, nxt, real, present = group_entries(
            order, src, user, row, val, anchor, seq, attach, key, excluded_keys, _GROUP_COLUMNS, _GROUP_SCALED, N_FEATURES,
            _COVISIT, _NEXT)
        anchors = {source: a for source, a in ((_COVISIT, cov), (_NEXT, nxt)) if present[source]}
        batch = _Batch(g_key, g_user, g_row, features, first_seen, anchors)
        if not real.all():  # drop candidates that only attach-only entries named
            batch = batch.subset(real)
        return batch

    def _order(self, key: np.ndarray, seq: np.ndarray, attach: np.ndarray) -> np.ndarray:
        """``np.lexsort((seq, key))`` with one sort of distinct int64 values instead of two
        stable passes (~25 -> ~8 ms for a 1,000-user batch; a sort of the values, not an
        argsort). The parts are added in increasing
        source order, so a real entry's ``seq`` grows with its position in the concatenation,
        and attach-only entries (``seq`` = max) follow the real ones of their key in that order
        too: ``key``, then attach, then position, packed into one value, is the same order.
        Anything else (a source added twice or out of order, keys too wide to pack) takes lexsort."""
        sources = [p[0] for p in self.parts]
        bits = max(len(key), 1).bit_length() + 1  # the position, and one bit for attach
        if (any(a >= b for a, b in zip(sources, sources[1:])) or not len(key) or int(key.min()) < 0
                or int(key.max()) >= 1 << (63 - bits)):
            return np.lexsort((seq, key))
        packed = (key << bits) | (attach.astype(np.int64) << (bits - 1)) | np.arange(len(key), dtype=np.int64)
        # the values are distinct, so sorting them and keeping the position bits is the argsort
        # (numpy sorts values faster than it sorts indices: ~13 against ~18 ms for 300k)
        packed.sort()
        return packed & ((1 << (bits - 1)) - 1)


@dataclass
class _Batch:
    """Grouped candidates of a batch, one row per distinct (user, item), sorted by key."""

    key: np.ndarray
    user: np.ndarray
    row: np.ndarray
    features: np.ndarray
    first_seen: np.ndarray
    anchor: dict[int, np.ndarray]

    def subset(self, keep: np.ndarray) -> "_Batch":
        return _Batch(self.key[keep], self.user[keep], self.row[keep], self.features[keep], self.first_seen[keep],
                      {s: a[keep] for s, a in self.anchor.items()})

    @staticmethod
    def empty() -> "_Batch":
        z = np.zeros(0, dtype=np.int64)
        return _Batch(z, z, z, np.zeros((0, N_FEATURES), dtype=np.float32), z, {})
