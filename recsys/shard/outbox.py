"""What a shard commits beside user state so that a crash loses and doubles nothing.

- the **outbox**: each user's emitted recommendations that may still be needed after a crash,
  ``{(partition, offset): (bytes, stamp)}``, so a re-delivered trigger re-emits exactly the
  bytes emitted the first time (``stamp``: the batch that last emitted them, see below);
- per-partition **offsets** (watermarks, positions) stored as ``<prefix><topic>:<partition>``;
- the surgery a source move (an offset reset) needs: a user record or an outbox without one
  partition's entries;
- the offsets below which a rebuilt state's outputs were sent before its rebuild
  (:data:`SENT_BEFORE_PREFIX`, :func:`write_sent_before`).

Which entries are kept. A list is in doubt from the batch that emitted it until the sink has had
it acknowledged: the Kafka sink sends without waiting and its producer flushes (every send
acknowledged) at Bytewax's epoch snapshot, every ``RECSYS_SNAPSHOT_INTERVAL_S``; a crash before
that re-delivers the epoch's events, and only the outbox can give back a list the broker never
got. So an entry stays while its batch's ``stamp`` is above the acknowledged one
(``Shard.acknowledge``), and only then: an acknowledged list is in the broker, and its
re-delivered trigger is skipped without a copy. (Written with the user's next list: one that
stays because its user has no new event is re-emitted, identical, if its trigger comes again.)
Until 2026-12-04 each user's newest four were kept whatever had been delivered: a shopper with
more lists than that in one epoch lost the older ones to a crash while the broker was slow or
away (``tests/test_output_acks.py``), and every other user's outbox carried three lists nobody
could need (~3.5 KB of the ~6.6 KB each event wrote to the store, ``engine_speed.py --phases``).

>>> box = {(0, 7): (b'{"a":1}', 5), (0, 9): (b'{"b":2}', 6)}
>>> decode_outbox(encode_outbox(box, acknowledged=4)) == box
True
>>> decode_outbox(encode_outbox(box, acknowledged=5))  # batch 5 delivered
{(0, 9): (b'{"b":2}', 6)}
>>> decode_outbox(outbox_without(encode_outbox(box, acknowledged=4), 0))
{}
>>> decode_outbox(b'[[0,7,"{}"]]')  # as written before 2026-12-03 (no stamp: 0)
{(0, 7): (b'{}', 0)}
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import orjson

from recsys.store.kv import KVStore
from recsys.store.users import decode_user, encode_user


#: An outbox entry's header: partition, offset, payload length and (format 2) the stamp of the
#: batch that last emitted it (little-endian).
_ENTRY = struct.Struct("<iqI")
_STAMPED_ENTRY = struct.Struct("<iqIq")
_BINARY = 1  # first byte of a binary outbox of 2026-12-03 (no stamps, a one-byte count); a JSON one starts with "["
_STAMPED = 2  # first byte of a binary outbox with stamps (2026-12-04 on), then a four-byte count
_STAMPED_HEAD = struct.Struct("<BI")


def encode_outbox(box: dict[tuple[int, int], tuple[bytes, int]], acknowledged: int) -> bytes:
    """The entries the outbox keeps (the module's docstring): a format byte, the count (4 bytes), each
    entry's header (:data:`_STAMPED_ENTRY`), then the payloads one after another, as emitted.
    Binary, so a payload is stored as its bytes (as a JSON string it was escaped, and parsed
    again on every read: the user's outbox is read and rewritten with every batch they are in)."""
    kept = [entry for entry in sorted(box.items()) if entry[1][1] > acknowledged]
    heads = b"".join([_STAMPED_ENTRY.pack(p, o, len(payload), stamp) for (p, o), (payload, stamp) in kept])
    return _STAMPED_HEAD.pack(_STAMPED, len(kept)) + heads + b"".join([payload for _, (payload, _) in kept])


def decode_outbox(raw: bytes) -> dict[tuple[int, int], tuple[bytes, int]]:
    """Inverse of :func:`encode_outbox`; also reads the binary outboxes of 2026-12-03 and the JSON
    ones written before (``[[partition, offset, payload], ...]``), their entries stamped 0."""
    if raw[:1] == b"[":
        return {(p, o): (payload.encode(), 0) for p, o, payload in orjson.loads(raw)}
    if raw[:1] == bytes((_STAMPED,)) and len(raw) >= _STAMPED_HEAD.size:
        form, start, count = _STAMPED_ENTRY, _STAMPED_HEAD.size, _STAMPED_HEAD.unpack_from(raw)[1]
    elif raw[:1] == bytes((_BINARY,)) and len(raw) >= 2:
        form, start, count = _ENTRY, 2, raw[1]
    else:
        form = None
    if form is None or len(raw) < start + count * form.size:
        raise ValueError(f"outbox: not a record of a known format ({len(raw)} bytes, starting {raw[:4]!r})")
    out: dict[tuple[int, int], tuple[bytes, int]] = {}
    at = start + count * form.size
    for p, o, size, *stamp in form.iter_unpack(raw[start:at]):
        out[(p, o)] = (raw[at : at + size], stamp[0] if stamp else 0)
        at += size
    if at != len(raw):
        raise ValueError(f"outbox: {len(raw)} bytes, but its entries take {at}")
    return out


#: ``sent:<topic>:<partition>`` -> the offset below which every output a message triggered was
#: delivered before ``recsys run --rebuild-state`` wiped the state (the recovery store's resume
#: offset: Bytewax commits an epoch's source offsets only after its sinks flushed what the epoch
#: sent). The rebuilt state applies and ranks those messages again and sends nothing for them.
#: A mark stays in the state once the replay has passed it (only an offset reset takes it): a
#: rebuild killed part-way and rebuilt again before Bytewax had committed an epoch past it finds
#: it there. Until 2026-12-07 a rebuild sent every list, search answer and dead letter again
#: (216 lists on a topic became 432).
SENT_BEFORE_PREFIX = b"sent:"
#: The positions ``[[topic, partition, offset], ...]`` of the events the wiped state still held
#: waiting for their catalog item (:mod:`recsys.shard.waiting`): never answered, so sent however
#: far below a mark they lie. Absent when the wiped state could not be read (or there was none):
#: then an event that waits again in the replay is answered when let go, and the others below a
#: mark are kept back.
REBUILD_WAITING_KEY = b"meta:rebuild-waiting"


def offset_key(prefix: bytes, topic: str, partition: int) -> bytes:
    """``<prefix><topic>:<partition>``, as :func:`load_offsets` reads it back."""
    return prefix + f"{topic}:{partition}".encode()


def write_sent_before(kv: KVStore, marks: dict[tuple[str, int], int],
                      waiting: Iterable[tuple[str, int, int]] | None = None) -> None:
    """Record ``(topic, partition) -> offset`` marks (:data:`SENT_BEFORE_PREFIX`) in a fresh state,
    and the wiped state's waiting events (:data:`REBUILD_WAITING_KEY`; None: not known).

    >>> from recsys.store.kv import MemoryKV
    >>> kv = MemoryKV(); write_sent_before(kv, {("events", 1): 400}, [("events", 1, 7)])
    >>> load_offsets(kv, SENT_BEFORE_PREFIX), load_waiting_at_rebuild(kv)
    ({('events', 1): 400}, {('events', 1, 7)})
    """
    puts = {offset_key(SENT_BEFORE_PREFIX, t, p): str(o).encode() for (t, p), o in marks.items()}
    if waiting is not None:
        puts[REBUILD_WAITING_KEY] = orjson.dumps(sorted(waiting))
    kv.write(puts)


def load_waiting_at_rebuild(kv: KVStore) -> set[tuple[str, int, int]] | None:
    """:data:`REBUILD_WAITING_KEY` as a set of positions; None when not recorded."""
    raw = kv.get(REBUILD_WAITING_KEY)
    return None if raw is None else {(t, p, o) for t, p, o in orjson.loads(raw)}


def load_offsets(kv: KVStore, prefix: bytes) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for key, value in kv.iter_prefix(prefix):
        topic, _, partition = key[len(prefix) :].decode().rpartition(":")
        out[(topic, int(partition))] = int(value)
    return out


def user_without(raw: bytes, partition: int) -> bytes | None:
    state = decode_user(raw)
    if partition not in state.last_applied:
        return None
    del state.last_applied[partition]
    return encode_user(state)


def outbox_without(raw: bytes, partition: int) -> bytes | None:
    box = decode_outbox(raw)
    kept = {po: entry for po, entry in box.items() if po[0] != partition}
    return None if len(kept) == len(box) else encode_outbox(kept, acknowledged=-1)  # every one kept
