"""What a shard commits beside user state so that a crash loses and doubles nothing.

- the **outbox**: each user's last few emitted recommendations, ``{(partition, offset): bytes}``,
  so a re-delivered trigger re-emits exactly the bytes emitted the first time;
- per-partition **offsets** (watermarks, positions) stored as ``<prefix><topic>:<partition>``;
- the surgery a source move (an offset reset) needs: a user record or an outbox without one
  partition's entries.

>>> box = {(0, 7): b'{"a":1}', (0, 9): b'{"b":2}'}
>>> decode_outbox(encode_outbox(box)) == box
True
>>> outbox_without(encode_outbox(box), 0)
b'[]'
"""

from __future__ import annotations

import orjson

from recsys.store.kv import KVStore
from recsys.store.users import decode_user, encode_user

#: Recommendations kept per user for identical re-emission after a crash. The sink flushes
#: every batch right after it is committed, so more than a couple can never be in doubt.
OUTBOX_LEN = 4


def encode_outbox(box: dict[tuple[int, int], bytes]) -> bytes:
    recent = sorted(box.items())[-OUTBOX_LEN:]
    return orjson.dumps([[p, o, payload.decode()] for (p, o), payload in recent])


def decode_outbox(raw: bytes) -> dict[tuple[int, int], bytes]:
    return {(p, o): payload.encode() for p, o, payload in orjson.loads(raw)}


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
