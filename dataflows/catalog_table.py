"""The catalog as a table, bootstrapped before any event (like Kafka Streams' GlobalKTable).

Before the flow starts, :func:`bootstrap_catalog` reads every partition of the ``catalog``
topic up to its high watermark and feeds the records through the engine's own step
(:meth:`recsys.shard.step.Shard.process`, so items are validated, embedded and committed to RocksDB
exactly as in the flow, and bad records get the same dead letters). Only then does the flow
start; its catalog source resumes where the bootstrap stopped (:class:`ResumeAtLeast`), so a
record is applied once, in offset order, and a fresh instance never sees an event before the
items it refers to. Catalog records that arrive later race with events; an event whose item is
not known yet waits for the catalog to catch up (``RECSYS_UNKNOWN_ITEM_WAIT_S``, in the engine).

Crash safety. What the bootstrap read is committed before the flow starts: the items in the
engine's atomic RocksDB writes, the dead letters (and any recommendation or search result of
events it released: :class:`OutputsBeforeTheFlow`) flushed to Kafka, and last the next
offset to read per partition, under ``catalog-boot:<topic>:<partition>`` in the same RocksDB. The catalog source keeps its offsets in
Bytewax recovery as before, starting at ``max(recovery offset, bootstrap end)``. After a crash
the next bootstrap reads again from the stored offset to the new high watermark: records the
last run's flow already applied are applied again, which changes nothing (an upsert of the same
item; its embedding is cached). A bad one is not refused again: its dead letter, and any
output of what the bootstrap released, stay in the engine's state until the flush acknowledged
them, and a restart sends what a crash left there again, the bytes first sent. Reading from the
stored offset rather than from Bytewax's recovery offset keeps this module out of Bytewax's
private recovery format.

Cost: what applying those catalog records costs anyway (embedding new text dominates); a
restart after an orderly stop reads only what arrived since the stop
(:func:`record_read_after_orderly_stop`), a restart after a crash what arrived since the last
start or orderly stop.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from kafka.structs import TopicPartition

from dataflows.kafka_io import (
    HIGHWATER_TIMEOUT_S,
    KafkaClientFactory,
    _envelope,
    _partitions,
    part_name,
)
from recsys.shard.step import Shard

#: Key prefix, in the engine's RocksDB, of the next catalog offset to read per partition.
BOOT_PREFIX = b"catalog-boot:"


@dataclass(frozen=True)
class Bootstrapped:
    """What one bootstrap read: ``ends`` = next offset per partition (the high watermarks)."""

    topic: str
    records: int
    dead_letters: int
    ends: dict[int, int]
    seconds: float
    kept_back: int = 0  # refusals sent before a rebuild, not sent again (recsys run --rebuild-state)

    def parts(self) -> dict[str, int]:
        """``{"catalog#0": end, ...}``: the floor of each catalog source partition."""
        return {part_name(self.topic, p): end for p, end in self.ends.items()}


#: Seconds between the bootstrap's progress lines (the first after as long): a catalog of new
#: text embeds at a few hundred records a second, so 30,000 took 73 s without a word.
PROGRESS_EVERY_S = 5.0


def _boot_key(topic: str, partition: int) -> bytes:
    return BOOT_PREFIX + f"{topic}:{partition}".encode()


class _Progress:
    """``catalog: N of M records of 'topic' applied (R/s, about S s left)`` on stdout every
    ``every_s`` (the shard supervisor relays it, as the flow's status lines); nothing for a
    bootstrap shorter than that."""

    def __init__(self, topic: str, every_s: float) -> None:
        self.topic, self.every_s = topic, every_s
        self.started = self.last = time.monotonic()

    def update(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        if total is None:  # a partition's end not known yet
            print(f"catalog: {done:,} records of {self.topic!r} applied ({rate:,.0f}/s) ...", flush=True)
            return
        left = f", about {(total - done) / rate:,.0f} s left" if rate > 0 and done < total else ""
        print(f"catalog: {done:,} of {total:,} records of {self.topic!r} applied ({rate:,.0f}/s{left})", flush=True)


class OutputsBeforeTheFlow:
    """Sends what :meth:`Shard.process` returns when it is called before the flow starts (the
    catalog bootstrap, the exchange catch-up), then flushes and acknowledges it.

    Such a call can release or expire events that waited in the engine's state for their item
    (or searches that waited for their query) across a restart: their recommendations, search
    results and dead letters come out of it, and no re-delivery brings them back. The engine
    keeps them unsent in its state until :meth:`close` has the broker acknowledge them, so a
    crash before then leaves them to the next start (``dataflows.live.resend_unsent``). A topic
    given as None is not sent to (the model trainer's bootstrap: the shards dead-letter the
    catalog's bad records; a search results topic when the engine answers no searches).
    Before 2026-12-06 the bootstrap sent only recommendations and dead letters, and the
    exchange catch-up sent nothing: what they released was lost."""

    def __init__(self, engine: Shard, clients: KafkaClientFactory, *, recommendations_topic: str | None,
                 dead_letters_topic: str | None, search_results_topic: str | None) -> None:
        self.engine, self.clients = engine, clients
        topics = {"recommendations": recommendations_topic, "dead_letters": dead_letters_topic,
                  "search_results": search_results_topic}
        self.topics = {output: topic for output, topic in topics.items() if topic}
        if self.topics:
            engine.expect_acknowledgements(*self.topics)
        self._producer: Any = None
        self._last_stamp: int | None = None

    def send(self, result: Any) -> None:
        """One ``BatchResult``'s outputs to their topics (not waited for: :meth:`close` does)."""
        self._last_stamp = result.stamp
        for output, topic in self.topics.items():
            for key, value in getattr(result, output):
                self._producer = self._producer or self.clients.producer()
                self._producer.send(topic, key=key.encode() if key else None, value=value)

    def close(self) -> None:
        """Flush (the broker acknowledges every send), then let the engine forget them."""
        if self._producer is not None:
            try:
                self._producer.flush()
            finally:
                self.abandon()
        if self._last_stamp is not None:
            for output in self.topics:
                self.engine.acknowledge(self._last_stamp, output)

    def abandon(self) -> None:
        """Close without waiting (a failed read): what was sent stays unsent in the engine's
        state, for the next start."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            producer.close(timeout=0)


def bootstrap_catalog(engine: Shard, clients: KafkaClientFactory, topic: str, *, dead_letters_topic: str | None,
                      recommendations_topic: str, search_results_topic: str | None = None, chunk: int = 1000,
                      progress_every_s: float = PROGRESS_EVERY_S) -> Bootstrapped:
    """Apply the catalog topic up to its high watermark to ``engine``; returns what was read.
    A long bootstrap says how far it is every ``progress_every_s`` (:class:`_Progress`).
    ``dead_letters_topic`` None: refused records are counted, not sent (the model trainer reads
    the catalog beside the shards, which dead-letter them).

    A record can release events that waited in the engine's state for it (a restart's
    bootstrap: events parked before a crash, searches behind them): their recommendations and
    search results are sent here, to ``recommendations_topic`` and ``search_results_topic``
    (None: the engine answers no searches). Before 2026-12-06 such search results were
    dropped.

    Raises ``TimeoutError`` when a partition makes no progress (and reports no high watermark)
    for ``HIGHWATER_TIMEOUT_S``.
    """
    started = time.monotonic()
    consumer = clients.consumer()
    records = dead = kept = 0
    # its outputs stay in the engine's state until the flush at the end has the broker acknowledge
    # them: a crash before it leaves them to be sent again at the restart (dataflows.live.resend_unsent),
    # which reads the refused records again but refuses none twice (recsys.shard.step.Shard._dead_letter)
    sends = dead_letters_topic is not None  # the trainer's read sends nothing: nothing to keep for it
    outputs = OutputsBeforeTheFlow(engine, clients, dead_letters_topic=dead_letters_topic,
                                   recommendations_topic=recommendations_topic if sends else None,
                                   search_results_topic=search_results_topic if sends else None)
    try:
        tps = [TopicPartition(topic, p) for p in _partitions(clients, consumer, topic)]
        consumer.assign(tps)
        starts: dict[TopicPartition, int] = {}
        for tp in tps:
            stored = engine.kv.get(_boot_key(topic, tp.partition))
            starts[tp] = int(stored) if stored else 0
            consumer.seek(tp, starts[tp])
        progress = _Progress(topic, progress_every_s)
        ends: dict[TopicPartition, int] = {}
        last_progress = time.monotonic()
        while True:
            batch = [_envelope(r) for rs in consumer.poll(timeout_ms=100, max_records=chunk).values() for r in rs]
            for tp in tps:
                # highwater(), not end_offsets(): the local Tansu broker reports the last batch's
                # base offset + 1 there (ARCHITECTURE.md, facts about the local broker)
                if tp not in ends and (hw := consumer.highwater(tp)) is not None:
                    ends[tp] = hw  # the end as first seen: later records are the flow's
            batch = [e for e in batch if e.offset < ends.get(TopicPartition(e.topic, e.partition), e.offset + 1)]
            if batch:
                last_progress = time.monotonic()
                result = engine.process(batch)
                records += len(batch)
                dead += len(result.dead_letters)
                kept += result.counts.get("sent_before_rebuild", 0)
                outputs.send(result)
                total = sum(max(0, ends[tp] - starts[tp]) for tp in tps) if len(ends) == len(tps) else None
                progress.update(records, total)
            if len(ends) == len(tps) and all(consumer.position(tp) >= ends[tp] for tp in tps):
                break
            if time.monotonic() - last_progress > HIGHWATER_TIMEOUT_S:
                raise TimeoutError(
                    f"catalog bootstrap: no progress reading {topic!r} from {clients.bootstrap} for "
                    f"{HIGHWATER_TIMEOUT_S:.0f} s (read {records} records)"
                )
        outputs.close()  # outputs are acknowledged before the offsets below move on
        # Last: the offsets, so that a crash before this line only means reading again.
        engine.kv.write({_boot_key(topic, tp.partition): str(ends[tp]).encode() for tp in tps})
        return Bootstrapped(topic, records, dead, {tp.partition: ends[tp] for tp in tps}, time.monotonic() - started,
                            kept)
    finally:
        consumer.close()
        outputs.abandon()


def record_read_after_orderly_stop(engine: Shard, topic: str) -> int:
    """After an orderly stop: the next bootstrap starts where the flow stopped reading ``topic``.

    A flow that stopped in order flushed every output and committed its last epoch, so every
    catalog record up to the engine's committed position in its partition is applied and its
    dead letter, if any, is out. Before this, the next start read again every record since the
    previous start (a restart after a day of catalog updates applied the whole day again; each
    changes nothing). After a crash this is not called: the stored offset stays where the last
    start or orderly stop left it, and the records after it are read again (at-least-once).
    Returns the partitions moved forward."""
    puts = {}
    for (t, partition), offset in engine.positions.items():
        if t == topic and offset + 1 > int(engine.kv.get(key := _boot_key(topic, partition)) or 0):
            puts[key] = str(offset + 1).encode()
    if puts:
        engine.kv.write(puts)
    return len(puts)


class ResumeAtLeast(FixedPartitionedSource[Any, int]):
    """A partitioned source whose partitions start no earlier than ``floor[part]``: the catalog
    source resumes at ``max(Bytewax recovery offset, bootstrap end)``. Offsets stay in recovery."""

    def __init__(self, inner: FixedPartitionedSource[Any, int], floor: dict[str, int]) -> None:
        self.inner = inner
        self.floor = floor

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> StatefulSourcePartition[Any, int]:
        start = max(resume_state or 0, self.floor.get(for_part, 0))
        return self.inner.build_part(step_id, for_part, start)


def report(boot: Bootstrapped) -> None:
    """One line on stdout (the shard supervisor relays it) saying what the bootstrap read."""
    ends = ", ".join(f"{p}:{end}" for p, end in sorted(boot.ends.items()))
    print(f"catalog: {boot.records} records of {boot.topic!r} applied up to the high watermark ({ends}) "
          f"in {boot.seconds:.1f}s, before any event; {boot.dead_letters} dead-lettered"
          + (f" ({boot.kept_back} more refused, sent before the rebuild)" if boot.kept_back else ""),
          file=sys.stdout, flush=True)
