"""The search outbox: each user's last few search results, so a re-delivered search re-emits
exactly the bytes emitted the first time (exactly-once, like recommendations' outbox).

A search is answered from the user's state as committed before its batch. After a crash the
broker re-delivers the messages above the recovery snapshot; a search among them was already
answered and committed, and the user's state may have moved on since (the events after it are
applied), so answering it again would give another answer. Instead the answer is stored with
the batch that answered it (same atomic write: ``b"sqo:" + user`` ->
``[[partition, offset, event_id, payload], ...]``, the last :data:`SEARCH_OUTBOX_LEN`) and a
re-delivered search whose position and event id are stored re-emits the stored bytes. One that
is not stored (an outbox already trimmed past it, or a topic re-created under the same
offsets) is answered again from the current state.

>>> box = SearchOutbox()
>>> box.put("u", 0, 7, "e7", b'{"a":1}')
>>> box.get("u", 0, 7, "e7"), box.get("u", 0, 7, "other-event"), box.get("u", 0, 8, "e8")
(b'{"a":1}', None, None)
>>> box.export_dirty()
{b'sqo:u': b'[[0,7,"e7","{\\\\"a\\\\":1}"]]'}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from recsys.store.kv import KVStore

OUTBOX_PREFIX = b"sqo:"
#: Search results kept per user. The sink flushes at each epoch snapshot
#: (``RECSYS_SNAPSHOT_INTERVAL_S``), so every answer since the last one is in doubt; a user who
#: searched more often than this since then gets the older ones answered again after a crash,
#: from the state then current (never lost; the recommendations' outbox keeps every list not yet
#: acknowledged instead, ``recsys.shard.outbox``).
SEARCH_OUTBOX_LEN = 8


def outbox_key(user_id: str) -> bytes:
    return OUTBOX_PREFIX + user_id.encode()


class SearchOutbox:
    """Per user ``{(partition, offset): (event_id, payload)}``, read from the store on demand."""

    def __init__(self) -> None:
        self._kv: KVStore | None = None
        self._boxes: dict[str, dict[tuple[int, int], tuple[str, bytes]]] = {}  # changed, not yet written
        self._dirty: set[str] = set()

    def load(self, kv: KVStore) -> None:
        self._kv = kv
        self._boxes.clear()
        self._dirty.clear()

    def _box(self, user_id: str) -> dict[tuple[int, int], tuple[str, bytes]]:
        box = self._boxes.get(user_id)
        if box is None:
            raw = self._kv.get(outbox_key(user_id)) if self._kv is not None else None
            box = {(p, o): (e, payload.encode()) for p, o, e, payload in orjson.loads(raw)} if raw else {}
            self._boxes[user_id] = box
        return box

    def get(self, user_id: str, partition: int, offset: int, event_id: str) -> bytes | None:
        """The stored answer to the search at ``(partition, offset)`` with ``event_id``, if any."""
        stored = self._box(user_id).get((partition, offset))
        return stored[1] if stored is not None and stored[0] == event_id else None

    def put(self, user_id: str, partition: int, offset: int, event_id: str, payload: bytes) -> None:
        box = self._box(user_id)
        box[(partition, offset)] = (event_id, payload)
        if len(box) > SEARCH_OUTBOX_LEN:
            for old in sorted(box)[: len(box) - SEARCH_OUTBOX_LEN]:
                del box[old]
        self._dirty.add(user_id)

    def forget_user(self, user_id: str) -> list[bytes]:
        self._boxes.pop(user_id, None)
        self._dirty.discard(user_id)
        return [outbox_key(user_id)]

    def export_dirty(self) -> dict[bytes, bytes]:
        """The changed boxes, for the batch's atomic write; the read cache is dropped with them
        (what is written is read back from the store when next needed)."""
        out = {outbox_key(u): orjson.dumps([[p, o, e, payload.decode()] for (p, o), (e, payload) in sorted(self._boxes[u].items())])
               for u in sorted(self._dirty)}
        self._dirty.clear()
        self._boxes.clear()
        return out
