"""The search outbox: each user's search results that may still be needed after a crash, so a
re-delivered search re-emits exactly the bytes emitted the first time (exactly-once, like
recommendations' outbox, :mod:`recsys.shard.outbox`).

A search is answered from the user's state as committed before its batch. After a crash the
broker re-delivers the messages above the recovery snapshot; a search among them was already
answered and committed, and the user's state may have moved on since (the events after it are
applied), so answering it again would give another answer. Instead the answer is stored with
the batch that answered it (same atomic write: ``b"sqo:" + user`` ->
``[[partition, offset, event_id, payload, stamp], ...]``) and a re-delivered search whose
position and event id are stored re-emits the stored bytes. One that is not stored (an outbox
already trimmed past it, or a topic re-created under the same offsets) is answered again from
the current state.

Which answers are kept: as for recommendations, every one whose batch (``stamp``) the search
sink has not had acknowledged (:attr:`SearchOutbox.acknowledged`), and the newest
:data:`SEARCH_OUTBOX_LEN` besides. A re-emitted answer is stamped again with the batch that
re-emitted it, and a write that only re-stamps lets no answer go (the user's later searches may
not be re-delivered yet). Until 2026-12-04 the newest 8 only: a user with more searches than
that in one epoch got the older ones answered again, from the state then current.

>>> box = SearchOutbox()
>>> box.stamp = 3
>>> box.put("u", 0, 7, "e7", b'{"a":1}')
>>> box.get("u", 0, 7, "e7"), box.get("u", 0, 7, "other-event"), box.get("u", 0, 8, "e8")
(b'{"a":1}', None, None)
>>> box.export_dirty()
{b'sqo:u': b'[[0,7,"e7","{\\\\"a\\\\":1}",3]]'}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from recsys.store.kv import KVStore

OUTBOX_PREFIX = b"sqo:"
#: Search results kept per user whether or not acknowledged (the unacknowledged ones are kept
#: besides, however many).
SEARCH_OUTBOX_LEN = 8


def outbox_key(user_id: str) -> bytes:
    return OUTBOX_PREFIX + user_id.encode()


class SearchOutbox:
    """Per user ``{(partition, offset): (event_id, payload, stamp)}``, read from the store on demand.

    ``stamp``: the batch being answered (set by the engine before each batch); ``acknowledged``:
    the newest stamp whose answers the sink has had acknowledged (the engine keeps it)."""

    def __init__(self) -> None:
        self._kv: KVStore | None = None
        self._boxes: dict[str, dict[tuple[int, int], tuple[str, bytes, int]]] = {}  # changed, not yet written
        self._dirty: set[str] = set()
        self._trim: set[str] = set()  # dirty users with a new answer: what is acknowledged may go
        self.stamp = 0
        self.acknowledged = -1

    def load(self, kv: KVStore) -> None:
        self._kv = kv
        self._boxes.clear()
        self._dirty.clear()
        self._trim.clear()

    def _box(self, user_id: str) -> dict[tuple[int, int], tuple[str, bytes, int]]:
        box = self._boxes.get(user_id)
        if box is None:
            raw = self._kv.get(outbox_key(user_id)) if self._kv is not None else None
            # entries written before 2026-12-04 have no stamp: 0, acknowledged long since
            box = {(p, o): (e, payload.encode(), stamp[0] if stamp else 0) for p, o, e, payload, *stamp in orjson.loads(raw)} if raw else {}
            self._boxes[user_id] = box
        return box

    def get(self, user_id: str, partition: int, offset: int, event_id: str) -> bytes | None:
        """The stored answer to the search at ``(partition, offset)`` with ``event_id``, if any;
        found, it is in doubt again until this batch is acknowledged (stamped again)."""
        box = self._box(user_id)
        stored = box.get((partition, offset))
        if stored is None or stored[0] != event_id:
            return None
        box[(partition, offset)] = (stored[0], stored[1], self.stamp)
        self._dirty.add(user_id)
        return stored[1]

    def put(self, user_id: str, partition: int, offset: int, event_id: str, payload: bytes) -> None:
        self._box(user_id)[(partition, offset)] = (event_id, payload, self.stamp)
        self._dirty.add(user_id)
        self._trim.add(user_id)

    def forget_user(self, user_id: str) -> list[bytes]:
        self._boxes.pop(user_id, None)
        self._dirty.discard(user_id)
        self._trim.discard(user_id)
        return [outbox_key(user_id)]

    def export_dirty(self) -> dict[bytes, bytes]:
        """The changed boxes, for the batch's atomic write, each without the answers it lets go
        (the module's docstring); the read cache is dropped with them (what is written is read
        back from the store when next needed)."""
        out = {}
        for user_id in sorted(self._dirty):
            entries = sorted(self._boxes[user_id].items())
            newest = len(entries) - SEARCH_OUTBOX_LEN
            floor = self.acknowledged if user_id in self._trim else -1
            out[outbox_key(user_id)] = orjson.dumps([[p, o, e, payload.decode(), stamp]
                                                     for i, ((p, o), (e, payload, stamp)) in enumerate(entries)
                                                     if i >= newest or stamp > floor])
        self._dirty.clear()
        self._trim.clear()
        self._boxes.clear()
        return out
