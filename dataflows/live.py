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
import threading
from typing import Any

from bytewax.dataflow import Dataflow

from dataflows.catalog_table import ResumeAtLeast, bootstrap_catalog, report
from dataflows.flow import Ticks, build_flow
from dataflows.kafka_io import KafkaClients, KafkaSink, KafkaSource, ensure_topics, part_name
from dataflows.metrics import FlowMetrics, Watched
from recsys.items.catalog import read_catalog_file
from recsys.settings import Settings
from recsys.shard.step import Shard

#: The timer of a flow that runs until stopped: the precision of the unknown-item wait's
#: deadline on an idle stream, and of the metrics' refresh. A tick costs microseconds.
TICK_INTERVAL_S = 0.25


def shard_factory(settings: Settings, *, evaluate: bool = False, in_memory: bool = False):
    """A zero-argument callable that opens the engine and loads the start-up catalog file."""

    def build() -> Shard:
        engine = Shard.open(settings, evaluate=evaluate, in_memory=in_memory)
        if settings.catalog_file:
            engine.upsert_catalog(read_catalog_file(settings.catalog_file), progress=True)
        settle_heap()
        return engine

    return build


def settle_heap() -> None:
    """Hide everything alive now (imported modules, the catalog, loaded state) from Python's
    cyclic garbage collector. Its full passes scan every tracked object: with torch,
    sentence-transformers and a catalog loaded that is ~0.5 s during which the stream stands
    still, the worst of the latency tail. Start-up objects live as long as the process, so
    scanning them again and again finds nothing (``gc.freeze``, Python >= 3.7)."""
    gc.collect()
    gc.freeze()


def live_flow(
    settings: Settings | None = None, clients: Any = None, engine: Shard | None = None, stop: Any = None
) -> Dataflow:
    """The production graph over Kafka (or any object with the same client surface).

    ``engine``: an engine already opened in this process (the CLI opens it first so that the
    model and catalog are loaded before the first message); otherwise it is opened here.
    ``settings`` given are used as they are; read from the environment, they are this shard's
    (:meth:`Settings.for_shard`: with ``RECSYS_SHARDS`` > 1, per-shard state directories).
    ``stop``: a ``threading.Event``; once set, every source (the timer too) ends its input
    and the flow stops in order (:class:`dataflows.runner.StopSignals`).

    Before the graph is built the catalog topic is read to its high watermark into the engine
    (:mod:`dataflows.catalog_table`): the catalog is a table bootstrapped before any event,
    and the catalog source resumes where that read stopped.
    """
    from dataflows.runner import StopSignals, stoppable

    if settings is None and stop is None and threading.current_thread() is threading.main_thread():
        # built by `python -m bytewax.run dataflows.live:live_flow`: Ctrl-C and SIGTERM stop
        # in order there too, instead of through a Rust panic (dataflows/runner.py)
        stop = StopSignals().running().requested
    settings = settings or Settings.from_env(os.environ).for_shard()
    clients = clients if clients is not None else KafkaClients(settings)
    # Opened here, not lazily in the worker: the bootstrap needs it before the sources start.
    engine = engine if engine is not None else shard_factory(settings)()
    boot = bootstrap_catalog(engine, clients, settings.catalog_topic, dead_letters_topic=settings.dead_letters_topic,
                             recommendations_topic=settings.recommendations_topic)
    report(boot)
    metrics = FlowMetrics(settings)
    metrics.tick(engine)  # gauges filled before the first scrape
    if (url := metrics.serve()) is not None:
        print(f"metrics: {url}", flush=True)
    catalog = KafkaSource.from_settings(clients, settings.catalog_topic, settings)
    events = KafkaSource.from_settings(clients, settings.events_topic, settings, sharded=True)
    # erasure requests: every shard reads the whole control topic; a missing topic only means
    # none was ever sent, so it is created (one partition keeps requests in order)
    ensure_topics(clients, {settings.control_topic: 1})
    # answers to search events (issue 13): created like the events topic when missing, so a
    # deployment from before search gains the topic instead of failing its first search
    ensure_topics(clients, {settings.search_results_topic: _partitions_of(clients, settings.events_topic)})
    control = KafkaSource.from_settings(clients, settings.control_topic, settings)
    exchange = exchange_out = None
    if engine.exchange is not None:  # issue 11: the exchange log, read whole from the position in state
        ensure_topics(clients, {settings.exchange_topic: 1})  # one partition: one total order
        log = KafkaSource.from_settings(clients, settings.exchange_topic, settings)
        exchange = stoppable(ResumeAtLeast(log, {part_name(settings.exchange_topic, 0): engine.exchange.position + 1}), stop)
        exchange_out = KafkaSink(clients, settings.exchange_topic)

    return build_flow(
        "recsys_live",
        events=stoppable(Watched(events, settings.events_topic, metrics), stop),
        catalog=stoppable(Watched(ResumeAtLeast(catalog, boot.parts()), settings.catalog_topic, metrics), stop),
        control=stoppable(control, stop),
        observer=metrics,
        recommendations=KafkaSink(clients, settings.recommendations_topic),
        dead_letters=KafkaSink(clients, settings.dead_letters_topic),
        search_results=KafkaSink(clients, settings.search_results_topic),  # issue 13
        exchange=exchange,
        exchange_out=exchange_out,
        shard_factory=lambda: engine,
        # a run to the end seen at start ends when its sources do: it has no timer (nothing
        # waits there either: Shard turns the unknown-item wait off for it)
        ticks=None if settings.stop_at_end else Ticks(TICK_INTERVAL_S, stop),
    )


def _partitions_of(clients: Any, topic: str) -> int:
    """How many partitions ``topic`` has (1 when it cannot be told)."""
    consumer = clients.consumer()
    try:
        return len(consumer.partitions_for_topic(topic) or ()) or 1
    finally:
        consumer.close()
