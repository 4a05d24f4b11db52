"""The live dataflow: Kafka ``events`` + ``catalog`` in, ``recommendations`` + ``dead-letters`` out.

Run it with the CLI (``recsys run``) or directly with Bytewax::

    mkdir -p var/recovery && python -m bytewax.recovery var/recovery 1    # once
    python -m bytewax.run dataflows.live:live_flow -r var/recovery -s 2 -b 0

(``-b``: Bytewax's backup interval, required with recovery; a new recovery directory is
initialised with ``python -m bytewax.recovery var/recovery 1``, which ``recsys run`` does by
itself.) Settings come from ``RECSYS_*`` environment variables (see ``recsys/settings.py``).

Before the graph starts, the catalog topic is read to its high watermark into the engine
(:mod:`dataflows.catalog_table`); metrics and the status line: :mod:`dataflows.metrics`.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from bytewax.dataflow import Dataflow

from dataflows.catalog_table import OutputsBeforeTheFlow, ResumeAtLeast, bootstrap_catalog, report
from dataflows.flow import Ticking, build_flow
from dataflows.kafka_io import (
    HIGHWATER_TIMEOUT_S,
    KafkaClients,
    KafkaSink,
    KafkaSource,
    SharedConsumers,
    _envelope,
    ensure_topics,
    part_name,
    produce_records,
)
from dataflows.metrics import FlowMetrics, Watched
from recsys.items.catalog import read_catalog_file
from recsys.settings import Settings
from recsys.shard.step import Shard, StateLayoutError, check_state_layout
from recsys.signals.exchange import POSITION_KEY
from recsys.signals.snapshot import (
    SnapshotError,
    SnapshotInfo,
    SnapshotWriter,
    bootstrap,
    newest_snapshot,
)
from recsys.store.kv import RocksKV

#: The timer of a flow that runs until stopped: the precision of the unknown-item wait's
#: deadline on an idle stream, and of the metrics' refresh. A tick costs microseconds; it rides
#: on the control source's polls (dataflows.flow.Ticking), never on an input that sleeps.
TICK_INTERVAL_S = 0.25


def shard_factory(settings: Settings, *, evaluate: bool = False, in_memory: bool = False, clients: Any = None,
                  check: Callable[[Shard], None] | None = None):
    """A zero-argument callable that opens the engine and loads the start-up catalog file.

    With sharing (issue 11) on a persistent state it also bootstraps the exchange: a blank
    state is first loaded from the newest snapshot of the shared records, then the exchange
    log is read from the state's position + 1 to its end (:func:`catch_up_exchange`; Kafka
    through ``clients``, default real clients from ``settings``), or the start is refused
    (:class:`ExchangeBootstrapError`) when retention deleted what the state needs.

    ``check(engine)``: called once the state is open, before the catch-up reads, applies or
    sends anything (``recsys run``'s check of the state against the recovery offsets: until
    2026-12-07 the catch-up ran first, said what it had applied, and then the start was refused);
    what it raises closes the engine and goes to the caller."""

    def build() -> Shard:
        sharing = settings.share_signals and not in_memory and not evaluate
        kafka = (clients if clients is not None else KafkaClients(settings)) if sharing else None
        if not in_memory:
            check_state_layout(settings)  # before anything is read into, or written to, the directory
        loaded = load_exchange_snapshot(settings, kafka) if sharing else None
        engine = Shard.open(settings, evaluate=evaluate, in_memory=in_memory)
        if check is not None:
            try:
                check(engine)
            except BaseException:
                engine.close()
                raise
        if sharing and engine.exchange is not None:
            try:
                catch_up_exchange(engine, kafka, settings, loaded)
            except BaseException:
                engine.close()
                raise
        if settings.catalog_file:
            try:
                engine.upsert_catalog_file(read_catalog_file(settings.catalog_file), progress=True)
            except BaseException:  # a bad file (CatalogFileError), a signal: the state closed in order
                engine.close()
                raise
        settle_heap()
        return engine

    return build


# ------------------------------------------------------------------ issue 11: bootstrapping a shard


class ExchangeBootstrapError(StateLayoutError):
    """The exchange log no longer holds what this shard's state needs to catch up, and no
    snapshot covers the gap: started, its global signals would differ from the other shards'
    for good. (A :class:`StateLayoutError`: a state the shard refuses to start on.)"""


def load_exchange_snapshot(settings: Settings, clients: Any = None) -> SnapshotInfo | None:
    """Load the newest snapshot of ``settings.exchange_topic`` into this shard's state when the
    state is blank, or when the exchange log (its start read through ``clients``) no longer
    holds what the state needs and the snapshot does (:func:`recsys.signals.snapshot.bootstrap`);
    prints what it did."""
    if not settings.exchange_snapshot_dir:
        return None
    log_start = _log_start(clients, settings.exchange_topic) if clients is not None else None
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    kv = RocksKV(str(Path(settings.state_dir) / "rocks"), verify=False)  # Shard.open verifies it next
    try:
        started = time.perf_counter()
        blank = kv.get(POSITION_KEY) is None
        info = bootstrap(kv, settings.exchange_snapshot_dir, settings.exchange_topic, origin=settings.shard,
                         log_start=log_start)
    except SnapshotError as exc:
        raise ExchangeBootstrapError(f"exchange bootstrap of {settings.state_dir}: {exc}") from exc
    finally:
        kv.close()
    if info is not None:
        what = "blank state" if blank else f"shared records (the log now starts at offset {log_start}; users kept)"
        print(f"exchange: {what} loaded from snapshot {info.path} ({info.records} records, "
              f"{info.file_bytes / 2**20:.1f} MiB) at position {info.position} in {time.perf_counter() - started:.1f}s; "
              f"reading {settings.exchange_topic!r} from offset {info.position + 1}", file=sys.stdout, flush=True)
    return info


def _log_start(clients: Any, topic: str) -> int:
    """The first offset the exchange log still holds (created with one partition if missing)."""
    from kafka.structs import TopicPartition

    ensure_topics(clients, {topic: 1})  # one partition: one total order
    consumer = clients.consumer()
    try:
        tp = TopicPartition(topic, 0)
        return consumer.beginning_offsets([tp])[tp]
    finally:
        consumer.close()


def exchange_gap_message(topic: str, start: int, log_start: int, *, state_position: int,
                         snapshot_dir: str | None, loaded: SnapshotInfo | None, newest: SnapshotInfo | None,
                         interval_s: float) -> str:
    """Why a shard refuses to start: its state needs the exchange log from ``start``, which
    retention deleted (the log starts at ``log_start``)."""
    if loaded is not None:
        where = f"it was loaded from the newest snapshot, {loaded.path}, at position {loaded.position}"
    elif state_position >= 0:
        where = f"its state has applied the log up to position {state_position}"
    else:
        where = "its state is blank"
    if newest is None:
        snaps = f"no snapshot of {topic!r} is in {snapshot_dir}" if snapshot_dir else "snapshots are off (RECSYS_EXCHANGE_SNAPSHOT_DIR)"
    else:
        snaps = f"the newest snapshot in {snapshot_dir} is at position {newest.position}"
    return (
        f"exchange topic {topic!r} partition 0: this shard needs the log from offset {start} ({where}), but the log "
        f"now starts at offset {log_start}: records {start}..{log_start - 1} were deleted (retention), and {snaps}. "
        f"Started, its global signals would never equal the other shards'. To go on, put a snapshot at position "
        f">= {log_start - 1} in {snapshot_dir or 'RECSYS_EXCHANGE_SNAPSHOT_DIR'} (running sharing shards write one "
        f"every RECSYS_EXCHANGE_SNAPSHOT_INTERVAL_S={interval_s:g} s) and start this shard again: it loads it "
        f"(a blank state whole; a state behind the log keeps its users, its shared records replaced)."
    )


def catch_up_exchange(engine: Shard, clients: Any, settings: Settings, loaded: SnapshotInfo | None = None,
                      *, timeout_s: float = 600.0) -> int:
    """Read the exchange log from the state's position + 1 to the end seen at start and apply it
    (through :meth:`Shard.process`, so the positions are recorded as in the flow), before any
    event: the shard starts on the signals everyone holds, and a shard restored from a
    snapshot numbers its next message after its last one in the log. Refuses
    (:class:`ExchangeBootstrapError`) when the log starts above that position + 1. Returns
    how many records it read."""
    from kafka.structs import TopicPartition

    topic = settings.exchange_topic
    ensure_topics(clients, {topic: 1})  # one partition: one total order
    if engine.search.respond:  # what the catch-up releases may include answers to searches
        ensure_search_results_topic(clients, settings)
    tp = TopicPartition(topic, 0)
    start = engine.exchange.position + 1
    consumer = clients.consumer(auto_offset_reset="none")
    read = 0
    outputs = OutputsBeforeTheFlow(engine, clients, recommendations_topic=settings.recommendations_topic,
                                   dead_letters_topic=settings.dead_letters_topic,
                                   search_results_topic=settings.search_results_topic if engine.search.respond else None)
    try:
        consumer.assign([tp])
        log_start = consumer.beginning_offsets([tp])[tp]
        if log_start > start:
            raise ExchangeBootstrapError(exchange_gap_message(
                topic, start, log_start, state_position=engine.exchange.position, loaded=loaded,
                snapshot_dir=settings.exchange_snapshot_dir, newest=newest_snapshot(settings.exchange_snapshot_dir, topic),
                interval_s=settings.exchange_snapshot_interval_s))
        consumer.seek(tp, start)
        end, began = None, time.monotonic()
        while True:
            records = consumer.poll(timeout_ms=50).get(tp, [])
            if end is None:
                end = consumer.highwater(tp)  # the end as first seen: later records come through the flow
            records = [r for r in records if end is None or r.offset < end]
            if records:
                # what it releases from the waiting room (a wait that ran out while the shard was
                # down, the shopper's later events behind it) is sent from here
                outputs.send(engine.process([_envelope(r) for r in records]))
                read += len(records)
            if end is not None and consumer.position(tp) >= end:
                break
            waited = time.monotonic() - began
            if waited > timeout_s or (end is None and waited > HIGHWATER_TIMEOUT_S):
                raise TimeoutError(f"exchange topic {topic!r} on {clients.bootstrap}: read {read} records from offset "
                                   f"{start} but not to its end (high watermark {end}) within {waited:.0f} s")
        outputs.close()
    finally:
        consumer.close()
        outputs.abandon()
    puts: dict[bytes, bytes] = {}
    engine.exchange.resume_numbering(puts)
    if puts:
        engine.kv.write(puts)
    if read or loaded is not None:
        print(f"exchange: applied {read} records of {topic!r} from offset {start} up to position "
              f"{engine.exchange.position} before any event", file=sys.stdout, flush=True)
    return read


class SnapshotObserver:
    """The step observer (``dataflows.metrics.FlowMetrics``) plus the exchange snapshots: after
    every batch and tick (a point between two atomic writes) the writer may cut one."""

    def __init__(self, inner: Any, writer: SnapshotWriter) -> None:
        self.inner, self.writer = inner, writer

    def batch(self, engine: Shard, envelopes: list, result: Any, seconds: float) -> None:
        self.inner.batch(engine, envelopes, result, seconds)
        self.writer.maybe_write(engine.kv, erased_at=engine.exchange.erased_at)

    def tick(self, engine: Shard) -> None:
        self.inner.tick(engine)
        self.writer.maybe_write(engine.kv, erased_at=engine.exchange.erased_at)


def resend_unsent(engine: Shard, clients: Any, settings: Settings) -> int:
    """Send again what an earlier life emitted that its sinks never had acknowledged and no
    re-delivery brings back (``Shard.unsent``: lists of events that waited for their item,
    answers of searches that waited, dead letters of waits that ran out), wait for the broker to
    acknowledge them, then drop them from state; before any event. Returns how many (copies of
    delivered ones are identical)."""
    topics = {"recommendations": settings.recommendations_topic, "search_results": settings.search_results_topic,
              "dead_letters": settings.dead_letters_topic}
    sent = sum(produce_records(clients, topics[output], records) for output, records in engine.unsent().items())
    engine.drop_unsent()
    if sent:
        print(f"re-sent {sent} outputs a stop left unacknowledged", flush=True)
    return sent


def settle_heap() -> None:
    """Hide everything alive now (imported modules, the catalog, loaded state) from Python's
    cyclic garbage collector. Its full passes scan every tracked object: with torch,
    sentence-transformers and a catalog loaded that is ~0.5 s during which the stream stands
    still, the worst of the latency tail. Start-up objects live as long as the process, so
    scanning them again and again finds nothing (``gc.freeze``, Python >= 3.7)."""
    gc.collect()
    gc.freeze()


def ready_engine(engine: Shard, say: Callable[[str], object]) -> None:
    """What a flow does with its opened engine before it reads anything, under `recsys run` and
    under Bytewax's own runner alike: the embedding model warmed (a new catalog item then embeds
    in milliseconds), the engine's compiled loops loaded, or compiled once on a new machine
    (~20 s on 2 cores, announced through ``say``), before the first batch instead of in it, and
    the heap settled (:func:`settle_heap`)."""
    from recsys.signals.compile_kernels import compile_kernels_announced

    engine.embedder.warm()
    compile_kernels_announced(say)
    settle_heap()  # the model is loaded now: keep it out of the collector's full passes


def finish_flow(engine: Shard, settings: Settings, *, in_order: bool) -> None:
    """What a flow does with its engine once Bytewax has returned, under `recsys run` and under
    Bytewax's own runner alike: one line of totals (with sharing, the global signals' checksum
    first); after a stop in order (every batch committed) the shared models checkpointed, so a
    restart learns no exchange message again, and the catalog's read position recorded for the
    next bootstrap; then the engine closed, which saves the head and the re-ranker (not after a
    batch that failed before its write)."""
    from dataflows.catalog_table import record_read_after_orderly_stop

    totals = {"events_in": 0, "applied": 0, **engine.totals}  # also when nothing came in
    if engine.exchange is not None:  # issue 11: equal on every shard that applied the same log
        print(f"global signals: sha256={engine.signal_checksum()} at exchange position {engine.exchange.position}",
              flush=True)
    print("stopped: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())), flush=True)
    try:
        if in_order:
            engine.checkpoint_shared_models()  # issue 11: a restart learns no exchange message again
            record_read_after_orderly_stop(engine, settings.catalog_topic)  # the next bootstrap starts here
    finally:
        engine.close()


def _finish_at_exit(engine: Shard, settings: Settings) -> None:
    """Under Bytewax's own runner, :func:`finish_flow` once the runner has returned (at the
    interpreter's exit: the runner calls nothing after the flow), in order unless an exception
    reached the top (a panic, a second Ctrl-C). Until 2026-12-06 (forty-third session) nothing
    closed the engine there: the head and re-ranker learned since their last periodic snapshot
    (``RECSYS_HEAD_SNAPSHOT_INTERVAL_S``) were lost at every stop, though the state had the
    events that taught them, and no line said the flow had stopped."""
    import atexit

    failed: list[BaseException] = []
    previous = sys.excepthook

    def noted(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        failed.append(value)
        previous(kind, value, tb)

    sys.excepthook = noted
    atexit.register(lambda: finish_flow(engine, settings, in_order=not failed))


def live_flow(
    settings: Settings | None = None, clients: Any = None, engine: Shard | None = None, stop: Any = None,
    on_partitions_added: Callable[[str], object] | None = None,
) -> Dataflow:
    """The production graph over Kafka (or any object with the same client surface).

    ``engine``: an engine already opened in this process (the CLI opens it first so that the
    model and catalog are loaded before the first message); otherwise it is opened here.
    ``settings`` given are used as they are; read from the environment, they are this shard's
    (:meth:`Settings.for_shard`: with ``RECSYS_SHARDS`` > 1, per-shard state directories).
    ``stop``: a ``threading.Event``; once set, every source ends its input
    and the flow stops in order (:class:`dataflows.runner.StopSignals`).

    Before the graph is built the catalog topic is read to its high watermark into the engine
    (:mod:`dataflows.catalog_table`): the catalog is a table bootstrapped before any event,
    and the catalog source resumes where that read stopped.

    ``on_partitions_added``: called with one line when the events, catalog or control topic
    gains partitions this process should read (Bytewax reads those it listed at start;
    :class:`dataflows.kafka_io.PartitionWatch`). ``recsys run`` stops in order there and starts
    again; without it the line is logged.
    """
    from dataflows.runner import (StopSignals, bytewax_run_args, bytewax_run_layout_error, bytewax_run_recovery_dir,
                                  stoppable)

    recovery_dir = None
    from_runner = settings is None and stop is None and threading.current_thread() is threading.main_thread()
    if from_runner:
        runner = bytewax_run_args()
        if (layout_error := bytewax_run_layout_error(runner)) is not None:  # -w 2 or -a: before anything else
            _refuse_under_runner(layout_error)
        # built by `python -m bytewax.run dataflows.live:live_flow`: Ctrl-C and SIGTERM stop
        # in order there too, instead of through a Rust panic (dataflows/runner.py)
        stop = StopSignals().running().requested
        recovery_dir = bytewax_run_recovery_dir(runner)  # its -r, checked below as `recsys run` checks its own
    settings = settings or Settings.from_env(os.environ).for_shard()
    clients = clients if clients is not None else KafkaClients(settings)
    if from_runner:  # `recsys run` checks these before it calls here
        _check_broker_or_exit(settings)
    if recovery_dir is not None:
        _check_recovery_topics_or_exit(settings, recovery_dir)
    # Opened here, not lazily in the worker: the bootstrap needs it before the sources start.
    engine = engine if engine is not None else shard_factory(settings, clients=clients)()
    if from_runner:
        if recovery_dir is not None:
            _check_state_or_exit(settings, recovery_dir, engine)
        ready_engine(engine, lambda line: print(line, flush=True))  # `recsys run` does this before it calls here
        _finish_at_exit(engine, settings)  # and `recsys run` this after Bytewax returns
    # before the catalog bootstrap and the re-send below: what they send may include answers to
    # searches that waited in state (until 2026-12-06 a restart after the topic was deleted, or
    # renamed with a new recovery directory, failed here, at every start)
    ensure_search_results_topic(clients, settings)
    boot = bootstrap_catalog(engine, clients, settings.catalog_topic, dead_letters_topic=settings.dead_letters_topic,
                             recommendations_topic=settings.recommendations_topic,
                             search_results_topic=settings.search_results_topic if engine.search.respond else None)
    report(boot)
    resend_unsent(engine, clients, settings)
    # issue 13: the query model now, not on the first search (seconds, with every event behind
    # that search waiting); BM25 is current after every catalog upsert
    engine.search.warm_up()
    metrics = FlowMetrics(settings)
    metrics.kept_back.inc(engine.totals.get("sent_before_rebuild", 0))  # the bootstrap's, before the flow's
    metrics.tick(engine)  # gauges filled before the first scrape
    if (url := metrics.serve()) is not None:
        print(f"metrics: {url}", flush=True)
    # one consumer for every partition of every topic this process reads: one fetch request for
    # all, one network thread (each consumer's cost ~5% of a core idle; README, Performance)
    consumers = SharedConsumers()
    # ... but the catalog's: it hands a batch at most catalog_poll_max_records records, so a bulk
    # import of new text (embedded in the batch, ~3 ms an item) holds the events behind it for a
    # slice's embedding, not a whole poll's (1,000 records: ~3 s). One consumer cannot hand one
    # partition less than another: a poll that filled the catalog's buffer would hold every
    # partition's next poll until the slices drained it. Measured (README, "Catalog import into
    # a running flow"): an idle flow +4-5% of a core (its fetch round trips); a 100 ms long poll
    # for it cost +1.3% but new items took twice as long to be recommended (p50 56 -> 134 ms)
    catalog = KafkaSource.from_settings(clients, settings.catalog_topic, settings, consumers=consumers,
                                        poll_max_records=settings.catalog_poll_max_records)
    events = KafkaSource.from_settings(clients, settings.events_topic, settings, sharded=True, consumers=consumers)
    # erasure requests: every shard reads the whole control topic; a missing topic only means
    # none was ever sent, so it is created (one partition keeps requests in order)
    ensure_topics(clients, {settings.control_topic: 1})
    # resumed no earlier than what the engine committed with the requests' effects: a recovery
    # directory from before the flow had one input holds no control offsets (dataflows.flow.Inputs)
    requests = KafkaSource.from_settings(clients, settings.control_topic, settings, consumers=consumers)
    for source in (catalog, events, requests):
        source.on_partitions_added = on_partitions_added
    control = ResumeAtLeast(requests,
                            {part_name(t, p): o + 1 for (t, p), o in engine.positions.items() if t == settings.control_topic})
    exchange = exchange_out = None
    observer: Any = metrics
    if engine.exchange is not None:  # issue 11: the exchange log, read whole from the position in state
        ensure_topics(clients, {settings.exchange_topic: 1})  # one partition: one total order
        log = KafkaSource.from_settings(clients, settings.exchange_topic, settings, consumers=consumers)
        log.on_offset_reset = "fail"  # skipping exchange records would part the shards' signals for good
        exchange = stoppable(ResumeAtLeast(log, {part_name(settings.exchange_topic, 0): engine.exchange.position + 1}), stop)
        exchange_out = KafkaSink(clients, settings.exchange_topic, ordered=True)  # seq order = log order
        if settings.exchange_snapshot_dir and settings.exchange_snapshot_interval_s > 0:  # for shards started later
            observer = SnapshotObserver(metrics, SnapshotWriter(settings.exchange_snapshot_dir, settings.exchange_topic,
                                                                settings.exchange_snapshot_interval_s, origin=settings.shard))

    return build_flow(
        "recsys_live",
        events=stoppable(Watched(events, settings.events_topic, metrics), stop),
        catalog=stoppable(Watched(ResumeAtLeast(catalog, boot.parts()), settings.catalog_topic, metrics), stop),
        # the timer rides on the control source (dataflows.flow.Ticking); a run to the end seen at
        # start ends when its sources do and has none (nothing waits there either: Shard turns
        # the unknown-item wait off for it)
        control=stoppable(control if settings.stop_at_end else Ticking(control, TICK_INTERVAL_S), stop),
        observer=observer,
        recommendations=KafkaSink(clients, settings.recommendations_topic),
        dead_letters=KafkaSink(clients, settings.dead_letters_topic),
        search_results=KafkaSink(clients, settings.search_results_topic),  # issue 13
        exchange=exchange,
        exchange_out=exchange_out,
        shard_factory=lambda: engine,
    )


def _refuse_under_runner(message: str) -> NoReturn:
    """One line on stderr and exit status 1: how the flow refuses to start under Bytewax's own
    runner (``recsys run`` says ``recsys run: ...``)."""
    print(f"python -m bytewax.run dataflows.live:live_flow: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def _check_broker_or_exit(settings: Settings) -> None:
    """Under Bytewax's own runner, the check ``recsys run`` makes first: a broker answers and has
    the topics the flow needs (the search-results and control topics it creates itself). Until
    2026-12-06 (forty-third session) a broker that was down was found after the model had loaded
    (~30 s), in a traceback."""
    from dataflows.kafka_io import BROKER_PROBE_TIMEOUT_S, BrokerCheckError, check_broker, required_topics

    try:
        check_broker(settings, required_topics(settings), timeout_s=BROKER_PROBE_TIMEOUT_S,
                     missing_hint="create them (`recsys run --create-topics` creates them) or name existing "
                                  "ones with the RECSYS_*_TOPIC variables")
    except BrokerCheckError as exc:
        _refuse_under_runner(str(exc))


def _check_recovery_topics_or_exit(settings: Settings, recovery_dir: str) -> None:
    """Under Bytewax's own runner, before the engine opens, the check ``recsys run`` makes first
    against its recovery directory (:func:`dataflows.runner.check_recovery_topics`): refused in
    one line, exit status 1. Until 2026-12-06 (forty-third session) that runner started without
    it, and a renamed topic stopped in Bytewax's "routing map" panic at every start."""
    from dataflows.runner import RecoveryTopicsError, check_recovery_topics

    reads, writes = flow_topics(settings)
    try:
        check_recovery_topics(recovery_dir, reads=reads, writes=writes, state_dir=settings.state_dir,
                              exchange_topic=settings.exchange_topic)
    except RecoveryTopicsError as exc:
        _refuse_under_runner(str(exc))


def _check_state_or_exit(settings: Settings, recovery_dir: str, engine: Shard) -> None:
    """Under Bytewax's own runner, once the engine is open, ``recsys run``'s second check
    (:func:`dataflows.runner.check_state_against_recovery`): refused in one line, exit status 1,
    the engine closed. Until 2026-12-06 a state directory lost beside its recovery directory
    skipped every message below the recovered offsets for good, silently."""
    from dataflows.runner import StateBehindRecoveryError, check_state_against_recovery

    try:
        check_state_against_recovery(engine.positions, recovery_dir, state_dir=settings.state_dir,
                                     legacy_watermarks=engine.watermarks)
    except StateBehindRecoveryError as exc:
        engine.close()
        # `recsys run --rebuild-state` deletes RECSYS_RECOVERY_DIR, which need not be this -r
        _refuse_under_runner(f"{exc} Under Bytewax's runner, rebuild by deleting both directories and initialising "
                             f"{recovery_dir} again (`python -m bytewax.recovery {recovery_dir} 1`).")


def flow_topics(settings: Settings) -> tuple[set[str], set[str]]:
    """The Kafka topics :func:`live_flow` reads and writes with these settings, as ``(reads,
    writes)`` (what :func:`dataflows.runner.check_recovery_topics` compares a recovery directory
    with, before the engine opens; a live engine has the exchange exactly when
    ``share_signals`` is on). Keep it in step with the sources and sinks above: a test walks the
    built graph and compares (``tests/test_pipeline.py``)."""
    reads = {settings.events_topic, settings.catalog_topic, settings.control_topic}
    writes = {settings.recommendations_topic, settings.dead_letters_topic, settings.search_results_topic}
    if settings.share_signals:
        reads.add(settings.exchange_topic)
        writes.add(settings.exchange_topic)
    return reads, writes


def ensure_search_results_topic(clients: Any, settings: Settings) -> None:
    """Create the search-results topic (issue 13) when it is missing, with the events topic's
    partition count: a deployment from before search, or one restarted with another
    ``--search-results-topic``, gains it instead of failing its first answer. Called before
    anything is sent at start (the exchange catch-up, the catalog bootstrap, the re-send of
    unsent outputs), since those may send answers to searches that waited in state."""
    ensure_topics(clients, {settings.search_results_topic: _partitions_of(clients, settings.events_topic)})


def _partitions_of(clients: Any, topic: str) -> int:
    """How many partitions ``topic`` has (1 when it cannot be told)."""
    consumer = clients.consumer()
    try:
        return len(consumer.partitions_for_topic(topic) or ()) or 1
    finally:
        consumer.close()
