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
publishes the op; applying it again finds nothing to drop. The op is followed by the user's
search engagements still in the associations (:data:`SEARCH_UNLEARN_OP`, read from the shard's
per-user :class:`recsys.search.learned.SearchTrail`: only the user's own shard has it), which
every shard takes back at that position; taken back twice, the second finds nothing.

Learned models through the same log (message version 2, :class:`SharedModels`): each op then
carries the user's last ``history_len`` history entries (what the head's training example
reads), and the message a list of re-ranker steps, each the feature rows of the engaged
candidate and its sampled negatives (drawn at the shard that showed the list). Every shard
trains its head and re-ranker from the log's messages, in log order, right after applying their
signal ops: the same examples in the same order from the same start, so after the same log
position every shard holds the same model parameters (bit for bit on CPU, one torch thread).

Search's learned query -> item associations (:class:`recsys.search.learned.QueryAssociations`)
through the same log: the search window that attributes an engagement to a query is the user's,
so it stays on the user's shard, but the association it teaches is global. A sharing shard
records each ``learn(query key, item, weight)`` as a :data:`SEARCH_OP` op instead of learning
it, and every shard learns it when it applies the op, so the associations (``sqa:`` records,
covered by the checksum and the snapshots) are the same on every shard at the same position.
Search's re-ranker the same way (since 2026-12-03; it learned per shard before): the shard
whose user engaged after a search samples the step's rows (the engaged candidate's features and
its negatives', :meth:`recsys.search.rerank.SearchReranker.sample`) and records them as a
:data:`SEARCH_RANK_OP` op; every shard takes the step when it applies the op
(:meth:`~recsys.search.rerank.SearchReranker.learn_rows`). Its weights (``sqr:weights``) are
committed with the log position like the signals and are in the snapshots. Like the
recommendation re-ranker's, they are not in the signal checksum (``model_checksum`` covers
them): a step is sampled from the list the shard showed, and a wiped shard re-reading its events
answers their searches again from other state, so its later steps may differ from those of a
run never wiped (the shards still agree with each other: they learn the same log). It learns on
every shard, a model trainer or not: eleven weights, one step per engagement.

Bootstrapping: a new or wiped shard starts from a snapshot of the shared records (every key
under :data:`SHARED_PREFIXES`: the signals and the shared models' checkpoint and log, with the
log position and the per-origin sequence numbers they hold) that running shards write now and
then, and reads the log from the snapshot's position + 1 (:mod:`recsys.signals.snapshot`).

Coverage (message version 3): a wiped shard also re-reads its own ``events`` partition into its
blank user state, and the ops of the events still retained are in the shared signals already.
So each message names the origin's input positions it covers, ``[[topic, partition, offset],
...]``: every input message of that partition at or below ``offset`` has had its ops sealed (in
this message or an earlier one; an event waiting for its catalog item caps it below itself).
Every shard, applying a message, keeps the newest covered offset per (origin, topic, partition)
(``x:c:<origin>:<topic>:<partition>``, in the same atomic write as the ops, and in snapshots; it
only goes down when the input's offsets went backwards, :meth:`SignalExchange.uncover`),
and a shard re-reading its own events at or below its own covered offset (:meth:`SignalExchange.covers`)
applies them to its users but records no op, no re-ranker step and no search association for
them. What was sealed but never reached the log (an outbox lost with the state) is not covered:
those events are recorded again, once. The records are not in the checksum: like the log
position and the per-origin sequence numbers they are bookkeeping of the log, not signals, and
they move with the batch boundaries, which differ between two runs that end in the same signals.

Message (version 3, sealed now): ``b"X3"`` + zlib(orjson ``[origin, seq, ops, pairs or null, covered]``):
version 2's fields (``pairs`` null: a shard not sharing the models, version 1's meaning) and the
positions covered (above). Version 2 (still read): ``b"X2"`` + zlib(orjson ``[origin, seq, ops, pairs]``), ``pairs`` being
``[[n_rows, base64 of the float32 rows], ...]`` (row 0 the engaged candidate). Version 1 (still
read; it teaches the models nothing, its histories being too short for the head):: ``b"X1"`` + zlib(orjson ``[origin, seq, ops]``), each op one applied
event with an item: ``[user_id, session_id, item_id, event_type, ts, history]``, ``history``
being the user's last ``window`` history entries ``[[item, type, ts], ...]`` before the event,
or ``null`` when the shard was not learning (frozen: only the session memory goes on).
An erasure's op is ``[user_id, null, null, "forget_user", erased_at, null]``
(:data:`FORGET_OP`: no event type has that name), each followed by the erased shopper's search
engagements taken back, ``[query key, [event time, tie-break], item_id, "search_unlearn", weight,
null]`` (:data:`SEARCH_UNLEARN_OP`, since 2026-12-08), and a search association's
``[query key, [event time, tie-break], item_id, "search_learn", weight, null]`` (:data:`SEARCH_OP`), and a search
re-ranker step's ``[null, null, null, "search_rank", [n_rows, base64 of the float64 rows], null]``
(:data:`SEARCH_RANK_OP`). Every shard must run code that knows them.

>>> ops = [["u1", None, "b", "click", 5, [["a", "browse", 1]]]]
>>> decode_message(encode_message(3, 7, ops)) == OpMessage(3, 7, ops)
True
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import math
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import orjson

from recsys.feedback import EVENT_WEIGHTS
from recsys.search.learned import ASSOC_PREFIX
from recsys.search.rerank import RERANK_KEY
from recsys.signals.covisitation import COV_PREFIX, NEXT_PREFIX
from recsys.signals.popularity import POP_PREFIX
from recsys.signals.sessions import SESSION_PREFIX

if TYPE_CHECKING:
    from recsys.ranking.head import Head
    from recsys.ranking.reranker import PairwiseReranker
    from recsys.search.learned import QueryAssociations
    from recsys.search.rerank import SearchReranker
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
#: The log position of the newest message holding an erasure this shard applied: the exchange
#: snapshots older than it still hold the erased user's sessions, and are deleted once one at or
#: past it exists (:class:`recsys.signals.snapshot.SnapshotWriter`). Local, not a shared record.
ERASED_AT_KEY = b"x:erased"
APPLIED_PREFIX = b"x:a:"
SEQ_KEY = b"x:seq"
OUTBOX_PREFIX = b"x:o:"
#: The records the checksum covers: every global signal, nothing per user or per shard (search's
#: learned associations included: they go through the log as :data:`SEARCH_OP` ops).
SIGNAL_PREFIXES = (POP_PREFIX, COV_PREFIX, NEXT_PREFIX, SESSION_PREFIX, ASSOC_PREFIX)

Op = list  # [user_id, session_id, item_id, event_type, ts, history | None]
#: The event-type field of an erasure's op: drop every session of the op's user.
FORGET_OP = "forget_user"
#: The event-type field of a search association's op: ``[query key, [event time, tie-break], item,
#: SEARCH_OP, weight, None]`` (:meth:`recsys.search.learned.QueryAssociations.learn_at`; ops sealed
#: before they carried the time have ``None`` there).
SEARCH_OP = "search_learn"
#: The event-type field of an erasure's search engagement taken back, right after its :data:`FORGET_OP`:
#: :data:`SEARCH_OP`'s fields (:meth:`recsys.search.learned.QueryAssociations.unlearn`).
SEARCH_UNLEARN_OP = "search_unlearn"
#: The event-type field of a search re-ranker step's op: ``[None, None, None, SEARCH_RANK_OP,
#: [n_rows, base64 of the float64 rows], None]`` (:meth:`recsys.search.rerank.SearchReranker.learn_rows`).
SEARCH_RANK_OP = "search_rank"
#: ``x:c:<origin>:<topic>:<partition>`` -> the highest input offset of that origin's partition whose
#: ops the applied log holds (version 3 messages' ``covered``); in snapshots, not in the checksum.
COVERED_PREFIX = b"x:c:"

#: Version 2 carries the models' training inputs too (:class:`SharedModels`).
MESSAGE_MAGIC_V2 = b"X2"
#: Version 3 adds the input positions a message covers (see the module docstring).
MESSAGE_MAGIC_V3 = b"X3"
_MAGICS = {MESSAGE_MAGIC: 1, MESSAGE_MAGIC_V2: 2, MESSAGE_MAGIC_V3: 3}
#: The shared learned models in RocksDB (:class:`SharedModels`): ``xm:ckpt`` -> a checkpoint (the
#: head, its pending examples and the re-ranker's weights at a log position), ``xm:log:<position>``
#: -> each message applied since that checkpoint, re-learned on start. Another shard's copy of
#: these records (with SIGNAL_PREFIXES and the exchange position) is a complete model state.
MODEL_CHECKPOINT_KEY = b"xm:ckpt"
MODEL_REPLAY_PREFIX = b"xm:log:"
SHARED_MODEL_PREFIXES = (MODEL_CHECKPOINT_KEY, MODEL_REPLAY_PREFIX)
#: A trainer's snapshot of the shared models for serving (:meth:`SharedModels.serving_state`).
SERVING_MAGIC = b"XS1\n"
#: Everything a snapshot carries to bootstrap a shard (:mod:`recsys.signals.snapshot`).
SHARED_PREFIXES = SIGNAL_PREFIXES + SHARED_MODEL_PREFIXES + (RERANK_KEY, COVERED_PREFIX)


class ExchangeFormatError(ValueError):
    """A message that is not an exchange message of a version this code reads."""


@dataclass(frozen=True)
class OpMessage:
    """One batch's signal operations from one shard: ``origin`` (shard index), ``seq`` (that
    shard's 1, 2, 3, ... per sealed batch) and ``ops`` (see the module docstring)."""

    origin: int
    seq: int
    ops: list
    pairs: Sequence = ()  # version 2: the re-ranker's steps, [[n_rows, base64 float32 rows], ...]
    version: int = 1
    covered: Sequence = ()  # version 3: [[topic, partition, offset], ...] of the origin's input it covers
    models: bool = False  # whether it carries the models' training inputs (version 2; version 3 with pairs)


def encode_message(origin: int, seq: int, ops: Sequence[Op]) -> bytes:
    """The wire bytes of one message (see :func:`decode_message`)."""
    return MESSAGE_MAGIC + zlib.compress(orjson.dumps([origin, seq, ops]), _ZLIB_LEVEL)


def decode_message(raw: bytes) -> OpMessage:
    """The :class:`OpMessage` in ``raw`` (version 1, 2 or 3); :class:`ExchangeFormatError` when it is not one."""
    magic = raw[:2]
    version = _MAGICS.get(magic)
    if version is None:
        raise ExchangeFormatError(f"not an exchange message of version 1, 2 or 3 (starts {magic!r}, expected "
                                  f"{MESSAGE_MAGIC!r}, {MESSAGE_MAGIC_V2!r} or {MESSAGE_MAGIC_V3!r})")
    try:
        body = orjson.loads(zlib.decompress(raw[2:]))
        if version == 1:
            origin, seq, ops = body
            return OpMessage(int(origin), int(seq), ops)
        if version == 2:
            origin, seq, ops, pairs = body
            return OpMessage(int(origin), int(seq), ops, pairs, 2, models=True)
        origin, seq, ops, pairs, covered = body
        covered = [(str(t), int(p), int(o)) for t, p, o in covered]
        return OpMessage(int(origin), int(seq), ops, pairs or (), 3, covered, models=pairs is not None)
    except (zlib.error, orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise ExchangeFormatError(f"exchange message (version {version}) body unreadable: {exc}") from None


def encode_message_v2(origin: int, seq: int, ops: Sequence[Op], pairs: Sequence[np.ndarray]) -> bytes:
    """Version 2: the ops (histories as long as the head reads) and the re-ranker's steps.

    >>> rows = np.array([[1, 0], [0, 1.5]], np.float32)
    >>> m = decode_message(encode_message_v2(1, 2, [], [rows]))
    >>> (m.version, pair_rows(m.pairs[0]).tolist())
    (2, [[1.0, 0.0], [0.0, 1.5]])
    """
    wire = _wire_pairs(pairs)
    return MESSAGE_MAGIC_V2 + zlib.compress(orjson.dumps([origin, seq, ops, wire]), _ZLIB_LEVEL)


def _wire_rows(rows: np.ndarray, dtype: str = "<f4") -> list:
    """``[n_rows, base64 of the rows as dtype]``: a re-ranker step on the wire (:func:`pair_rows` reads it)."""
    return [len(rows), base64.b64encode(np.ascontiguousarray(rows, dtype=dtype).tobytes()).decode()]


def _wire_pairs(pairs: Sequence[np.ndarray]) -> list:
    return [_wire_rows(r) for r in pairs]


def encode_message_v3(origin: int, seq: int, ops: Sequence[Op], pairs: Sequence[np.ndarray] | None,
                      covered: Sequence[tuple[str, int, int]]) -> bytes:
    """Version 3: version 2's fields (``pairs`` None: a shard not sharing the models) and the
    input positions the message covers, ``(topic, partition, offset)`` each.

    >>> m = decode_message(encode_message_v3(1, 2, [], None, [("events", 3, 41)]))
    >>> (m.version, m.models, m.covered)
    (3, False, [('events', 3, 41)])
    """
    wire = None if pairs is None else _wire_pairs(pairs)
    return MESSAGE_MAGIC_V3 + zlib.compress(orjson.dumps([origin, seq, ops, wire, [list(c) for c in covered]]), _ZLIB_LEVEL)


def pair_rows(pair: Sequence, dtype: str = "<f4") -> np.ndarray:
    """One re-ranker step of a version 2 message as its ``(n_rows, features)`` rows: float32, or
    float64 with ``dtype="<f8"`` (search's steps, :data:`SEARCH_RANK_OP`)."""
    n, data = pair
    rows = np.frombuffer(base64.b64decode(data), dtype=dtype).astype(np.dtype(dtype).newbyteorder("="))
    return rows.reshape(int(n), -1)


def unread(records: Iterable[tuple[int, bytes]], position: int, applied: dict[int, int],
           unknown_items: Callable[[OpMessage], list[str]] | None = None,
           hold: Callable[[int, list[str]], bool] | None = None,
           ) -> Iterator[tuple[int, bytes, OpMessage | None, bool]]:
    """The exchange log's exactly-once reading rule, shared by every reader (a shard's
    :meth:`SignalExchange.apply`, the model trainer's :meth:`recsys.signals.trainer.ModelTrainer.apply`).

    Yields ``(position, raw, message or None, fresh)`` for each record after ``position``, in
    order: ``message`` is None for a record that is not an exchange message (refused alike by
    every reader); ``fresh`` is False for a message whose origin's sequence number ``applied``
    already holds (a re-publication). ``applied`` is read as the caller updates it. Before a fresh
    message naming items ``unknown_items`` reports missing, ``hold(position, items)`` is asked:
    True stops the reading there, that message unread."""
    for at, raw in records:
        if at <= position:
            continue
        try:
            message = decode_message(raw)
        except ExchangeFormatError:
            message = None
        fresh = message is not None and message.seq > applied.get(message.origin, 0)
        if fresh and hold is not None and unknown_items is not None and (missing := unknown_items(message)):
            if hold(at, missing):
                return
        position = at
        yield at, raw, message, fresh


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
        self._kv = kv
        self.covisit, self.transitions, self.popularity, self.sessions = covisit, transitions, popularity, sessions
        self.window = max(covisit.window, transitions.window)  # the history either update reads
        raw = kv.get(POSITION_KEY)
        self.position = -1 if raw is None else int(raw)
        raw = kv.get(ERASED_AT_KEY)
        self.erased_at = -1 if raw is None else int(raw)  # see ERASED_AT_KEY
        self.applied = {int(k[len(APPLIED_PREFIX):]): int(v) for k, v in kv.iter_prefix(APPLIED_PREFIX)}
        raw = kv.get(SEQ_KEY)
        self.next_seq = 1 if raw is None else int(raw)
        self._outbox = {int(k[len(OUTBOX_PREFIX):]): v for k, v in kv.iter_prefix(OUTBOX_PREFIX)}
        #: (origin, topic, partition) -> the highest offset of that input the applied log covers
        self.covered: dict[tuple[int, str, int], int] = {}
        for key, value in kv.iter_prefix(COVERED_PREFIX):
            origin_, topic, partition = key[len(COVERED_PREFIX):].decode().split(":")
            self.covered[(int(origin_), topic, int(partition))] = int(value)
        self._covering: dict[tuple[str, int], int] = {}  # this shard's input the next sealed message covers
        self._ops: list[Op] = []
        self.models: SharedModels | None = None  # set by share_models: version 2 messages
        self.associations: QueryAssociations | None = None  # set by share_search: search's learned associations
        self.search_reranker: SearchReranker | None = None  # set by share_search: search's re-ranker
        self._pairs: list[np.ndarray] = []
        self.applied_ops = 0  # counts, for the cost figures
        self.refused = 0  # log records that were not exchange messages (skipped by every shard alike)

    # ---------------------------------------------------------------- the origin's side

    def record(self, user_id: str, session_id: str | None, item_id: str, event_type: str, ts: int,
               history: Iterable | None) -> None:
        """Note one applied event's signal updates instead of applying them; ``history`` is
        the user's history before the event, or None when the shard is not learning."""
        tail = None if history is None else [list(h) for h in list(history)[-self.window:]]
        self._ops.append([user_id, session_id, item_id, event_type, ts, tail])

    def share_models(self, models: SharedModels) -> None:
        """Share the learned models through the log too: seal version 2 messages (histories as
        long as the head reads, plus the re-ranker's steps) and train ``models`` from each
        message applied."""
        self.models = models
        self.window = max(self.window, models.history_len)

    def share_search(self, associations: QueryAssociations, reranker: SearchReranker | None = None) -> None:
        """Share search's learned query -> item associations (and its re-ranker) through the log:
        the shard records each association it would learn (:meth:`record_search`) and each
        re-ranker step it would take (:meth:`record_search_step`), and every shard learns them into
        ``associations`` and ``reranker`` when it applies the ops."""
        self.associations = associations
        self.search_reranker = reranker

    def record_search_step(self, rows: np.ndarray) -> None:
        """Note one search re-ranker step (:meth:`recsys.search.rerank.SearchReranker.sample`'s rows)."""
        self._ops.append([None, None, None, SEARCH_RANK_OP, _wire_rows(rows, "<f8"), None])

    def record_search(self, key: str, item_id: str, weight: float, ts: int, tie: int) -> None:
        """Note one search association (``QueryAssociations.learn_at``'s arguments) instead of learning it."""
        self._ops.append([key, [ts, tie], item_id, SEARCH_OP, weight, None])

    def record_pair(self, rows: np.ndarray) -> None:
        """Note one re-ranker step (:meth:`recsys.ranking.reranker.PairwiseReranker.sample_pair`'s rows)."""
        self._pairs.append(rows)

    def covers(self, topic: str, partition: int, offset: int) -> bool:
        """Whether the applied log holds the ops of this shard's input message at ``offset``
        already (sealed by this shard before its state was lost): re-read, it is applied to the
        user state, and records nothing."""
        return offset <= self.covered.get((self.origin, topic, partition), -1)

    def cover(self, topic: str, partition: int, offset: int) -> None:
        """Note that every input message of ``topic``/``partition`` up to ``offset`` has had its
        ops recorded (and is committed with them): the next sealed message says so. Call it
        with the batch's atomic write; notes of a batch that seals nothing go with the next.
        The newest note wins (offsets only go down when the input's offsets went backwards)."""
        self._covering[(topic, partition)] = offset

    def uncover(self, topic: str, partition: int) -> None:
        """The input's offsets went backwards (its topic was re-created): forget this shard's
        coverage of it, so that its new messages at low offsets are recorded; the next sealed
        message sets every shard's record to the new offsets (committed here at once)."""
        self._covering.pop((topic, partition), None)
        if self.covered.pop((self.origin, topic, partition), None) is not None:
            self._kv.write({}, [COVERED_PREFIX + f"{self.origin}:{topic}:{partition}".encode()])

    def seal(self, puts: dict[bytes, bytes]) -> bytes | None:
        """The message of the operations recorded since the last seal (None if there are
        none); adds its outbox entry and the next sequence number to ``puts`` (the batch's
        atomic write), so a crash after that write re-publishes it from :meth:`pending`."""
        if not self._ops and not self._pairs:
            return None
        seq = self.next_seq
        covered = [(t, p, o) for (t, p), o in sorted(self._covering.items())]
        message = encode_message_v3(self.origin, seq, self._ops, None if self.models is None else self._pairs, covered)
        self._ops, self._pairs, self._covering = [], [], {}
        self.next_seq = seq + 1
        self._outbox[seq] = message
        puts[OUTBOX_PREFIX + str(seq).encode()] = message
        puts[SEQ_KEY] = str(self.next_seq).encode()
        return message

    def record_forget(self, user_id: str, erased_at: int, engaged: Iterable[tuple] = ()) -> None:
        """Note an erasure's signal-side effects as ops, applied by every shard at their log
        position instead of by this shard now: drop the user's sessions, and take back their
        search engagements ``engaged`` (``(query key, event time, tie-break, item, weight)`` each,
        :meth:`recsys.search.Search.erase_user`) from the associations."""
        self._ops.append([user_id, None, None, FORGET_OP, erased_at, None])
        self._ops.extend([key, [ts, tie], item_id, SEARCH_UNLEARN_OP, weight, None]
                         for key, ts, tie, item_id, weight in engaged)

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

    def apply(self, records: Iterable[tuple[int, bytes]], puts: dict[bytes, bytes], deletes: list[bytes],
              hold: Callable[[int, list[str]], bool] | None = None) -> int:
        """Apply the log's ``(position, message)`` records in order, skipping positions at or
        below the last applied and ``(origin, seq)`` already applied; adds the new position
        and per-origin sequence numbers to ``puts`` (and this shard's own messages seen back
        to ``deletes``, leaving the outbox). Returns how many messages were applied.

        ``hold(position, items)``: called (with shared models) for a message whose head examples
        name items this shard's catalog does not hold yet (:meth:`SharedModels.unknown_items`);
        True stops here, before that message, leaving it and everything after it unapplied
        (:attr:`position` says where it stopped), so that no shard's head learns a zero vector
        where another's learns the item's own."""
        done = 0
        unknown = self.models.unknown_items if self.models is not None else None
        # a held message is not applied and the position stays before it: the caller offers it again later
        for position, raw, message, fresh in unread(records, self.position, self.applied, unknown, hold):
            self.position = position
            puts[POSITION_KEY] = str(position).encode()
            if message is None:
                self.refused += 1  # every shard refuses the same record: they stay identical
                continue
            if not fresh:
                continue  # published twice (an outbox re-send): once is enough
            self.apply_ops(message.ops, deletes)
            if any(op[3] == FORGET_OP for op in message.ops):
                self.erased_at = position
                puts[ERASED_AT_KEY] = str(position).encode()
            if self.models is not None:
                self.models.learn(position, raw, message, puts, deletes)
            self.applied[message.origin] = message.seq
            puts[APPLIED_PREFIX + str(message.origin).encode()] = str(message.seq).encode()
            for topic, partition, offset in message.covered:  # the origin's newest word on it
                at = (message.origin, topic, partition)
                if self.covered.get(at) != offset:
                    self.covered[at] = offset
                    puts[COVERED_PREFIX + f"{message.origin}:{topic}:{partition}".encode()] = str(offset).encode()
            if message.origin == self.origin:
                for seq in [s for s in self._outbox if s <= message.seq]:
                    del self._outbox[seq]
                    deletes.append(OUTBOX_PREFIX + str(seq).encode())
            done += 1
        return done

    def apply_ops(self, ops: Iterable[Op], deletes: list[bytes] | None = None) -> None:
        """The very signal updates the step makes for each op's event, in order; an erasure's op
        (:data:`FORGET_OP`) drops the user's sessions, their keys added to ``deletes``; a search
        association's op (:data:`SEARCH_OP`) is learned by the associations, and taken back
        (:data:`SEARCH_UNLEARN_OP`, an erasure's), and a search
        re-ranker step's (:data:`SEARCH_RANK_OP`) by that re-ranker (when shared)."""
        covisit, transitions, popularity, sessions = self.covisit, self.transitions, self.popularity, self.sessions
        n = 0
        for user_id, session_id, item_id, event_type, ts, history in ops:
            if event_type == SEARCH_RANK_OP:
                if self.search_reranker is not None:  # the op's ts field holds the rows
                    self.search_reranker.learn_rows(pair_rows(ts, "<f8"))
                continue
            if event_type == SEARCH_OP:
                if self.associations is not None:  # the op's ts field holds the weight
                    if session_id is not None:  # [event time, tie-break]
                        self.associations.learn_at(user_id, item_id, ts, *session_id)
                    else:  # a message sealed before ops carried them: after what the query holds
                        self.associations.learn_at(user_id, item_id, ts, self.associations.last_ts(user_id),
                                                   2**32 + self.associations.engagements(user_id))
                continue
            if event_type == SEARCH_UNLEARN_OP:
                if self.associations is not None:
                    self.associations.unlearn(user_id, item_id, ts, *session_id)
                continue
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


# ---------------------------------------------------------------------- the shared learned models


_log = logging.getLogger(__name__)
#: The head's examples waiting for a full training batch (as the unshared step bounds them).
_MAX_PENDING_EXAMPLES = 4096
_CHECKPOINT_FORMAT = 1
_NOT_EVENTS = (FORGET_OP, SEARCH_OP, SEARCH_UNLEARN_OP, SEARCH_RANK_OP)  # ops that are no applied event (their history is null anyway)


class SharedModels:
    """The head and the re-ranker learned from the exchange log (issue 11), the same on every shard.

    For each message applied (:meth:`SignalExchange.apply`, after its signal ops, in log order):
    every op with a history is one head :class:`~recsys.ranking.head.Example` (history before
    the event -> its item), collected as the unshared step collects a batch's; once a message
    leaves ``batch_size`` of them waiting the head learns them (one bounded ``Head.learn`` call,
    as the unshared step does once per batch). Each re-ranker step of the message is learned
    (:meth:`~recsys.ranking.reranker.PairwiseReranker.learn_pair`). ``position`` is the log
    position of the last message that changed either model: the models' version, the same on
    every shard that has applied the log that far.

    Exactly-once across restarts, without writing the head per batch: with a persistent store
    every applied message is also written under ``xm:log:<position>`` (in the batch's atomic
    write, with the exchange position), and at most every ``checkpoint_interval_s`` a checkpoint
    of the models (head state, pending examples, re-ranker weights, ``position``) replaces
    those records (``xm:ckpt``, same write). On start the checkpoint is loaded and the messages
    after it are learned again, so the models equal those of a shard that never stopped. A head
    step that read the vector of an item the catalog did not hold (a wait that gave up: a zero
    vector) is checkpointed at once, so no restart learns it again with the item's own vector.
    """

    def __init__(self, kv: KVStore, head: Head | None, reranker: PairwiseReranker | None, *,
                 history_len: int, vectors_for: Callable[[Iterable[str]], None] | None = None,
                 persistent: bool = False, checkpoint_interval_s: float = 30.0,
                 clock: Callable[[], float] = time.time, train: bool = True) -> None:
        self.head, self.reranker = head, reranker
        #: False on a shard served by a trainer (:mod:`recsys.signals.trainer`): messages still carry
        #: the training inputs, but this shard learns nothing from them; its models are loaded
        #: from the trainer's snapshots (:meth:`load_checkpoint`), and nothing is persisted here.
        self.train = train
        self.history_len = history_len
        self.ensure_items = vectors_for  # makes every id of an example known to this shard's item space
        #: Whether an item id is in this shard's catalog (None: every item counts as known). With
        #: ``ensure_items`` unset, a message naming an unknown item waits for it (:meth:`unknown_items`).
        self.is_known: Callable[[str], bool] | None = None
        self.persistent = persistent
        self.checkpoint_interval_s = checkpoint_interval_s
        self.clock = clock
        self.pending: list = []
        self.position = -1  # the log position of the last message that changed a model
        self.learned_at = -1  # the log position of the last message learned (changed a model or not)
        self.head_calls = 0
        self.learn_cpu_s = 0.0  # CPU seconds spent learning (the cost figures)
        self._replay: list[bytes] = []  # xm:log: keys written since the checkpoint
        self._read_unknown = False  # a head step since the last checkpoint read an unknown item's vector
        self._last_checkpoint = clock()
        if persistent and train:
            self._restore(kv)

    @property
    def version(self) -> str:
        """``x<position>``: the log position the shared models were last changed at."""
        return f"x{self.position}"

    def unknown_items(self, message: OpMessage) -> list[str]:
        """The items the head would read a vector for in ``message`` (each example's target and
        history) that this shard's catalog does not hold: the head would learn a zero vector for
        them, where a shard that knows them learns their own. Empty when nothing is missing, or
        when the head is off, the message teaches it nothing, or unknown items are admitted."""
        if (self.head is None or not self.train or not message.models or self.ensure_items is not None
                or self.is_known is None):
            return []
        known = self.is_known
        missing = {item_id for _, _, item_id, event_type, _, history in message.ops
                   if history and event_type not in _NOT_EVENTS and not known(item_id)}
        missing.update(h[0] for *_, event_type, _, history in message.ops
                       if history and event_type not in _NOT_EVENTS for h in history if not known(h[0]))
        return sorted(missing)

    def learn(self, position: int, raw: bytes, message: OpMessage, puts: dict[bytes, bytes], deletes: list[bytes]) -> None:
        """Learn one applied message (positions only ever grow); with a persistent store adds its
        replay record, or a checkpoint, to the batch's write. Nothing when not training here."""
        if not self.train:
            return
        t0 = time.process_time()
        self._learn(position, message)
        self.learn_cpu_s += time.process_time() - t0
        if not self.persistent:
            return
        if self._read_unknown or self.clock() - self._last_checkpoint >= self.checkpoint_interval_s:
            # a head step that read an unknown item's (zero) vector is never learned again on a
            # restart: by then the item's record may have come, and the step would read its own
            # vector and end with other models under the same version
            self.checkpoint_into(puts, deletes)
        else:
            key = MODEL_REPLAY_PREFIX + f"{position:020d}".encode()
            puts[key] = raw
            self._replay.append(key)

    def checkpoint_into(self, puts: dict[bytes, bytes], deletes: list[bytes]) -> None:
        """Add a checkpoint of the models as they are, replacing the replay records since the last
        one, to a write (persistent and training only). Call it where everything learned is
        committed by that write or before it: a model trainer stopping in order does, so that its
        restart learns nothing again, with vectors a catalog update may have changed meanwhile."""
        if not (self.train and self.persistent):
            return
        puts[MODEL_CHECKPOINT_KEY] = self.checkpoint()
        deletes.extend(self._replay)
        for key in self._replay:
            puts.pop(key, None)
        self._replay = []
        self._read_unknown = False
        self._last_checkpoint = self.clock()

    def write_checkpoint(self, kv: KVStore) -> None:
        """:meth:`checkpoint_into` a write of its own to ``kv`` (a stop in order)."""
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        self.checkpoint_into(puts, deletes)
        if puts:
            kv.write(puts, deletes)

    def _learn(self, position: int, message: OpMessage) -> None:
        self.learned_at = position
        if not message.models:
            return  # version 1 histories are cut to the signals' window: nothing for the models
        changed = False
        head = self.head
        if head is not None:
            from recsys.ranking.head import Example

            examples = [Example([tuple(h) for h in history], item_id, event_type, ts)
                        for _, _, item_id, event_type, ts, history in message.ops if history]
            if examples:
                if self.ensure_items is not None:
                    self.ensure_items([i for ex in examples for i in (ex.target, *(h[0] for h in ex.history))])
                self.pending.extend(examples)
                del self.pending[:-_MAX_PENDING_EXAMPLES]
            if len(self.pending) >= head.config.batch_size:
                batch, self.pending = self.pending, []
                if (known := self.is_known) is not None and self.ensure_items is None:
                    self._read_unknown = self._read_unknown or any(
                        not known(i) for ex in batch for i in (ex.target, *(h[0] for h in ex.history)))
                changed = head.learn(batch)["steps"] > 0 or changed
                self.head_calls += 1
        if self.reranker is not None:
            for pair in message.pairs:
                self.reranker.learn_pair(pair_rows(pair))
                changed = True
        if changed:
            self.position = position

    # ------------------------------------------------------------------ persistence

    def checkpoint(self) -> bytes:
        """The models' state as bytes (torch.save of plain tensors, numbers and strings)."""
        import torch

        state = {
            "format": _CHECKPOINT_FORMAT,
            "position": self.position,
            "learned_at": self.learned_at,
            "head": self.head.state_dict() if self.head is not None else None,
            "pending": orjson.dumps([[ex.history, ex.target, ex.target_type, ex.ts] for ex in self.pending]).decode(),
            "reranker": None if self.reranker is None else orjson.dumps(
                {"w": self.reranker.w.tolist(), "examples": self.reranker.examples}).decode(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()

    def serving_state(self) -> bytes:
        """What a shard needs to *serve* these models (a trainer's snapshot payload): the head's
        parameters and step count, the re-ranker's weights and example count, the log positions.
        No optimizer moments, sampler or pending examples (training state: the trainer's own),
        and no torch.save: ``b"XS1\\n"`` + one JSON header line + the float32 parameters (1.2 MB at
        384 dimensions), which loads in 3-5 ms where a checkpoint's ``torch.load`` took 13-28 ms,
        side by side on the loaded 2-core box.

        >>> from recsys.store.kv import MemoryKV
        >>> m = SharedModels(MemoryKV(), None, None, history_len=0); m.position = 4
        >>> other = SharedModels(MemoryKV(), None, None, history_len=0); other.load_serving(m.serving_state())
        >>> other.version
        'x4'
        """
        header: dict = {"position": self.position, "learned_at": self.learned_at, "head": None, "reranker": None}
        blobs: list[bytes] = []
        if self.head is not None:
            params = self.head._towers.state_dict()
            header["head"] = {"n_updates": self.head.n_updates,
                              "params": [[name, list(t.shape)] for name, t in params.items()]}
            blobs.extend(t.detach().numpy().astype("<f4", copy=False).tobytes() for t in params.values())
        if self.reranker is not None:
            header["reranker"] = {"examples": self.reranker.examples, "n": int(self.reranker.w.size)}
            blobs.append(np.ascontiguousarray(self.reranker.w, dtype="<f8").tobytes())
        return SERVING_MAGIC + orjson.dumps(header) + b"\n" + b"".join(blobs)

    def load_serving(self, raw: bytes) -> None:
        """Serve the models in :meth:`serving_state`'s bytes from now on (version included)."""
        import torch

        if not raw.startswith(SERVING_MAGIC):
            raise ExchangeFormatError(f"not a serving snapshot (starts {raw[:4]!r}, expected {SERVING_MAGIC!r})")
        end = raw.index(b"\n", len(SERVING_MAGIC))
        header = orjson.loads(raw[len(SERVING_MAGIC):end])
        body = memoryview(raw)[end + 1:]
        at = 0
        if header["head"] is not None and self.head is not None:
            tensors = {}
            for name, shape in header["head"]["params"]:
                n = math.prod(shape)
                tensors[name] = torch.from_numpy(np.frombuffer(body, dtype="<f4", count=n, offset=at).astype(np.float32).reshape(shape))
                at += 4 * n
            self.head._towers.load_state_dict(tensors)
            self.head.n_updates = int(header["head"]["n_updates"])
            self.head.publish()  # served from now on
        elif header["head"] is not None:
            at += 4 * sum(math.prod(shape) for _, shape in header["head"]["params"])
        if header["reranker"] is not None and self.reranker is not None:
            n = int(header["reranker"]["n"])
            self.reranker.w = np.frombuffer(body, dtype="<f8", count=n, offset=at).astype(np.float64)
            self.reranker.examples = int(header["reranker"]["examples"])
        self.position, self.learned_at = int(header["position"]), int(header["learned_at"])

    def load_checkpoint(self, raw: bytes, *, pending: bool = True) -> None:
        """Take the models' state from :meth:`checkpoint`'s bytes (a shard served by a trainer:
        the trainer's snapshot; ``pending=False`` leaves the head's waiting examples out)."""
        import torch

        from recsys.ranking.head import Example

        state = torch.load(io.BytesIO(raw), weights_only=True)
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ExchangeFormatError(f"shared model checkpoint of unknown format {state.get('format')!r}")
        self.position, self.learned_at = int(state["position"]), int(state["learned_at"])
        if self.head is not None and state["head"] is not None:
            self.head.load_state_dict(state["head"])
        if pending:
            self.pending = [Example([tuple(h) for h in hist], t, ty, ts) for hist, t, ty, ts in orjson.loads(state["pending"])]
        if self.reranker is not None and state["reranker"] is not None:
            rr = orjson.loads(state["reranker"])
            self.reranker.w = np.asarray(rr["w"], dtype=np.float64)
            self.reranker.examples = int(rr["examples"])

    def _restore(self, kv: KVStore) -> None:
        raw = kv.get(MODEL_CHECKPOINT_KEY)
        if raw is not None:
            self.load_checkpoint(raw)
        replayed = 0
        for key, raw_message in kv.iter_prefix(MODEL_REPLAY_PREFIX):
            position = int(key[len(MODEL_REPLAY_PREFIX):])
            self._replay.append(key)
            if position > self.learned_at:
                self._learn(position, decode_message(raw_message))
                replayed += 1
        if raw is not None or replayed:
            _log.info("shared models restored at log position %d (%d messages learned again)", self.learned_at, replayed)
