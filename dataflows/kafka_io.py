"""The Kafka boundary of the dataflow: a partitioned source, a flushing sink, and helpers.

Everything talks to Kafka through a *client factory* (:class:`KafkaClientFactory`): an
object with ``.consumer(**overrides)`` and ``.producer(**overrides)``. :class:`KafkaClients`
builds real kafka-python clients from :class:`recsys.settings.Settings`;
:class:`dataflows.testing.memory_broker.InMemoryBroker` is the in-memory one used by tests.

- :class:`KafkaSource` — a Bytewax ``FixedPartitionedSource`` whose partitions are the
  topic's Kafka partitions (``"events#0"``, ...). Manual ``assign`` + ``seek`` to the resume
  offset (Bytewax recovery stores it), non-blocking batched polls; yields
  :class:`recsys.events.Envelope`. No consumer groups, no commits. A worker's partitions share
  one consumer (:class:`SharedConsumers`; across topics when the sources share one and poll as
  many records at a time: the live flow's catalog has one of its own).
- :class:`KafkaSink` — a Bytewax ``FixedPartitionedSink`` of ``(key, value)``; sends are flushed
  and checked at every epoch snapshot, before Bytewax commits the epoch (at-least-once); an
  :class:`Acknowledgement` in the stream is acknowledged there, once everything before it is.
- :func:`produce_records`, :func:`consume_all`, :func:`ensure_topics` for the demo, tests and
  benchmarks.

>>> from dataflows.testing.memory_broker import InMemoryBroker
>>> broker = InMemoryBroker()
>>> ensure_topics(broker, {"events": 2})
['events']
>>> produce_records(broker, "events", [("u1", b"a"), ("u2", b"b")])
2
>>> sorted(e.value for e in consume_all(broker, "events", timeout_s=1))
[b'a', b'b']
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from kafka.partitioner.default import murmur2
from kafka.structs import TopicPartition

from recsys.events import OFFSETS_RESET_FROM, OFFSETS_RESET_TO, Envelope
from recsys.settings import Settings

__all__ = [
    "BrokerUnavailableError",
    "KafkaClientFactory",
    "KafkaClients",
    "KafkaSink",
    "KafkaSource",
    "OffsetResetError",
    "ProduceError",
    "SharedConsumers",
    "UnknownTopicError",
    "consume_all",
    "ensure_topics",
    "part_name",
    "produce_records",
]

log = logging.getLogger(__name__)

Key = str | bytes | None

#: Producer batching delay. A few ms lets a burst share a request without adding visible
#: latency (the flow's own epochs and the broker round trip are larger).
PRODUCER_LINGER_MS = 5
PRODUCER_BATCH_BYTES = 256 * 1024
#: Idle backoff bounds: long enough that an idle partition does not spin a core, short
#: enough not to dominate latency (the design keeps fetch_max_wait_ms at 10-50 ms).
MIN_IDLE_BACKOFF_MS, MAX_IDLE_BACKOFF_MS = 1, 100
#: A poll of the shared consumer that found nothing this recently is not repeated for another
#: partition: no fetch response can have come in between (Bytewax calls a worker's due partitions
#: back to back, tens of microseconds apart). Each poll hands a task to the consumer's network
#: thread, so four idle partitions polling apart cost that thread four wake-ups instead of one.
FRESH_POLL_S = 0.001
#: How long a partition holding part of a batch may wait for the rest while its log holds it. A
#: shared consumer's poll splits ``poll_max_records`` between partitions wherever a fetched chunk
#: ends, so without the wait a partition's batch boundaries would depend on how the broker cut
#: its fetch responses; with it, a batch is ``poll_max_records`` records whenever the log holds
#: that many, as a partition's own consumer returned them. The engine coalesces a user's events
#: per batch, so a restarted run emits the same recommendations as an uninterrupted one
#: (tests/test_crash_recovery.py). The rest comes once the records fetched ahead of it (another
#: partition's chunk, at most one fetch) have been handed out, batch by batch: under a second.
#: Only runs to the end seen at start (``stop_at_end``: replays, benchmarks, the crash test)
#: wait: there the log decides the batches. A live flow's batches depend on arrival times
#: anyway, and there a partition behind by a batch would wait while the other partition's
#: batches go first (one live run with it waiting had a p99 of 3 s at 1,000 events/s, against
#: 1.4 s for the tree before beside it). The bound is a stall guard.
FULL_BATCH_WAIT_S = 5.0
#: How often a source compares the partitions it reads with its topic's (the consumer's cached
#: metadata: no request of its own), and how old that metadata may get: kafka-python refreshes
#: it every ``metadata_max_age_ms`` (5 minutes by default; one small request a minute here).
PARTITION_CHECK_S = 10.0
METADATA_MAX_AGE_MS = 60_000
#: How long a partition may take to report its high watermark.
HIGHWATER_TIMEOUT_S = 15.0
#: A shared consumer whose polls have returned no record for this long while the broker reports
#: records past its position (and it is connected) raises its fetch wait, :data:`FETCH_WAIT_STEP`
#: times, up to :data:`MAX_FETCH_WAIT_MS`: the broker takes longer than the wait to read them and
#: answers every fetch empty. The local Tansu broker's memory storage does once a partition holds
#: tens of thousands of small record batches (a 20 ms fetch got nothing for minutes after ~80,000;
#: 100 ms got records in 0.15 s); until 2026-12-07 the flow then read nothing for good, its status
#: line saying only ``0 events/s, lag N``. A broker that answers as soon as it has records (Apache
#: Kafka) never gets here.
#: The raised wait stays until the flow restarts: on that broker the partitions only grow, and a
#: wait stepped back down would stall again. A leader away for seconds (a rolling restart of a
#: Kafka cluster) while the flow lags can raise it once too.
DRY_FETCH_S = 3.0
FETCH_WAIT_STEP = 4
MAX_FETCH_WAIT_MS = 5_000
#: How often, at most, an empty poll looks at the partitions' positions for that: kafka-python's
#: ``position()`` scans the whole assignment (0.4 ms at 16 partitions, 5 ms at 64, measured by a
#: code review of 2026-12-07), too much for every empty poll of an idle flow.
DRY_CHECK_INTERVAL_S = 0.5
#: Fewer polls than this in a window say nothing either way (a flow busy with long batches).
DRY_MIN_POLLS = 10
#: How long a log end below the flow's position must persist before it counts as data loss:
#: a new partition leader can report a lagging high watermark for a moment after an election.
OFFSET_LOSS_CONFIRM_S = 2.0


@dataclass(slots=True)
class _DryWindow:
    """One partition's polls since ``since`` (``time.monotonic()``) while the broker reported
    records past its position, and how many of them brought it records."""

    since: float
    polls: int = 0
    hits: int = 0

    def starved(self, now: float) -> bool:
        """For :data:`DRY_FETCH_S`, at least :data:`DRY_MIN_POLLS` polls, fewer than an eighth with records."""
        return now - self.since >= DRY_FETCH_S and self.polls >= DRY_MIN_POLLS and self.hits * 8 < self.polls


class UnknownTopicError(LookupError):
    """A topic (or partition) that does not exist; names the topic and the bootstrap servers."""

    def __init__(self, topic: str, bootstrap: str, *, partition: int | None = None) -> None:
        self.topic, self.bootstrap, self.partition = topic, bootstrap, partition
        what = f"topic {topic!r}" if partition is None else f"partition {partition} of topic {topic!r}"
        super().__init__(
            f"{what} does not exist on {bootstrap} (topics are not auto-created; "
            f"create it first, e.g. with dataflows.kafka_io.ensure_topics)"
        )


class OffsetResetError(RuntimeError):
    """A partition's log no longer holds the offset the flow recovered or reached: records
    were lost (retention, a broker that lost its data) or the topic was re-created."""

    def __init__(self, topic: str, partition: int, offset: int, log_start: int, log_end: int) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset
        self.log_start, self.log_end = log_start, log_end
        if offset > log_end:
            what = f"its log ends at offset {log_end} (the topic was re-created or the broker lost data)"
        else:
            what = f"its log now starts at offset {log_start} (records {offset}..{log_start - 1} were deleted unread)"
        super().__init__(
            f"topic {topic!r} partition {partition}: the flow is at offset {offset}, but {what}. Not going on "
            f"silently. To go on, restart with --on-offset-reset earliest (read the partition from offset "
            f"{log_start}) or latest (from offset {log_end}; RECSYS_ON_OFFSET_RESET), or rebuild everything "
            f"with `recsys run --rebuild-state`."
        )


class BrokerUnavailableError(ConnectionError):
    """No Kafka broker answered at the bootstrap servers."""


#: How long a start waits for the first broker answer before saying there is none. The client's
#: own default is 30 s of silence; a reachable broker answers in milliseconds.
BROKER_PROBE_TIMEOUT_S = 5.0

#: How long any client this module makes waits for its first broker answer (kafka-python's
#: ``bootstrap_timeout_ms``; its default is 30 s). The probe above runs first, but a broker that
#: goes away after it, while ``recsys run`` loads, was said 33 s later (forty-seventh session).
CLIENT_BOOTSTRAP_TIMEOUT_MS = 10_000


def required_topics(settings: Settings) -> tuple[str, ...]:
    """The topics that must exist before the flow starts: what it reads, and the two outputs it
    has always needed (the search-results and control topics it creates when missing)."""
    return settings.events_topic, settings.catalog_topic, settings.recommendations_topic, settings.dead_letters_topic


class BrokerCheckError(RuntimeError):
    """What :func:`check_broker` found wrong, in one sentence an operator can act on."""


def check_broker(settings: Settings, topics: tuple[str, ...] = (), *, timeout_s: float, missing_hint: str) -> None:
    """Raise :class:`BrokerCheckError` unless a broker answers within ``timeout_s`` and has every
    topic in ``topics`` (``missing_hint``: what to do about a missing one). The check at the start
    of every command (``recsys run``, ``produce``, ...) and of the flow under Bytewax's own runner:
    a broker that is down is said in seconds, not after the client's 30 s of silence and a
    traceback."""
    from kafka.errors import KafkaError

    timeout_ms = int(timeout_s * 1000)
    try:
        probe = KafkaClients(settings).consumer(bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms)
    except BrokerUnavailableError:
        raise BrokerCheckError(
            f"no Kafka broker answered at {settings.bootstrap_servers} within {timeout_s:.0f} s: start one (recsys "
            f"broker) or point --bootstrap-servers / RECSYS_BOOTSTRAP_SERVERS at yours") from None
    except KafkaError as exc:
        raise BrokerCheckError(f"could not connect to {settings.bootstrap_servers}: {exc}; check the connection "
                               f"settings (--security-protocol, --sasl-*, --ssl-cafile)") from None
    try:
        existing = probe.topics()
    except KafkaError as exc:
        raise BrokerCheckError(f"the broker at {settings.bootstrap_servers} did not list its topics: {exc}") from None
    finally:
        probe.close()
    missing = [t for t in topics if t not in existing]
    if missing:
        names = ", ".join(repr(t) for t in missing)
        others = sorted(t for t in existing if not t.startswith("_"))
        known = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "") if others else "none"
        exist = "topics {} do not exist" if len(missing) > 1 else "topic {} does not exist"
        raise BrokerCheckError(f"{exist.format(names)} on {settings.bootstrap_servers} (it has: {known}); "
                               f"{missing_hint}")


def _connect(make: Any, bootstrap: str, opts: dict[str, Any]) -> Any:
    from kafka.errors import KafkaTimeoutError

    try:
        return make(**opts)
    except KafkaTimeoutError as exc:  # kafka-python 3: "Unable to bootstrap from ..."
        raise BrokerUnavailableError(
            f"no Kafka broker answered at {bootstrap} (is it running? set RECSYS_BOOTSTRAP_SERVERS "
            f"or --bootstrap-servers)"
        ) from exc


class KafkaClientFactory(Protocol):
    """Makes Kafka clients: real (:class:`KafkaClients`) or in memory (``InMemoryBroker``)."""

    bootstrap: str  # where the clients connect, for error messages

    def consumer(self, **overrides: Any) -> Any: ...  # KafkaConsumer-like

    def producer(self, **overrides: Any) -> Any: ...  # KafkaProducer-like

    def admin(self, **overrides: Any) -> Any: ...  # KafkaAdminClient-like (list_topics, create_topics, close)


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition kafka-python's default partitioner picks for a key (murmur2, as Java's).

    >>> partition_for_key(b"u1", 1)
    0
    """
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class KafkaClients:
    """Real kafka-python clients from settings: manual-assignment consumers, acks=all producers.

    >>> KafkaClients(Settings(bootstrap_servers="127.0.0.1:9999")).bootstrap
    '127.0.0.1:9999'
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bootstrap = settings.bootstrap_servers

    @classmethod
    def for_bootstrap(cls, bootstrap: str, **settings: Any) -> "KafkaClients":
        return cls(Settings(bootstrap_servers=bootstrap, **settings))

    def __repr__(self) -> str:
        return f"KafkaClients({self.bootstrap!r})"

    def consumer(self, **overrides: Any) -> Any:
        from kafka import KafkaConsumer

        opts = {
            **self.settings.kafka_options(),
            "group_id": None,  # manual assignment; offsets live in Bytewax recovery
            "enable_auto_commit": False,
            "allow_auto_create_topics": False,
            "auto_offset_reset": "earliest",  # a resume offset past retention re-reads rather than skips
            "fetch_max_wait_ms": self.settings.fetch_max_wait_ms,
            "max_poll_records": self.settings.poll_max_records,
            "bootstrap_timeout_ms": CLIENT_BOOTSTRAP_TIMEOUT_MS,
            **overrides,
        }
        return _connect(KafkaConsumer, self.bootstrap, opts)

    def producer(self, **overrides: Any) -> Any:
        from kafka import KafkaProducer

        opts = {
            **self.settings.kafka_options(),
            "acks": "all",
            "linger_ms": PRODUCER_LINGER_MS,
            # a recommendation is ~1 KB: the 16 KB default holds a dozen, so the sender woke up
            # (and the flush waited) once per dozen; 256 KB batches a whole polled batch
            "batch_size": PRODUCER_BATCH_BYTES,
            "bootstrap_timeout_ms": CLIENT_BOOTSTRAP_TIMEOUT_MS,
            **overrides,
        }
        return _connect(KafkaProducer, self.bootstrap, opts)  # no serializers: keys and values are bytes

    def admin(self, **overrides: Any) -> Any:
        from kafka import KafkaAdminClient

        return _connect(KafkaAdminClient, self.bootstrap, {**self.settings.kafka_options(),
                                                            "bootstrap_timeout_ms": CLIENT_BOOTSTRAP_TIMEOUT_MS, **overrides})


def part_name(topic: str, partition: int) -> str:
    """Bytewax partition key of a Kafka partition.

    >>> part_name("events", 3)
    'events#3'
    """
    return f"{topic}#{partition}"


def sink_part_name(topic: str) -> str:
    """Bytewax partition key of a :class:`KafkaSink`'s one producer.

    >>> sink_part_name("recommendations")
    'recommendations-producer'
    """
    return f"{topic}-producer"


def topic_of_part(name: str) -> tuple[str, int | None] | None:
    """The topic a Bytewax partition key of this module names: ``(topic, partition)`` for a
    source's (:func:`part_name`), ``(topic, None)`` for a sink's (:func:`sink_part_name`), None
    for any other key (what reads a recovery directory tells them apart with).

    >>> topic_of_part("events#3"), topic_of_part("search-results-producer"), topic_of_part("x")
    (('events', 3), ('search-results', None), None)
    """
    topic, sep, partition = name.rpartition("#")
    if sep and partition.isdigit():
        return topic, int(partition)
    if name.endswith("-producer"):
        return name[: -len("-producer")], None
    return None


def _partition_of(name: str) -> int:
    return int(name.rsplit("#", 1)[1])


def _to_bytes(key: Key) -> bytes | None:
    return key.encode("utf-8") if isinstance(key, str) else key


def _partitions(clients: KafkaClientFactory, consumer: Any, topic: str) -> list[int]:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise UnknownTopicError(topic, clients.bootstrap)
    return sorted(parts)


def connection_count(consumer: Any) -> int | None:
    """How many broker connections a kafka-python consumer holds open now: 0 while no broker
    answers (kafka-python keeps retrying without a word); None if the client does not say
    (``KafkaConsumer.metrics()`` is documented as an unstable interface)."""
    try:
        count = (consumer.metrics() or {}).get("consumer-metrics", {}).get("connection-count")
    except Exception:  # noqa: BLE001 - a figure for a status line, never a reason to stop
        return None
    return None if count is None else int(count)


def _envelope(r: Any) -> Envelope:
    # a tombstone keeps its None value: on the catalog it withdraws its item, elsewhere it is
    # dead-lettered as an empty message (recsys.shard.step.Shard._decode)
    return Envelope(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)


# ------------------------------------------------------------------------------ source


def _named_partitions(exc: Exception) -> set[TopicPartition]:
    """The partitions an ``OffsetOutOfRangeError`` names (kafka-python raises it with
    ``{TopicPartition: fetch offset}``); empty when it names none."""
    named = exc.args[0] if exc.args else None
    return {tp for tp in named if isinstance(tp, TopicPartition)} if isinstance(named, dict) else set()


class _SharedConsumer:
    """One consumer for every partition a worker reads, and a buffer of fetched records per partition.

    Why one: each consumer has its own network thread, which wakes for a fetch round trip every
    ``fetch_max_wait_ms`` (~5% of a core each on an idle flow; README, Performance), and under load
    each sends its own fetch requests. Shared, one fetch request carries every partition.

    A poll made for one partition files the records of the others in their buffers. No poll is
    made while a buffer holds ``poll_max_records`` or more (a poll returns at most that many), so
    one busy topic cannot fill memory, and kafka-python fetches no more for a partition whose
    records wait in a buffer. Only a partition being built polls regardless: its high watermark
    comes with a fetch response queued behind what the consumer had fetched for the others, which
    its polls move to their buffers (about one fetch, ``max_partition_fetch_bytes``, per
    partition: memory the consumer held anyway). Not ``pause``/``resume``: kafka-python 3.0.12
    parks the records of a partition paused in the middle of a fetched batch and hands them back
    only in a state it seldom returns to; the partition is then never fetched again (seen as a
    stop_at_end flow that never ended).

    An ``OffsetOutOfRangeError`` is marked on the partitions it names until their owner deals
    with it (:meth:`seek`).
    """

    def __init__(self, clients: KafkaClientFactory, *, poll_max_records: int, fetch_max_wait_ms: int,
                 release: Callable[["_SharedConsumer"], None]) -> None:
        self._clients = clients
        self.fetch_max_wait_ms = fetch_max_wait_ms  # raised when the broker answers every fetch empty (DRY_FETCH_S)
        self._configured_wait_ms = fetch_max_wait_ms
        self.consumer: Any = self._open_consumer(poll_max_records)
        # partition -> its polls, counted while the broker reports records past its position (a
        # window dropped whenever it does not)
        self._dry: dict[TopicPartition, _DryWindow] = {}
        self._dry_checked = float("-inf")  # time.monotonic() of the last look (DRY_CHECK_INTERVAL_S)
        self._max = poll_max_records
        self._buffers: dict[TopicPartition, list[Any]] = {}
        self._lost: set[TopicPartition] = set()  # out of range, until their owner seeks
        self._release = release
        self.polled_at = float("-inf")  # time.monotonic() of the last poll that returned nothing

    def _open_consumer(self, poll_max_records: int) -> Any:
        # "none": an offset out of range raises instead of being reset silently (kafka-python's
        # "earliest" re-read from the log start, where the engine skipped what it thought it had)
        return self._clients.consumer(
            fetch_max_wait_ms=self.fetch_max_wait_ms, max_poll_records=poll_max_records, auto_offset_reset="none",
            metadata_max_age_ms=METADATA_MAX_AGE_MS,  # partitions added to a topic seen within a minute (PartitionWatch)
        )

    def holds(self, tp: TopicPartition) -> bool:
        return tp in self._buffers

    def join(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` too, from ``offset`` (the other partitions keep their positions and buffers)."""
        self._buffers[tp] = []
        try:
            self.consumer.assign(list(self._buffers))
            self.consumer.seek(tp, offset)  # before any poll: "none" has no position to start from
        except BaseException:
            self.leave(tp)
            raise

    def leave(self, tp: TopicPartition) -> None:
        """Stop reading ``tp``; the last partition to leave closes the consumer."""
        if self._buffers.pop(tp, None) is None:
            return
        self._lost.discard(tp)
        if self._buffers:
            self.consumer.assign(list(self._buffers))
        else:
            self.consumer.close()
            self._release(self)

    def poll(self, timeout_ms: int = 0, *, building: bool = False) -> None:
        """One poll for every partition: what it returns goes to the partitions' buffers. None
        while a buffer is full, unless ``building`` (a partition being built waits for its high
        watermark, and Bytewax drains no buffer before every partition is built)."""
        from kafka.errors import OffsetOutOfRangeError

        if not building and (
            time.monotonic() - self.polled_at < FRESH_POLL_S
            or any(len(buffer) >= self._max for buffer in self._buffers.values())
        ):
            return
        try:
            got = self.consumer.poll(timeout_ms=timeout_ms, max_records=self._max)
        except OffsetOutOfRangeError as exc:  # the broker says so: below the log start or past its end
            self._lost |= (_named_partitions(exc) & self._buffers.keys()) or set(self._buffers)
            return
        now = time.monotonic()
        self.polled_at = float("-inf") if got else now
        for tp, records in got.items():
            buffer = self._buffers.get(tp)
            if buffer is not None:  # None: left since the fetch
                buffer.extend(records)
        if not building:
            for tp, window in self._dry.items():
                window.polls += 1
                window.hits += tp in got
        if not building and now - self._dry_checked >= DRY_CHECK_INTERVAL_S:
            self._dry_checked = now
            self._check_dry(now)

    def _behind(self) -> dict[TopicPartition, int]:
        """The partitions whose log (as the last fetch reported it) holds records past the fetch
        position, with how many."""
        out = {}
        for tp in self._buffers:
            if tp not in self._lost and (hw := self.consumer.highwater(tp)) is not None:
                position = self.consumer.position(tp, timeout_ms=0)  # never waits on a reset or validation
                if position is not None and (ahead := hw - position) > 0:
                    out[tp] = ahead
        return out

    def _check_dry(self, now: float) -> None:
        """Raise the fetch wait once, for :data:`DRY_FETCH_S`, fewer than an eighth of a partition's
        polls (at least :data:`DRY_MIN_POLLS`) brought it records while the broker, connected,
        reported records past its position. Per partition, and not only for polls all empty: a
        soak probe saw the flow read half its rate for ~40 s, one partition or the other
        answering, before both went dry; in CI a first raise (1 -> 4 ms) left a few fetches in many
        answered, and the run crawled. A healthy broker with records waiting answers most polls (a
        poll hands out one partition's records or a few: eight busy partitions get an eighth each)."""
        if self.fetch_max_wait_ms >= MAX_FETCH_WAIT_MS:
            self._dry.clear()
            return
        behind = self._behind()
        for tp in [tp for tp in self._dry if tp not in behind]:
            del self._dry[tp]
        if behind and not connection_count(self.consumer):  # a broker that went away is the status line's to
            for tp in behind:  # report, not a slow read: its polls say nothing, the windows start again
                self._dry[tp] = _DryWindow(now)
            return
        for tp in behind:
            self._dry.setdefault(tp, _DryWindow(now))
        starved = {tp: n for tp, n in behind.items() if self._dry[tp].starved(now)}
        for tp, window in self._dry.items():  # a window that said nothing starts again
            if tp not in starved and now - window.since >= DRY_FETCH_S:
                self._dry[tp] = _DryWindow(now)
        if starved:
            windows = {tp: self._dry[tp] for tp in starved}
            self._dry.clear()
            self._raise_wait(starved, windows, now)

    def _raise_wait(self, starved: dict[TopicPartition, int], windows: dict[TopicPartition, _DryWindow],
                    now: float) -> None:
        """Reopen the consumer with a :data:`FETCH_WAIT_STEP` times longer fetch wait, at the same
        positions (what is buffered lies below them), and say so once."""
        old, before = self.consumer, self.fetch_max_wait_ms
        positions = {tp: old.position(tp, timeout_ms=0) for tp in self._buffers}
        if any(offset is None for offset in positions.values()):
            return  # a position being reset or validated: looked at again later
        self.fetch_max_wait_ms = min(before * FETCH_WAIT_STEP, MAX_FETCH_WAIT_MS) if before > 0 else FETCH_WAIT_STEP
        try:
            fresh = self._open_consumer(self._max)
        except Exception as exc:  # noqa: BLE001 - the broker went away meanwhile: keep reading as before
            self.fetch_max_wait_ms = before
            log.warning("could not open a consumer with a longer fetch wait (%s); reading on with %d ms", exc, before)
            return
        fresh.assign(list(positions))
        for tp, offset in positions.items():
            fresh.seek(tp, offset)
        self.consumer = fresh
        old.close()
        asked, answered = sum(w.polls for w in windows.values()), sum(w.hits for w in windows.values())
        named = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(starved)[:3]) + (
            f" and {len(starved) - 3} more" if len(starved) > 3 else "")
        log.warning(
            "%s: the broker at %s answered %d of %d polls empty for %.0f s while its log holds %d record(s) past the "
            "flow's position: it takes longer than the fetch wait (%d ms; RECSYS_FETCH_MAX_WAIT_MS is %d) to read them "
            "(the local Tansu broker's memory storage does once a partition holds tens of thousands of small batches; "
            "so does a partition leader away for seconds); fetching with a wait of %d ms from now on, until a restart",
            named, self._clients.bootstrap, asked - answered, asked, max(now - w.since for w in windows.values()),
            sum(starved.values()), before, self._configured_wait_ms, self.fetch_max_wait_ms,
        )

    def take(self, tp: TopicPartition, n: int) -> list[Any]:
        """Up to ``n`` buffered records of ``tp``, oldest first."""
        buffer = self._buffers[tp]
        if len(buffer) <= n:
            out, self._buffers[tp] = buffer, []
        else:
            out, self._buffers[tp] = buffer[:n], buffer[n:]
        return out

    def buffered(self, tp: TopicPartition) -> int:
        return len(self._buffers[tp])

    def out_of_range(self, tp: TopicPartition) -> bool:
        return tp in self._lost

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` on: its buffer dropped, its out-of-range mark cleared."""
        self._buffers[tp] = []
        self._lost.discard(tp)
        self.consumer.seek(tp, offset)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.consumer.highwater(tp)

    def position(self, tp: TopicPartition) -> int:
        """The next offset the consumer fetches (records below it may still be buffered)."""
        return self.consumer.position(tp)

    def connections(self) -> int | None:
        """How many broker connections the consumer holds open now (:func:`connection_count`)."""
        return connection_count(self.consumer)


class PartitionWatch:
    """Says when a topic gains partitions that its source should read, once.

    Bytewax lists a source's partitions once, when the flow starts: a partition added to the topic
    later (``kafka-topics --alter --partitions``) is not read until the flow starts again, and
    the events keyed to it wait there unseen. Each partition of the source calls :meth:`check`
    from its ``next_batch``; at most every :data:`PARTITION_CHECK_S` it compares the consumer's
    metadata (kept fresh within :data:`METADATA_MAX_AGE_MS`) with what was listed, and calls
    ``on_added`` with one line naming the topic and the partitions (the live flow stops in order
    there and ``recsys run`` starts again; without a callback the line is logged).

    >>> from dataflows.testing.memory_broker import InMemoryBroker
    >>> broker = InMemoryBroker(); broker.create_topic("events", 2)
    >>> said = []
    >>> watch = PartitionWatch("events", [0], lambda p: p % 2 == 0, said.append, interval_s=0)
    >>> watch.check(broker.consumer()); said
    []
    >>> broker.add_partitions("events", 4); watch.check(broker.consumer()); said
    ["topic 'events' has 4 partitions now, 1 of which this process reads; partition 2 was added while it ran"]
    """

    def __init__(self, topic: str, listed: Iterable[int], mine: Callable[[int], bool],
                 on_added: Callable[[str], object] | None, *, interval_s: float | None = None) -> None:
        self.topic, self._listed, self._mine = topic, frozenset(listed), mine
        self._on_added = on_added
        self._interval_s = PARTITION_CHECK_S if interval_s is None else interval_s
        self._checked_at = time.monotonic()
        self.added: list[int] = []  # once found, the check stops

    def check(self, consumer: Any) -> None:
        now = time.monotonic()
        if self.added or now - self._checked_at < self._interval_s:
            return
        self._checked_at = now
        # kafka-python's cluster metadata as last refreshed; its public partitions_for_topic would
        # block on a metadata request if the topic were gone from it (deleted): not in a batch's path
        cluster = getattr(consumer, "_cluster", None)
        found = cluster.partitions_for_topic(self.topic) if cluster is not None else consumer.partitions_for_topic(self.topic)
        added = sorted(p for p in found or () if p not in self._listed and self._mine(p))
        if not added:
            return
        self.added = added
        names = ", ".join(map(str, added))
        line = (f"topic {self.topic!r} has {len(found)} partitions now, {len(self._listed)} of which this process "
                f"reads; partition{'s' if len(added) > 1 else ''} {names} {'were' if len(added) > 1 else 'was'} "
                f"added while it ran")
        if self._on_added is not None:
            self._on_added(line)
        else:
            log.warning("%s: not read until the flow starts again (Bytewax lists partitions at start)", line)


class SharedConsumers:
    """Hands each partition built on a worker the one :class:`_SharedConsumer` of that worker
    (thread) and client settings. Give the same object to every :class:`KafkaSource` of a flow
    (:func:`dataflows.live.live_flow` does): then a process reads its partitions through one
    consumer per poll size (the events, control and exchange partitions through one; the catalog,
    polled ``RECSYS_CATALOG_POLL_MAX_RECORDS`` at a time, through a second). A source given none
    shares one among its own partitions. ``--processes N``: each process builds its own flow, so
    its own consumers.

    A partition built again while the first one of that name is still open (a test building a
    resumed partition beside the old one) gets a consumer of its own: one consumer cannot read
    one partition from two positions.
    """

    def __init__(self) -> None:
        self._local = threading.local()  # Bytewax workers are threads; a KafkaConsumer is not thread-safe
        self.opened = 0  # consumers opened so far (all threads): one per worker is the point

    def join(self, clients: KafkaClientFactory, tp: TopicPartition, offset: int, *,
             poll_max_records: int, fetch_max_wait_ms: int) -> _SharedConsumer:
        mine: dict[tuple[int, int, int], _SharedConsumer] = self._local.__dict__.setdefault("consumers", {})
        key = (id(clients), poll_max_records, fetch_max_wait_ms)  # the consumer keeps ``clients`` alive
        shared = mine.get(key)
        if shared is None or shared.holds(tp):

            def release(done: _SharedConsumer, key: tuple[int, int, int] = key) -> None:
                if mine.get(key) is done:
                    del mine[key]

            shared = _SharedConsumer(clients, poll_max_records=poll_max_records,
                                     fetch_max_wait_ms=fetch_max_wait_ms, release=release)
            mine[key] = shared
            self.opened += 1
        shared.join(tp, offset)  # on failure a consumer opened for it alone is closed
        return shared


class _KafkaPartition(StatefulSourcePartition[Envelope, int]):
    """One Kafka partition, read through the consumer it shares with the other partitions of its
    worker (:class:`SharedConsumers`); resume state = the next offset to read.

    ``resumed``: ``start`` came from Bytewax recovery. Then the partition's log must still hold
    it (log start <= start <= log end); if it does not, ``on_offset_reset`` decides: ``"fail"``
    raises :class:`OffsetResetError`, ``"earliest"`` / ``"latest"`` go on from the log's start
    / end (with a warning). The same check runs while reading (the consumer never resets its
    position by itself). A fresh partition starts at the log start.
    """

    def __init__(
        self,
        clients: KafkaClientFactory,
        tp: TopicPartition,
        start: int,
        *,
        poll_max_records: int,
        fetch_max_wait_ms: int,
        stop_at_end: bool,
        resumed: bool = False,
        on_offset_reset: str = "fail",
        consumers: SharedConsumers | None = None,
        watch: PartitionWatch | None = None,
    ) -> None:
        self._tp = tp
        self._watch = watch
        self._next = start
        self._max = poll_max_records
        self._policy = on_offset_reset
        self._backoff = timedelta(
            milliseconds=min(max(fetch_max_wait_ms, MIN_IDLE_BACKOFF_MS), MAX_IDLE_BACKOFF_MS)
        )
        self._awake: datetime | None = None
        self._end: int | None = None
        self._control: Envelope | None = None  # tells the engine of a move we made (on_offset_reset)
        self._short_since: float | None = None  # waiting for the rest of a batch since (FULL_BATCH_WAIT_S)
        self._clients = clients
        self._bootstrap = clients.bootstrap
        consumers = consumers if consumers is not None else SharedConsumers()
        self._shared: _SharedConsumer | None = consumers.join(
            clients, tp, start, poll_max_records=poll_max_records, fetch_max_wait_ms=fetch_max_wait_ms
        )
        try:
            if not resumed:
                self._next = max(start, self._shared.consumer.beginning_offsets([tp])[tp])
                self._shared.seek(tp, self._next)
            end = self._read_highwater()
            if end is None:  # out of range: read on from _next if the log still holds it
                self._shared.seek(tp, self._next)
            if end is None or end < self._next:
                end = self._verify_position()
        except BaseException:
            self.close()
            raise
        if stop_at_end:
            self._end = end

    def _read_highwater(self) -> int | None:
        """The log end, from a fetch at this partition's position (records fetched meanwhile, its
        own or other partitions', wait in their buffers); None when the broker answers that the
        position is out of range. (end_offsets() is not used: the local Tansu broker reports the
        last batch's base offset + 1 there.)"""
        shared = self._shared
        assert shared is not None
        deadline = time.monotonic() + HIGHWATER_TIMEOUT_S
        while not shared.out_of_range(self._tp):
            if (hw := shared.highwater(self._tp)) is not None:
                return hw
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no high watermark for {self._tp.topic}[{self._tp.partition}] from {self._bootstrap} "
                    f"within {HIGHWATER_TIMEOUT_S:.0f} s"
                )
            shared.poll(timeout_ms=50, building=True)
        return None

    def _bounds(self) -> tuple[int, int]:
        """The log's (start, end) now, read by a new consumer from the log start (the reading
        consumer keeps the high watermark of its last fetch, and its position may be out of range)."""
        from kafka.errors import OffsetOutOfRangeError

        probe = self._clients.consumer(max_poll_records=1, auto_offset_reset="none")
        try:
            probe.assign([self._tp])
            log_start = probe.beginning_offsets([self._tp])[self._tp]
            probe.seek(self._tp, log_start)
            try:
                end = _fetched_highwaters(probe, [self._tp], HIGHWATER_TIMEOUT_S, self._bootstrap)[self._tp]
            except OffsetOutOfRangeError:
                end = None
        finally:
            probe.close()
        return log_start, log_start if end is None else end

    def _verify_position(self) -> int:
        """The log end, if the log still holds ``_next``. Otherwise (still so after
        :data:`OFFSET_LOSS_CONFIRM_S`) raise :class:`OffsetResetError`, or move to the log's
        start or end, as ``on_offset_reset`` says, and return the end."""
        deadline = time.monotonic() + OFFSET_LOSS_CONFIRM_S
        while True:
            log_start, end = self._bounds()
            if log_start <= self._next <= end:
                return end
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if self._policy == "fail":
            raise OffsetResetError(self._tp.topic, self._tp.partition, self._next, log_start, end)
        target = log_start if self._policy == "earliest" else end
        log.warning(
            "%s[%d]: the flow was at offset %d but the log holds %d..%d; going on from offset %d "
            "(on_offset_reset=%s)",
            self._tp.topic, self._tp.partition, self._next, log_start, end, target, self._policy,
        )
        # sent ahead of the new log's records: the engine records the move, and forgets the
        # partition's old offsets when they went backwards (topic re-created)
        self._control = Envelope(
            self._tp.topic, self._tp.partition, target - 1, None, b"",
            extra={OFFSETS_RESET_FROM: self._next, OFFSETS_RESET_TO: target},
        )
        self._next = target
        assert self._shared is not None
        self._shared.seek(self._tp, target)
        return end

    def _done(self) -> bool:
        # buffered records are at or above _next, so at or past the end too
        return self._end is not None and self._next >= self._end

    def _read(self) -> list[Any] | None:
        """Up to ``poll_max_records`` records: this partition's buffer, topped up by a poll of the
        shared consumer; None while it waits for the rest of a batch (:data:`FULL_BATCH_WAIT_S`)."""
        shared, tp = self._shared, self._tp
        assert shared is not None
        if shared.buffered(tp) < self._max:
            shared.poll()
        if shared.out_of_range(tp):  # the broker says so: below the log start or past its end
            shared.seek(tp, self._next)  # nothing buffered was handed out: read on from _next
            self._verify_position()
            return []
        if self._batch_incomplete():
            return None
        records = shared.take(tp, self._max)
        if not records and (hw := shared.highwater(tp)) is not None and hw < self._next:
            self._verify_position()  # an idle partition whose log end fell below us: data lost under us
        return records

    def _batch_incomplete(self) -> bool:
        """Whether the buffer holds part of a batch whose rest the log holds (up to the end of a
        ``stop_at_end`` run) and the consumer has not fetched yet (not for longer than
        :data:`FULL_BATCH_WAIT_S`). Offsets the log
        does not fill (transaction markers, compaction) end the wait once fetched past."""
        shared = self._shared
        assert shared is not None
        buffered = shared.buffered(self._tp)
        end = shared.highwater(self._tp)
        if self._end is None:  # a live flow: see FULL_BATCH_WAIT_S
            return False
        if end is not None:
            end = min(end, self._end)
        if (not 0 < buffered < self._max or end is None or end - self._next < self._max
                or shared.position(self._tp) >= end):
            self._short_since = None
            return False
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
        if now - self._short_since >= FULL_BATCH_WAIT_S:
            self._short_since = None
            return False
        return True

    def next_batch(self) -> list[Envelope]:
        if self._control is not None:
            control, self._control = self._control, None
            return [control]
        if self._done():
            self.close()
            raise StopIteration()
        if self._watch is not None and self._shared is not None:
            self._watch.check(self._shared.consumer)
        records = self._read()
        if records is None:  # the rest of the batch is on its way: look again soon
            self._awake = datetime.now(timezone.utc) + timedelta(milliseconds=MIN_IDLE_BACKOFF_MS)
            return []
        if self._end is not None:
            records = [r for r in records if r.offset < self._end]
            assert self._shared is not None
            if not self._shared.buffered(self._tp):
                # control records (transactions) leave offset gaps: the fetch position still
                # advances (with records buffered it is ahead of what was handed out)
                self._next = max(self._next, min(self._shared.position(self._tp), self._end))
        if not records:
            self._awake = datetime.now(timezone.utc) + self._idle_wait()
            return []
        self._awake = None
        self._next = max(self._next, records[-1].offset + 1)
        return [_envelope(r) for r in records]

    def _idle_wait(self) -> timedelta:
        """The idle backoff, counted from the shared consumer's last empty poll, whoever made it:
        the idle partitions of a worker then wake together, and one poll serves them all."""
        since = time.monotonic() - self._shared.polled_at if self._shared is not None else 0.0
        if not 0 <= since < self._backoff.total_seconds():  # no recent empty poll
            return self._backoff
        return max(self._backoff - timedelta(seconds=since), timedelta(milliseconds=MIN_IDLE_BACKOFF_MS))

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> int:
        return self._next

    # issue 10 (metrics): consumer lag for dataflows/metrics.py, from the high watermark the
    # last fetch reported (no request of its own); None until the first fetch answered.
    def lag(self) -> int | None:
        hw = self._shared.highwater(self._tp) if self._shared is not None else None
        return None if hw is None else max(hw - self._next, 0)

    @property
    def consumer_id(self) -> int | None:
        """Which consumer this partition reads through: the partitions of one process share it,
        and the metrics count its connections once."""
        return None if self._shared is None else id(self._shared)

    def connections(self) -> int | None:
        """Broker connections of the consumer this partition reads through (for the status line)."""
        return self._shared.connections() if self._shared is not None else None

    def close(self) -> None:
        if self._shared is not None:
            shared, self._shared = self._shared, None
            shared.leave(self._tp)


class KafkaSource(FixedPartitionedSource[Envelope, int]):
    """Read a topic as :class:`Envelope` items; one Bytewax partition per Kafka partition.

    ``stop_at_end``: each partition stops at the high watermark it saw when built
    (demo, replay, benchmarks); otherwise the source runs forever.

    ``shard``/``shards``: read only the partitions ``p`` with ``p % shards == shard`` (the
    events topic of one of ``shards`` independent processes; producers key events by user, so
    each user belongs to exactly one shard). A shard left without partitions is an error.
    """

    def __init__(
        self,
        clients: KafkaClientFactory,
        topic: str,
        *,
        poll_max_records: int = 1000,
        fetch_max_wait_ms: int = 20,
        stop_at_end: bool = False,
        shard: int = 0,
        shards: int = 1,
        on_offset_reset: str = "fail",
        consumers: SharedConsumers | None = None,
    ) -> None:
        if poll_max_records <= 0:
            raise ValueError(f"poll_max_records must be > 0, got {poll_max_records}")
        if shards <= 0 or not 0 <= shard < shards:
            raise ValueError(f"need shards >= 1 and 0 <= shard < shards, got shard {shard} of {shards}")
        self.shard, self.shards = shard, shards
        self.clients = clients
        self.topic = topic
        self.poll_max_records = poll_max_records
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.stop_at_end = stop_at_end
        self.on_offset_reset = on_offset_reset  # a recovered offset the log no longer holds: _KafkaPartition
        # one consumer per worker for every partition built with it (the flow's other sources too)
        self.consumers = consumers if consumers is not None else SharedConsumers()
        #: called with one line when the topic gains partitions this source should read (PartitionWatch);
        #: None: logged. Not for a run to the end seen at start, which reads what it listed.
        self.on_partitions_added: Callable[[str], object] | None = None
        self._watch: PartitionWatch | None = None

    @classmethod
    def from_settings(cls, clients: KafkaClientFactory, topic: str, settings: Settings, *, sharded: bool = False,
                      consumers: SharedConsumers | None = None, poll_max_records: int | None = None) -> "KafkaSource":
        """``sharded``: this process reads only its shard's partitions (the events topic);
        otherwise every partition (the catalog: every shard needs every item). ``consumers``:
        shared with the flow's other sources (one consumer for all that read as many records a
        batch: ``poll_max_records``, by default the settings')."""
        return cls(
            clients,
            topic,
            poll_max_records=poll_max_records or settings.poll_max_records,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            stop_at_end=settings.stop_at_end,
            shard=settings.shard if sharded else 0,
            shards=settings.shards if sharded else 1,
            on_offset_reset=settings.on_offset_reset,
            consumers=consumers,
        )

    def list_parts(self) -> list[str]:
        consumer = self.clients.consumer()
        try:
            partitions = _partitions(self.clients, consumer, self.topic)
        finally:
            consumer.close()
        mine = [p for p in partitions if p % self.shards == self.shard]
        if not mine:
            raise ValueError(_no_partitions(self.topic, len(partitions), self.shard, self.shards))
        if not self.stop_at_end:
            self._watch = PartitionWatch(self.topic, mine, lambda p: p % self.shards == self.shard,
                                         self.on_partitions_added)
        return [part_name(self.topic, p) for p in mine]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _KafkaPartition:
        return _KafkaPartition(
            self.clients,
            TopicPartition(self.topic, _partition_of(for_part)),
            0 if resume_state is None else resume_state,
            poll_max_records=self.poll_max_records,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            stop_at_end=self.stop_at_end,
            resumed=resume_state is not None,
            on_offset_reset=self.on_offset_reset,
            consumers=self.consumers,
            watch=self._watch,
        )


def _no_partitions(topic: str, n: int, first: int, shards: int, last: int | None = None) -> str:
    """Shards ``first`` to ``last`` (``first`` alone when None) read no partition of ``topic``.

    >>> _no_partitions("events", 2, 2, 4, 3)[:60]
    "topic 'events' has 2 partition(s): shards 2 and 3 of 4 would"
    """
    last = first if last is None else last
    which = (f"shard {first}" if last == first else f"shards {first} and {last}" if last == first + 1
             else f"shards {first} to {last}")
    return (f"topic {topic!r} has {n} partition(s): {which} of {shards} would read none; "
            f"give the topic at least {shards} partitions (a multiple of the shard count)")


def check_shards(clients: KafkaClientFactory, topic: str, shards: int) -> str | None:
    """Raise ``ValueError`` (naming the topic) unless every one of ``shards`` shards gets a
    partition of ``topic``: checked before any shard loads its model. Returns a warning when the
    partitions do not divide evenly between the shards (users are spread by partition: some shards
    get more of them; until 2026-12-07 nothing was said), else None."""
    consumer = clients.consumer()
    try:
        n = len(_partitions(clients, consumer, topic))
    finally:
        consumer.close()
    if n < shards:  # each of the shards from n on (until 2026-12-07 only shard n was named)
        raise ValueError(_no_partitions(topic, n, n, shards, shards - 1))
    if n % shards:
        counts = [len(range(i, n, shards)) for i in range(shards)]
        return (f"{topic!r} has {n} partitions for {shards} shards: shards read {'/'.join(map(str, counts))} of them "
                f"(users are spread by partition, so some shards get more of them); give it a multiple of {shards}")
    return None


# -------------------------------------------------------------------------------- sink


class Acknowledgement:
    """An item that follows a batch's records down a sink's stream (value of a ``(None, it)``
    pair): an acknowledging sink (``acknowledges = True``) calls :meth:`done` once the broker has
    acknowledged every record written before it; the engine's outbox then lets the batch's
    lists go (:meth:`recsys.shard.step.Shard.acknowledge`). One worker per process
    (dataflows/runner.py): the item never leaves the process, so it may hold a callback."""

    __slots__ = ("stamp", "_callback")

    def __init__(self, stamp: int, callback: Callable[[int], None]) -> None:
        self.stamp, self._callback = stamp, callback

    def done(self) -> None:
        self._callback(self.stamp)

    def __repr__(self) -> str:
        return f"Acknowledgement({self.stamp})"


#: While an epoch's sends wait for the broker's acknowledgement, the sink says so on stderr every
#: this many seconds: the wait holds the flow's one thread (for up to the producer's delivery
#: timeout), and with it every status line; until 2026-12-07 a broker gone under a busy flow was
#: that silent.
FLUSH_NOTE_S = 10.0


class _KafkaSinkPartition(StatefulSinkPartition[tuple[Key, bytes], None]):
    def __init__(self, producer: Any, topic: str, bootstrap: str = "?") -> None:
        self._producer = producer
        self._topic = topic
        self._bootstrap = bootstrap
        self._pending: list[Any] = []
        self._acknowledgement: Acknowledgement | None = None  # the last one written, not yet done

    def _flush(self) -> None:
        """``producer.flush()``, saying every :data:`FLUSH_NOTE_S` while the broker has not
        acknowledged everything sent (kafka-python's flush may be called again after a timeout)."""
        from kafka.errors import KafkaTimeoutError

        began = time.monotonic()
        while True:
            try:
                self._producer.flush(timeout=FLUSH_NOTE_S)
                return
            except KafkaTimeoutError:
                unacknowledged = sum(not f.is_done for f in self._pending)
                print(f"sink: waiting {time.monotonic() - began:.0f} s for the broker at {self._bootstrap} to "
                      f"acknowledge {unacknowledged} record{'s' if unacknowledged != 1 else ''} sent to {self._topic!r} "
                      f"(is it up?); nothing of this epoch is committed until it does", file=sys.stderr, flush=True)

    def write_batch(self, items: list[tuple[Key, bytes]]) -> None:
        send = self._producer.send
        for key, value in items:
            if type(value) is Acknowledgement:
                self._acknowledgement = value
            else:
                self._pending.append(send(self._topic, value=value, key=_to_bytes(key)))

    def snapshot(self) -> None:
        # Bytewax snapshots every partition at the end of an epoch, before it commits the epoch
        # (which moves the source offsets on): everything sent so far must be acknowledged now.
        self._flush()
        pending, self._pending = self._pending, []
        _raise_failures(pending)  # nothing is silently dropped
        if self._acknowledgement is not None:  # everything written before it is delivered
            acknowledgement, self._acknowledgement = self._acknowledgement, None
            acknowledgement.done()
        return None

    def close(self) -> None:
        self.snapshot()
        self._producer.close()


class KafkaSink(FixedPartitionedSink[tuple[Key, bytes], None]):
    """Write ``(key, value)`` items to a topic, keyed (kafka's partitioner hashes the key).

    Sends are not waited for batch by batch; the partition's epoch snapshot flushes and checks
    every send before Bytewax commits the epoch: at-least-once, with one broker round trip
    per epoch instead of one per batch (which cost a fifth of the main thread's time). So a
    record is in doubt until that snapshot: an :class:`Acknowledgement` written after it is
    done only then (``acknowledges``).
    The flow feeds it ``(routing key, (key, value))`` pairs (:func:`dataflows.flow.build_flow`).
    """

    acknowledges = True

    def __init__(self, clients: KafkaClientFactory, topic: str, *, ordered: bool = False) -> None:
        self.clients = clients
        self.topic = topic
        # ``ordered``: one request in flight, so a retried send can never land after a later
        # one. The exchange log needs it: a shard skips any message whose sequence number is
        # not above the last it applied from that origin, so a reordered message would be lost.
        self.ordered = ordered

    def list_parts(self) -> list[str]:
        return [sink_part_name(self.topic)]  # one producer; its own partitioner spreads by key

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _KafkaSinkPartition:
        overrides = {"max_in_flight_requests_per_connection": 1} if self.ordered else {}
        return _KafkaSinkPartition(self.clients.producer(**overrides), self.topic, self.clients.bootstrap)


# ----------------------------------------------------------------------------- helpers


#: How long :func:`produce_records` waits for the broker to acknowledge what it sent: just over
#: kafka-python's delivery timeout (120 s), after which a send fails. A flush without a bound
#: waited for ever with the broker gone (seen with `recsys produce`: over 5 minutes).
PRODUCE_FLUSH_TIMEOUT_S = 150.0


def log_ends(clients: KafkaClientFactory, parts: Iterable[tuple[str, int]],
             timeout_s: float = HIGHWATER_TIMEOUT_S) -> dict[tuple[str, int], int]:
    """Each partition's log end now, of those the broker lists (a topic or partition it does not
    list is left out: asked for by offset, the local broker would create it). The high watermark
    of a fetch from the log start, as ``_KafkaPartition._bounds`` reads it (end_offsets() is off
    by a batch on the local broker). Raises ``TimeoutError`` after ``timeout_s`` without one."""
    wanted = sorted(set(parts))
    consumer = clients.consumer(max_poll_records=1, auto_offset_reset="none")
    try:
        listed = {t: consumer.partitions_for_topic(t) or set() for t in {t for t, _ in wanted}}
        tps = [TopicPartition(t, p) for t, p in wanted if p in listed[t]]
        if not tps:
            return {}
        consumer.assign(tps)
        for tp, start in consumer.beginning_offsets(tps).items():
            consumer.seek(tp, start)
        ends = _fetched_highwaters(consumer, tps, timeout_s, clients.bootstrap)
        return {(tp.topic, tp.partition): end for tp, end in ends.items()}
    finally:
        consumer.close()


def _fetched_highwaters(consumer: Any, tps: list[TopicPartition], timeout_s: float, bootstrap: str) -> dict[TopicPartition, int]:
    """The high watermark of each of ``tps`` (assigned to ``consumer``, positioned where its fetches
    may start) from the consumer's fetches, polling one record at a time until every partition
    has reported one (the records polled are dropped); ``TimeoutError`` after ``timeout_s``."""
    ends: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for tp in tps:
            if (hw := consumer.highwater(tp)) is not None:
                ends[tp] = hw
        if len(ends) == len(tps):
            return ends
        if time.monotonic() > deadline:
            missing = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in tps if tp not in ends)
            raise TimeoutError(f"no high watermark for {missing} from {bootstrap} within {timeout_s:.0f} s")
        consumer.poll(timeout_ms=50, max_records=1)


def kafka_error_text(exc: BaseException) -> str:
    """A kafka-python error as one readable phrase, its class named once: its errors word
    themselves in three ways (``KafkaTimeoutError: Timeout ...``, ``[Error 59]
    UnknownProducerIdError: None``, a bare message), and until 2026-12-07 the second read
    ``UnknownProducerIdError: [Error 59] UnknownProducerIdError: None`` in a stop line.

    >>> from kafka.errors import KafkaConnectionError, KafkaTimeoutError, UnknownProducerIdError
    >>> kafka_error_text(UnknownProducerIdError()), kafka_error_text(UnknownProducerIdError("fenced"))
    ('[Error 59] UnknownProducerIdError', '[Error 59] UnknownProducerIdError: fenced')
    >>> kafka_error_text(KafkaTimeoutError("Timeout after 1 s")), kafka_error_text(KafkaConnectionError("refused"))
    ('KafkaTimeoutError: Timeout after 1 s', 'KafkaConnectionError: refused')
    """
    said = str(exc).removesuffix(": None")
    name = type(exc).__name__
    return said if name in said else f"{name}: {said}" if said else name


class ProduceError(RuntimeError):
    """Sends of :func:`produce_records` the broker never acknowledged (it went away, most often):
    ``acknowledged`` of the ``sent`` records are in the topic. Which ones is not known record by
    record: each partition's go in order, but the partitions fail apart."""

    def __init__(self, topic: str, sent: int, acknowledged: int, cause: Exception) -> None:
        self.topic, self.sent, self.acknowledged = topic, sent, acknowledged
        super().__init__(f"{acknowledged} of the {sent} records sent to {topic!r} were acknowledged "
                         f"({kafka_error_text(cause)})")


class ProduceInterrupted(KeyboardInterrupt):
    """:func:`produce_records` stopped by Ctrl-C or SIGTERM: the first ``sent`` records were
    handed to the producer, and its close sent them before this was raised; none after them."""

    def __init__(self, topic: str, sent: int) -> None:
        self.topic, self.sent = topic, sent
        super().__init__(f"{sent} records sent to {topic!r} before the stop")


def produce_records(
    clients: KafkaClientFactory,
    topic: str,
    records: Iterable[tuple[Key, bytes]],
    rate: float | None = None,
    too_large: Callable[[bytes, Exception], None] | None = None,
) -> int:
    """Send ``(key, value)`` records, paced to ``rate`` records/s if given; flush; return the count.

    Pacing sleeps to keep the i-th record at or after ``i / rate`` seconds from the start,
    so bursts after a slow step are caught up rather than lost. A record over the producer's
    largest request raises, or with ``too_large(value, error)`` is handed to it, unsent and
    uncounted, and the rest go on. Sends the broker never acknowledges raise :class:`ProduceError`;
    a stop (``KeyboardInterrupt``) raises :class:`ProduceInterrupted`, with the count sent.
    """
    from kafka.errors import KafkaError, MessageSizeTooLargeError

    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 records/s, got {rate}")
    producer = clients.producer()
    count = acknowledged = 0
    futures: list[Any] = []
    close_timeout = None  # wait for what is buffered, unless the broker is gone
    try:
        start = time.monotonic()
        for key, value in records:
            if rate is not None:
                delay = start + count / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            try:
                futures.append(producer.send(topic, value=value, key=_to_bytes(key)))
            except MessageSizeTooLargeError as exc:  # refused before it is sent: nothing to undo
                if too_large is None:
                    raise
                too_large(value, exc)
                continue
            count += 1
            if len(futures) >= 10_000:  # bound memory held by futures on long runs
                producer.flush(timeout=PRODUCE_FLUSH_TIMEOUT_S)
                _raise_failures(futures)
                acknowledged += len(futures)
                futures = []
        producer.flush(timeout=PRODUCE_FLUSH_TIMEOUT_S)
        _raise_failures(futures)
    except KeyboardInterrupt:  # what was handed to the producer is still sent: the close below flushes it
        raise ProduceInterrupted(topic, count) from None
    except KafkaError as exc:
        if isinstance(exc, MessageSizeTooLargeError):
            raise
        close_timeout = 5  # what is still buffered is lost with the broker: do not wait for it
        raise ProduceError(topic, count, acknowledged + sum(1 for f in futures if f.succeeded()), exc) from exc
    finally:
        producer.close(timeout=close_timeout)
    return count


def _raise_failures(futures: list[Any]) -> None:
    """Raise the first failed send's error (``get`` re-raises it); call after ``flush``."""
    for f in futures:
        if not f.succeeded():
            f.get(timeout=30)


def consume_all(clients: KafkaClientFactory, topic: str, timeout_s: float = 10.0) -> list[Envelope]:
    """Every record of a topic, from the beginning to the high watermark, by partition then offset.

    Raises :class:`UnknownTopicError` for a missing topic and ``TimeoutError`` if the end
    is not reached within ``timeout_s``.
    """
    consumer = clients.consumer()
    try:
        tps = [TopicPartition(topic, p) for p in _partitions(clients, consumer, topic)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: dict[TopicPartition, list[Envelope]] = {tp: [] for tp in tps}
        ends: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + timeout_s
        while True:
            for tp, records in consumer.poll(timeout_ms=50).items():
                out[tp].extend(_envelope(r) for r in records)
            for tp in tps:
                if tp not in ends and (hw := consumer.highwater(tp)) is not None:
                    ends[tp] = hw  # the end as first seen: records appended later are not awaited
            if len(ends) == len(tps) and all(consumer.position(tp) >= ends[tp] for tp in tps):
                break
            if time.monotonic() > deadline:
                got = sum(map(len, out.values()))
                raise TimeoutError(f"read {got} records of {topic!r} from {clients.bootstrap} but not to its end in {timeout_s} s")
        return [e for tp in tps for e in out[tp] if e.offset < ends[tp]]
    finally:
        consumer.close()


def default_topics(settings: Settings, partitions: int) -> dict[str, int]:
    """The topics a run needs, ``{name: partitions}``: keyed topics get ``partitions``."""
    return {
        settings.events_topic: partitions,
        settings.catalog_topic: 1,
        settings.recommendations_topic: partitions,
        settings.dead_letters_topic: 1,
        settings.search_results_topic: partitions,  # issue 13: answers to search events
    }


def default_topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Topic configs :func:`default_topics` are created with: the catalog compacted (the latest
    record of every item kept for ever, as docker-compose.yml creates it; until 2026-12-07 `recsys
    run --create-topics` made it an ordinary topic, whose retention would delete items a rebuilt
    state or a new shard then never learns)."""
    return {settings.catalog_topic: {"cleanup.policy": "compact"}}


def ensure_topics(
    target: KafkaClientFactory | str, topics: Mapping[str, int], *, replication_factor: int = 1,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> list[str]:
    """Create the missing ``{topic: partitions}`` (with ``configs[topic]``, if given); existing
    topics are left as they are.

    ``target`` is a bootstrap string or a :class:`KafkaClientFactory` (real, or the test broker:
    both hand out an admin client).
    Returns the names created.
    """
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    clients = KafkaClients.for_bootstrap(target) if isinstance(target, str) else target
    admin = clients.admin()
    try:
        existing = set(admin.list_topics())
        created = []
        for name, n in topics.items():
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, num_partitions=n, replication_factor=replication_factor,
                                              topic_configs=dict((configs or {}).get(name, {})))])
                created.append(name)
            except TopicAlreadyExistsError:  # created concurrently: fine
                pass
        return created
    finally:
        admin.close()
