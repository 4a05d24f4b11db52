"""Per-user state and its binary codec, kept in a :class:`recsys.store.kv.KVStore`.

- :class:`UserState`: one shopper's recent history, decayed event counts, interest vector
  and purchases, plus the source offsets already absorbed, so ``apply`` is idempotent
  against Kafka re-delivery.
- :func:`encode_user` / :func:`decode_user`: a compact record (fixed header, orjson
  metadata, raw float32 vector), ~10-20 µs a round trip.
- :class:`UserStore`: users under ``b"u:" + user_id`` with a TTL.

>>> from recsys.events import Event
>>> from recsys.store.kv import MemoryKV
>>> kv = MemoryKV()
>>> users = UserStore(kv, ttl_days=90)
>>> state = users.get_many(["u1"], now_ts=0)["u1"]
>>> ev = Event("e1", "click", "u1", "i9", ts=1_000)
>>> state.apply(ev, None, partition=0, offset=7, history_len=50, half_life_h=24)
True
>>> state.apply(ev, None, partition=0, offset=7, history_len=50, half_life_h=24)  # re-delivered
False
>>> kv.write(users.puts([state]))
>>> users.get_many(["u1"], now_ts=2_000)["u1"].history
[('i9', 'click', 1000)]
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import orjson

from recsys.events import Event
from recsys.feedback import EVENT_WEIGHTS, MS_PER_DAY, MS_PER_HOUR, decay_factor
from recsys.store.kv import KVStore

USER_PREFIX = b"u:"

#: Purchases remembered per user (to filter already-bought items); bounds the record size.
MAX_PURCHASED = 1000
#: Event ids remembered per user to drop a re-sent event (``RECSYS_DEDUP_WINDOW``): a producer
#: retry or a re-run upstream job repeats an event_id within seconds, long before the user has
#: done 50 more things; 50 ids cost ~1 KB of the record.
DEFAULT_DEDUP_WINDOW = 50



# --------------------------------------------------------------------------- key-value stores


@dataclass(slots=True, eq=False)
class UserState:
    """One shopper's state; mutated only by :meth:`apply`.

    - ``history``: ``[(item_id, event_type, ts), ...]`` in event-time order, most recent last,
      at most ``history_len`` long (search events, which carry no item, are not kept).
    - ``counts``: event type -> count decayed to ``updated_ts``.
    - ``interest``: float32 ``(dim,)`` sum of item vectors weighted by
      :data:`recsys.feedback.EVENT_WEIGHTS`, decayed to ``updated_ts``; None until the first
      weighted event with a known vector.
    - ``purchased``: distinct purchased item ids, most recent last, at most
      :data:`MAX_PURCHASED`.
    - ``bought``: purchase count per item of ``purchased`` (the "buy again" signal: on the
      grocery log a shopper's own most-bought items are the next purchase 7.8% of the time
      in their top 10, more than recent popularity's 5%; plain counts beat decayed ones).
    - ``updated_ts``: the newest event time applied (decay reference; TTL clock).
    - ``last_applied``: partition -> highest offset applied.
    - ``recent_ids``: the ``event_id`` of the last applied events, oldest first (at most the
      dedup window): an event whose id is here is a re-sent duplicate (:meth:`is_duplicate`).
    """

    user_id: str
    history: list[tuple[str, str, int]] = field(default_factory=list)
    counts: dict[str, float] = field(default_factory=dict)
    interest: np.ndarray | None = None
    purchased: list[str] = field(default_factory=list)
    session_id: str | None = None
    updated_ts: int = 0
    last_applied: dict[int, int] = field(default_factory=dict)
    bought: dict[str, int] = field(default_factory=dict)
    recent_ids: list[str] = field(default_factory=list)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UserState):
            return NotImplemented
        if (self.interest is None) != (other.interest is None):
            return False
        if self.interest is not None and not np.array_equal(self.interest, other.interest):  # type: ignore[arg-type]
            return False
        return (
            self.user_id == other.user_id
            and self.history == other.history
            and self.counts == other.counts
            and self.purchased == other.purchased
            and self.bought == other.bought
            and self.session_id == other.session_id
            and self.updated_ts == other.updated_ts
            and self.last_applied == other.last_applied
            and self.recent_ids == other.recent_ids
        )

    def is_duplicate(self, event_id: str) -> bool:
        """Whether an event with this id was applied recently (within the dedup window)."""
        return event_id in self.recent_ids

    def is_applied(self, partition: int, offset: int) -> bool:
        """Whether the event at ``(partition, offset)`` has already been absorbed."""
        return offset <= self.last_applied.get(partition, -1)

    def apply(
        self,
        event: Event,
        vector: np.ndarray | None,
        partition: int,
        offset: int,
        *,
        history_len: int,
        half_life_h: float,
        dedup_window: int = DEFAULT_DEDUP_WINDOW,
    ) -> bool:
        """Absorb one event read from ``(partition, offset)``; False (and no change) if already done.

        Its ``event_id`` joins :attr:`recent_ids` (the last ``dedup_window`` kept); whether an
        event is a re-sent duplicate is the caller's question (:meth:`is_duplicate`), asked
        before any global signal learns from it.

        ``vector`` is the item's embedding (None when unknown: the interest is then only
        decayed). Decay runs in event time with half-life ``half_life_h`` hours. The decay
        reference only moves forward: a late event is added already decayed to
        ``updated_ts`` instead of rewinding the clock, so no step uses a negative ``dt``.

        >>> s = UserState("u")
        >>> s.apply(Event("e1", "click", "u", "a", ts=0), np.ones(2), 0, 0, history_len=5, half_life_h=1)
        True
        >>> s.apply(Event("e2", "browse", "u", "b", ts=3_600_000), np.zeros(2), 0, 1, history_len=5, half_life_h=1)
        True
        >>> s.interest.tolist(), s.counts  # the click halved after one half-life
        ([1.0, 1.0], {'click': 0.5, 'browse': 1.0})
        """
        if event.user_id != self.user_id:
            raise ValueError(f"UserState.apply: event for user {event.user_id!r} applied to {self.user_id!r}")
        if offset <= self.last_applied.get(partition, -1):
            return False
        half_life_ms = half_life_h * MS_PER_HOUR
        ts = event.ts
        late = ts < self.updated_ts
        if late:
            step = 1.0
            contribution = decay_factor(self.updated_ts - ts, half_life_ms)
        else:
            step = decay_factor(ts - self.updated_ts, half_life_ms)
            contribution = 1.0

        counts = self.counts
        if step != 1.0:
            for k in counts:
                counts[k] *= step
        counts[event.type] = counts.get(event.type, 0.0) + contribution

        weight = EVENT_WEIGHTS.get(event.type, 0.0)
        if self.interest is not None and step != 1.0:
            self.interest *= np.float32(step)
        if vector is not None and weight != 0.0 and event.item_id is not None:
            add = np.asarray(vector, dtype=np.float32) * np.float32(weight * contribution)
            if self.interest is None:
                self.interest = add
            elif self.interest.shape != add.shape:
                raise ValueError(f"UserState.apply: vector shape {add.shape} != interest shape {self.interest.shape}")
            else:
                self.interest += add

        if event.item_id is not None:
            entry = (event.item_id, event.type, ts)
            if late:  # keep event-time order; equal times keep arrival order
                pos = bisect.bisect_right(self.history, ts, key=lambda h: h[2])
                self.history.insert(pos, entry)
            else:
                self.history.append(entry)
            if len(self.history) > history_len:
                del self.history[: len(self.history) - history_len]
            if event.type == "purchase":
                if event.item_id in self.purchased:
                    self.purchased.remove(event.item_id)
                self.purchased.append(event.item_id)
                self.bought[event.item_id] = self.bought.get(event.item_id, 0) + 1
                if len(self.purchased) > MAX_PURCHASED:
                    for dropped in self.purchased[: len(self.purchased) - MAX_PURCHASED]:
                        self.bought.pop(dropped, None)
                    del self.purchased[: len(self.purchased) - MAX_PURCHASED]

        if not late:
            self.updated_ts = ts
            if event.session_id is not None:
                self.session_id = event.session_id
        self.last_applied[partition] = offset
        if dedup_window > 0:
            self.recent_ids.append(event.event_id)
            if len(self.recent_ids) > dedup_window:
                del self.recent_ids[: len(self.recent_ids) - dedup_window]
        return True


# --------------------------------------------------------------------------- codec

_CODEC_VERSION = 1
# version, flags (bit 0: interest present), updated_ts, metadata length
_HEADER = struct.Struct("<BBqI")
_HAS_INTEREST = 1


class StateDecodeError(ValueError):
    """Bytes that are not a user-state record of a known version."""


def encode_user(state: UserState) -> bytes:
    """Record bytes: header, orjson metadata, then the interest as little-endian float32.

    ``updated_ts`` sits in the fixed header so a TTL sweep reads it without parsing JSON.

    >>> decode_user(encode_user(UserState("u1", history=[("i", "click", 5)]))).history
    [('i', 'click', 5)]
    """
    meta = orjson.dumps(
        {
            "u": state.user_id,
            "h": state.history,
            "c": state.counts,
            "p": state.purchased,
            "s": state.session_id,
            "l": sorted(state.last_applied.items()),
            "b": state.bought,
            "e": state.recent_ids,
        }
    )
    if state.interest is None:
        return _HEADER.pack(_CODEC_VERSION, 0, state.updated_ts, len(meta)) + meta
    vec = np.ascontiguousarray(state.interest, dtype="<f4").tobytes()
    return _HEADER.pack(_CODEC_VERSION, _HAS_INTEREST, state.updated_ts, len(meta)) + meta + vec


def decode_user(raw: bytes) -> UserState:
    """Inverse of :func:`encode_user`; raises :class:`StateDecodeError` on bad bytes."""
    try:
        version, flags, updated_ts, meta_len = _HEADER.unpack_from(raw)
    except struct.error:
        raise StateDecodeError(f"user state: truncated header ({len(raw)} bytes)") from None
    if version != _CODEC_VERSION:
        raise StateDecodeError(f"user state: unknown codec version {version}")
    start = _HEADER.size
    end = start + meta_len
    if end > len(raw):
        raise StateDecodeError("user state: truncated metadata")
    try:
        meta = orjson.loads(memoryview(raw)[start:end])
    except orjson.JSONDecodeError as exc:
        raise StateDecodeError(f"user state: bad metadata ({exc})") from None
    interest = None
    if flags & _HAS_INTEREST:
        if (len(raw) - end) % 4:
            raise StateDecodeError("user state: interest vector is not whole float32s")
        interest = np.frombuffer(raw, dtype="<f4", offset=end).astype(np.float32)  # own, writable copy
    return UserState(
        meta["u"],
        [(h[0], h[1], h[2]) for h in meta["h"]],
        meta["c"],
        interest,
        meta["p"],
        meta["s"],
        updated_ts,
        {p: o for p, o in meta["l"]},
        meta.get("b", {}),  # records written before purchase counts existed have none
        meta.get("e", []),  # nor those written before the dedup window
    )


def record_updated_ts(raw: bytes) -> int:
    """``updated_ts`` of an encoded record, read from the header alone."""
    return _HEADER.unpack_from(raw)[2]


# --------------------------------------------------------------------------- user store


def user_key(user_id: str) -> bytes:
    """Store key of a user: ``b"u:" + utf-8 id``.

    >>> user_key("ü1")
    b'u:\\xc3\\xbc1'
    """
    return USER_PREFIX + user_id.encode()


class UserStore:
    """Users in a :class:`KVStore`, expired after ``ttl_days`` without an event.

    Writes are returned as records (``puts``) rather than written, so the caller commits
    users, global signals and watermarks in one atomic ``kv.write``.
    """

    def __init__(self, kv: KVStore, *, ttl_days: float) -> None:
        if ttl_days <= 0:
            raise ValueError(f"ttl_days must be > 0, got {ttl_days}")
        self.kv = kv
        self.ttl_days = ttl_days
        self._ttl_ms = ttl_days * MS_PER_DAY
        self.last_slice_oldest: int | None = None  # set by sweep_slice: the oldest updated_ts it read

    def _expired(self, updated_ts: int, now_ts: int) -> bool:
        return now_ts - updated_ts > self._ttl_ms

    def get_many(self, user_ids: Iterable[str], now_ts: int | Mapping[str, int]) -> dict[str, UserState]:
        """``user_id -> state``; a fresh state for unknown users and for expired records.

        ``now_ts``: one time for all (a query), or each user's own time (``user_id -> ts``, the
        engine: the user's own next event), so that no user's event can expire another user.
        """
        ids = list(dict.fromkeys(user_ids))
        out: dict[str, UserState] = {}
        per_user = now_ts if isinstance(now_ts, Mapping) else None
        for uid, raw in zip(ids, self.kv.multi_get([user_key(u) for u in ids])):
            now = per_user[uid] if per_user is not None else now_ts
            if raw is None or self._expired(record_updated_ts(raw), now):  # type: ignore[arg-type]
                out[uid] = UserState(uid)
            else:
                out[uid] = decode_user(raw)
        return out

    def puts(self, states: Iterable[UserState]) -> dict[bytes, bytes]:
        """Encoded records ``key -> bytes`` for ``kv.write`` (nothing is written here)."""
        return {user_key(s.user_id): encode_user(s) for s in states}

    def sweep_expired(self, now_ts: int, *, chunk: int = 10_000) -> int:
        """Delete every stored user idle longer than the TTL; returns how many."""
        doomed = [k for k, v in self.kv.iter_prefix(USER_PREFIX) if self._expired(record_updated_ts(v), now_ts)]
        for i in range(0, len(doomed), chunk):
            self.kv.write({}, doomed[i : i + chunk])
        return len(doomed)

    def sweep_slice(self, now_ts: int, start: bytes, limit: int) -> tuple[list[str], bytes]:
        """One bounded step of an incremental expiry sweep: of the (at most) ``limit`` user
        records from key ``start`` on, the ids of those idle longer than the TTL at ``now_ts``
        (nothing is deleted here), and the key to start the next step from (``b""`` once the
        scan has wrapped around: the next step starts over at the first user).

        >>> from recsys.store.kv import MemoryKV
        >>> kv = MemoryKV()
        >>> kv.write(UserStore(kv, ttl_days=1).puts([UserState("a", updated_ts=0), UserState("b", updated_ts=10**9)]))
        >>> UserStore(kv, ttl_days=1).sweep_slice(10**9, b"", 10)
        (['a'], b'')
        """
        expired: list[str] = []
        next_start = b""
        oldest = None  # the smallest updated_ts among the records looked at (kept for the caller)
        for n, (key, raw) in enumerate(self.kv.iter_from(start or USER_PREFIX, USER_PREFIX)):
            if n == limit:
                next_start = key
                break
            updated_ts = record_updated_ts(raw)
            if oldest is None or updated_ts < oldest:
                oldest = updated_ts
            if self._expired(updated_ts, now_ts):
                expired.append(key[len(USER_PREFIX) :].decode())
        self.last_slice_oldest = oldest
        return expired, next_start

    def delete_user(self, user_id: str) -> None:
        """Delete the user record alone (the full erasure is ``Shard.forget``)."""
        self.kv.write({}, [user_key(user_id)])

    def count(self) -> int:
        """Number of stored users (expired but unswept ones included)."""
        return sum(1 for _ in self.kv.iter_prefix(USER_PREFIX))
