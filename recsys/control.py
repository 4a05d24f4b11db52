"""Control messages (topic ``RECSYS_CONTROL_TOPIC``, default ``control``) and erasure records.

One message type today, ``schemas/control.v1.json``::

    {"type": "forget_user", "user_id": "u42"}

asks every shard to erase a shopper (the right to be forgotten): the user record, the outbox
of past recommendations, their session postings, the dedup window, the in-memory "last
shown" entry, and what search learned from them (their engagements after a query, the query
texts they typed). What stays is a *tombstone* under ``fg:<id hash>`` (SHA-256 of the id, no other
personal data) holding when the erasure happened, so that an event of that user that is
older than the erasure (re-delivered, or still queued in ``events`` when the request came)
never brings them back; a newer event starts a new, empty user.

>>> decode_control(b'{"type": "forget_user", "user_id": "u42"}')
ControlMessage(type='forget_user', user_id='u42')
>>> user_hash("u42")
'd472ef773520c93109073e75932a1edd'
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import orjson

from recsys.events import DEFAULT_MAX_MESSAGE_BYTES, DecodeError, _id, _loads

ControlType = Literal["forget_user"]
CONTROL_TYPES: tuple[str, ...] = ("forget_user",)
#: Tombstone keys of erased users: ``fg:`` + :func:`user_hash`.
TOMBSTONE_PREFIX = b"fg:"


@dataclass(frozen=True, slots=True)
class ControlMessage:
    type: ControlType
    user_id: str

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "user_id": self.user_id}


def decode_control(raw: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> ControlMessage:
    """A :class:`ControlMessage` from JSON bytes; :class:`DecodeError` names what is wrong."""
    obj = _loads(raw, max_bytes)
    kind = obj.get("type")
    if kind not in CONTROL_TYPES:
        raise DecodeError(f"field 'type': unknown control message type {kind!r} (expected one of {', '.join(CONTROL_TYPES)})")
    # an id as events' ids are (until 2026-12-08 any string: "u\x00e" reached the erasure; a review)
    return ControlMessage(kind, _id(obj, "user_id", required=True))  # type: ignore[arg-type]


def encode_control(message: ControlMessage) -> bytes:
    return orjson.dumps(message.to_dict())


def user_hash(user_id: str) -> str:
    """What the tombstone and the audit log keep of an erased id: 128 bits of its SHA-256.

    Pseudonymous, not anonymous: whoever already knows an id can check whether it was erased,
    nobody can read an id from it."""
    return hashlib.sha256(user_id.encode()).hexdigest()[:32]


def tombstone_key(user_id: str) -> bytes:
    return TOMBSTONE_PREFIX + user_hash(user_id).encode()
