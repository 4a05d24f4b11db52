"""The vectorised hot paths give bit-identical answers to the per-user code they replaced.

Each reference below is the code as it stood before the speed-up (issue 12), kept here as the
specification: the batched versions must produce the same items, in the same order, with the
same floats (``==``, never ``approx``), because recommendations and backtest metrics must not
move by a bit.
"""

from __future__ import annotations

import itertools
import random
from operator import itemgetter

import numpy as np
import pytest

from recsys.events import CatalogItem
from recsys.items.catalog import ItemSpace
from recsys.ranking.recommender import Recommender, RecommenderConfig
from recsys.signals.covisitation import CoVisitation
from recsys.signals.popularity import Popularity
from recsys.signals.sessions import SessionNeighbours
from recsys.store.users import UserState

MIN = 60_000


def _score_one_reference(s: SessionNeighbours, own: int, items: dict[str, int], n: int) -> list[tuple[str, float]]:
    """``SessionNeighbours._score_one`` before the batch version (one user at a time)."""
    query = list(items)[-min(s.query_items or s.max_session_len, s.max_session_len) :]
    m = len(query)
    lists = [list(s._postings.get(item, ()))[-s.postings_scanned:] if s.postings_scanned else s._postings.get(item, ())
             for item in query]
    sizes = np.fromiter((len(p) for p in lists), dtype=np.int64, count=m)
    if sizes.sum() == 0:
        return []
    slots = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(sizes.sum()))
    weights = np.repeat(np.arange(1, m + 1, dtype=np.float64) / m, sizes)
    if len(slots) > 4096:
        dots = np.bincount(slots, weights=weights, minlength=len(s._active))
        sids = np.flatnonzero(dots)
        dots = dots[sids]
    else:
        sids, inverse = np.unique(slots, return_inverse=True)
        dots = np.bincount(inverse, weights=weights)
    keep = sids != own
    sids, dots = sids[keep], dots[keep]
    if len(sids) == 0:
        return []
    if len(sids) > s.sample_size:
        recent = np.argpartition(-s._active[sids], s.sample_size - 1)[: s.sample_size]
        sids, dots = sids[recent], dots[recent]
    sims = dots / np.sqrt(m * s._length[sids])
    top = np.lexsort((sids, -sims))[: s.k]
    held = s._held[sids[top]]
    voters = held >= 0
    if s.vote_items:  # each neighbour's last vote_items items (rows hold them oldest first)
        for r, length in enumerate(s._length[sids[top]].astype(int)):
            voters[r, : max(length - s.vote_items, 0)] = False
    voted, inverse = np.unique(held[voters], return_inverse=True)
    votes = np.bincount(inverse, weights=np.broadcast_to(sims[top, None], held.shape)[voters])
    if len(votes) > n:
        keep = np.flatnonzero(votes >= -np.partition(-votes, n - 1)[n - 1])
        voted, votes = voted[keep], votes[keep]
    ranked = sorted(zip(map(s._names.__getitem__, voted.tolist()), votes.tolist()))
    ranked.sort(key=itemgetter(1), reverse=True)
    return ranked[:n]


def _reference_scores(s: SessionNeighbours, user_ids: list[str], n: int) -> list[list[tuple[str, float]]]:
    out = []
    for user_id in user_ids:
        slot = s._current.get(user_id)
        session = s._sessions.get(slot) if slot is not None else None
        out.append(_score_one_reference(s, slot, session["items"], n) if session else [])
    return out


@pytest.mark.parametrize(
    "bounds, users, items, events",
    [
        (dict(), 300, 400, 6000),  # nothing cut
        (dict(k=7, sample_size=15, max_session_len=6, max_sessions=120), 200, 60, 5000),  # every cut, evictions
        (dict(k=50, sample_size=400, max_session_len=50), 150, 40, 12000),  # > 4096 postings per query
        (dict(k=20, sample_size=30), 400, 12, 4000),  # few items: many tied votes
        # the read-time bounds of issue 12 (settings, off by default)
        (dict(query_items=3, postings_scanned=7, vote_items=2), 300, 400, 6000),
        (dict(k=7, sample_size=15, max_session_len=6, max_sessions=120, query_items=4, vote_items=5), 200, 60, 5000),
        (dict(k=50, sample_size=400, max_session_len=50, postings_scanned=40), 150, 40, 12000),
        (dict(query_items=60, postings_scanned=1000, vote_items=60), 300, 400, 6000),  # bounds above the sizes
    ],
)
def test_batched_session_votes_equal_the_per_user_reference(bounds, users, items, events):
    rng = random.Random(len(bounds) + users)
    s = SessionNeighbours(**bounds)
    ts = 0
    for t in range(events):
        ts += 1000 if rng.random() < 0.999 else 45 * MIN  # long sessions, now and then all cut by the gap
        user = f"u{rng.randrange(users)}"
        session = f"{user}-s{t // 3000}" if user.endswith("7") else None  # some shoppers send session ids
        s.update(user, session, f"i{rng.randrange(items)}", ts)
    everyone = [f"u{u}" for u in range(users)] + ["nobody"]
    rng.shuffle(everyone)
    for n in (1, 5, 40, 10_000):
        assert s.scores(everyone, n) == _reference_scores(s, everyone, n)
        assert s.scores(everyone[:1], n) == _reference_scores(s, everyone[:1], n)


class _CoVisitationReference(CoVisitation):
    """``CoVisitation`` before the remembered weakest pairs: a full ``min`` on every overflow."""

    def _add_pair(self, a: str, b: str, weight: float) -> None:
        for x, y in ((a, b),) if self.directed else ((a, b), (b, a)):
            nbrs = self._nbrs.setdefault(x, {})
            counts = self._counts.setdefault(x, {})
            nbrs[y] = nbrs.get(y, 0.0) + weight
            counts[y] = counts.get(y, 0) + 1
            self._dirty.add(x)
            self._ranked.pop(x, None)
        for x in (a,) if self.directed else (a, b):
            nbrs = self._nbrs.get(x)
            if nbrs is not None and len(nbrs) > self.max_neighbours:
                victim = min(nbrs.items(), key=itemgetter(1, 0))[0]
                self._drop_pair(x, victim)

    def _drop_pair(self, x: str, y: str) -> None:
        for p, q in ((x, y),) if self.directed else ((x, y), (y, x)):
            nbrs = self._nbrs.get(p)
            if nbrs is not None and nbrs.pop(q, None) is not None:
                del self._counts[p][q]
                self._dirty.add(p)
                self._ranked.pop(p, None)
                if not nbrs:
                    del self._nbrs[p], self._counts[p]


@pytest.mark.parametrize("directed", [False, True])
@pytest.mark.parametrize("max_neighbours, items", [(3, 30), (10, 200), (50, 400)])
def test_co_visitation_drops_the_same_weakest_pairs_as_a_full_scan(directed, max_neighbours, items):
    rng = random.Random(max_neighbours * 7 + directed)
    fast = CoVisitation(half_life_h=0.5, max_neighbours=max_neighbours, window=5, directed=directed)
    slow = _CoVisitationReference(half_life_h=0.5, max_neighbours=max_neighbours, window=5, directed=directed)
    histories: dict[str, list] = {}
    types = ["browse", "click", "add_to_cart", "purchase", "search"]
    ts = 0
    # the records each would leave in a store; a new pair that its own overflow drops at once is
    # skipped by the fast one, so it rewrites fewer (unchanged) lists, never other bytes
    fast_store: dict[bytes, bytes] = {}
    slow_store: dict[bytes, bytes] = {}
    writes = [0, 0]

    def export_both() -> None:
        f, s = fast.export_dirty(), slow.export_dirty()
        assert f.items() <= s.items()  # what it writes, the reference writes too, the same bytes
        fast_store.update(f)
        slow_store.update(s)
        writes[0] += len(f)
        writes[1] += len(s)
        assert fast_store == slow_store  # and what it leaves out, the reference rewrote unchanged

    for n in range(20_000):
        ts += rng.choice([1, 1000, 60_000, 3_600_000])  # equal weights (ties by id) and decayed ones
        user = f"u{rng.randrange(40)}"
        hist = histories.setdefault(user, [])
        item, etype = f"i{int(rng.paretovariate(1.2)) % items}", rng.choice(types)
        fast.update(hist, item, etype, ts)
        slow.update(hist, item, etype, ts)
        hist.append((item, etype, ts))
        del hist[:-5]
        if n % 997 == 0:
            export_both()
        if n % 1999 == 0:  # the same sorted answers, read as the ranker reads them
            for i in (item, hist[0][0]):
                fr, sr = fast.ranked(i), slow.ranked(i)
                assert fr[0] == sr[0] and fr[1].tolist() == sr[1].tolist() and fr[2] == sr[2]
    export_both()
    # the skip happened (directed lists of 50 over 400 items: 227 of the 352 overflows drop their
    # own new pair, but every such list is changed by another pair before the next export)
    assert writes[0] < writes[1] or (directed and max_neighbours == 50)
    assert fast._nbrs == slow._nbrs and fast._counts == slow._counts
    assert all(list(fast._nbrs[i].items()) == list(slow._nbrs[i].items()) for i in slow._nbrs)
    for item_id, heap in fast._heaps.items():  # each heap holds every current pair of its list
        assert set(zip(fast._nbrs[item_id].values(), fast._nbrs[item_id])) <= set(heap)
        assert len(heap) <= max_neighbours + 16
    assert fast._heaps.keys() <= fast._nbrs.keys()
    assert sum(len(n) > max_neighbours - 1 for n in slow._nbrs.values()) > 5  # lists really overflowed


def _closest_history_items_reference(rec: Recommender, rows, users, wanted, recents) -> dict[int, tuple[str, float]]:
    """``Recommender._closest_history_items`` before the batch gathers (one loop per user)."""
    picks = np.flatnonzero(wanted)
    if len(picks) == 0:
        return {}
    index = rec.items.index
    out = {}
    bounds = np.flatnonzero(np.diff(users[picks])) + 1  # picks are grouped by user
    for group in np.split(picks, bounds):
        recent = [i for i, _ in recents[int(users[group[0]])] if i in index]
        if not recent:
            continue
        sims = index.vectors_of_rows(rows[group]) @ index.vectors_of_rows(index.rows(recent)).T
        best = sims.argmax(axis=1)
        for p, j, sim in zip(group.tolist(), best.tolist(), sims[np.arange(len(group)), best].tolist()):
            out[p] = (recent[j], sim)
    return out


class _RandomEmbedder:
    """Production-sized vectors (384 dims, so BLAS takes the paths it takes in the engine),
    with near-duplicates so that argmax meets near-ties."""

    dim = 384

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        out = []
        for text in texts:
            n = int(text.split()[1])
            base = np.random.default_rng(n // 3).normal(size=self.dim)  # every 3 items share a base
            out.append(base + 1e-4 * np.random.default_rng(n).normal(size=self.dim))
        return np.asarray(out, dtype=np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_closest_history_items_equal_the_per_user_reference(seed):
    rng = np.random.default_rng(seed)
    items = ItemSpace(_RandomEmbedder())
    items.upsert([CatalogItem(f"i{i}", f"item {i}") for i in range(3000)])
    items.index.remove([f"i{i}" for i in range(0, 3000, 11)])  # history items no longer indexed
    rec = Recommender(items, Popularity(half_life_h=1.0), CoVisitation(half_life_h=1.0, max_neighbours=20), RecommenderConfig())
    n_users = 400
    recents = []
    for u in range(n_users):  # 0..10 distinct recent items, some unindexed, some users none at all
        n = int(rng.integers(0, 11)) if u % 9 else 0
        recents.append([(f"i{i}", "click") for i in rng.choice(3000, size=n, replace=False).tolist()])
    per_user = rng.integers(0, 12, size=n_users)  # shown positions per user, grouped by user
    users = np.repeat(np.arange(n_users), per_user)
    indexed = np.flatnonzero(np.arange(3000) % 11 != 0)
    rows = items.index.rows([f"i{i}" for i in rng.choice(indexed, size=len(users)).tolist()])
    for wanted in (rng.random(len(users)) < 0.6, np.ones(len(users), bool), np.zeros(len(users), bool)):
        fast = rec._closest_history_items(rows, users, wanted, recents)
        slow = _closest_history_items_reference(rec, rows, users, wanted, recents)
        assert fast == slow  # same keys, anchors and floats (==, every bit that prints)
        assert list(fast) == sorted(fast)
    assert len(slow) == 0 and len(fast) == 0  # the last round wanted nothing


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ivf_search_by_cell_equals_faiss_search(threads):
    """The cell-ordered scan gives faiss's own answer bit for bit, through the engine's entry
    point (one thread below faiss's BLAS threshold) and directly at 1-3 OpenMP threads (the
    quantizer then runs once per thread's slice, as inside ``IndexIVF::search``)."""
    import faiss

    from recsys.items.catalog import VectorIndex, _faiss_search, _ivf_search_by_cell

    rng = np.random.default_rng(threads)
    centres = rng.normal(size=(40, 384))
    vecs = centres[rng.integers(0, 40, 6000)] + 0.3 * rng.normal(size=(6000, 384))
    vecs[5000:5100] = vecs[4000:4100]  # exact duplicates: tied scores, so the heap's tie order counts
    index = VectorIndex(384, ivf_threshold=5000)
    index.upsert([f"i{i}" for i in range(6000)], vecs.astype(np.float32))
    assert index.approximate
    ivf = index._index
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        for m in (2, 5, 21, 257, 1000):
            q = (centres[rng.integers(0, 40, m)] + 0.5 * rng.normal(size=(m, 384))).astype(np.float32)
            q[: m // 4] = vecs[rng.integers(4000, 4100, m // 4)]  # queries on the duplicates
            faiss.normalize_L2(q)
            for k in (1, 30, 130):
                want_s, want_i = ivf.search(q, k)
                for got_s, got_i in (_faiss_search(ivf, q, k), _ivf_search_by_cell(ivf, q, k)):
                    assert np.array_equal(got_i, want_i)
                    assert got_s.tobytes() == want_s.tobytes()
        assert ivf.parallel_mode == 0 and faiss.omp_get_max_threads() == threads  # both restored
    finally:
        faiss.omp_set_num_threads(before)


def _add_neighbours_reference(rec: Recommender, parts, source, signal, recents, anchor_weights) -> None:
    """``Recommender._add_neighbours`` before the one-pass read (a loop per user and anchor)."""
    names, vals, lengths, owners, slots = [], [], [], [], []
    n = rec.config.covisit_per_anchor
    for u, recent in enumerate(recents):
        for a, (anchor, _) in enumerate(recent[: len(anchor_weights)]):
            nbr_names, nbr_weights, _ = signal.ranked(anchor)
            if nbr_names:
                names += nbr_names[:n]
                vals.append(nbr_weights[:n])
                lengths.append(min(n, len(nbr_names)))
                owners.append(u)
                slots.append(a)
    if names:
        rows = rec.items.index.rows(names)
        anchors = np.repeat(slots, lengths)
        values = np.concatenate(vals) * np.asarray(anchor_weights)[anchors]
        keep = rows >= 0
        parts.add(source, np.repeat(owners, lengths)[keep], rows[keep], values[keep], anchors[keep])


@pytest.mark.parametrize("seed", [3, 4])
def test_one_pass_neighbour_entries_equal_the_per_user_reference(seed):
    from test_recommender import _world

    from recsys.ranking.recommender import _Entries, _recent_distinct

    rec, states, _now = _world(n_items=150, n_users=60, n_events=2500, seed=seed)
    rec.items.index.remove(["i3", "i10", "i25"])  # neighbours and anchors that left the index
    users = list(states.values()) + [UserState("nobody")]
    recents = [_recent_distinct(s.history, 10) for s in users]
    for signal, weights in ((rec.covisit, [1.0, 0.5, 1 / 3]), (rec.transitions, [1.0, 0.5])):
        for batch in (recents, recents[:1], recents[-1:], []):
            fast, slow = _Entries(), _Entries()
            rec._add_neighbours(fast, 1, signal, batch, weights)
            _add_neighbours_reference(rec, slow, 1, signal, batch, weights)
            assert len(fast.parts) == len(slow.parts) == (1 if batch is recents else len(fast.parts))
            for a, b in zip(fast.parts, slow.parts):
                assert a[0] == b[0] and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a[1:], b[1:]))
    assert len(fast.parts) == 0 and any(len(r) > 3 for r in recents)


def test_rank_order_equals_the_three_key_lexsort():
    """The ranking's one-sort order is ``np.lexsort((first_seen, -scores, user))`` exactly: ties in
    score (many, with -0.0 against +0.0, subnormals and infinities), users in any order."""
    from recsys.ranking.recommender import _rank_order

    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 1e-40, -1e-40, np.inf, -np.inf, 3.5, -3.5, 1.0], dtype=np.float32)
    for trial in range(400):
        n = int(rng.integers(0, 2000))
        user = rng.integers(0, int(rng.integers(1, 60)), n).astype(np.int64)
        if trial % 2:
            user = np.sort(user)  # as the grouped batch gives them
        kind = trial % 4
        if kind == 0:
            scores = (rng.integers(-3, 4, n) * 0.5).astype(np.float32)
        elif kind == 1:
            scores = rng.normal(size=n).astype(np.float32)
        elif kind == 2:
            scores = np.where(rng.random(n) < 0.3, np.float32(-0.0), rng.normal(size=n)).astype(np.float32)
        else:
            scores = rng.choice(special, n)
        first_seen = rng.permutation(n * 5)[:n].astype(np.int64)
        assert np.array_equal(_rank_order(user, scores, first_seen), np.lexsort((first_seen, -scores, user)))
    with_nan = np.array([1.0, np.nan, 1.0], dtype=np.float32)  # never produced; lexsort's answer
    assert _rank_order(np.zeros(3, np.int64), with_nan, np.arange(3)).tolist() == np.lexsort((np.arange(3), -with_nan, np.zeros(3))).tolist()


class _LexsortEntries:
    """``_Entries`` grouping with the two-key lexsort it used before (the reference)."""

    @staticmethod
    def make():
        from recsys.ranking.recommender import _Entries

        class Reference(_Entries):
            def _order(self, key, seq, attach):
                return np.lexsort((seq, key))

        return Reference()


@pytest.mark.parametrize("seed", range(6))
def test_entries_group_equals_the_lexsort_grouping(seed):
    import recsys.ranking.recommender as r

    _AGAIN, _CONTENT, _COVISIT, _NEXT, _SESSION, _TRENDING, _Entries = (
        r._AGAIN, r._CONTENT, r._COVISIT, r._NEXT, r._SESSION, r._TRENDING, r._Entries)
    rng = np.random.default_rng(seed)
    n_users, cap = int(rng.integers(1, 40)), 64
    fast, slow = _Entries(), _LexsortEntries.make()
    sources = [_CONTENT, _COVISIT, _NEXT, _SESSION, _AGAIN, _TRENDING]
    if seed == 5:  # a source added twice and out of order: the lexsort path, still the same answer
        sources = [_COVISIT, _CONTENT, _COVISIT, _SESSION]
    for src in sources:
        m = int(rng.integers(0, 400))
        args = (rng.integers(0, n_users, m), rng.integers(0, cap - 1, m), rng.integers(1, 4, m) * 0.25)
        anchors = rng.integers(0, 3, m) if src in (_COVISIT, _NEXT) else None
        attach = rng.random(m) < 0.4 if src == _SESSION else None
        for entries in (fast, slow):
            entries.add(src, *args, anchors=anchors, attach_only=attach)
    excl_owner = rng.integers(0, n_users, 30)
    excl_rows = rng.integers(0, cap - 1, 30)
    a, b = fast.group(cap, excl_rows, excl_owner), slow.group(cap, excl_rows, excl_owner)
    for x, y in ((a.key, b.key), (a.user, b.user), (a.row, b.row), (a.features, b.features), (a.first_seen, b.first_seen)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    assert a.anchor.keys() == b.anchor.keys() and all(a.anchor[s].tobytes() == b.anchor[s].tobytes() for s in a.anchor)
