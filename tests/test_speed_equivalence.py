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

from recsys.signals.covisitation import CoVisitation
from recsys.signals.sessions import SessionNeighbours

MIN = 60_000


def _score_one_reference(s: SessionNeighbours, own: int, items: dict[str, int], n: int) -> list[tuple[str, float]]:
    """``SessionNeighbours._score_one`` before the batch version (one user at a time)."""
    query = list(items)[-s.max_session_len :]
    m = len(query)
    lists = [s._postings.get(item, ()) for item in query]
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
            assert fast.export_dirty() == slow.export_dirty()  # same bytes: same maps, same order
    assert fast.export_dirty() == slow.export_dirty()
    assert fast._nbrs == slow._nbrs and fast._counts == slow._counts
    assert all(list(fast._nbrs[i].items()) == list(slow._nbrs[i].items()) for i in slow._nbrs)
    for item_id, low in fast._weakest.items():  # what is remembered is the list's true start
        assert list(low) == sorted(zip(fast._nbrs[item_id].values(), fast._nbrs[item_id]))[: len(low)]
    assert sum(len(n) > max_neighbours - 1 for n in slow._nbrs.values()) > 5  # lists really overflowed
