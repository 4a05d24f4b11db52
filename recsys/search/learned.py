"""Learned query -> item associations: what shoppers choose after searching, online and persisted.

**The attribution rule.** A ``search`` by a user opens a window on that user's next
:data:`FOLLOW_EVENTS` events (5) within :data:`FOLLOW_MS` (30 minutes) of the search, in event
time. Each ``click``, ``add_to_cart`` or ``purchase`` of an item inside the window is an
engagement with that item *after that query*, weighing ``EVENT_WEIGHTS[type] / 8`` (purchase
1, add to cart 0.5, click 0.25). A ``browse`` counts toward the 5 events but is no engagement;
a new search closes the window and opens its own. Queries are identified by
:func:`recsys.search.text.query_key` (normalised, sorted tokens: word order does not matter).

**Only an answer to the query is credited** (:meth:`recsys.search.Search.credits`): an engaged
item counts for the query when its text matches it (a BM25 score at least half the query's best,
or a MiniLM cosine of at least ``min_semantic``), or when text cannot judge (the item has no
text in the lexical index, or the query matches no item's text at all: the id-only catalog, a
query in words the catalog does not use). The other engagements of the window (the milk bought
in the same basket as the cereal searched for) are things the shopper also did, not answers to
the query; they still use up the window's events. A window's other events are left to the
recommender's co-visitation.

**The association.** Per query, an exponential moving average over its engagements *in event
time*: each engagement first multiplies all of the query's weights by ``1 - rate`` and then adds
``rate * weight`` to the chosen item. So weights stay in [0, 1], and when what shoppers choose
after a query changes, the new choice overtakes the old one after a fixed number of
engagements whatever the history (rate 0.25: an item the query always led to drops to 0.42
after three purchases of another, which has then risen to 0.58).

**Independent of arrival order.** One process reading several partitions sees each user's
events in order, but how the users' events interleave depends on the consumer's fetches, and
differs after a restart. An average taken in arrival order would then learn other weights
than the uninterrupted run. So each query keeps its last :data:`KEEP_ENGAGEMENTS` engagements
sorted by ``(event time, crc32 of the engagement's event id, item, weight)`` and its weights
are the average over them in that order: the same records whatever the interleaving. (An
engagement older than the query's last 64 weighs at most ``0.75 ** 64`` = 1e-8 of it: dropped.)
Bounded: at most ``max_items`` items per query (the lightest go) and ``max_queries`` queries
(the one least recently engaged with goes: at that bound alone, arrival order matters).

**Crash safety.** Like :class:`recsys.signals.covisitation.CoVisitation`: ``export_dirty()`` returns the
changed records (``b"sqa:" + key``; the open windows under ``b"sqw:" + user``) for the
engine's one atomic write per batch, ``load(kv)`` restores them, and the engine only feeds
events above the committed watermark, so a re-delivered event is never learned twice.

**Erasure.** Each engagement credited is also noted in the shopper's :class:`SearchTrail`, so that
erasing them takes it back (:meth:`QueryAssociations.unlearn`): the query's weights become those
it would hold had it never been learned: exactly, as the average is taken in event time, unless
learning it had pushed the query's oldest engagement out (which weighed 1e-8 at most).

>>> a = QueryAssociations(rate=0.5)
>>> a.learn("tent", "t1", 1.0); a.learn("tent", "t2", 1.0)
>>> a.top("tent", 5)
[('t2', 0.5), ('t1', 0.25)]
"""

from __future__ import annotations

import bisect
import hashlib
import struct
import zlib
from collections import OrderedDict
from typing import TYPE_CHECKING

import orjson

from recsys.feedback import EVENT_WEIGHTS

if TYPE_CHECKING:
    from recsys.store.kv import KVStore

ASSOC_PREFIX = b"sqa:"
WINDOW_PREFIX = b"sqw:"
#: Per shopper, what search holds of them (:class:`SearchTrail`): :func:`trail_prefix` + a record.
TRAIL_PREFIX = b"sqt:"
#: Events of the same user after a search that can still be attributed to it.
FOLLOW_EVENTS = 5
#: ... and the time after the search within which they must fall (event time).
FOLLOW_MS = 30 * 60 * 1000
#: Event types that count as choosing an item after a search, with their weight (purchase 1).
ENGAGEMENTS = {t: EVENT_WEIGHTS[t] / EVENT_WEIGHTS["purchase"] for t in ("click", "add_to_cart", "purchase")}


#: Engagements kept per query (see "Independent of arrival order" above).
KEEP_ENGAGEMENTS = 64

#: An engagement: ``(event time, crc32 of its event id, item, weight)``; sorted, they are the order
#: the average is taken in.
Engagement = tuple[int, int, str, float]


def tie_break(event_id: str) -> int:
    """The order of an engagement among those at the same event time: the crc32 of its event id."""
    return zlib.crc32(event_id.encode())


class QueryAssociations:
    """Query key -> item -> weight in [0, 1], an exponential moving average per query, taken in
    event time over its last :data:`KEEP_ENGAGEMENTS` engagements."""

    def __init__(self, *, rate: float = 0.25, max_items: int = 50, max_queries: int = 100_000,
                 keep: int = KEEP_ENGAGEMENTS) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        self.rate = rate
        self.max_items = max_items
        self.max_queries = max_queries
        self.keep = keep
        self._engaged: OrderedDict[str, list[Engagement]] = OrderedDict()  # least recently learned first
        self._counts: dict[str, int] = {}  # engagements per query (for reasons and slices)
        #: weights read from a record of the arrival-order average (before the event-time one):
        #: query -> (item -> weight, the query's count then); they decay by ``1 - rate`` per
        #: engagement since, and are dropped once ``keep`` engagements followed
        self._legacy: dict[str, tuple[dict[str, float], int]] = {}
        self._items: dict[str, dict[str, float]] = {}  # the weights, computed when first read
        self._dirty: set[str] = set()

    def __len__(self) -> int:
        return len(self._engaged)

    def learn(self, key: str, item_id: str, weight: float, *, ts: int = 0, event_id: str = "") -> None:
        """One engagement with ``item_id`` after query ``key`` (weight in (0, 1]): the event
        ``event_id`` at ``ts`` (ms). Engagements equal in time are ordered by the crc32 of their
        event ids, then item and weight."""
        self.learn_at(key, item_id, weight, ts, tie_break(event_id))

    def learn_at(self, key: str, item_id: str, weight: float, ts: int, tie: int) -> None:
        """:meth:`learn` with the tie-break already computed (the exchange log's ops carry it)."""
        if not key or weight <= 0:
            return
        engaged = self._engaged.get(key)
        if engaged is None:
            engaged = self._engaged[key] = []
        else:
            self._engaged.move_to_end(key)
        bisect.insort(engaged, (int(ts), int(tie), item_id, float(weight)))
        if len(engaged) > self.keep:
            del engaged[0]
        count = self._counts[key] = self._counts.get(key, 0) + 1
        legacy = self._legacy.get(key)
        if legacy is not None and count - legacy[1] >= self.keep:
            del self._legacy[key]
        self._items.pop(key, None)
        self._dirty.add(key)
        while len(self._engaged) > self.max_queries:
            old, _ = self._engaged.popitem(last=False)
            self._forget(old)
            self._dirty.add(old)

    def unlearn(self, key: str, item_id: str, weight: float, ts: int, tie: int) -> bool:
        """Take one engagement back (an erasure of the shopper who made it): ``learn_at``'s
        arguments. The query's weights become those it would hold had the engagement never been
        learned, as long as it is among the query's last :data:`KEEP_ENGAGEMENTS` (an older one was
        dropped already, and so is not held: False). A query left with no engagement goes, its
        record with it (its key is the query's words)."""
        engaged = self._engaged.get(key)
        if not engaged:
            return False
        record = (int(ts), int(tie), item_id, float(weight))
        at = bisect.bisect_left(engaged, record)
        if at == len(engaged) or engaged[at] != record:
            return False
        del engaged[at]
        self._counts[key] -= 1
        self._items.pop(key, None)
        self._dirty.add(key)
        if not engaged and key not in self._legacy:
            del self._engaged[key]
            self._forget(key)
        return True

    def last_ts(self, key: str) -> int:
        """Event time of the query's latest engagement kept (0: none)."""
        engaged = self._engaged.get(key)
        return engaged[-1][0] if engaged else 0

    def _forget(self, key: str) -> None:
        self._counts.pop(key, None)
        self._legacy.pop(key, None)
        self._items.pop(key, None)

    def weights(self, key: str) -> dict[str, float]:
        """Item -> weight for a query key (empty when nothing was learned); do not modify."""
        items = self._items.get(key)
        if items is None:
            engaged = self._engaged.get(key)
            if engaged is None:
                return {}
            items = self._items[key] = self._average(key, engaged)
        return items

    def _average(self, key: str, engaged: list[Engagement]) -> dict[str, float]:
        """The moving average over the sorted engagements (items in order of first appearance),
        the lightest beyond ``max_items`` left out."""
        keep, rate = 1.0 - self.rate, self.rate
        items: dict[str, float] = {}
        legacy = self._legacy.get(key)
        if legacy is not None:
            decay = keep ** (self._counts[key] - legacy[1] - len(engaged))  # engagements since, not kept
            items = {i: w * decay for i, w in legacy[0].items()}
        for _ts, _tie, item_id, weight in engaged:
            for other in items:
                items[other] *= keep
            items[item_id] = items.get(item_id, 0.0) + rate * weight
        if len(items) > self.max_items:
            drop = set(sorted(items, key=lambda i: (items[i], i))[: len(items) - self.max_items])
            items = {i: w for i, w in items.items() if i not in drop}
        return items

    def engagements(self, key: str) -> int:
        return self._counts.get(key, 0)

    def top(self, key: str, n: int) -> list[tuple[str, float]]:
        items = self.weights(key)
        return sorted(items.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def export_dirty(self) -> dict[bytes, bytes]:
        """Changed queries as ``b"sqa:"+key -> JSON {"e": [[ts, tie, item, weight], ...], "n":
        count}`` (plus ``"b"``, ``"bn"``: weights read from an older record and the count then;
        ``b""``: evicted)."""
        out: dict[bytes, bytes] = {}
        for key in sorted(self._dirty):
            engaged = self._engaged.get(key)
            if engaged is None:
                out[ASSOC_PREFIX + key.encode()] = b""
                continue
            record: dict = {"e": engaged, "n": self._counts[key]}
            if (legacy := self._legacy.get(key)) is not None:
                record["b"], record["bn"] = legacy
            out[ASSOC_PREFIX + key.encode()] = orjson.dumps(record)
        self._dirty.clear()
        return out

    def load(self, kv: KVStore) -> None:
        """Replace everything held with the records under ``b"sqa:"`` (an older record, ``[{item:
        weight}, count]`` of the arrival-order average, becomes the query's starting weights)."""
        self._engaged.clear()
        self._counts.clear()
        self._legacy.clear()
        self._items.clear()
        self._dirty.clear()
        for key, value in kv.iter_prefix(ASSOC_PREFIX):
            if not value:  # emptied by a release before 2026-12-08: deleted at the next commit
                self._dirty.add(key[len(ASSOC_PREFIX):].decode())
                continue
            record = orjson.loads(value)
            name = key[len(ASSOC_PREFIX):].decode()
            if isinstance(record, list):  # [{item: weight}, count]
                items, count = record
                self._engaged[name] = []
                self._counts[name] = int(count)
                self._legacy[name] = ({i: float(w) for i, w in items.items()}, int(count))
                continue
            self._engaged[name] = [(int(ts), int(tie), item, float(w)) for ts, tie, item, w in record["e"]]
            self._counts[name] = int(record["n"])
            if "b" in record:
                self._legacy[name] = ({i: float(w) for i, w in record["b"].items()}, int(record["bn"]))


def window_key(user_id: str) -> bytes:
    """Store key of a user's open search window."""
    return WINDOW_PREFIX + user_id.encode()


class SearchWindows:
    """Each user's open search window: ``(query key, query as typed, search ts, events left,
    first item engaged in it)``.

    Bounded by ``max_users`` (the least recently opened goes); persisted like the associations.

    >>> w = SearchWindows()
    >>> w.open("u1", "tent", "Tent", ts=0)
    >>> w.follow("u1", "t1", "purchase", ts=60_000)
    ('tent', 'Tent', 1.0, None)
    >>> w.follow("u1", "t2", "click", ts=FOLLOW_MS + 1)  # too late: window closed
    """

    def __init__(self, *, follow_events: int = FOLLOW_EVENTS, follow_ms: int = FOLLOW_MS, max_users: int = 200_000) -> None:
        self.follow_events = follow_events
        self.follow_ms = follow_ms
        self.max_users = max_users
        # user -> (key, query, ts, events left, first item or None): tuples, replaced on each
        # change, so that the collector stops visiting them (a tuple of strings and ints is
        # untracked by the first collection that sees it; a list never is)
        self._open: OrderedDict[str, tuple] = OrderedDict()
        self._dirty: set[str] = set()

    def open(self, user_id: str, key: str, query: str, ts: int) -> None:
        self._open.pop(user_id, None)
        self._open[user_id] = (key, query, ts, self.follow_events, None)  # None: no item engaged yet
        self._dirty.add(user_id)
        while len(self._open) > self.max_users:
            old, _ = self._open.popitem(last=False)
            self._dirty.add(old)

    def open_window(self, user_id: str, now_ts: int) -> tuple[str, str, int] | None:
        """``(query key, query, search ts)`` of the user's window if it is still open at ``now_ts``."""
        window = self._open.get(user_id)
        if window is None or window[3] <= 0 or now_ts - window[2] > self.follow_ms:
            return None
        return window[0], window[1], window[2]

    def last_query(self, user_id: str) -> str | None:
        window = self._open.get(user_id)
        return None if window is None else window[1]

    def follow(self, user_id: str, item_id: str | None, event_type: str,
               ts: int) -> tuple[str, str, float, str | None] | None:
        """A later event of the user: ``(query key, query as typed, engagement weight, the item
        first engaged in the window before this event or None)`` when it falls in the window and
        is an engagement (whether it is credited is the caller's rule)."""
        window = self._open.get(user_id)
        if window is None:
            return None
        key, query, opened, left = window[:4]
        first = window[4] if len(window) > 4 else None
        if ts - opened > self.follow_ms or left <= 0:
            del self._open[user_id]
            self._dirty.add(user_id)
            return None
        weight = ENGAGEMENTS.get(event_type)
        engagement = weight is not None and item_id is not None
        if left - 1 <= 0:
            del self._open[user_id]
        else:  # the first engagement becomes the window's first choice
            self._open[user_id] = (key, query, opened, left - 1, item_id if engagement and first is None else first)
        self._dirty.add(user_id)
        return (key, query, weight, first) if engagement else None

    def forget_user(self, user_id: str) -> list[bytes]:
        """Drop a user's window (an erasure); the key to delete with it."""
        self._open.pop(user_id, None)
        self._dirty.discard(user_id)
        return [window_key(user_id)]

    def export_dirty(self) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for user_id in sorted(self._dirty):
            window = self._open.get(user_id)
            out[WINDOW_PREFIX + user_id.encode()] = b"" if window is None else orjson.dumps(window)
        self._dirty.clear()
        return out

    def load(self, kv: KVStore) -> None:
        self._open.clear()
        self._dirty.clear()
        for key, value in kv.iter_prefix(WINDOW_PREFIX):
            if value:
                self._open[key[len(WINDOW_PREFIX):].decode()] = tuple(orjson.loads(value))
            else:  # a closed window, emptied by a release before 2026-12-08: deleted at the next commit
                self._dirty.add(key[len(WINDOW_PREFIX):].decode())


#: A trail record's key after its user's prefix: ``b"e"`` + event time (8 bytes, big-endian) +
#: tie-break (4 bytes) + item (an engagement credited to a query); ``b"q"`` + 8 bytes of the
#: BLAKE2b of a query text (a query the shopper typed, as the query model read it).
_ENGAGED, _TYPED = b"e", b"q"
_TS_TIE = struct.Struct(">qI")


def trail_prefix(user_id: str) -> bytes:
    """The prefix of a user's trail records: ``b"sqt:"``, the id's length in UTF-8 bytes (4 bytes,
    big-endian) and the id, so that no other id's records start with it whatever the ids hold
    (until 2026-12-08 the id and a NUL: an erasure of ``"u\\x00e"``, which the control topic
    then took, matched the engagements of ``"u"``; a review).

    >>> trail_prefix("u1")
    b'sqt:\\x00\\x00\\x00\\x02u1'
    """
    raw = user_id.encode()
    return TRAIL_PREFIX + len(raw).to_bytes(4, "big") + raw


class SearchTrail:
    """Per shopper, what search took from them: each engagement credited to a query (the
    query key, event time, tie-break, item and weight that :meth:`QueryAssociations.learn_at`
    was given) and each query text they typed (as the query model read it: the key of its
    vector in the :class:`recsys.search.semantic.QueryEncoder` ring). The associations and the
    ring hold no user id; this is the link an erasure follows to take the engagements back
    (:meth:`QueryAssociations.unlearn`) and the texts out of the ring. Written with the batch
    (one record per engagement or distinct text: appended, never read on the event path) and
    deleted with the user: by an erasure, or by the sweep of users idle past
    ``RECSYS_STATE_TTL_DAYS`` (which takes nothing back: the link alone goes).

    >>> from recsys.store.kv import MemoryKV
    >>> trail, kv = SearchTrail(), MemoryKV()
    >>> trail.typed("u1", "blue tent"); trail.credited("u1", "blue tent", 5, 7, "t1", 1.0)
    >>> kv.write(trail.export_dirty())
    >>> texts, engaged, keys = trail.read(kv, "u1")
    >>> texts, engaged, len(keys)
    (['blue tent'], [('blue tent', 5, 7, 't1', 1.0)], 2)
    """

    def __init__(self) -> None:
        self._dirty: dict[bytes, bytes] = {}

    def typed(self, user_id: str, text: str) -> None:
        raw = text.encode()
        self._dirty[trail_prefix(user_id) + _TYPED + hashlib.blake2b(raw, digest_size=8).digest()] = raw

    def credited(self, user_id: str, key: str, ts: int, tie: int, item_id: str, weight: float) -> None:
        record = trail_prefix(user_id) + _ENGAGED + _TS_TIE.pack(int(ts), int(tie)) + item_id.encode()
        self._dirty[record] = orjson.dumps([key, int(ts), int(tie), item_id, float(weight)])

    def export_dirty(self) -> dict[bytes, bytes]:
        out, self._dirty = self._dirty, {}
        return out

    def read(self, kv: KVStore, user_id: str) -> tuple[list[str], list[tuple[str, int, int, str, float]], list[bytes]]:
        """The user's ``(texts typed, engagements credited, record keys)``, stored or not yet
        exported (those are dropped here: the caller deletes the keys)."""
        prefix = trail_prefix(user_id)
        records = {**dict(kv.iter_prefix(prefix)), **self._take_unexported(prefix)}
        texts, engaged = [], []
        for key, value in records.items():
            if key[len(prefix):len(prefix) + 1] == _TYPED:
                texts.append(value.decode())
            else:
                q, ts, tie, item_id, weight = orjson.loads(value)
                engaged.append((q, int(ts), int(tie), item_id, float(weight)))
        return texts, engaged, list(records)

    def keys(self, kv: KVStore, user_id: str) -> list[bytes]:
        """The keys of the user's stored records, those not exported yet dropped (their sweep:
        the records go, nothing is taken back)."""
        prefix = trail_prefix(user_id)
        self._take_unexported(prefix)
        return [key for key, _ in kv.iter_prefix(prefix)]

    def _take_unexported(self, prefix: bytes) -> dict[bytes, bytes]:
        """The records under ``prefix`` not exported yet, no longer to be exported."""
        return {key: self._dirty.pop(key) for key in [k for k in self._dirty if k.startswith(prefix)]}
