"""Session neighbours (V-SKNN) as a global signal: "shoppers whose sessions looked like yours
went on to these items".

Co-visitation and transitions look at the last few items; on anonymous click sessions the next
item is best predicted from the *whole* current session (Ludewig & Jannach 2018; the
``session_knn`` baseline led YooChoose and DIGINETICA before this module existed). This is
the same scoring as :class:`recsys.backtest.baselines.SessionKNNBaseline`, kept incrementally and with
hard memory bounds so it can live inside the engine:

- at most ``max_sessions`` sessions, each holding its last ``max_session_len`` distinct items;
  when full, the least recently active session is evicted and its slot reused;
- an inverted index item -> the ``sample_size`` sessions that most recently added it;
- each session's items also as int32 codes in one ``max_sessions x max_session_len`` array
  (40 MB at the default bounds), so the ``k`` neighbours vote with one ``bincount``.

Sessions are ``Event.session_id`` when present, else runs of a user's events with gaps under
``session_gap_min``. Everything is ordered by a sequence number of applied events (never wall
time), so a replay gives the same answers as the live run, and ``load`` rebuilds exactly the
structure that was exported. Like the other global signals it does not skip re-delivered
events itself: the engine guards it with its per-partition watermarks.

>>> s = SessionNeighbours()
>>> for i, (user, item) in enumerate([("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "b")]):
...     s.update(user, None, item, ts=i)
>>> [(item, round(score, 3)) for item, score in s.scores(["u2"], 5)[0]]  # u1 shares a, b with u2
[('a', 0.612), ('b', 0.612), ('c', 0.612)]
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import orjson

from recsys.signals._covisit_kernels import IdBytes
from recsys.signals._session_kernels import most_active_per_query, session_dots, top_session_votes, top_sessions
from recsys.signals.coderows import CodeRows, RowIndex

if TYPE_CHECKING:
    from recsys.store.kv import KVStore

SESSION_PREFIX = b"ses:"
_META_KEY = b"ses:~meta"  # '~' sorts after every slot key (digits)


class SessionNeighbours:
    """Incremental session-kNN over every user's sessions, bounded in memory and persisted."""

    def __init__(
        self,
        *,
        k: int = 100,
        sample_size: int = 500,
        max_session_len: int = 50,
        session_gap_min: float = 30.0,
        max_sessions: int = 200_000,
        query_items: int = 0,
        postings_scanned: int = 0,
        vote_items: int = 0,
    ) -> None:
        if min(k, sample_size, max_session_len, max_sessions) <= 0:
            raise ValueError("k, sample_size, max_session_len and max_sessions must be > 0")
        if min(query_items, postings_scanned, vote_items) < 0:
            raise ValueError("query_items, postings_scanned and vote_items must be >= 0 (0: no bound)")
        self.k = k
        self.sample_size = sample_size
        self.max_session_len = max_session_len
        self.session_gap_ms = session_gap_min * 60_000
        self.max_sessions = max_sessions
        # Read-time bounds on the work of one query (issue 12: the session-neighbour votes'
        # cost grows with the sessions and postings held, so the engine slows as state fills).
        # Each changes the answers, so each is off (0) unless set: the query is the current
        # session's last ``query_items`` items; each query item contributes its
        # ``postings_scanned`` most recent postings; each neighbour votes for its last
        # ``vote_items`` items (its similarity still counts its whole session).
        self.query_items = query_items
        self.postings_scanned = postings_scanned
        self.vote_items = vote_items
        self._reset()

    def _reset(self) -> None:
        self._seq = 0  # applied events so far: the only clock of this structure
        # slot -> session: (owner, session key, last event ts), a tuple replaced when its ts moves;
        # and slot -> its items (item -> seq when first added, negated once the item's postings
        # pushed this session out), newest interaction last. Apart, so that neither is an object
        # the collector visits per session: a tuple of strings and ints and a dict of strings
        # to ints are both untracked (one dict per session holding both was ~22 ms a full pass
        # at 200,000 sessions; benchmarks/README.md, "The collector's full passes and the state
        # the engine keeps")
        self._sessions: dict[int, tuple[str, str | None, int]] = {}
        self._items: dict[int, dict[str, int]] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # slots, least recently active first
        self._current: dict[str, int] = {}  # user -> slot of their latest session
        # item -> slots, most recent last. An array of machine ints, not a deque of Python ints:
        # the collector's full passes visit every element of a deque (~45 ms a pass with 10,000
        # items x 500 postings), and an array has none to visit (benchmarks/README.md, "The
        # collector's full passes and the state the engine keeps")
        self._postings: dict[str, array] = {}
        # item -> small int code and back, for voting with numpy (every posted item has one)
        self._code: dict[str, int] = {}
        self._names: list[str] = []
        self._ids = IdBytes()  # their UTF-8 bytes: the compiled ranking breaks ties by id
        self._rows = CodeRows()  # code -> row of the ranker's item index
        self._active = np.zeros(1024, dtype=np.int64)  # slot -> seq of its latest event
        self._length = np.zeros(1024, dtype=np.float64)  # slot -> distinct items held
        # slot -> codes of the items it holds (in any order), -1 padded: neighbours vote from here
        self._held = np.full((1024, self.max_session_len), -1, dtype=np.int32)
        self._dirty: set[int] = set()
        self._next_slot = 0  # slots below this have been used
        self._free: list[int] = []  # heap of unused slots below _next_slot (freed by forget_user)

    def __len__(self) -> int:
        return len(self._sessions)

    # ------------------------------------------------------------------ learning

    def update(self, user_id: str, session_id: str | None, item_id: str | None, ts: int) -> None:
        """Add one engagement of ``user_id`` with ``item_id`` to their current session."""
        if item_id is None:
            return
        self._seq += 1
        slot = self._current.get(user_id)
        session = self._sessions.get(slot) if slot is not None else None
        if session is not None:
            _owner, key, last_ts = session
            if (session_id is not None and key != session_id) or (
                session_id is None and (key is not None or ts - last_ts > self.session_gap_ms)
            ):
                session = None
        if session is None:
            slot = self._new_slot()
            session = self._sessions[slot] = (user_id, session_id, ts)
            self._items[slot] = {}
            self._current[user_id] = slot
        items = self._items[slot]
        if item_id in items:  # seen in this session: move to the newest position, keep its posting
            items[item_id] = items.pop(item_id)
        else:
            items[item_id] = self._seq
            self._post(item_id, slot)
            if len(items) > self.max_session_len:
                oldest = next(iter(items))
                if items.pop(oldest) > 0:
                    self._unpost(oldest, slot)
        owner, key, last_ts = session
        if ts > last_ts:
            self._sessions[slot] = (owner, key, ts)
        self._active[slot] = self._seq
        self._length[slot] = len(items)
        self._hold(slot, items)
        self._lru[slot] = None
        self._lru.move_to_end(slot)
        self._dirty.add(slot)

    def _new_slot(self) -> int:
        if self._free:  # the lowest slot an erasure freed: the same choice after a reload
            return heapq.heappop(self._free)
        if self._next_slot < self.max_sessions:
            slot = self._next_slot
            self._next_slot += 1
            self._grow(slot)
            return slot
        slot, _ = self._lru.popitem(last=False)  # full: the least recently active session goes
        user, _key, _ts = self._sessions.pop(slot)
        for item, seq in self._items.pop(slot).items():
            if seq > 0:
                self._unpost(item, slot)
        if self._current.get(user) == slot:
            del self._current[user]
        return slot

    def _post(self, item_id: str, slot: int) -> None:
        postings = self._postings.get(item_id)
        if postings is None:
            postings = self._postings[item_id] = array("q")
            self._intern(item_id)
        elif len(postings) == self.sample_size:  # the oldest session falls out of this item's list
            pushed = postings[0]
            del postings[0]
            items = self._items[pushed]
            items[item_id] = -abs(items[item_id])
            self._dirty.add(pushed)
        postings.append(slot)

    def _grow(self, slot: int) -> None:
        """Make the per-slot arrays long enough for ``slot`` (doubling)."""
        while slot >= len(self._active):
            self._active = np.concatenate([self._active, np.zeros_like(self._active)])
            self._length = np.concatenate([self._length, np.zeros_like(self._length)])
            self._held = np.concatenate([self._held, np.full_like(self._held, -1)])

    def _hold(self, slot: int, items: dict[str, int]) -> None:
        row = self._held[slot]
        row[: len(items)] = np.fromiter(map(self._code.__getitem__, items), dtype=np.int32, count=len(items))
        row[len(items) :] = -1

    def _intern(self, item_id: str) -> None:
        """Give ``item_id`` a code if it has none (codes stay: at most one per distinct item)."""
        if item_id not in self._code:
            self._code[item_id] = len(self._names)
            self._ids.add(len(self._names), item_id)
            self._names.append(item_id)

    def _unpost(self, item_id: str, slot: int) -> None:
        postings = self._postings[item_id]
        postings.remove(slot)
        if not postings:
            del self._postings[item_id]

    def forget_user(self, user_id: str) -> list[bytes]:
        """Erase every session of ``user_id`` (the right to be forgotten): their postings,
        votes and records go, their slots are reused. Returns the keys to delete from the
        store in the same write as the rest of the erasure."""
        slots = sorted(slot for slot, (owner, _key, _ts) in self._sessions.items() if owner == user_id)
        for slot in slots:
            del self._sessions[slot]
            for item, seq in self._items.pop(slot).items():
                if seq > 0:
                    self._unpost(item, slot)
            self._lru.pop(slot, None)
            self._active[slot] = 0
            self._length[slot] = 0
            self._held[slot] = -1
            self._dirty.discard(slot)
            heapq.heappush(self._free, slot)
        self._current.pop(user_id, None)
        return [SESSION_PREFIX + str(slot).encode() for slot in slots]

    # ------------------------------------------------------------------ reading

    def scores(self, user_ids: list[str], n: int) -> list[list[tuple[str, float]]]:
        """Per user, up to ``n`` items voted for by the ``k`` most similar sessions, best first.

        The user's latest session is the query: a binary vector with linearly decaying
        position weights (newest 1, oldest 1/len). Candidate neighbours are the sessions in
        the postings of its items; the ``sample_size`` most recently active are compared by
        cosine similarity, and the ``k`` most similar vote for their items with their
        similarity. Ties break by item id (scores) and slot (neighbours): deterministic.
        """
        owner, codes, votes = self.ranked_votes(user_ids, n)
        out: list[list[tuple[str, float]]] = [[] for _ in user_ids]
        for u, item, vote in zip(owner.tolist(), self.item_names(codes), votes.tolist()):
            out[u].append((item, vote))
        return out

    def item_names(self, codes: np.ndarray) -> list[str]:
        """Item ids of the codes :meth:`ranked_votes` returns."""
        return list(map(self._names.__getitem__, codes.tolist()))

    def item_rows(self, codes: np.ndarray, index: RowIndex) -> np.ndarray:
        """Rows in ``index`` of the codes :meth:`ranked_votes` returns (-1: not in it): what
        ``index.rows(self.item_names(codes))`` gives, from an array (:class:`CodeRows`)."""
        return self._rows.rows(codes, self._names, index)

    def ranked_votes(self, user_ids: list[str], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`scores` for a whole batch as three arrays ``(user position, item code, vote)``:
        grouped by user in ``user_ids`` order, each user's best first (ties by item id).

        The sums per (query, session) and per (query, item), each query's ``k`` nearest
        sessions and its ``n`` best items are compiled loops over the whole batch
        (``_session_kernels``: no sort of the batch's entries; ties by item id, compared on the
        ids' UTF-8 bytes). Each sum adds
        the same floats in the same order as scoring the user alone (query position, then
        posting order; neighbour order for votes), so the votes are bit-identical to the
        per-user computation (``tests/test_speed_equivalence.py`` pins that against the per-user
        reference).
        """
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
        max_len = min(self.query_items or self.max_session_len, self.max_session_len)
        get = self._recent_postings if self.postings_scanned else self._postings.get
        lists: list = []  # posting lists of every query item, users' queries one after another
        owners, lengths, own = [], [], []
        for u, user_id in enumerate(user_ids):
            slot = self._current.get(user_id)
            if slot is None or slot not in self._sessions:
                continue
            query = list(self._items[slot])[-max_len:]
            lists += map(get, query, itertools.repeat(()))
            owners.append(u)
            lengths.append(len(query))
            own.append(slot)
        if not owners or n <= 0:
            return empty
        m = np.asarray(lengths, dtype=np.int64)
        sizes = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        total = int(sizes.sum())
        if total == 0:
            return empty
        slots = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=total)  # in C
        # per (query, session): the query's item at position j (from 1, oldest first) weighs j / m_q
        q, sids, dots = session_dots(slots, sizes, m, len(self._active))
        keep = sids != np.asarray(own, dtype=np.int64)[q]
        q, sids, dots = q[keep], sids[keep], dots[keep]
        if len(q) == 0:
            return empty
        per_q = np.bincount(q, minlength=len(m))
        if per_q.max() > self.sample_size:  # the most recently active sessions (activity is unique)
            pick = most_active_per_query(q, self._active[sids], self.sample_size)
            q, sids, dots = q[pick], sids[pick], dots[pick]
        sims = dots / np.sqrt(m[q] * self._length[sids])
        # the k most similar per query, most similar first, ties by slot
        top = top_sessions(q, sids, sims, self.k)
        q, sids, sims = q[top], sids[top], sims[top]
        # every neighbour votes its similarity for each of its items, in neighbour order; rows
        # hold a session's items oldest first, so a vote_items bound is a first column
        first_col = np.zeros(len(sids), dtype=np.int64)
        if self.vote_items:
            first_col = np.maximum(self._length[sids] - self.vote_items, 0).astype(np.int64)
        # and each query's n best, best first, ties by item id
        vq, codes, votes = top_session_votes(q, sids, sims, self._held, self._length, first_col, len(self._names), n,
                                             self._ids.buf, self._ids.offset, self._ids.length)
        return np.asarray(owners, dtype=np.int64)[vq], codes, votes

    def _recent_postings(self, item_id: str, default=()):
        """The ``postings_scanned`` most recent postings of ``item_id``, in posting order."""
        postings = self._postings.get(item_id, default)
        if len(postings) <= self.postings_scanned:
            return postings
        return postings[-self.postings_scanned :]

    # ------------------------------------------------------------------ persistence

    def export_dirty(self) -> dict[bytes, bytes]:
        """Sessions changed since the last export (``b"ses:<slot>"`` -> JSON) and the sequence
        counter; clears them. A slot reused after an eviction is simply overwritten."""
        if not self._dirty:
            return {}
        out: dict[bytes, bytes] = {}
        for slot in sorted(self._dirty):
            s = self._sessions.get(slot)
            if s is not None:
                record = [*s, int(self._active[slot]), list(self._items[slot].items())]  # owner, key, ts, ...
                out[SESSION_PREFIX + str(slot).encode()] = orjson.dumps(record)
        out[_META_KEY] = orjson.dumps({"seq": self._seq})
        self._dirty.clear()
        return out

    def load(self, kv: KVStore) -> None:
        """Replace everything held with the records under ``b"ses:"`` in ``kv``.

        Postings are rebuilt from the items still posted, in the order they were added (their
        sequence number; postings only ever append and remove, so that is their live order),
        and the recency order from each session's latest event, so the loaded structure
        answers exactly as the one that was exported.
        """
        self._reset()
        adds: list[tuple[int, int, str]] = []
        by_activity: list[tuple[int, int]] = []
        for key, value in kv.iter_prefix(SESSION_PREFIX):
            if key == _META_KEY:
                self._seq = int(orjson.loads(value)["seq"])
                continue
            slot = int(key[len(SESSION_PREFIX) :])
            user, session_key, ts, active, items = orjson.loads(value)
            self._grow(slot)
            self._sessions[slot] = (user, session_key, ts)
            self._items[slot] = {i: s for i, s in items}
            self._active[slot] = active
            self._length[slot] = len(items)
            by_activity.append((active, slot))
            adds.extend((seq, slot, item) for item, seq in items if seq > 0)
            for item, _seq in items:  # also items no longer posted: their sessions still vote
                self._intern(item)
            self._hold(slot, self._items[slot])
        self._next_slot = max(self._sessions, default=-1) + 1
        self._free = [slot for slot in range(self._next_slot) if slot not in self._sessions]  # sorted: a heap
        for active, slot in sorted(by_activity):
            self._lru[slot] = None
            owner, _key, _ts = self._sessions[slot]
            self._current[owner] = slot  # the user's latest session wins
        for _seq, slot, item in sorted(adds):
            self._post(item, slot)
