"""Shards share the global signals: a replicated log of signal *operations* (issue 11).

Each shard learns co-visitation, transitions, popularity and session neighbours from its own
users' events. With sharing on, a shard does not apply those updates itself while it processes
a batch: it *records* them (the exact arguments of ``covisit.update``, ``transitions.update``,
``popularity.update`` and ``sessions.update``, in the order the step would have called them)
and seals them into one message per batch. Every message goes to one exchange log (one Kafka
partition live, a list in replays), and every shard, the origin too, applies the log's
messages in the log's single total order. So after the same log position every shard holds
byte-identical global signals.

Why operations in one total order, not merged deltas: the signals are not commutative. A
co-visitation list keeps its ``max_neighbours`` heaviest pairs and drops the weakest when it
overflows, so which pair survives depends on the order pairs arrived; session neighbours evict
the least recently active session and cap each item's postings; float sums round differently
in another order. Applying the same operations in a different order may end in different
bytes (``tests/test_exchange.py`` shows one such pair of orders); applying them in one order
cannot.

Exactly-once: :class:`SignalExchange` keeps the last log position applied and, per origin, the
last sequence number applied, and writes both in the same atomic ``kv.write`` as the signal
records they changed. A message re-delivered at an old position, or published twice by its
origin (its outbox re-sends after a crash), is skipped. A sealed message waits in the origin's
outbox (written in its batch's own atomic write) until the origin sees it come back from the
log, so a crash between commit and publish loses nothing.

Erasures go through the log too: with sharing on, a shard that erases a user (``forget_user``
from the control topic, or ``recsys forget --offline``) does not drop the user's sessions from
its session-neighbour index itself; it seals a :data:`FORGET_OP` op in the erasure's own atomic
write, and every shard drops them when it applies that op, at the same log position, so the
session records stay identical (the checksum says so). Every shard reads the control topic and
publishes the op; applying it again finds nothing to drop. Not through the log: the head, the
re-ranker and search's learned associations, which stay per shard.

Bootstrapping: a new or wiped shard starts from a snapshot of the shared records (every key
under :data:`SIGNAL_PREFIXES`, with the log position and the per-origin sequence numbers they
hold) that running shards write now and then, and reads the log from the snapshot's position + 1
(:mod:`recsys.signals.snapshot`).

Message (version 1): ``b"X1"`` + zlib(orjson ``[origin, seq, ops]``), each op one applied
event with an item: ``[user_id, session_id, item_id, event_type, ts, history]``, ``history``
being the user's last ``window`` history entries ``[[item, type, ts], ...]`` before the event,
or ``null`` when the shard was not learning (frozen: only the session memory goes on).
An erasure's op is ``[user_id, null, null, "forget_user", erased_at, null]``
(:data:`FORGET_OP`: no event type has that name). Every shard must run code that knows it.

>>> ops = [["u1", None, "b", "click", 5, [["a", "browse", 1]]]]
>>> decode_message(encode_message(3, 7, ops)) == OpMessage(3, 7, ops)
True
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import orjson

from recsys.feedback import EVENT_WEIGHTS
from recsys.signals.covisitation import COV_PREFIX, NEXT_PREFIX
from recsys.signals.popularity import POP_PREFIX
from recsys.signals.sessions import SESSION_PREFIX

if TYPE_CHECKING:
    from recsys.signals.covisitation import CoVisitation
    from recsys.signals.popularity import Popularity
    from recsys.signals.sessions import SessionNeighbours
    from recsys.store.kv import KVStore

#: The wire version in a message's first two bytes; a reader refuses any other.
MESSAGE_MAGIC = b"X1"
#: zlib level 1: most of the gain (ids repeat within a batch) at a fraction of level 6's CPU.
_ZLIB_LEVEL = 1
#: ``xpos`` -> the last exchange-log position applied; ``xa:<origin>`` -> the last sequence
#: number applied from that origin; ``xs`` -> this shard's next sequence number to seal;
#: ``xo:<seq>`` -> a sealed message of this shard not yet seen back in the log (the outbox).
POSITION_KEY = b"x:pos"
APPLIED_PREFIX = b"x:a:"
SEQ_KEY = b"x:seq"
OUTBOX_PREFIX = b"x:o:"
#: The records the checksum covers: every global signal, nothing per user or per shard.
SIGNAL_PREFIXES = (POP_PREFIX, COV_PREFIX, NEXT_PREFIX, SESSION_PREFIX)

Op = list  # [user_id, session_id, item_id, event_type, ts, history | None]
#: The event-type field of an erasure's op: drop every session of the op's user.
FORGET_OP = "forget_user"


class ExchangeFormatError(ValueError):
    """A message that is not an exchange message of a version this code reads."""


@dataclass(frozen=True)
class OpMessage:
    """One batch's signal operations from one shard: ``origin`` (shard index), ``seq`` (that
    shard's 1, 2, 3, ... per sealed batch) and ``ops`` (see the module docstring)."""

    origin: int
    seq: int
    ops: list


def encode_message(origin: int, seq: int, ops: Sequence[Op]) -> bytes:
    """The wire bytes of one message (see :func:`decode_message`)."""
    return MESSAGE_MAGIC + zlib.compress(orjson.dumps([origin, seq, ops]), _ZLIB_LEVEL)


def decode_message(raw: bytes) -> OpMessage:
    """The :class:`OpMessage` in ``raw``; :class:`ExchangeFormatError` when it is not one."""
    if raw[:2] != MESSAGE_MAGIC:
        raise ExchangeFormatError(f"not an exchange message of version 1 (starts {raw[:2]!r}, expected {MESSAGE_MAGIC!r})")
    try:
        origin, seq, ops = orjson.loads(zlib.decompress(raw[2:]))
    except (zlib.error, orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise ExchangeFormatError(f"exchange message body unreadable: {exc}") from None
    return OpMessage(int(origin), int(seq), ops)


def signal_checksum(kv: KVStore) -> str:
    """sha256 (hex) over every committed global-signal record, in key order: equal on two
    shards exactly when their popularity, co-visitation, transitions and session records are
    byte-identical."""
    digest = hashlib.sha256()
    for prefix in SIGNAL_PREFIXES:
        for key, value in kv.iter_prefix(prefix):
            digest.update(len(key).to_bytes(4, "little") + key + len(value).to_bytes(4, "little") + value)
    return digest.hexdigest()


class SignalExchange:
    """One shard's end of the exchange: records its batch's signal operations, seals them into
    a message (with an outbox entry), and applies the log's messages exactly once.

    ``signals`` are the shard's own objects; applying an op calls exactly what the step would
    have called, in the same order (co-visitation, transitions, popularity, then sessions).
    What is returned as puts/deletes must be committed in one ``kv.write`` together with the
    signals' ``export_dirty()`` (the shard's commit does that).
    """

    def __init__(self, kv: KVStore, origin: int, covisit: CoVisitation, transitions: CoVisitation,
                 popularity: Popularity, sessions: SessionNeighbours) -> None:
        self.origin = origin
        self.covisit, self.transitions, self.popularity, self.sessions = covisit, transitions, popularity, sessions
        self.window = max(covisit.window, transitions.window)  # the history either update reads
        raw = kv.get(POSITION_KEY)
        self.position = -1 if raw is None else int(raw)
        self.applied = {int(k[len(APPLIED_PREFIX):]): int(v) for k, v in kv.iter_prefix(APPLIED_PREFIX)}
        raw = kv.get(SEQ_KEY)
        self.next_seq = 1 if raw is None else int(raw)
        self._outbox = {int(k[len(OUTBOX_PREFIX):]): v for k, v in kv.iter_prefix(OUTBOX_PREFIX)}
        self._ops: list[Op] = []
        self.applied_ops = 0  # counts, for the cost figures
        self.refused = 0  # log records that were not exchange messages (skipped by every shard alike)

    # ---------------------------------------------------------------- the origin's side

    def record(self, user_id: str, session_id: str | None, item_id: str, event_type: str, ts: int,
               history: Iterable | None) -> None:
        """Note one applied event's signal updates instead of applying them; ``history`` is
        the user's history before the event, or None when the shard is not learning."""
        tail = None if history is None else [list(h) for h in list(history)[-self.window:]]
        self._ops.append([user_id, session_id, item_id, event_type, ts, tail])

    def seal(self, puts: dict[bytes, bytes]) -> bytes | None:
        """The message of the operations recorded since the last seal (None if there are
        none); adds its outbox entry and the next sequence number to ``puts`` (the batch's
        atomic write), so a crash after that write re-publishes it from :meth:`pending`."""
        if not self._ops:
            return None
        seq = self.next_seq
        message = encode_message(self.origin, seq, self._ops)
        self._ops = []
        self.next_seq = seq + 1
        self._outbox[seq] = message
        puts[OUTBOX_PREFIX + str(seq).encode()] = message
        puts[SEQ_KEY] = str(self.next_seq).encode()
        return message

    def record_forget(self, user_id: str, erased_at: int) -> None:
        """Note an erasure's signal-side effect (drop the user's sessions) as an op, applied by
        every shard at its log position instead of by this shard now."""
        self._ops.append([user_id, None, None, FORGET_OP, erased_at, None])

    def resume_numbering(self, puts: dict[bytes, bytes]) -> None:
        """Number the next sealed message after this origin's last one applied from the log:
        a wiped shard restored from a snapshot (its ``x:seq`` lost) must not reuse a sequence
        number every shard would skip as already applied. Adds ``x:seq`` to ``puts`` when moved."""
        last = self.applied.get(self.origin, 0)
        if last >= self.next_seq:
            self.next_seq = last + 1
            puts[SEQ_KEY] = str(self.next_seq).encode()

    def pending(self) -> list[bytes]:
        """This shard's sealed messages not yet seen back in the log, oldest first (to publish
        again after a restart: appliers skip a ``(origin, seq)`` they have applied)."""
        return [self._outbox[seq] for seq in sorted(self._outbox)]

    # ---------------------------------------------------------------- every shard's side

    def apply(self, records: Iterable[tuple[int, bytes]], puts: dict[bytes, bytes], deletes: list[bytes]) -> int:
        """Apply the log's ``(position, message)`` records in order, skipping positions at or
        below the last applied and ``(origin, seq)`` already applied; adds the new position
        and per-origin sequence numbers to ``puts`` (and this shard's own messages seen back
        to ``deletes``, leaving the outbox). Returns how many messages were applied."""
        done = 0
        for position, raw in records:
            if position <= self.position:
                continue
            self.position = position
            puts[POSITION_KEY] = str(position).encode()
            try:
                message = decode_message(raw)
            except ExchangeFormatError:
                self.refused += 1  # every shard refuses the same record: they stay identical
                continue
            if message.seq <= self.applied.get(message.origin, 0):
                continue  # published twice (an outbox re-send): once is enough
            self.apply_ops(message.ops, deletes)
            self.applied[message.origin] = message.seq
            puts[APPLIED_PREFIX + str(message.origin).encode()] = str(message.seq).encode()
            if message.origin == self.origin:
                for seq in [s for s in self._outbox if s <= message.seq]:
                    del self._outbox[seq]
                    deletes.append(OUTBOX_PREFIX + str(seq).encode())
            done += 1
        return done

    def apply_ops(self, ops: Iterable[Op], deletes: list[bytes] | None = None) -> None:
        """The very signal updates the step makes for each op's event, in order; an erasure's op
        (:data:`FORGET_OP`) drops the user's sessions, their keys added to ``deletes``."""
        covisit, transitions, popularity, sessions = self.covisit, self.transitions, self.popularity, self.sessions
        n = 0
        for user_id, session_id, item_id, event_type, ts, history in ops:
            if event_type == FORGET_OP:
                dropped = sessions.forget_user(user_id)
                if deletes is not None:
                    deletes.extend(dropped)
                continue
            if history is not None:
                covisit.update(history, item_id, event_type, ts)
                transitions.update(history, item_id, event_type, ts)
                popularity.update(item_id, EVENT_WEIGHTS[event_type], ts)
            sessions.update(user_id, session_id, item_id, ts)
            n += 1
        self.applied_ops += n
