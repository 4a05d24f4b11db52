"""Session neighbours (V-SKNN inside the engine): scoring, session cuts, memory bounds, persistence."""

from __future__ import annotations

import math
import random
import textwrap

import pytest

from recsys.signals.sessions import SessionNeighbours

MIN = 60_000  # one minute in ms


def _feed(s: SessionNeighbours, rows) -> None:
    for user, session, item, ts in rows:
        s.update(user, session, item, ts)


def test_votes_are_cosine_similarities_with_position_weights():
    s = SessionNeighbours()
    _feed(s, [("u1", None, "a", 0), ("u1", None, "b", 1), ("u1", None, "c", 2)])
    _feed(s, [("u3", None, "b", 3), ("u3", None, "d", 4)])
    _feed(s, [("u2", None, "a", 5), ("u2", None, "b", 6)])
    # query u2 = [a (weight 1/2), b (weight 1)]; u1 holds a, b: dot 1.5 over sqrt(2 * 3);
    # u3 holds b: dot 1 over sqrt(2 * 2)
    sim1, sim3 = 1.5 / math.sqrt(6), 1.0 / math.sqrt(4)
    got = dict(s.scores(["u2"], 10)[0])
    assert got == pytest.approx({"a": sim1, "b": sim1 + sim3, "c": sim1, "d": sim3})
    assert [i for i, _ in s.scores(["u2"], 2)[0]] == ["b", "a"]  # best first, ties by id


def test_own_session_is_not_a_neighbour_and_unknown_users_get_nothing():
    s = SessionNeighbours()
    _feed(s, [("u1", None, "a", 0), ("u1", None, "b", 1)])
    assert s.scores(["u1", "nobody"], 5) == [[], []]


def test_sessions_are_cut_by_session_id_or_by_the_gap():
    s = SessionNeighbours(session_gap_min=30)
    _feed(s, [("u", "s1", "a", 0), ("u", "s1", "b", 1), ("u", "s2", "c", 2)])  # new id: new session
    assert len(s) == 2
    _feed(s, [("v", None, "a", 0), ("v", None, "b", 29 * MIN), ("v", None, "c", 60 * MIN)])  # 31 min gap
    assert len(s) == 4
    # v's current session is [c] alone: its neighbour is u's second session, voting only c
    assert s.scores(["v"], 5) == [[("c", 1.0)]]


def test_a_repeated_item_moves_to_the_newest_position_and_is_posted_once():
    s = SessionNeighbours()
    _feed(s, [("u1", None, "a", 0), ("u1", None, "b", 1), ("u1", None, "a", 2)])
    assert list(s._items[s._current["u1"]]) == ["b", "a"]
    assert list(s._postings["a"]) == [s._current["u1"]]
    _feed(s, [("u2", None, "a", 3)])
    assert dict(s.scores(["u2"], 5)[0]) == pytest.approx({"a": 1 / math.sqrt(2), "b": 1 / math.sqrt(2)})


def _invariants(s: SessionNeighbours) -> None:
    """Postings list exactly the live sessions holding an item with a positive sequence."""
    posted = {(slot, item) for item, slots in s._postings.items() for slot in slots}
    held = {(slot, item) for slot, items in s._items.items() for item, seq in items.items() if seq > 0}
    assert posted == held
    assert all(len(p) <= s.sample_size for p in s._postings.values())
    assert all(len(items) <= s.max_session_len for items in s._items.values())
    assert len(s) <= s.max_sessions and set(s._lru) == set(s._sessions)
    assert all(s._sessions[slot][0] == user for user, slot in s._current.items()) and set(s._items) == set(s._sessions)
    for slot, items in s._items.items():  # the vote array holds exactly each session's items
        row = s._held[slot]
        assert sorted(s._names[c] for c in row[row >= 0]) == sorted(items)


def test_memory_stays_bounded_under_a_long_stream():
    rng = random.Random(3)
    s = SessionNeighbours(k=5, sample_size=4, max_session_len=3, max_sessions=10)
    for t in range(3000):
        user = f"u{rng.randrange(40)}"
        s.update(user, None, f"i{rng.randrange(15)}", t * MIN * rng.choice([1, 1, 40]))
        if t % 97 == 0:
            _invariants(s)
    _invariants(s)
    assert len(s) == 10 and len(s._current) <= 10


def test_postings_and_sessions_give_the_collector_nothing_to_visit_per_session():
    """Each item's postings (up to ``sample_size`` sessions, 500 by default) are visited by
    every full pass of Python's collector when held as Python ints: ~45 ms a pass at 10,000
    items, the live stream standing still meanwhile (benchmarks/README.md, "The collector's
    full passes and the state the engine keeps"). Held as arrays of machine ints there is
    nothing in them to visit, and they still list exactly the sessions that hold each item.
    Likewise a session was one dict holding another (~22 ms a pass at 200,000 sessions)."""
    import gc

    rng = random.Random(5)
    s = SessionNeighbours(k=50, sample_size=30, max_sessions=500)
    for t in range(4000):
        s.update(f"u{rng.randrange(1000)}", None, f"i{rng.randrange(20)}", t * MIN)
    _invariants(s)
    assert max(map(len, s._postings.values())) == s.sample_size  # full lists, the oldest pushed out
    gc.collect()
    assert [item for item, slots in s._postings.items() if len(gc.get_referents(slots)) > 1] == []
    # nor one object per session: each session's owner, key and time, and its items, untracked
    assert not [slot for slot in s._sessions if gc.is_tracked(s._sessions[slot]) or gc.is_tracked(s._items[slot])]


def test_the_least_recently_active_session_is_evicted_first():
    s = SessionNeighbours(max_sessions=2)
    _feed(s, [("u1", None, "a", 0), ("u2", None, "a", 1), ("u1", None, "b", 2)])  # u2's is now the oldest
    _feed(s, [("u3", None, "a", 3)])
    assert set(s._current) == {"u1", "u3"}
    assert [i for i, _ in s.scores(["u3"], 5)[0]] == ["a", "b"]  # only u1's session is left to vote


def _brute_force(sessions: dict[str, list[str]], query_user: str) -> dict[str, float]:
    """V-SKNN with every other session as a neighbour (no sampling, no k cut)."""
    query = sessions[query_user]
    w = {item: (pos + 1) / len(query) for pos, item in enumerate(query)}
    votes: dict[str, float] = {}
    for user, items in sessions.items():
        if user == query_user:
            continue
        dot = sum(w.get(i, 0.0) for i in items)
        if dot:
            for i in items:
                votes[i] = votes.get(i, 0.0) + dot / math.sqrt(len(query) * len(items))
    return votes


def test_scores_match_a_brute_force_reference_when_nothing_is_cut():
    rng = random.Random(9)
    s = SessionNeighbours(k=1000, sample_size=1000)
    sessions: dict[str, list[str]] = {}
    for t in range(600):
        user, item = f"u{rng.randrange(60)}", f"i{rng.randrange(40)}"
        s.update(user, None, item, t)
        items = sessions.setdefault(user, [])
        if item in items:
            items.remove(item)
        items.append(item)
    for user in sorted(sessions)[:20]:
        want = _brute_force(sessions, user)
        got = s.scores([user], 1000)[0]
        assert dict(got) == pytest.approx(want)
        assert [v for _, v in got] == sorted((v for _, v in got), reverse=True)


def test_a_cut_at_n_is_the_prefix_of_the_full_ranking_even_through_ties():
    rng = random.Random(4)
    s = SessionNeighbours(k=30, sample_size=50)
    for t in range(2000):  # short sessions of few items: many equal vote totals
        s.update(f"u{rng.randrange(200)}", None, f"i{rng.randrange(30)}", t * MIN * rng.choice([1, 40]))
    users = sorted(s._current)
    full = s.scores(users, 10_000)
    assert sum(len(r) - len({v for _, v in r}) for r in full) > 50  # ties really occur
    for n in (1, 3, 7):
        assert s.scores(users, n) == [r[:n] for r in full]
    assert all(r == sorted(r, key=lambda kv: (-kv[1], kv[0])) for r in full)


def _stream(rng: random.Random, n: int, start: int = 0):
    for t in range(start, start + n):
        user = f"u{rng.randrange(30)}"
        session = None if rng.random() < 0.5 else f"{user}-s{t // 200}"
        yield user, session, f"i{rng.randrange(20)}", t * MIN


def test_export_and_load_answer_exactly_as_before_and_keep_learning_alike(kv):
    rng = random.Random(5)
    s = SessionNeighbours(k=10, sample_size=6, max_session_len=5, max_sessions=25)
    for n, row in enumerate(_stream(rng, 1500)):
        s.update(*row)
        if n % 100 == 0:
            kv.write(s.export_dirty())
    kv.write(s.export_dirty())
    assert s.export_dirty() == {}
    d = SessionNeighbours(k=10, sample_size=6, max_session_len=5, max_sessions=25)
    d.load(kv)
    users = [f"u{i}" for i in range(30)]
    assert d.scores(users, 50) == s.scores(users, 50)
    _invariants(d)
    more = list(_stream(random.Random(6), 500, start=1500))  # evictions and pushed-out postings go on
    for row in more:
        s.update(*row)
        d.update(*row)
    assert d.scores(users, 50) == s.scores(users, 50)
    assert d.export_dirty() == s.export_dirty()


def test_rejects_non_positive_bounds():
    with pytest.raises(ValueError):
        SessionNeighbours(max_sessions=0)
    with pytest.raises(ValueError):
        SessionNeighbours(query_items=-1)


def _voted(bounds: dict) -> set[str]:
    s = SessionNeighbours(**bounds)
    _feed(s, [("u1", None, "a", 0), ("u1", None, "b", 1)])
    _feed(s, [("u2", None, "c", 2), ("u2", None, "x", 3)])
    _feed(s, [("u3", None, "a", 4), ("u3", None, "y", 5)])
    _feed(s, [("q", None, "a", 6), ("q", None, "c", 7)])  # postings: a -> u1, u3, q; c -> u2, q
    return {item for item, _ in s.scores(["q"], 10)[0]}


def test_read_time_bounds_narrow_the_query_the_postings_and_the_votes():
    assert _voted({}) == {"a", "b", "c", "x", "y"}
    assert _voted({"query_items": 1}) == {"c", "x"}  # only the newest item, c, is asked: u2 answers
    assert _voted({"postings_scanned": 2}) == {"a", "c", "x", "y"}  # a's oldest posting, u1, is not read
    assert _voted({"vote_items": 1}) == {"b", "x", "y"}  # each neighbour votes for its newest item only
    assert _voted({"query_items": 50, "postings_scanned": 500, "vote_items": 50}) == _voted({})


_RUN = textwrap.dedent(
    """
    import hashlib, random
    from recsys.signals.sessions import SessionNeighbours
    rng = random.Random(11)
    s = SessionNeighbours(k=8, sample_size=5, max_session_len=4, max_sessions=30)
    for t in range(2000):
        s.update("u%d" % rng.randrange(40), None, "i%d" % rng.randrange(30), t * 600_000)
    blob = repr(sorted(s.export_dirty().items())) + repr(s.scores(["u%d" % i for i in range(40)], 20))
    print(hashlib.sha256(blob.encode()).hexdigest())
    """
)


def test_sessions_do_not_depend_on_the_hash_seed(outputs_under_hash_seeds):
    outs = outputs_under_hash_seeds(_RUN)
    assert len(outs) == 1
