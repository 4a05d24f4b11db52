"""Events whose item the catalog has not delivered yet wait, for a bounded time, in state.

The catalog and the events are two topics: a shop that announces an item and a shopper who
clicks it a moment later can reach the flow in the other order. So an event for an item not
(yet) in the catalog is parked instead of being dead-lettered at once; it is applied as soon as
the item arrives, or dead-lettered as an unknown item once it has waited ``wait_s`` seconds
(``RECSYS_UNKNOWN_ITEM_WAIT_S``). Each user's events keep their order: while one of a user's
events waits, the user's later events wait behind it.

Search events wait here too when their query is being encoded by the embedding worker
(``RECSYS_EMBED_WORKER``; ``sort``'s ``encoding``): the user's later events wait behind the
search, so it is still answered on the user's state before it, and one whose time is up is
released, not dead-lettered (the engine encodes its query itself).

Crash safety: parked events live in the engine's RocksDB (``wait:<topic>:<partition>:<offset>``
-> the raw message and its deadline), written and deleted in the batch's one atomic write. So a
parked event survives a crash although Bytewax has moved its source offset on, and a
re-delivered copy of a parked event is dropped here. Any other copy (at or below the last offset
its partition had processed) was applied, and goes on to the engine, which skips it, or was
dead-lettered, and is dropped: its dead letter was kept until its sink acknowledged it, so it
is not refused again (before 2026-12-06 it was, with a new ``failed_at``).

Time is the engine's clock (wall time) less the time the engine spent applying catalog records
(embedding new items, indexing them for search; during a bulk import of new items, the time
between its slices too: ``IMPORT_GAP_S`` in recsys/shard/step.py): while it does, the catalog is catching up, and
an event waiting for an item further on in a bulk import must not run out of time because the
import ahead of its item is being embedded (the operator's run that found it: 5,000 new items
and 800 events for them, 478 dead-lettered at ~3.4 s of embedding per 1,000 items). That credit
is state too (``meta:wait-credit``, written with the batch), so a deadline read back after a
restart means what it meant. The flow calls the engine on a timer as well, so a parked event
meets its deadline on an idle stream. With ``wait_s == 0`` nothing waits.

>>> from recsys.store.kv import MemoryKV
>>> from recsys.events import Envelope, Event, encode
>>> now = [0.0]
>>> room = WaitingRoom(MemoryKV(), wait_s=2.0, clock=lambda: now[0])
>>> ev = Event("e1", "click", "u1", "new-item", ts=0)
>>> sorted_ = room.sort([(Envelope("events", 0, 7, b"u1", encode(ev)), ev)], known=set(), committed={})
>>> (len(sorted_.ready), len(sorted_.expired), len(room))
(0, 0, 1)
>>> later = room.sort([], known={"new-item"}, committed={})  # the catalog caught up
>>> ([e.event_id for _, e in later.ready], len(room), later.released)
(['e1'], 0, {('events', 0, 7)})
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Container
from dataclasses import dataclass, field

import orjson

from recsys.events import DecodeError, Envelope, Event, decode_event
from recsys.store.kv import KVStore

WAIT_PREFIX = b"wait:"
#: Seconds spent applying catalog records so far: the waiting room's clock is the wall's less this.
CREDIT_KEY = b"meta:wait-credit"

Position = tuple[str, int, int]  # topic, partition, offset


def _key(pos: Position) -> bytes:
    topic, partition, offset = pos
    return WAIT_PREFIX + f"{topic}:{partition}:{offset:020d}".encode()


def parked_positions(kv: KVStore) -> set[Position]:
    """The positions of the events parked in ``kv``, from their keys alone (``recsys run
    --rebuild-state`` reads a wiped state's).

    >>> from recsys.store.kv import MemoryKV
    >>> kv = MemoryKV(); kv.write({_key(("ev:a", 1, 42)): b"{}"}); parked_positions(kv)
    {('ev:a', 1, 42)}
    """
    out: set[Position] = set()
    for key, _ in kv.iter_prefix(WAIT_PREFIX):
        topic, partition, offset = key[len(WAIT_PREFIX):].decode().rsplit(":", 2)
        out.add((topic, int(partition), int(offset)))
    return out


@dataclass
class Sorted:
    """One batch's events after the waiting room: ``ready`` to apply (released ones first, each
    user's order kept), ``expired`` to dead-letter as unknown items, ``released`` = positions of
    parked events applied now (below the watermark, yet never applied), and the KV changes."""

    ready: list[tuple[Envelope, Event]] = field(default_factory=list)
    expired: list[tuple[Envelope, Event]] = field(default_factory=list)
    released: set[Position] = field(default_factory=set)
    puts: dict[bytes, bytes] = field(default_factory=dict)
    deletes: list[bytes] = field(default_factory=list)
    parked: int = 0
    refused_before: int = 0  # re-delivered copies of messages dead-lettered before: dropped
    #: parked events a restart could not decode again (a rule added since they were parked): each
    #: with the reason, to dead-letter; their keys are in ``deletes``
    unreadable: list[tuple[Envelope, str]] = field(default_factory=list)


class WaitingRoom:
    """Parked events by user, in arrival order, persisted in ``kv``."""

    def __init__(self, kv: KVStore, wait_s: float, clock: Callable[[], float], max_message_bytes: int = 1 << 20):
        self.wait_s = wait_s
        self.clock = clock
        stored = kv.get(CREDIT_KEY)
        self.credit = float(stored) if stored is not None else 0.0
        # user -> [(envelope, event, deadline)], oldest first
        self.queues: dict[str, list[tuple[Envelope, Event, float]]] = {}
        self.positions: set[Position] = set()
        self._unreadable: list[tuple[Envelope, str]] = []
        for _, raw in kv.iter_prefix(WAIT_PREFIX):
            topic, partition, offset, key, value, ts, deadline = orjson.loads(raw)
            env = Envelope(topic, partition, offset, base64.b64decode(key) if key is not None else None,
                           base64.b64decode(value), ts)
            try:
                event = decode_event(env.value, max_message_bytes)
            except DecodeError as exc:  # it decoded when parked; a changed limit or rule must not stop
                # start-up, nor drop it unsaid (until 2026-12-07 it was skipped, its key kept for good)
                self._unreadable.append((env, f"{exc} (refused at a restart: a rule newer than when it was parked)"))
                continue
            self.queues.setdefault(event.user_id, []).append((env, event, deadline))
            self.positions.add((topic, partition, offset))
        for queue in self.queues.values():
            queue.sort(key=lambda q: (q[0].topic, q[0].partition, q[0].offset))

    def __len__(self) -> int:
        return len(self.positions)

    def now(self) -> float:
        """The waiting clock: the wall's, less the seconds credited for catalog work."""
        return self.clock() - self.credit

    def credit_catalog(self, seconds: float) -> dict[bytes, bytes]:
        """Stop the waiting clock for ``seconds`` spent applying catalog records; the put that
        keeps it across a restart (none when nothing ever waits)."""
        if self.wait_s <= 0 or seconds <= 0:
            return {}
        self.credit += seconds
        return {CREDIT_KEY: repr(self.credit).encode()}

    def sort(self, events: list[tuple[Envelope, Event]], known: Container[str],
             committed: dict[tuple[str, int], int], encoding: Callable[[Event], bool] | None = None,
             query_wait_s: float = 0.0) -> Sorted:
        """Release what the catalog now knows, expire what waited too long, park what must wait.

        ``committed``: the last offset per partition processed before this batch; an event at or
        below it is a re-delivered copy. ``encoding(event)`` True: a search whose query the
        embedding worker is encoding (``RECSYS_EMBED_WORKER``); it waits for the vector like an
        event for its item, its user's later events behind it, but for ``query_wait_s`` at most
        (a wait for a query only saves the batch the model's time), and once its time is up it
        is released all the same (the engine then encodes the query itself) instead of being
        dead-lettered."""
        out = Sorted()
        if self._unreadable:
            out.unreadable, self._unreadable = self._unreadable, []
            out.deletes.extend(_key((env.topic, env.partition, env.offset)) for env, _ in out.unreadable)
        if self.wait_s <= 0 and not self.positions:
            out.ready = events
            return out
        now = self.now()
        # positions released or expired by this call: a re-delivered copy in the same batch (a
        # restart's first batch) is dropped like a copy of a still parked event
        gone: set[Position] = set()
        for user, queue in list(self.queues.items()):
            while queue:
                env, event, deadline = queue[0]
                if encoding is not None and encoding(event) and now < deadline and self.wait_s > 0:
                    break
                if event.item_id is None or event.item_id in known:
                    out.ready.append((env, event))
                    out.released.add((env.topic, env.partition, env.offset))
                elif now >= deadline or self.wait_s <= 0:
                    out.expired.append((env, event))
                else:
                    break
                queue.pop(0)
                self.positions.discard((env.topic, env.partition, env.offset))
                gone.add((env.topic, env.partition, env.offset))
                out.deletes.append(_key((env.topic, env.partition, env.offset)))
            if not queue:
                del self.queues[user]
        for env, event in events:
            pos = (env.topic, env.partition, env.offset)
            if pos in self.positions or pos in gone:
                continue  # a re-delivered copy of a parked event
            unknown = event.item_id is not None and event.item_id not in known
            if env.offset <= committed.get((env.topic, env.partition), -1):
                # a re-delivered copy of a message processed before, not parked now: applied
                # (the engine skips it, re-emitting what it stored), or dead-lettered, whose dead
                # letter was kept until acknowledged: not refused again (before 2026-12-06 it
                # was, with a new failed_at; and a copy of an applied event was parked behind
                # its user's later waiting event, then released as new: a search answered twice)
                if unknown:
                    out.refused_before += 1
                else:
                    out.ready.append((env, event))
                continue
            for_query = not unknown and encoding is not None and encoding(event)
            if event.user_id in self.queues or unknown or for_query:
                self._park(out, env, event, now + (min(query_wait_s, self.wait_s) if for_query else self.wait_s))
            else:
                out.ready.append((env, event))
        return out

    def events_of(self, user_id: str) -> list[Event]:
        """A user's parked events, in their order."""
        return [event for _env, event, _deadline in self.queues.get(user_id, ())]

    def forget_user(self, user_id: str) -> list[bytes]:
        """Drop a user's parked events (an erasure): the keys to delete in the same write."""
        queue = self.queues.pop(user_id, [])
        for env, _event, _deadline in queue:
            self.positions.discard((env.topic, env.partition, env.offset))
        return [_key((env.topic, env.partition, env.offset)) for env, _event, _deadline in queue]

    def _park(self, out: Sorted, env: Envelope, event: Event, deadline: float) -> None:
        pos = (env.topic, env.partition, env.offset)
        self.queues.setdefault(event.user_id, []).append((env, event, deadline))
        self.positions.add(pos)
        key = base64.b64encode(env.key).decode() if env.key is not None else None
        out.puts[_key(pos)] = orjson.dumps(
            [env.topic, env.partition, env.offset, key, base64.b64encode(env.value).decode(), env.timestamp_ms, deadline]
        )
        out.parked += 1
