"""What a shard commits beside user state so that a crash loses and doubles nothing.

- the **outbox**: each user's last few emitted recommendations, ``{(partition, offset): bytes}``,
  so a re-delivered trigger re-emits exactly the bytes emitted the first time;
- per-partition **offsets** (watermarks, positions) stored as ``<prefix><topic>:<partition>``;
- the surgery a source move (an offset reset) needs: a user record or an outbox without one
  partition's entries.

>>> box = {(0, 7): b'{"a":1}', (0, 9): b'{"b":2}'}
>>> decode_outbox(encode_outbox(box)) == box
True
>>> decode_outbox(outbox_without(encode_outbox(box), 0))
{}
>>> decode_outbox(b'[[0,7,"{}"]]')  # as written before 2026-12-03
{(0, 7): b'{}'}
"""

from __future__ import annotations

import struct

import orjson

from recsys.store.kv import KVStore
from recsys.store.users import decode_user, encode_user

#: Recommendations kept per user for identical re-emission after a crash. The sink flushes
#: every batch right after it is committed, so more than a couple can never be in doubt.
OUTBOX_LEN = 4


#: An outbox entry's header: partition, offset, payload length (little-endian).
_ENTRY = struct.Struct("<iqI")
_BINARY = 1  # first byte of a binary outbox (a JSON one, before 2026-12-03, starts with "[")


def encode_outbox(box: dict[tuple[int, int], bytes]) -> bytes:
    """The last :data:`OUTBOX_LEN` entries by ``(partition, offset)``: a format byte, the count,
    each entry's header (:data:`_ENTRY`), then the payloads one after another, as emitted.
    Binary, so a payload is stored as its bytes (as a JSON string it was escaped, and parsed
    again on every read: the user's outbox is read and rewritten with every batch they are in)."""
    recent = sorted(box.items())[-OUTBOX_LEN:]
    heads = b"".join([_ENTRY.pack(p, o, len(payload)) for (p, o), payload in recent])
    return bytes((_BINARY, len(recent))) + heads + b"".join([payload for _, payload in recent])


def decode_outbox(raw: bytes) -> dict[tuple[int, int], bytes]:
    """Inverse of :func:`encode_outbox`; also reads the JSON outboxes written before 2026-12-03
    (``[[partition, offset, payload], ...]``)."""
    if raw[:1] == b"[":
        return {(p, o): payload.encode() for p, o, payload in orjson.loads(raw)}
    if raw[:1] != bytes((_BINARY,)) or len(raw) < 2 or len(raw) < 2 + raw[1] * _ENTRY.size:
        raise ValueError(f"outbox: not a record of a known format ({len(raw)} bytes, starting {raw[:4]!r})")
    out: dict[tuple[int, int], bytes] = {}
    at = 2 + raw[1] * _ENTRY.size
    for p, o, size in _ENTRY.iter_unpack(raw[2:at]):
        out[(p, o)] = raw[at : at + size]
        at += size
    if at != len(raw):
        raise ValueError(f"outbox: {len(raw)} bytes, but its entries take {at}")
    return out


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
    kept = {po: payload for po, payload in box.items() if po[0] != partition}
    return None if len(kept) == len(box) else encode_outbox(kept)
