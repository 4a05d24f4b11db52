"""An in-memory Kafka for tests: topics, partitions, offsets, keys and timestamps.

:class:`InMemoryBroker` has the client surface :mod:`dataflows.kafka_io` uses
(``.consumer(**overrides)`` and ``.producer(**overrides)``), and its clients speak
kafka-python's own types (``TopicPartition``, ``ConsumerRecord``, ``RecordMetadata``),
so a flow under test runs the same code as in production. Keyed records are routed with
kafka-python's murmur2 partitioner, so a key lands in the same partition as on a real
broker. Topics are never created implicitly (like a broker with auto-create off).

>>> broker = InMemoryBroker()
>>> broker.create_topic("events", partitions=2)
>>> meta = broker.producer().send("events", value=b"v1", key=b"u1").get(timeout=1)
>>> (meta.partition, meta.offset) == (partition_for_key(b"u1", 2), 0)
True
>>> [(e.key, e.value) for e in broker.records("events")]
[(b'u1', b'v1')]
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import TopicAlreadyExistsError
from kafka.producer.future import RecordMetadata
from kafka.structs import TopicPartition

from dataflows.kafka_io import UnknownTopicError, partition_for_key
from recsys.events import Envelope

__all__ = ["InMemoryBroker"]

_CREATE_TIME = 0  # kafka-python's timestamp_type for CreateTime


@dataclass(slots=True)
class _Stored:
    key: bytes | None
    value: bytes | None
    timestamp: int


@dataclass(slots=True)
class _Topic:
    partitions: list[list[_Stored]] = field(default_factory=list)


class InMemoryBroker:
    """A thread-safe, in-process stand-in for a Kafka cluster (one per test).

    ``default_partitions`` is used by :meth:`create_topic` when no count is given.
    """

    def __init__(self, default_partitions: int = 1) -> None:
        if default_partitions <= 0:
            raise ValueError(f"default_partitions must be > 0, got {default_partitions}")
        self.default_partitions = default_partitions
        self._topics: dict[str, _Topic] = {}
        self.topic_configs: dict[str, dict[str, str]] = {}  # what ``create_topics`` was given (not acted on)
        self._cond = threading.Condition()
        self._round_robin = itertools.count()
        self.bootstrap = f"memory://{id(self):x}"

    def __repr__(self) -> str:
        return f"InMemoryBroker(topics={self.topics()})"

    # ------------------------------------------------------------------ admin

    def create_topic(self, name: str, partitions: int | None = None) -> None:
        """Create a topic; raises kafka's ``TopicAlreadyExistsError`` if it exists."""
        count = self.default_partitions if partitions is None else partitions
        if count <= 0:
            raise ValueError(f"topic {name!r}: partitions must be > 0, got {count}")
        with self._cond:
            if name in self._topics:
                raise TopicAlreadyExistsError(f"topic {name!r} already exists")
            self._topics[name] = _Topic([[] for _ in range(count)])

    def add_partitions(self, name: str, total: int) -> None:
        """Grow a topic to ``total`` partitions (Kafka's CreatePartitions; a topic never shrinks)."""
        with self._cond:
            topic = self._topic(name)
            if total <= len(topic.partitions):
                raise ValueError(f"topic {name!r} has {len(topic.partitions)} partitions; {total} adds none")
            topic.partitions.extend([] for _ in range(total - len(topic.partitions)))

    def topics(self) -> dict[str, int]:
        """``{topic: partition count}``."""
        with self._cond:
            return {name: len(t.partitions) for name, t in self._topics.items()}

    def records(self, topic: str) -> list[Envelope]:
        """Every record of a topic as :class:`Envelope`, by partition then offset (for assertions)."""
        with self._cond:
            parts = self._topic(topic).partitions
            return [
                Envelope(topic, p, off, r.key, r.value, r.timestamp)
                for p, log in enumerate(parts)
                for off, r in enumerate(log)
            ]

    # ---------------------------------------------------------------- clients

    def consumer(self, **overrides: Any) -> "MemoryConsumer":
        """A consumer for manual assignment; ``max_poll_records`` is honoured, other options ignored."""
        return MemoryConsumer(self, max_poll_records=int(overrides.get("max_poll_records", 500)))

    def producer(self, **overrides: Any) -> "MemoryProducer":
        """A producer; appends are synchronous, so ``flush`` has nothing to wait for."""
        return MemoryProducer(self)

    def admin(self, **overrides: Any) -> "MemoryAdmin":
        """The admin surface :func:`dataflows.kafka_io.ensure_topics` uses (list and create topics)."""
        return MemoryAdmin(self)

    # --------------------------------------------------------------- internals

    def _topic(self, name: str) -> _Topic:
        try:
            return self._topics[name]
        except KeyError:
            raise UnknownTopicError(name, self.bootstrap) from None

    def _append(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None, timestamp_ms: int | None
    ) -> RecordMetadata:
        with self._cond:
            parts = self._topic(topic).partitions
            if partition is None:
                # kafka-python hashes keys; unkeyed records are spread (round robin here)
                partition = (
                    partition_for_key(key, len(parts)) if key is not None else next(self._round_robin) % len(parts)
                )
            elif not 0 <= partition < len(parts):
                raise UnknownTopicError(topic, self.bootstrap, partition=partition)
            ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
            log = parts[partition]
            log.append(_Stored(key, value, ts))
            self._cond.notify_all()
            return RecordMetadata(
                topic, partition, TopicPartition(topic, partition), len(log) - 1, ts, None,
                -1 if key is None else len(key), -1 if value is None else len(value), -1,
            )


class MemoryAdmin:
    """kafka-python's ``KafkaAdminClient`` surface that the flows use: ``list_topics``,
    ``create_topics([NewTopic])`` (raising ``TopicAlreadyExistsError`` like a broker), ``close``."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self._broker = broker

    def list_topics(self) -> list[str]:
        return list(self._broker.topics())

    def create_topics(self, new_topics: list[Any]) -> None:
        for topic in new_topics:
            self._broker.create_topic(topic.name, topic.num_partitions)
            self._broker.topic_configs[topic.name] = dict(topic.topic_configs or {})

    def close(self) -> None:
        pass


class _DoneFuture:
    """The already-resolved result of a send (the append happened synchronously)."""

    __slots__ = ("value",)

    def __init__(self, value: RecordMetadata) -> None:
        self.value = value

    def get(self, timeout: float | None = None) -> RecordMetadata:
        return self.value

    def succeeded(self) -> bool:
        return True

    def failed(self) -> bool:
        return False


class MemoryProducer:
    """kafka-python ``KafkaProducer`` subset: ``send``, ``flush``, ``close``. Keys and values are bytes."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self._broker = broker
        self._closed = False

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: Any = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> _DoneFuture:
        if self._closed:
            raise RuntimeError("send on a closed producer")
        if key is None and value is None:
            raise ValueError("Need at least one: key or value")  # as kafka-python
        for name, b in (("key", key), ("value", value)):
            if b is not None and not isinstance(b, (bytes, bytearray)):
                raise TypeError(f"{name} must be bytes (no serializer configured), got {type(b).__name__}")
        return _DoneFuture(
            self._broker._append(
                topic, None if key is None else bytes(key), None if value is None else bytes(value), partition, timestamp_ms
            )
        )

    def flush(self, timeout: float | None = None) -> None:
        return None

    def close(self, timeout: float | None = None) -> None:
        self._closed = True


class MemoryConsumer:
    """kafka-python ``KafkaConsumer`` subset for manual assignment (no groups, no commits).

    Like the real client, :meth:`highwater` is ``None`` until a poll has fetched the partition.
    """

    def __init__(self, broker: InMemoryBroker, max_poll_records: int = 500) -> None:
        self._broker = broker
        self._max_poll_records = max_poll_records
        self._positions: dict[TopicPartition, int] = {}
        self._highwater: dict[TopicPartition, int] = {}
        self._closed = False

    def partitions_for_topic(self, topic: str) -> set[int]:
        with self._broker._cond:
            t = self._broker._topics.get(topic)
            return set(range(len(t.partitions))) if t else set()

    def topics(self) -> set[str]:
        return set(self._broker.topics())

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        tps = list(partitions)
        with self._broker._cond:
            for tp in tps:
                if tp.partition not in self.partitions_for_topic(tp.topic):
                    raise UnknownTopicError(tp.topic, self._broker.bootstrap, partition=tp.partition)
        self._positions = {tp: self._positions.get(tp, 0) for tp in tps}
        self._highwater = {tp: hw for tp, hw in self._highwater.items() if tp in self._positions}

    def assignment(self) -> set[TopicPartition]:
        return set(self._positions)

    def _check(self, tp: TopicPartition) -> None:
        if tp not in self._positions:
            raise ValueError(f"partition {tp} is not assigned")

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._check(partition)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._positions[partition] = offset

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        for tp in partitions or tuple(self._positions):
            self.seek(tp, 0)

    def seek_to_end(self, *partitions: TopicPartition) -> None:
        ends = self.end_offsets(list(partitions or self._positions))
        for tp, end in ends.items():
            self.seek(tp, end)

    def position(self, partition: TopicPartition, timeout_ms: int | None = None) -> int:
        self._check(partition)
        return self._positions[partition]

    def highwater(self, partition: TopicPartition) -> int | None:
        self._check(partition)
        return self._highwater.get(partition)

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        with self._broker._cond:
            return {tp: len(self._broker._topic(tp.topic).partitions[tp.partition]) for tp in partitions}

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in partitions}

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Up to ``max_records`` (in all) from the assigned partitions' positions; waits up to ``timeout_ms`` for data."""
        if self._closed:
            raise RuntimeError("poll on a closed consumer")
        budget = max_records or self._max_poll_records
        deadline = time.monotonic() + max(timeout_ms, 0) / 1000
        with self._broker._cond:
            while True:
                out = self._take(budget)
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    return out
                self._broker._cond.wait(remaining)

    def _take(self, budget: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        out: dict[TopicPartition, list[ConsumerRecord]] = {}
        for tp, pos in self._positions.items():
            log = self._broker._topic(tp.topic).partitions[tp.partition]
            self._highwater[tp] = len(log)
            if budget <= 0 or pos >= len(log):
                continue
            batch = log[pos : pos + budget]
            out[tp] = [
                ConsumerRecord(
                    tp.topic, tp.partition, -1, pos + i, r.timestamp, _CREATE_TIME, r.key, r.value, [], None,
                    -1 if r.key is None else len(r.key), -1 if r.value is None else len(r.value), -1,
                )
                for i, r in enumerate(batch)
            ]
            self._positions[tp] = pos + len(batch)
            budget -= len(batch)
        return out

    def close(self, autocommit: bool = False, timeout_ms: int | None = None) -> None:
        self._closed = True
