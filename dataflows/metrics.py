"""Live metrics of the flow: Prometheus (``prometheus_client``) and a status line on stderr.

One :class:`FlowMetrics` per process (per shard), one registry, every name
``recsys_<thing>_<unit>`` with help text. It is fed plain data only: the engine's per-batch
:class:`recsys.shard.step.BatchResult` and its public attributes (through
:class:`dataflows.flow.StepObserver`), and each source partition's lag (:class:`Watched`).
Nothing here changes what the flow does; ``recsys/`` stays free of Prometheus.

Served at ``http://RECSYS_METRICS_HOST:(RECSYS_METRICS_PORT + shard)/metrics`` when
``RECSYS_METRICS_PORT`` is set (off by default). The model trainer's (issue 11,
:class:`TrainerMetrics`) are served on ``RECSYS_METRICS_PORT + RECSYS_SHARDS``, the port after the
last shard's. The status line (every
``RECSYS_STATUS_INTERVAL_S``, unless ``RECSYS_QUIET``) reads the same numbers::

    status: 1998 events/s, lag 12, p99 48 ms (append -> recommendation), 0 dead letters (7 in all), 0 waiting

>>> m = FlowMetrics(Settings(), status=None)
>>> "recsys_events_in_total" in m.series_names() and "recsys_batch_processing_seconds_bucket" in m.series_names()
True
>>> reason_class("field 'item_id': unknown item 'x' (not in the catalog)")
'unknown_item'
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np
import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from recsys.events import Envelope
from recsys.settings import Settings
from recsys.shard.step import PHASES, BatchResult, Shard

#: Latency buckets (seconds): the design's range is tens to hundreds of milliseconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
#: Batch processing buckets (seconds): a polled batch takes ~1 ms to ~1 s.
#: time between two polls of an input partition: the idle backoff is 1-100 ms; anything longer
#: is time the flow did not read the partition (a long batch, an epoch close held)
POLL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: The on-disk state size and users gauges are refreshed at most this often (a directory walk).
SLOW_GAUGES_INTERVAL_S = 5.0
#: Latencies kept for the status line's p99 (the last interval's, at most this many).
STATUS_SAMPLES = 20_000
#: At most one slow-batch line per this many seconds; the batches in between are counted in it.
SLOW_BATCH_LOG_INTERVAL_S = 1.0

#: Dead-letter reason -> class, first match wins (the reasons are recsys.events' DecodeErrors).
_REASON_CLASSES = (
    ("unknown item", "unknown_item"),
    ("oversized", "oversized"),
    ("empty message", "empty"),
    ("malformed or truncated JSON", "malformed_json"),
    ("expected a JSON object", "malformed_json"),
    ("unknown event type", "unknown_event_type"),
    (": missing", "missing_field"),
    ("field '", "invalid_field"),
)


def reason_class(reason: str) -> str:
    """A dead letter's reason reduced to a small, fixed set of label values."""
    for needle, label in _REASON_CLASSES:
        if needle in reason:
            return label
    return "other"


class MetricsPortError(RuntimeError):
    """The metrics endpoint's port could not be bound (in use, or not allowed)."""


class _Endpoint:
    """A registry served over HTTP on ``metrics_port`` + :meth:`_port_offset` (the flow's and
    the trainer's metrics alike)."""

    settings: Settings
    registry: CollectorRegistry
    server: Any
    _status: TextIO | None  # where status lines go (None: --quiet)
    _interval_started: float  # when the status line's interval began

    def _port_offset(self) -> int:
        raise NotImplementedError

    def status_line(self, now: float) -> str:
        """The status line for the interval that ends ``now`` (which it starts anew)."""
        raise NotImplementedError

    def _status_if_due(self, now: float) -> None:
        """Write the status line once ``RECSYS_STATUS_INTERVAL_S`` has passed since the last."""
        if self._status is not None and now - self._interval_started >= self.settings.status_interval_s:
            self._status.write(self.status_line(now) + "\n")
            self._status.flush()

    @property
    def port(self) -> int | None:
        """The port this endpoint serves on (None: ``metrics_port`` unset, not served); the
        scrape targets of deploy/prometheus/prometheus.yml follow it (tests/test_compose.py)."""
        return None if self.settings.metrics_port is None else self.settings.metrics_port + self._port_offset()

    def serve(self) -> str | None:
        """Start the HTTP endpoint if ``metrics_port`` is set; returns its URL."""
        if self.port is None:
            return None
        try:
            self.server, url = _serve(self.registry, self.settings.metrics_host, self.port)
        except OSError as exc:
            offset = self._port_offset()
            given = f"RECSYS_METRICS_PORT {self.settings.metrics_port}" + (f" + {offset}" if offset else "")
            raise MetricsPortError(
                f"metrics: cannot serve on {self.settings.metrics_host}:{self.port} ({given}): {exc.strerror or exc}; "
                f"another process holds it? choose another --metrics-port (a run with --processes N uses it and the "
                f"N ports after it)") from exc
        return url

    def close(self) -> None:
        self.server = _close(self.server)

    def series_names(self) -> set[str]:
        """Every series name this registry exports (``_total``, ``_bucket``... included)."""
        return _series_names(self.registry)


class FlowMetrics(_Endpoint):
    """The metrics of one flow process: observer of the engine step and of the sources."""

    def __init__(self, settings: Settings, *, status: TextIO | None = sys.stderr, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.clock = clock
        self.registry = r = CollectorRegistry()
        ProcessCollector(namespace="recsys", registry=r)  # recsys_process_resident_memory_bytes, cpu, fds
        self.info = Gauge("recsys_shard_info", "This process's shard (labels); always 1", ["shard", "shards"], registry=r)
        self.info.labels(str(settings.shard), str(settings.shards)).set(1)
        self.events_in = Counter("recsys_events_in", "Events decoded, by event type", ["type"], registry=r)
        self.consumed = Counter("recsys_records_consumed", "Records read from an input topic (valid or not)", ["topic"], registry=r)
        self.catalog_in = Counter("recsys_catalog_records_in", "Catalog records read by the flow (after the bootstrap)", registry=r)
        self.applied = Counter("recsys_events_applied", "Events applied to user state", registry=r)
        self.recs_out = Counter("recsys_recommendations_out", "Recommendations emitted", registry=r)
        self.kept_back = Counter("recsys_outputs_sent_before_rebuild", "Outputs a --rebuild-state replay kept back: "
                                 "lists, search answers and dead letters the wiped state had delivered", registry=r)
        self.dead = Counter("recsys_dead_letters", "Messages dead-lettered, by reason class", ["reason"], registry=r)
        self.lag = Gauge("recsys_consumer_lag_records", "High watermark minus next offset to read, per input partition",
                         ["topic", "partition"], registry=r)
        self.poll_interval = Histogram("recsys_input_poll_interval_seconds",
                                       "Time between two polls of an input partition (a long one: the flow did not read it)",
                                       ["topic"], buckets=POLL_BUCKETS, registry=r)
        self.poll_interval_max = Gauge("recsys_input_poll_interval_max_seconds",
                                       "Longest time between two polls of an input partition since start", ["topic"],
                                       registry=r)
        self.batch_time = Histogram("recsys_batch_processing_seconds", "Shard time per polled batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.phase_time = Counter("recsys_batch_phase_seconds",
                                  f"Shard time per phase of the step ({', '.join(PHASES)}), summed over batches",
                                  ["phase"], registry=r)
        for phase in PHASES:
            self.phase_time.labels(phase)  # every phase exported from the start, at 0
        self.latency = Histogram("recsys_event_to_recommendation_seconds",
                                 "Broker append of a user's last event in a batch -> its recommendation (fresh ones; not re-emissions)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.new_item = Histogram("recsys_new_item_recommendable_seconds",
                                  "Broker append of a catalog record -> the item recommendable (indexed)",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.users = Gauge("recsys_state_users", "Users in state (counted at start, plus users first seen since, less "
                           "those swept or erased since)", registry=r)
        self.state_bytes = Gauge("recsys_state_size_bytes", "Size on disk of the state directory (RocksDB, models)", registry=r)
        self.waiting = Gauge("recsys_waiting_events", "Events waiting for their catalog item, or for their search's "
                             "query vector from the embedding worker (and their user's later events)", registry=r)
        self.deferred = Gauge("recsys_catalog_records_deferred",
                              "Catalog records waiting for the embedding worker's vectors (RECSYS_EMBED_WORKER)", registry=r)
        self.queries = Gauge("recsys_queries_at_worker",
                             "Search queries the embedding worker is encoding; their searches wait (RECSYS_EMBED_WORKER)",
                             registry=r)
        self.queries_sent = Counter("recsys_queries_to_worker", "Search queries sent to the embedding worker, their "
                                    "searches waiting for the vectors (RECSYS_EMBED_WORKER)", registry=r)
        self.items = Gauge("recsys_catalog_items", "Items in the catalog", registry=r)
        self.search_cache = Counter(
            "recsys_search_cache", "Search's cache look-ups by outcome (each search, and each engagement checked "
            "against its search's query): cache=candidates (a query's candidates before the shopper: hit, refreshed "
            "after a catalog change, rebuilt), cache=query_vectors (hit, encoded by the model)",
            ["cache", "outcome"], registry=r)
        self._search_seen: dict[tuple[str, str], int] = {}
        self.model_version = Gauge("recsys_model_version", "Updates so far: head optimizer steps, re-ranker examples",
                                   ["model"], registry=r)
        self.model_age = Gauge("recsys_model_update_age_seconds", "Seconds since the model last changed", ["model"], registry=r)
        self.hit_rate = Gauge("recsys_rolling_hit_rate_ratio",
                              "Share of recent shown lists whose next event hit them (the quality monitor's rolling mean)",
                              registry=r)
        self.drifts = Counter("recsys_quality_drifts", "Drops of the hit rate detected (ADWIN)", registry=r)
        self.key_mismatches = Counter(
            "recsys_key_mismatches", "Records keyed otherwise than their user_id (events) or item_id (catalog), "
            "applied in one process (events with shards are dead-lettered)", ["topic"], registry=r)
        # issue 11: the shared models this shard serves (a trainer's snapshot, or trained here from the log)
        self.served_offset = Gauge("recsys_served_model_offset",
                                   "Exchange log position of the shared models served (their version x<offset>; "
                                   "-1: none yet, or models not shared)", registry=r)
        self.served_age = Gauge("recsys_served_model_age_seconds",
                                "Seconds since the model trainer published the snapshot this shard serves "
                                "(NaN until one is loaded: only with RECSYS_MODEL_TRAINER)", registry=r)
        self.served_age.set(float("nan"))
        self.connections = Gauge("recsys_broker_connections",
                                 "Broker connections the input consumers hold now (0: the broker is unreachable; "
                                 "kafka-python retries without a word)", registry=r)
        self.connections.set_function(self._connection_count)
        self._status = None if settings.quiet else status
        self._lags: dict[tuple[str, int], int] = {}
        # the input partitions' consumers: the status line says when none holds a broker connection
        self._connection_probes: list[Callable[[], int | None]] = []
        self._connection_owners: set[object] = set()
        self._unreachable_since: float | None = None
        self._poll_max: dict[str, float] = {}
        self._versions: dict[str, tuple[int, float]] = {}
        self._users = None
        self._slow_at = 0.0
        self._interval_started = clock()
        self._interval_events = 0
        self._interval_dead = 0
        self._interval_mismatched = 0  # records keyed otherwise than their id since the last status line
        self._dead_total = 0
        self._samples: deque[float] = deque(maxlen=STATUS_SAMPLES)
        self._slow_logged_at = float("-inf")
        self._slow_unlogged = 0
        self.server: Any = None

    # ------------------------------------------------------------------ serving

    def _port_offset(self) -> int:
        return self.settings.shard  # each shard on metrics_port + its index

    # ------------------------------------------------------------------ observers

    def partition_lag(self, topic: str, partition: int, lag: int | None) -> None:
        if lag is not None:
            self._lags[(topic, partition)] = lag
            self.lag.labels(topic, str(partition)).set(lag)

    def watch_connections(self, probe: Callable[[], int | None], owner: object = None) -> None:
        """``probe()``: how many broker connections an input's consumer holds (None: unknown).
        ``owner``: the consumer it reads; partitions that share one consumer count it once."""
        if owner is not None:
            if owner in self._connection_owners:
                return
            self._connection_owners.add(owner)
        self._connection_probes.append(probe)

    def _connection_count(self) -> float:
        """The sum over the input consumers (NaN while none reports a count), read at scrape time."""
        counts = [c for probe in self._connection_probes if (c := probe()) is not None]
        return float(sum(counts)) if counts else float("nan")

    def _broker_note(self, now: float) -> str:
        """``", no broker connection for N s (...)"`` while every input consumer reports none; the
        first line that finds none says "since the last status line" (until 2026-12-07 it said
        "for 0 s", though the connection may have gone up to a status interval before).

        >>> m = FlowMetrics(Settings(bootstrap_servers="127.0.0.1:9")); m.watch_connections(lambda: 0)
        >>> m._broker_note(100.0), m._broker_note(110.0)
        (', no broker connection since the last status line (is 127.0.0.1:9 up?)', ', no broker connection for 10 s (is 127.0.0.1:9 up?)')
        """
        counts = [probe() for probe in self._connection_probes]
        if not counts or any(c is None or c > 0 for c in counts):
            self._unreachable_since = None
            return ""
        up = f"(is {self.settings.bootstrap_servers} up?)"
        if self._unreachable_since is None:
            self._unreachable_since = now
            return f", no broker connection since the last status line {up}"
        return f", no broker connection for {now - self._unreachable_since:.0f} s {up}"

    def polled(self, topic: str, seconds: float) -> None:
        """The time since the partition's last poll (``_WatchedPartition``)."""
        self.poll_interval.labels(topic).observe(seconds)
        if seconds > self._poll_max.get(topic, 0.0):
            self._poll_max[topic] = seconds
            self.poll_interval_max.labels(topic).set(seconds)

    def batch(self, engine: Shard, envelopes: list[Envelope], result: BatchResult, seconds: float) -> None:
        """After each ``Shard.process``: counts, processing time, latencies."""
        now_ms = self.clock() * 1000
        self.batch_time.observe(seconds)
        for phase, spent in result.phase_seconds.items():
            self.phase_time.labels(phase).inc(spent)
        if 0 < self.settings.slow_batch_ms <= seconds * 1000:
            self._slow_batch(len(envelopes), result, seconds, now_ms / 1000)
        catalog_topic = self.settings.catalog_topic
        last_append: dict[bytes, int] = {}  # user key -> append time of the user's last event here
        by_topic: dict[str, int] = {}
        for env in envelopes:
            by_topic[env.topic] = by_topic.get(env.topic, 0) + 1
            if env.topic != catalog_topic and env.key is not None:
                last_append[env.key] = env.timestamp_ms
        for appended_ms in result.catalog_applied_ms:  # indexed now (with the embedding worker: maybe later)
            self.new_item.observe(max(now_ms - appended_ms, 0) / 1000)
        for topic, n in by_topic.items():
            self.consumed.labels(topic).inc(n)
        for event_type, n in result.event_types.items():
            self.events_in.labels(event_type).inc(n)
        counts = result.counts
        self.catalog_in.inc(counts.get("catalog_in", 0))
        self.applied.inc(counts.get("applied", 0))
        self.recs_out.inc(len(result.recommendations))
        self.kept_back.inc(counts.get("sent_before_rebuild", 0))
        self.drifts.inc(counts.get("drift_detected", 0))
        self.queries_sent.inc(counts.get("queries_to_worker", 0))
        # until 2026-12-07 only the totals at stop said so: a catalog record keyed by another item's id
        # replaces that item's record when the compacted topic is compacted
        for count, topic in (("key_mismatch", self.settings.events_topic), ("catalog_key_mismatch", catalog_topic)):
            if n := counts.get(count, 0):
                self.key_mismatches.labels(topic).inc(n)
                self._interval_mismatched += n
        for _, payload in result.dead_letters:
            self.dead.labels(reason_class(orjson.loads(payload).get("reason", ""))).inc()
        # fresh answers only: the re-emitted lists come last (their triggers were read again, so
        # their append time is the first read's; until 2026-12-07 they were timed from it)
        fresh = result.recommendations[:len(result.recommendations) - counts.get("reemitted", 0)]
        for user_id, _ in fresh:
            appended = last_append.get(user_id.encode())
            if appended:  # producers key events by user: the trigger is the user's last event here
                latency = max(now_ms - appended, 0) / 1000
                self.latency.observe(latency)
                self._samples.append(latency)
        self._interval_events += counts.get("events_in", 0)
        self._interval_dead += len(result.dead_letters)
        if self._users is not None:  # until 2026-12-07 the sweep's and erasures' deletions were not taken off
            self._users += result.new_users - counts.get("swept_users", 0) - counts.get("forgotten_users", 0)
        self.tick(engine)

    def _slow_batch(self, records: int, result: BatchResult, seconds: float, now: float) -> None:
        """A batch over ``RECSYS_SLOW_BATCH_MS``: one line on stderr with where its time went
        (at most one line a second; the slow batches in between are counted in the next)."""
        if self._status is None:
            return
        if now - self._slow_logged_at < SLOW_BATCH_LOG_INTERVAL_S:
            self._slow_unlogged += 1
            return
        self._slow_logged_at = now
        self._status.write(slow_batch_line(records, result, seconds, self._slow_unlogged) + "\n")
        self._status.flush()
        self._slow_unlogged = 0

    def tick(self, engine: Shard) -> None:
        """On every timer tick and batch: gauges, and the status line when due."""
        now = self.clock()
        self.waiting.set(len(engine.waiting))
        self.deferred.set(engine.deferred_records)
        self.queries.set(engine.queries_at_worker)
        self.items.set(len(engine.items.catalog))
        self._count_search_caches(engine)
        self.hit_rate.set(engine.monitor.hit_rate)
        versions = {"reranker": engine.reranker.examples}
        if engine.head is not None:
            versions["head"] = engine.head.n_updates
        for model, version in versions.items():
            seen = self._versions.get(model)
            if seen is None or seen[0] != version:
                self._versions[model] = seen = (version, now)
            self.model_version.labels(model).set(version)
            self.model_age.labels(model).set(now - seen[1])
        shared = getattr(engine, "shared_models", None)
        self.served_offset.set(shared.position if shared is not None else -1)
        written_at = getattr(engine, "served_snapshot_written_at", None)
        if written_at is not None:
            self.served_age.set(max(now - written_at, 0.0))
        if now - self._slow_at >= SLOW_GAUGES_INTERVAL_S:
            self._slow_at = now
            if self._users is None:
                self._users = engine.users.count()  # once; then users first seen are added
            self.state_bytes.set(_dir_bytes(Path(self.settings.state_dir)))
        if self._users is not None:
            self.users.set(self._users)
        self._status_if_due(now)

    def _count_search_caches(self, engine: Shard) -> None:
        """Search's cache counts since the last tick into ``recsys_search_cache_total``."""
        base, vectors = engine.search.base_stats, engine.search.encoder.stats
        for key, total in ((("candidates", "hit"), base["hits"]), (("candidates", "refreshed"), base["refreshed"]),
                           (("candidates", "rebuilt"), base["misses"]), (("query_vectors", "hit"), vectors["hits"]),
                           (("query_vectors", "encoded"), vectors["misses"])):
            grew = total - self._search_seen.get(key, 0)
            if grew > 0:
                self.search_cache.labels(*key).inc(grew)
            self._search_seen[key] = total

    def _mismatch_note(self) -> str:
        n = self._interval_mismatched
        return (f", {n} record{'s' if n != 1 else ''} keyed otherwise than {'their' if n != 1 else 'its'} user_id / "
                f"item_id (applied; recsys_key_mismatches_total)") if n else ""

    def status_line(self, now: float) -> str:
        """The numbers of the interval since the last line; starts the next interval."""
        took = max(now - self._interval_started, 1e-9)
        p99 = f"{np.percentile(np.fromiter(self._samples, float), 99) * 1000:.0f} ms" if self._samples else "-"
        self._dead_total += self._interval_dead
        line = (f"status: {self._interval_events / took:.0f} events/s, lag {sum(self._lags.values())}, "
                f"p99 {p99} (append -> recommendation), {self._interval_dead} dead letters ({self._dead_total} in all), "
                f"{len(self._samples)} recommendations timed{self._mismatch_note()}{self._broker_note(now)}")
        self._interval_started, self._interval_events, self._interval_dead, self._interval_mismatched = now, 0, 0, 0
        self._samples.clear()
        return line


def slow_batch_line(records: int, result: BatchResult, seconds: float, unlogged: int = 0) -> str:
    """The slow-batch line: the batch's size and its phases, longest first (those over 1 ms). A
    batch with catalog records says how many (a catalog import's new items are embedded in
    ``decode``), and one that parked events for items not in the catalog yet says that too.

    >>> r = BatchResult(phase_seconds={"decode": 0.004, "rank": 0.41, "commit": 0.09, "head": 0.0002})
    >>> r.counts["applied"] = 180
    >>> slow_batch_line(200, r, 0.52, unlogged=3)
    'slow batch: 520 ms for 200 records (180 applied, 0 recommendations): rank 410 ms, commit 90 ms, decode 4 ms, other 16 ms (3 more slow batches since the last line)'
    >>> r = BatchResult(phase_seconds={"decode": 1.93})
    >>> r.counts.update(catalog_in=900, events_in=100, waited=60)
    >>> slow_batch_line(1000, r, 1.94)
    'slow batch: 1940 ms for 1000 records (0 applied, 0 recommendations, 900 catalog records, 60 events parked for their item): decode 1930 ms, other 10 ms'
    """
    phases = sorted(((spent, phase) for phase, spent in result.phase_seconds.items() if spent >= 0.001), reverse=True)
    other = seconds - sum(result.phase_seconds.values())
    parts = [f"{phase} {spent * 1000:.0f} ms" for spent, phase in phases]
    if other >= 0.001:
        parts.append(f"other {other * 1000:.0f} ms")
    more = f" ({unlogged} more slow batches since the last line)" if unlogged else ""
    counts = result.counts
    what = [f"{counts.get('applied', 0)} applied", f"{len(result.recommendations)} recommendations"]
    if counts.get("catalog_in"):
        what.append(f"{counts['catalog_in']} catalog records")
    if counts.get("waited"):
        what.append(f"{counts['waited']} events parked for their item")
    return f"slow batch: {seconds * 1000:.0f} ms for {records} records ({', '.join(what)}): {', '.join(parts)}{more}"


class TrainerMetrics(_Endpoint):
    """The model trainer's metrics (issue 11, :mod:`dataflows.trainer`): how far it has learned the
    exchange log, the log's end, the version it published last and how old that is. Served at
    ``RECSYS_METRICS_HOST:(RECSYS_METRICS_PORT + RECSYS_SHARDS)``, the port after the last shard's,
    when ``RECSYS_METRICS_PORT`` is set.

    >>> m = TrainerMetrics(Settings()); m.observe(position=9, log_end=15, published=7, published_at=100.0, now=103.5)
    >>> m.value("recsys_trainer_lag_records"), m.value("recsys_trainer_published_model_age_seconds")
    (5.0, 3.5)

    Every ``RECSYS_STATUS_INTERVAL_S`` (unless ``--quiet``) :meth:`observe` writes a status line to
    ``status`` (stderr), as a shard does (until 2026-12-07 a running trainer said nothing between
    ``ready:`` and ``stopped:``):

    >>> import io
    >>> out = io.StringIO(); m = TrainerMetrics(Settings(status_interval_s=10), status=out, clock=lambda: 100.0)
    >>> m.learned.inc(1200); m.observe(position=4811, log_end=4900, published=4800, published_at=105.0, now=110.0)
    >>> print(out.getvalue().strip())
    status: 120 messages/s learned, exchange position 4811, lag 88, models x4800 published 5 s ago
    """

    def __init__(self, settings: Settings, *, status: TextIO | None = sys.stderr,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings, self.clock = settings, clock
        self._status = None if settings.quiet else status
        self._interval_started, self._interval_learned = clock(), 0.0
        self.registry = r = CollectorRegistry()
        ProcessCollector(namespace="recsys", registry=r)
        self.position = Gauge("recsys_trainer_learned_offset",
                              "Exchange log position the trainer has learned up to (committed in its state; -1: none)",
                              registry=r)
        self.log_end = Gauge("recsys_trainer_log_end_offset",
                             "The exchange log's end as the trainer last saw it (high watermark: the next offset written)",
                             registry=r)
        self.lag = Gauge("recsys_trainer_lag_records", "Exchange log records not learned yet: log end - learned offset - 1",
                         registry=r)
        self.published = Gauge("recsys_trainer_published_model_offset",
                               "Log position of the models in the last snapshot published (the version x<offset> "
                               "shards load; -1: none yet)", registry=r)
        self.published_age = Gauge("recsys_trainer_published_model_age_seconds",
                                   "Seconds since the trainer last published a model snapshot (NaN: none yet)", registry=r)
        self.published_age.set(float("nan"))
        self.learned = Counter("recsys_trainer_messages_learned", "Exchange messages learned", registry=r)
        self.publications = Counter("recsys_trainer_publications", "Model snapshots published", registry=r)
        self.state_snapshots = Counter("recsys_trainer_state_snapshots",
                                       "Snapshots of the trainer's own state written (for a trainer past retention)",
                                       registry=r)
        for gauge in (self.position, self.published):
            gauge.set(-1)
        self.server: Any = None

    def observe(self, *, position: int, log_end: int | None, published: int, published_at: float | None,
                now: float | None = None) -> None:
        """After each step of the trainer's loop: where it stands."""
        now = self.clock() if now is None else now
        self.position.set(position)
        if log_end is not None:
            self.log_end.set(log_end)
            self.lag.set(max(log_end - position - 1, 0))
        self.published.set(published)
        if published_at is not None:
            self.published_age.set(max(now - published_at, 0.0))
        self._status_if_due(now)

    def status_line(self, now: float) -> str:
        """The trainer's numbers now, with its learning rate over the interval since the last line
        (which this starts anew)."""
        learned = self.value("recsys_trainer_messages_learned_total") or 0.0
        rate = (learned - self._interval_learned) / max(now - self._interval_started, 1e-9)
        self._interval_started, self._interval_learned = now, learned
        published, age = (self.value(f"recsys_trainer_published_model_{k}") for k in ("offset", "age_seconds"))
        models = ("no models published yet" if published is None or published < 0 or age is None or age != age
                  else f"models x{published:.0f} published {age:.0f} s ago")
        position, lag = (self.value(f"recsys_trainer_{k}") for k in ("learned_offset", "lag_records"))
        return (f"status: {rate:.0f} messages/s learned, exchange position {position:.0f}, "
                f"lag {lag or 0:.0f}, {models}")

    def value(self, name: str) -> float | None:
        """The current value of one of this registry's series (for tests and the status line)."""
        return self.registry.get_sample_value(name)

    def _port_offset(self) -> int:
        return self.settings.shards  # the port after the shards' (under --processes N)


def _serve(registry: CollectorRegistry, host: str, port: int) -> tuple[Any, str]:
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server, f"http://{host}:{port}/metrics"


def _close(server: Any) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
    return None


def _series_names(registry: CollectorRegistry) -> set[str]:
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "info": ("_info",), "summary": ("", "_sum", "_count", "_created")}
    return {m.name + s for m in registry.collect() for s in suffixes.get(m.type, ("",))}


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # a RocksDB file compacted away meanwhile
                pass
    return total


class _WatchedPartition(StatefulSourcePartition[Any, Any]):
    def __init__(self, inner: StatefulSourcePartition[Any, Any], topic: str, partition: int, metrics: FlowMetrics):
        self.inner, self.topic, self.partition, self.metrics = inner, topic, partition, metrics
        self._lag = getattr(inner, "lag", None)
        if (connections := getattr(inner, "connections", None)) is not None:
            metrics.watch_connections(connections, getattr(inner, "consumer_id", None))
        self._polled_at: float | None = None

    def next_batch(self) -> Any:
        now = time.monotonic()
        if self._polled_at is not None:
            self.metrics.polled(self.topic, now - self._polled_at)
        self._polled_at = now
        batch = self.inner.next_batch()
        if self._lag is not None:
            self.metrics.partition_lag(self.topic, self.partition, self._lag())
        return batch

    def next_awake(self) -> Any:
        return self.inner.next_awake()

    def snapshot(self) -> Any:
        return self.inner.snapshot()

    def close(self) -> None:
        self.inner.close()


class Watched(FixedPartitionedSource[Any, Any]):
    """A partitioned Kafka source whose partitions report their lag and the time between their polls
    to ``metrics``."""

    def __init__(self, inner: FixedPartitionedSource[Any, Any], topic: str, metrics: FlowMetrics) -> None:
        self.inner, self.topic, self.metrics = inner, topic, metrics

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _WatchedPartition:
        partition = int(for_part.rsplit("#", 1)[1])
        return _WatchedPartition(self.inner.build_part(step_id, for_part, resume_state), self.topic, partition, self.metrics)
